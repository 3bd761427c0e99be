//! Differentiable transformer layers built from candle ops that all have a backward pass:
//! RMSNorm, rotary embeddings, grouped-query attention with masking, softmax and gated MLPs.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rotary_emb` have no backward; they are
//! used here only on the `fused` paths, which callers take when no gradient is needed.

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, RopeConfig, RopeScaling};
use crate::Result;

/// A dense projection `y = x W^T + b` with `W` of shape `[out, in]` (the PyTorch layout).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `[out, in]`.
    pub weight: Tensor,
    /// The optional bias, `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the projection to `x` of shape `[.., in]`, returning `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused::supported(x) && self.weight.dtype() == DType::F32 && x.rank() > 0 {
            return Ok(match &self.bias {
                Some(bias) if bias.dtype() == DType::F32 => {
                    super::fused::linear_bias(x, &self.weight, bias)?
                }
                Some(bias) => super::fused::linear(x, &self.weight)?.broadcast_add(bias)?,
                None => super::fused::linear(x, &self.weight)?,
            });
        }
        let dims = x.dims();
        let features = dims[dims.len() - 1];
        let rows = x.elem_count() / features.max(1);

        let flat = x.reshape((rows, features))?;
        let mut y = flat.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }

        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dim") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// RMSNorm over the last dimension, in f32 whatever the input dtype (as transformers does).
///
/// With `gemma = true` the scale is `(1 + w)` applied before casting back (Gemma's
/// convention); otherwise `w` multiplies the result cast back to the input dtype (Llama's).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, gemma: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;

    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    let normed = x32.broadcast_mul(&inv_rms)?;

    if gemma {
        let scale = (weight.to_dtype(DType::F32)? + 1.0)?;
        Ok(normed.broadcast_mul(&scale)?.to_dtype(dtype)?)
    } else {
        Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
    }
}

/// The same as [`rms_norm`] through candle's fused kernel: no backward, inference only.
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64, gemma: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = &x.contiguous()?;
    if gemma {
        let scale = (weight.to_dtype(DType::F32)? + 1.0)?;
        let x32 = x.to_dtype(DType::F32)?;
        Ok(candle_nn::ops::rms_norm(&x32, &scale, eps as f32)?.to_dtype(dtype)?)
    } else if dtype == DType::F32 {
        Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?)
    } else {
        let w32 = weight.to_dtype(DType::F32)?;
        let normed =
            candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &w32.ones_like()?, eps as f32)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
    }
}

/// Softmax over the last dimension from differentiable ops.
///
/// The row maximum is detached: softmax does not depend on the shift, so no gradient needs to
/// flow through it, which saves the max's backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&sum)?)
}

/// The gated MLP nonlinearity applied to the gate projection, by composed candle ops.
pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    Ok(match activation {
        Activation::Silu => x.silu()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::GeluErf => x.gelu_erf()?,
    })
}

/// `act(x)`, through the fused CPU kernel when it applies.
pub fn activation(x: &Tensor, activation: Activation) -> Result<Tensor> {
    if super::fused::supported(x) {
        return Ok(super::fused::activation(x, activation)?);
    }
    activate(x, activation)
}

/// The gated MLP's `act(gate) * up`, through the fused CPU kernel when it applies.
pub fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    if super::fused::supported(gate) && up.dtype() == DType::F32 {
        return Ok(super::fused::gated_activation(gate, up, activation)?);
    }
    Ok((activate(gate, activation)? * up)?)
}

