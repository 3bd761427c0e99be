//! A small MLP discriminator: masked mean pool, then SN-Linear → GELU → … → SN-Linear(→1).

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::layers::{dropout, gelu, Pass, SnLinear};
use super::pool;
use crate::{Error, Result};

/// Sizes of the MLP discriminator.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpDiscConfig {
    /// Width of the hidden states fed in.
    pub input_dim: usize,
    /// Width of each hidden layer (256).
    pub hidden_dim: usize,
    /// Hidden layers (2).
    pub hidden_layers: usize,
    /// Dropout after each hidden activation in training (0.1).
    pub dropout: f64,
    /// Spectral normalisation of every linear layer (true).
    pub spectral_norm: bool,
}

impl MlpDiscConfig {
    /// Default sizes for hidden states of width `input_dim`.
    pub fn new(input_dim: usize) -> Self {
        Self {
            input_dim,
            hidden_dim: 256,
            hidden_layers: 2,
            dropout: 0.1,
            spectral_norm: true,
        }
    }
}

/// Pools the hidden states, then scores them with an MLP. Parameter names: `layers.{i}`.
#[derive(Debug)]
pub struct MlpDisc {
    cfg: MlpDiscConfig,
    layers: Vec<SnLinear>,
    rng: Mutex<ChaCha8Rng>,
}

impl MlpDisc {
    /// A freshly initialised MLP discriminator (Xavier-uniform weights, zero biases).
    pub fn new(cfg: MlpDiscConfig, seed: u64, device: &Device) -> Result<Self> {
        if cfg.hidden_layers == 0 {
            return Err(Error::invalid(
                "MLP discriminator needs at least one hidden layer",
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(cfg.hidden_layers + 1);
        let mut width = cfg.input_dim;
        for _ in 0..cfg.hidden_layers {
            layers.push(SnLinear::new(
                &mut rng,
                width,
                cfg.hidden_dim,
                cfg.spectral_norm,
                device,
            )?);
            width = cfg.hidden_dim;
        }
        layers.push(SnLinear::new(
            &mut rng,
            width,
            1,
            cfg.spectral_norm,
            device,
        )?);
        Ok(Self {
            cfg,
            layers,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d15c)),
        })
    }

    /// Scores `[N]` for `h` `[N, T, input_dim]`, mean-pooled over `mask` (or all positions).
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

    /// [`MlpDisc::forward`] with the parameters as given by `pass`.
    pub fn forward_pass(&self, h: &Tensor, mask: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let (n, t, d) = h.dims3()?;
        if d != self.cfg.input_dim {
            return Err(Error::ShapeMismatch {
                name: "discriminator input".into(),
                expected: vec![n, t, self.cfg.input_dim],
                got: h.dims().to_vec(),
            });
        }
        let p = if pass.train { self.cfg.dropout } else { 0.0 };

        let mut x = pool(&h.to_dtype(DType::F32)?, mask)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, pass)?;
            if i < last {
                x = dropout(&gelu(&x)?, p, &self.rng)?;
            }
        }
        Ok(x.squeeze(1)?)
    }

    /// Trainable parameters.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.sn_layers()
            .into_iter()
            .flat_map(|(name, l)| l.vars(&name))
            .collect()
    }

    /// Spectral-norm buffers.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for (name, l) in self.sn_layers() {
            out.extend(l.buffers(&name)?);
        }
        Ok(out)
    }

    pub(super) fn sn_layers(&self) -> Vec<(String, &SnLinear)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("layers.{i}"), l))
            .collect()
    }

    pub(super) fn rng(&self) -> &Mutex<ChaCha8Rng> {
        &self.rng
    }
}
