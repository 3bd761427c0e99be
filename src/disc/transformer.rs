//! GANPO's transformer discriminator: SN input projection, learned positions, a pre-norm
//! encoder, a masked mean pool and an SN head.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::fused_layer::{self, EncoderLayerSpec};
use super::layers::{
    dropout, dropout_seed, gelu, linear, normal, softmax_last, xavier_uniform, LayerNorm, Pass,
    SnLinear,
};
use super::pool;
use crate::model::fused;
use crate::model::fused_attention::{self, AttentionDropout};
use crate::{Error, Result};

/// Sizes of the transformer discriminator (defaults: GANPO.md).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerDiscConfig {
    /// Width of the hidden states fed in (the policy's `hidden_size`).
    pub input_dim: usize,
    /// Model width (512).
    pub d_model: usize,
    /// Attention heads (8).
    pub heads: usize,
    /// Encoder layers (2).
    pub layers: usize,
    /// FFN width (2048).
    pub ffn_dim: usize,
    /// Dropout in training (0.1): attention weights, attention output, FFN inner, FFN output.
    pub dropout: f64,
    /// Learned positions; longer inputs are cut to their first `max_positions` (2048).
    pub max_positions: usize,
    /// Spectral normalisation of the input projection and head layers (true).
    pub spectral_norm: bool,
}

impl TransformerDiscConfig {
    /// GANPO.md's sizes for hidden states of width `input_dim`.
    pub fn new(input_dim: usize) -> Self {
        Self {
            input_dim,
            d_model: 512,
            heads: 8,
            layers: 2,
            ffn_dim: 2048,
            dropout: 0.1,
            max_positions: 2048,
            spectral_norm: true,
        }
    }
}

/// One pre-norm encoder layer (torch's `TransformerEncoderLayer` with `norm_first=True`,
/// GELU, `batch_first=True`).
#[derive(Debug)]
struct EncoderLayer {
    in_proj_weight: Var,
    in_proj_bias: Var,
    out_proj_weight: Var,
    out_proj_bias: Var,
    linear1_weight: Var,
    linear1_bias: Var,
    linear2_weight: Var,
    linear2_bias: Var,
    norm1: LayerNorm,
    norm2: LayerNorm,
    dropout: f64,
}

impl EncoderLayer {
    fn new(rng: &mut ChaCha8Rng, cfg: &TransformerDiscConfig, device: &Device) -> Result<Self> {
        let d = cfg.d_model;
        let zeros = |n: usize| Var::zeros(n, DType::F32, device);
        Ok(Self {
            in_proj_weight: Var::from_tensor(&xavier_uniform(rng, 3 * d, d, device)?)?,
            in_proj_bias: zeros(3 * d)?,
            out_proj_weight: Var::from_tensor(&xavier_uniform(rng, d, d, device)?)?,
            out_proj_bias: zeros(d)?,
            linear1_weight: Var::from_tensor(&xavier_uniform(rng, cfg.ffn_dim, d, device)?)?,
            linear1_bias: zeros(cfg.ffn_dim)?,
            linear2_weight: Var::from_tensor(&xavier_uniform(rng, d, cfg.ffn_dim, device)?)?,
            linear2_bias: zeros(d)?,
            norm1: LayerNorm::new(d, device)?,
            norm2: LayerNorm::new(d, device)?,
            dropout: cfg.dropout,
        })
    }