/// `tanh(x / cap) * cap`: Gemma 2's soft-capping of attention and output logits.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// The rotary inverse frequencies of a head of width `head_dim`, rescaled as configured.
pub fn inverse_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (rope.theta as f32).powf(exponent) as f64
        })
        .collect();

    let scaled = match &rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: original,
        } => {
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            base.iter()
                .map(|&freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// Cosine and sine tables for the given positions.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    /// `[N or 1, 1, T, head_dim]`.
    pub cos: Tensor,
    /// `[N or 1, 1, T, head_dim]`.
    pub sin: Tensor,
}

impl RotaryTables {
    /// Tables for `positions` (u32, `[N, T]`), in `dtype`, computed in f32.
    pub fn new(
        rope: &RopeConfig,
        head_dim: usize,
        positions: &Tensor,
        dtype: DType,
    ) -> Result<Self> {
        let device = positions.device();
        let inv_freq = inverse_frequencies(rope, head_dim);
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, head_dim / 2), device)?;

        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;

        Ok(Self {
            cos: emb.cos()?.to_dtype(dtype)?,
            sin: emb.sin()?.to_dtype(dtype)?,
        })
    }

    /// Tables for positions `0..len`, shared by every row.
    pub fn for_len(
        rope: &RopeConfig,
        head_dim: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let positions = Tensor::arange(0u32, len as u32, device)?.unsqueeze(0)?;
        Self::new(rope, head_dim, &positions, dtype)
    }

    /// Rotates `x` of shape `[N, T, H, head_dim]` in that layout through the fused CPU kernel,
    /// or returns `None` where it does not apply (not f32 on the CPU, or per-row tables).
    pub fn rotate_heads_last(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !super::fused::supported(x) || self.cos.dim(0)? != 1 {
            return Ok(None);
        }
        let (_, _, t, d) = self.cos.dims4()?;
        let cos = self.cos.reshape((t, d))?;
        let sin = self.sin.reshape((t, d))?;
        Ok(Some(super::fused::rope(x, &cos, &sin)?))
    }

    /// Rotates `x` of shape `[N, T, H, head_dim]` and returns it as `[N, H, T, head_dim]`,
    /// through the fused CPU kernel when it applies (f32 on the CPU, tables shared by all rows).
    pub fn apply_before_transpose(&self, x: &Tensor) -> Result<Tensor> {
        match self.rotate_heads_last(x)? {
            Some(rotated) => Ok(rotated.transpose(1, 2)?),
            None => self.apply(&x.transpose(1, 2)?),
        }
    }

    /// Rotates `x` of shape `[N, H, T, head_dim]` (the rotate-half convention of transformers).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;

        let a = x.broadcast_mul(&self.cos)?;
        let b = rotated.broadcast_mul(&self.sin)?;
        Ok((a + b)?)
    }
}

/// Scaled dot-product attention with grouped-query heads and an additive mask.
///
/// `q` is `[N, H, T, d]` (already scaled), `k` and `v` are `[N, KV, S, d]` with `H` a
/// multiple of `KV`; `bias` is `[N, 1, T, S]` (0 where allowed, a large negative value where
/// masked). Key/value heads are shared without being copied: query heads of one group are
/// stacked along the time axis. Returns `[N, T, H * d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    softcap: Option<f64>,
    fused: bool,
) -> Result<Tensor> {
    let (n, h, t, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    let rep = h / kv;

    let q = q.contiguous()?.reshape((n, kv, rep * t, d))?;
    let mut scores = q
        .matmul(&k.contiguous()?.t()?)?
        .reshape((n, kv, rep, t, s))?;
    if let Some(cap) = softcap {
        scores = soft_cap(&scores, cap)?;
    }
    let dtype = scores.dtype();
    let probs = if !fused && super::fused::supported(&scores) && bias.dtype() == DType::F32 {
        // The mask enters the softmax kernel: no masked-scores tensor, no gradient for it.
        let scores = scores.reshape((n, kv * rep, t, s))?;
        super::fused::softmax_with_bias(&scores, bias)?
    } else {
        let scores = scores
            .broadcast_add(&bias.unsqueeze(1)?)?
            .to_dtype(DType::F32)?;
        if fused {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            softmax_last_dim(&scores)?
        }
    };
    let probs = probs.to_dtype(dtype)?.reshape((n, kv, rep * t, s))?;

    let out = probs.matmul(&v.contiguous()?)?.reshape((n, h, t, d))?;
    Ok(out.transpose(1, 2)?.reshape((n, t, h * d))?)
}

/// The most negative finite value of `dtype`, used to mask attention scores.
pub fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        _ => f32::MIN,
    }
}

/// The additive attention bias for queries at absolute positions `offset..offset + t` over
/// keys `0..S`, where `key_real[r][j]` says whether key `j` of row `r` is a real token.
///
/// A real query at `i` sees real keys `j <= i` and, with a `window`, only those with
/// `i - j < window`. A padding query sees only itself, so no row is ever fully masked (no NaN)
/// and padding never reaches a real token, whether the batch is padded right or left.
/// Returns `[N, 1, t, S]`.
pub fn attention_bias(
    key_real: &[Vec<bool>],
    offset: usize,
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let masked = mask_value(dtype);
    let s = key_real.first().map_or(0, Vec::len);
    let mut data = vec![0f32; key_real.len() * t * s];
    for (row, real) in key_real.iter().enumerate() {
        let block = &mut data[row * t * s..(row + 1) * t * s];
        for q in 0..t {
            let i = q + offset;
            let query_real = real.get(i).copied().unwrap_or(true);
            for (j, &key_is_real) in real.iter().enumerate() {
                let allowed = if query_real {
                    key_is_real && j <= i && window.is_none_or(|w| i - j < w)
                } else {
                    i == j
                };
                if !allowed {
                    block[q * s + j] = masked;
                }
            }
        }
    }
    let bias = Tensor::from_vec(data, (key_real.len(), 1, t, s), device)?;
    Ok(bias.to_dtype(dtype)?)
}
