//! Differentiable building blocks of the discriminators: linear layers (optionally spectrally
//! normalised), layer norm, softmax, dropout and parameter initialisation.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StandardNormal};

use crate::model::config::Activation;
use crate::model::fused;
use crate::{Error, Result};

/// How a forward pass runs: training mode (dropout, power iteration) and whether the
/// parameters are frozen (used detached, so no gradient reaches them, while gradients still
/// flow into the input: GANPO's generator term).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pass {
    /// Dropout on, one power iteration per spectrally normalised layer.
    pub train: bool,
    /// Parameters enter the graph detached.
    pub frozen: bool,
    /// Run the transformer's encoder layers as composed candle ops even where the fused
    /// kernel applies (f32 on the CPU): the reference the kernel is tested against.
    pub composed: bool,
}

impl Pass {
    /// The tensor of `var` as this pass uses it.
    pub fn param(&self, var: &Var) -> Tensor {
        if self.frozen {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        }
    }
}

/// `eps` of torch's `spectral_norm` in `normalize`.
pub const SPECTRAL_EPS: f64 = 1e-12;

/// A tensor of `shape` drawn uniformly from `[-bound, bound]` by `rng`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..=bound) as f32)
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A tensor of `shape` drawn from N(0, std²) by `rng`.
pub fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dist = Normal::new(0.0f64, std).map_err(|e| Error::invalid(format!("normal: {e}")))?;
    let data: Vec<f32> = (0..n).map(|_| dist.sample(rng) as f32).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Xavier-uniform init of a `[fan_out, fan_in]` weight (torch's `xavier_uniform_`, gain 1).
pub fn xavier_uniform(
    rng: &mut ChaCha8Rng,
    out: usize,
    inp: usize,
    device: &Device,
) -> Result<Tensor> {
    let bound = (6.0 / (inp + out) as f64).sqrt();
    uniform(rng, &[out, inp], bound, device)
}

/// `x / max(‖x‖₂, eps)` for a vector, as torch's `F.normalize(x, dim=0, eps)`.
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let norm = x.sqr()?.sum_all()?.sqrt()?.clamp(eps, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// `(x @ wᵀ) + b` over the last axis of an input of any rank.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fused::supported(x) && w.dtype() == DType::F32 {
        return Ok(match b {
            Some(b) => fused::linear_bias(x, w, b)?,
            None => fused::linear(x, w)?,
        });
    }
    let y = composed_linear(x, w)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

fn composed_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(match x.dims() {
        [n, t, d] => x
            .reshape((n * t, *d))?
            .matmul(&w.t()?)?
            .reshape((*n, *t, w.dim(0)?))?,
        _ => x.matmul(&w.t()?)?,
    })
}

/// Exact (erf) GELU, torch's default `gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    crate::model::layers::activation(x, Activation::GeluErf)
}

/// Softmax over the last axis by differentiable ops (one fused node on the CPU in f32).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::supported(x) {
        return Ok(fused::softmax_last_dim(x)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// A seed for one dropout mask, drawn from the discriminator's generator.
pub fn dropout_seed(rng: &Mutex<ChaCha8Rng>) -> Result<u64> {
    Ok(rng
        .lock()
        .map_err(|_| Error::invalid("dropout RNG lock poisoned"))?
        .random::<u64>())
}

/// Inverted dropout with probability `p`, drawing its mask from `rng` (deterministic given the
/// generator's state, which checkpoints save). On the CPU in f32 the mask is drawn in
/// parallel from one seed taken from `rng`, and kept inside the graph node as bytes.
pub fn dropout(x: &Tensor, p: f64, rng: &Mutex<ChaCha8Rng>) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if fused::supported(x) {
        return Ok(fused::dropout(x, p, dropout_seed(rng)?)?);
    }
    let n = x.elem_count();
    let keep = 1.0 - p;
    let mask: Vec<f32> = {
        let mut rng = rng
            .lock()
            .map_err(|_| Error::invalid("dropout RNG lock poisoned"))?;
        (0..n)
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect()
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Layer normalisation over the last axis (torch's `nn.LayerNorm`, eps 1e-5), differentiable.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale, `[d]`, initialised to ones.
    pub weight: Var,
    /// Shift, `[d]`, initialised to zeros.
    pub bias: Var,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Ones and zeros of width `d`.
    pub fn new(d: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::ones(d, DType::F32, device)?,
            bias: Var::zeros(d, DType::F32, device)?,
            eps: 1e-5,
        })
    }

    /// Normalises `x` over its last axis.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (w, b) = (pass.param(&self.weight), pass.param(&self.bias));
        if fused::supported(x) {
            return Ok(fused::layer_norm(x, &w, &b, self.eps)?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&var.affine(1.0, self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&w)?.broadcast_add(&b)?)
    }

    /// Named parameters under `prefix`.
    pub fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        vec![
            (format!("{prefix}.weight"), self.weight.clone()),
            (format!("{prefix}.bias"), self.bias.clone()),
        ]
    }
}