    fn attention(
        &self,
        x: &Tensor,
        heads: usize,
        pass: Pass,
        p: f64,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        let dh = d / heads;
        if fused::supported(x) {
            return self.fused_attention(x, heads, pass, p, rng);
        }
        let qkv = linear(
            x,
            &pass.param(&self.in_proj_weight),
            Some(&pass.param(&self.in_proj_bias)),
        )?;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * d, d)?
                .reshape((n, t, heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);

        let scores = q
            .affine(1.0 / (dh as f64).sqrt(), 0.0)?
            .matmul(&k.t()?.contiguous()?)?;
        let weights = dropout(&softmax_last(&scores)?, p, rng)?;
        let attended = weights.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))?;

        linear(
            &attended,
            &pass.param(&self.out_proj_weight),
            Some(&pass.param(&self.out_proj_bias)),
        )
    }

    /// [`EncoderLayer::attention`] through the fused kernel: three projections from row
    /// blocks of the packed input weight, and one attention node.
    fn fused_attention(
        &self,
        x: &Tensor,
        heads: usize,
        pass: Pass,
        p: f64,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        let dh = d / heads;
        let (w, b) = (
            pass.param(&self.in_proj_weight),
            pass.param(&self.in_proj_bias),
        );
        let project = |i: usize| -> Result<Tensor> {
            let y = linear(x, &w.narrow(0, i * d, d)?, Some(&b.narrow(0, i * d, d)?))?;
            Ok(y.reshape((n, t, heads, dh))?)
        };
        let (q, k, v) = (project(0)?, project(1)?, project(2)?);
        let dropout = if p > 0.0 {
            Some(AttentionDropout {
                p: p as f32,
                seed: dropout_seed(rng)?,
            })
        } else {
            None
        };
        let scale = 1.0 / (dh as f64).sqrt();
        let attended = fused_attention::attention(&q, &k, &v, None, scale, dropout)?;
        linear(
            &attended,
            &pass.param(&self.out_proj_weight),
            Some(&pass.param(&self.out_proj_bias)),
        )
    }

    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        pass: Pass,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Result<Tensor> {
        let p = if pass.train { self.dropout } else { 0.0 };
        if fused::supported(x) && !pass.composed {
            return self.fused_forward(x, heads, pass, p, rng);
        }
        let attended = self.attention(&self.norm1.forward(x, pass)?, heads, pass, p, rng)?;
        let x = x.add(&dropout(&attended, p, rng)?)?;

        let inner = gelu(&linear(
            &self.norm2.forward(&x, pass)?,
            &pass.param(&self.linear1_weight),
            Some(&pass.param(&self.linear1_bias)),
        )?)?;
        let inner = dropout(&inner, p, rng)?;
        let out = linear(
            &inner,
            &pass.param(&self.linear2_weight),
            Some(&pass.param(&self.linear2_bias)),
        )?;
        Ok(x.add(&dropout(&out, p, rng)?)?)
    }

    /// [`EncoderLayer::forward`] as one fused node: the parameters concatenated in
    /// [`fused_layer::FLAT_ORDER`], dropout seeds drawn in the composed layer's order.
    fn fused_forward(
        &self,
        x: &Tensor,
        heads: usize,
        pass: Pass,
        p: f64,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Result<Tensor> {
        let tensors = [
            &self.in_proj_weight,
            &self.in_proj_bias,
            &self.out_proj_weight,
            &self.out_proj_bias,
            &self.linear1_weight,
            &self.linear1_bias,
            &self.linear2_weight,
            &self.linear2_bias,
            &self.norm1.weight,
            &self.norm1.bias,
            &self.norm2.weight,
            &self.norm2.bias,
        ]
        .map(|var| pass.param(var).flatten_all());
        let flat = Tensor::cat(
            &tensors
                .into_iter()
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let dropout = if p > 0.0 {
            let mut seeds = [0u64; 4];
            for seed in &mut seeds {
                *seed = dropout_seed(rng)?;
            }
            Some((p, seeds))
        } else {
            None
        };
        let spec = EncoderLayerSpec {
            d: self.out_proj_weight.dim(0)?,
            heads,
            ffn: self.linear1_weight.dim(0)?,
            eps: (self.norm1.eps, self.norm2.eps),
            dropout,
        };
        Ok(fused_layer::encoder_layer(x, &flat, spec)?)
    }

    fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut v = vec![
            (
                format!("{prefix}.self_attn.in_proj_weight"),
                self.in_proj_weight.clone(),
            ),
            (
                format!("{prefix}.self_attn.in_proj_bias"),
                self.in_proj_bias.clone(),
            ),
            (
                format!("{prefix}.self_attn.out_proj.weight"),
                self.out_proj_weight.clone(),
            ),
            (
                format!("{prefix}.self_attn.out_proj.bias"),
                self.out_proj_bias.clone(),
            ),
            (
                format!("{prefix}.linear1.weight"),
                self.linear1_weight.clone(),
            ),
            (format!("{prefix}.linear1.bias"), self.linear1_bias.clone()),
            (
                format!("{prefix}.linear2.weight"),
                self.linear2_weight.clone(),
            ),
            (format!("{prefix}.linear2.bias"), self.linear2_bias.clone()),
        ];
        v.extend(self.norm1.vars(&format!("{prefix}.norm1")));
        v.extend(self.norm2.vars(&format!("{prefix}.norm2")));
        v
    }
}

/// The transformer discriminator of GANPO.md. Parameter names follow the torch module
/// `input_proj`, `pos_embedding`, `encoder.layers.{i}.…`, `head.0`, `head.2`.
#[derive(Debug)]
pub struct TransformerDisc {
    cfg: TransformerDiscConfig,
    input_proj: SnLinear,
    pos_embedding: Var,
    layers: Vec<EncoderLayer>,
    head_hidden: SnLinear,
    head_out: SnLinear,
    rng: Mutex<ChaCha8Rng>,
}

