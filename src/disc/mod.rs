//! GANPO's discriminators: the transformer discriminator of the paper and a small MLP, both
//! with torch-exact spectral normalisation and differentiable layer norm and softmax.

pub mod fused_layer;
pub mod layers;
pub mod mlp;
pub mod transformer;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

pub use mlp::{MlpDisc, MlpDiscConfig};
pub use transformer::{TransformerDisc, TransformerDiscConfig};

use crate::{Error, Result};

/// Which positions the discriminator's mean pool covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Every position, padding included: what the reference implementation does.
    #[default]
    All,
    /// Real tokens only (the attention mask).
    Tokens,
    /// Completion tokens only (the completion mask).
    Completion,
}

impl Pooling {
    /// Parses `all`, `tokens`, `completion`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "all" => Ok(Self::All),
            "tokens" => Ok(Self::Tokens),
            "completion" => Ok(Self::Completion),
            other => Err(Error::invalid(format!(
                "unknown pooling `{other}`; known: all, tokens, completion"
            ))),
        }
    }
}

/// Mean over positions of `x` `[N, T, d]`, weighted by `mask` `[N, T]` when given (rows with
/// an empty mask pool to zero).
pub fn pool(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(x.mean(1)?);
    };
    let (n, t, _) = x.dims3()?;
    if mask.dims() != [n, t] {
        return Err(Error::ShapeMismatch {
            name: "discriminator pooling mask".into(),
            expected: vec![n, t],
            got: mask.dims().to_vec(),
        });
    }
    let mask = mask.to_dtype(x.dtype())?;
    let summed = x.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let count = mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?;
    Ok(summed.broadcast_div(&count)?)
}

/// A GANPO discriminator: maps hidden states `[N, T, d]` to one logit per sequence `[N]`.
#[derive(Debug)]
pub enum Discriminator {
    /// The paper's transformer discriminator.
    Transformer(TransformerDisc),
    /// A small MLP over the pooled states.
    Mlp(MlpDisc),
}

impl Discriminator {
    /// The paper's transformer discriminator with GANPO.md's sizes for width `input_dim`.
    pub fn transformer(cfg: TransformerDiscConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(Self::Transformer(TransformerDisc::new(cfg, seed, device)?))
    }

    /// An MLP discriminator.
    pub fn mlp(cfg: MlpDiscConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(Self::Mlp(MlpDisc::new(cfg, seed, device)?))
    }

    /// Scores `[N]`; `mask` `[N, T]` restricts the mean pool; `train` enables dropout and the
    /// spectral-norm power iteration.
    pub fn forward(&self, h: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        match self {
            Self::Transformer(d) => d.forward(h, mask, train),
            Self::Mlp(d) => d.forward(h, mask, train),
        }
    }

    /// Scores with the discriminator frozen: its parameters enter the graph detached, so a
    /// backward reaches the input states but none of its weights (GANPO's generator term,
    /// which the reference code computes in eval mode: `train` false).
    pub fn forward_frozen(&self, h: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let pass = layers::Pass {
            train,
            frozen: true,
            composed: false,
        };
        match self {
            Self::Transformer(d) => d.forward_pass(h, mask, pass),
            Self::Mlp(d) => d.forward_pass(h, mask, pass),
        }
    }

    /// Trainable parameters with torch-style names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Self::Transformer(d) => d.vars(),
            Self::Mlp(d) => d.vars(),
        }
    }

    /// Parameters and spectral-norm buffers, for checkpoints.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        out.extend(match self {
            Self::Transformer(d) => d.buffers()?,
            Self::Mlp(d) => d.buffers()?,
        });
        Ok(out)
    }

    /// Overwrites parameters and buffers from `tensors` (torch-style names). Every parameter
    /// and buffer must be present with its exact shape; `source` names the file in errors.
    pub fn load_named_tensors(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        let fetch = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                path: source.to_path_buf(),
            })?;
            if t.dims() != like.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: like.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_device(like.device())?)
        };

        for (name, var) in self.vars() {
            var.set(&fetch(&name, var.as_tensor())?)?;
        }
        let layers: Vec<(String, &layers::SnLinear)> = match self {
            Self::Transformer(d) => d
                .sn_layers()
                .into_iter()
                .map(|(n, l)| (n.into(), l))
                .collect(),
            Self::Mlp(d) => d.sn_layers(),
        };
        for (prefix, layer) in layers {
            let current = layer.buffers(&prefix)?;
            if current.len() == 2 {
                let u = fetch(&current[0].0, &current[0].1)?;
                let v = fetch(&current[1].0, &current[1].1)?;
                layer.set_buffers(u, v)?;
            }
        }
        Ok(())
    }

    /// The dropout generator's exact state `(seed, word position)`, for checkpoints.
    pub fn rng_state(&self) -> Result<([u8; 32], u128)> {
        let rng = self
            .rng()
            .lock()
            .map_err(|_| Error::invalid("dropout RNG lock poisoned"))?;
        Ok((rng.get_seed(), rng.get_word_pos()))
    }

    /// Restores a state from [`Discriminator::rng_state`].
    pub fn set_rng_state(&self, seed: [u8; 32], word_pos: u128) -> Result<()> {
        use rand::SeedableRng;
        let mut rng = self
            .rng()
            .lock()
            .map_err(|_| Error::invalid("dropout RNG lock poisoned"))?;
        *rng = ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(word_pos);
        Ok(())
    }

    fn rng(&self) -> &std::sync::Mutex<ChaCha8Rng> {
        match self {
            Self::Transformer(d) => d.rng(),
            Self::Mlp(d) => d.rng(),
        }
    }
}