/// A linear layer whose weight can be spectrally normalised like torch's
/// `torch.nn.utils.spectral_norm` (one power iteration per training forward, persistent
/// `u` and `v`, `eps` 1e-12; evaluation uses the stored vectors without iterating).
#[derive(Debug)]
pub struct SnLinear {
    /// The unnormalised weight `[out, in]` (torch's `weight_orig`, or `weight` when plain).
    pub weight: Var,
    /// Bias `[out]`.
    pub bias: Var,
    /// `(u [out], v [in])` when spectrally normalised.
    pub uv: Option<Mutex<(Tensor, Tensor)>>,
}

impl SnLinear {
    /// Xavier-uniform weight, zero bias; `u`, `v` from N(0, 1) normalised, as torch does.
    pub fn new(
        rng: &mut ChaCha8Rng,
        inp: usize,
        out: usize,
        spectral: bool,
        device: &Device,
    ) -> Result<Self> {
        let weight = Var::from_tensor(&xavier_uniform(rng, out, inp, device)?)?;
        let bias = Var::zeros(out, DType::F32, device)?;
        let uv = if spectral {
            let u = random_unit(rng, out, device)?;
            let v = random_unit(rng, inp, device)?;
            Some(Mutex::new((u, v)))
        } else {
            None
        };
        Ok(Self { weight, bias, uv })
    }

    /// The weight actually applied: `W / σ(W)` with `σ = uᵀ W v` (power-iterated first when
    /// `train`), or `W` for a plain layer.
    pub fn effective_weight(&self, pass: Pass) -> Result<Tensor> {
        let w = &pass.param(&self.weight);
        let Some(uv) = &self.uv else {
            return Ok(w.clone());
        };
        let mut guard = uv
            .lock()
            .map_err(|_| Error::invalid("spectral-norm lock poisoned"))?;

        if pass.train {
            let wd = w.detach();
            let v = l2_normalize(
                &wd.t()?.matmul(&guard.0.unsqueeze(1)?)?.squeeze(1)?,
                SPECTRAL_EPS,
            )?;
            let u = l2_normalize(&wd.matmul(&v.unsqueeze(1)?)?.squeeze(1)?, SPECTRAL_EPS)?;
            *guard = (u, v);
        }

        let (u, v) = (&guard.0, &guard.1);
        let wv = w.matmul(&v.unsqueeze(1)?)?;
        let sigma = u.unsqueeze(0)?.matmul(&wv)?.reshape(())?;
        Ok(w.broadcast_div(&sigma)?)
    }

    /// Applies the layer to the last axis of `x`.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        linear(
            x,
            &self.effective_weight(pass)?,
            Some(&pass.param(&self.bias)),
        )
    }

    /// Named parameters under `prefix` (`weight_orig` when spectral, as torch names it).
    pub fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let w = if self.uv.is_some() {
            "weight_orig"
        } else {
            "weight"
        };
        vec![
            (format!("{prefix}.{w}"), self.weight.clone()),
            (format!("{prefix}.bias"), self.bias.clone()),
        ]
    }

    /// Named buffers (`weight_u`, `weight_v`) under `prefix`.
    pub fn buffers(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let Some(uv) = &self.uv else {
            return Ok(vec![]);
        };
        let guard = uv
            .lock()
            .map_err(|_| Error::invalid("spectral-norm lock poisoned"))?;
        Ok(vec![
            (format!("{prefix}.weight_u"), guard.0.clone()),
            (format!("{prefix}.weight_v"), guard.1.clone()),
        ])
    }

    /// Overwrites the `u` and `v` buffers.
    pub fn set_buffers(&self, u: Tensor, v: Tensor) -> Result<()> {
        if let Some(uv) = &self.uv {
            let mut guard = uv
                .lock()
                .map_err(|_| Error::invalid("spectral-norm lock poisoned"))?;
            *guard = (u, v);
        }
        Ok(())
    }
}

fn random_unit(rng: &mut ChaCha8Rng, n: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let x: f64 = StandardNormal.sample(rng);
            x as f32
        })
        .collect();
    l2_normalize(&Tensor::from_vec(data, n, device)?, SPECTRAL_EPS)
}