impl TransformerDisc {
    /// A freshly initialised discriminator; `seed` drives its init and its dropout masks.
    pub fn new(cfg: TransformerDiscConfig, seed: u64, device: &Device) -> Result<Self> {
        if cfg.heads == 0 || cfg.d_model % cfg.heads != 0 {
            return Err(Error::invalid(format!(
                "discriminator d_model {} is not divisible by heads {}",
                cfg.d_model, cfg.heads
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let sn = cfg.spectral_norm;

        let input_proj = SnLinear::new(&mut rng, cfg.input_dim, cfg.d_model, sn, device)?;
        let pos = normal(&mut rng, &[cfg.max_positions, cfg.d_model], 0.02, device)?;
        let layers = (0..cfg.layers)
            .map(|_| EncoderLayer::new(&mut rng, &cfg, device))
            .collect::<Result<Vec<_>>>()?;
        let head_hidden = SnLinear::new(&mut rng, cfg.d_model, cfg.d_model, sn, device)?;
        let head_out = SnLinear::new(&mut rng, cfg.d_model, 1, sn, device)?;

        Ok(Self {
            input_proj,
            pos_embedding: Var::from_tensor(&pos)?,
            layers,
            head_hidden,
            head_out,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d15c)),
            cfg,
        })
    }

    /// The sizes it was built with.
    pub fn config(&self) -> &TransformerDiscConfig {
        &self.cfg
    }

    /// Scores `[N]` for hidden states `h` `[N, T, input_dim]`; `mask` `[N, T]` restricts the
    /// mean pool (None: all positions, the reference code's behaviour). `train` turns on
    /// dropout and one power iteration per spectrally normalised layer.
    pub fn forward(&self, h: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.forward_pass(
            h,
            mask,
            Pass {
                train,
                ..Pass::default()
            },
        )
    }

    /// [`TransformerDisc::forward`] with the parameters as given by `pass`.
    pub fn forward_pass(&self, h: &Tensor, mask: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let (_n, t, d) = h.dims3()?;
        if d != self.cfg.input_dim {
            return Err(Error::ShapeMismatch {
                name: "discriminator input".into(),
                expected: vec![h.dim(0)?, t, self.cfg.input_dim],
                got: h.dims().to_vec(),
            });
        }
        let t = t.min(self.cfg.max_positions);
        let h = h.narrow(1, 0, t)?.to_dtype(DType::F32)?;
        let mask = match mask {
            Some(m) => Some(m.narrow(1, 0, t)?),
            None => None,
        };

        let pos = pass.param(&self.pos_embedding).narrow(0, 0, t)?;
        let mut x = self.input_proj.forward(&h, pass)?.broadcast_add(&pos)?;
        // TODO: attention always spans every position, padding included, as the reference
        // code does; the mask restricts only the pool. A key-padding mask for the `tokens` and
        // `completion` poolings is the natural next option.
        for layer in &self.layers {
            x = layer.forward(&x, self.cfg.heads, pass, &self.rng)?;
        }

        let pooled = pool(&x, mask.as_ref())?;
        let hidden = gelu(&self.head_hidden.forward(&pooled, pass)?)?;
        Ok(self.head_out.forward(&hidden, pass)?.squeeze(1)?)
    }

    /// Trainable parameters with torch-style names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = self.input_proj.vars("input_proj");
        v.push(("pos_embedding".into(), self.pos_embedding.clone()));
        for (i, layer) in self.layers.iter().enumerate() {
            v.extend(layer.vars(&format!("encoder.layers.{i}")));
        }
        v.extend(self.head_hidden.vars("head.0"));
        v.extend(self.head_out.vars("head.2"));
        v
    }

    /// Spectral-norm buffers with torch-style names (`….weight_u`, `….weight_v`).
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut b = self.input_proj.buffers("input_proj")?;
        b.extend(self.head_hidden.buffers("head.0")?);
        b.extend(self.head_out.buffers("head.2")?);
        Ok(b)
    }

    pub(super) fn sn_layers(&self) -> Vec<(&'static str, &SnLinear)> {
        vec![
            ("input_proj", &self.input_proj),
            ("head.0", &self.head_hidden),
            ("head.2", &self.head_out),
        ]
    }

    pub(super) fn rng(&self) -> &Mutex<ChaCha8Rng> {
        &self.rng
    }
}
