//! LoRA adapters: low-rank trainable updates on chosen projections, the base weights frozen,
//! merged back into the weights on save.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::decoder::CausalLm;
use crate::{Error, Result};

/// Which projections get adapters and how they are shaped.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` of the update `B A`.
    pub rank: usize,
    /// The scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Dropout applied to the adapter's input in training mode.
    pub dropout: f32,
    /// Projection names to adapt: any of `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// PEFT's common choice: rank 8, alpha 16, no dropout, attention q and v.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// One adapter: `y += (dropout(x) A^T B^T) * alpha / rank`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`, initialised uniformly in `±1/sqrt(in)`.
    pub a: Var,
    /// `[out, rank]`, initialised to zero so the adapted model starts equal to the base.
    pub b: Var,
    /// `alpha / rank`.
    pub scale: f64,
    /// Dropout probability in training mode.
    pub dropout: f32,
}

impl LoraAdapter {
    /// The adapter's contribution for input `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let dims = x.dims().to_vec();
        let features = dims[dims.len() - 1];
        let flat = x.reshape((x.elem_count() / features.max(1), features))?;

        let low = flat.matmul(&self.a.as_tensor().t()?)?;
        let y = (low.matmul(&self.b.as_tensor().t()?)? * self.scale)?;

        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a feature dim") = self.b.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }

    /// The update `B A * scale` in the weight's `[out, in]` layout, detached.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let delta = self.b.as_tensor().matmul(self.a.as_tensor())?;
        Ok((delta * self.scale)?.detach())
    }
}

const MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl CausalLm {
    /// Attaches LoRA adapters to the target projections of every layer. The base weights are
    /// frozen (they leave [`CausalLm::vars`]), and the adapters become the only trainable
    /// parameters, named `model.layers.{i}.{module}.lora_A.weight` / `lora_B.weight`.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::invalid("LoRA adapters are already attached"));
        }
        if cfg.rank == 0 {
            return Err(Error::invalid("LoRA rank must be positive"));
        }
        if let Some(bad) = cfg
            .target_modules
            .iter()
            .find(|m| !MODULES.contains(&m.as_str()))
        {
            return Err(Error::invalid(format!(
                "unknown LoRA target module `{bad}`; known: {}",
                MODULES.join(", ")
            )));
        }

        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dtype = self.dtype;
        let device = self.device.clone();
        let mut vars = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, proj) in block.projections_mut() {
                proj.base.weight = proj.base.weight.detach();
                proj.base.bias = proj.base.bias.as_ref().map(Tensor::detach);
                let short = name.rsplit('.').next().unwrap_or(name);
                if !cfg.target_modules.iter().any(|m| m == short) {
                    continue;
                }
                let (out_features, in_features) = proj.base.weight.dims2()?;
                let bound = 1.0 / (in_features as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * in_features)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = tensor(a, (cfg.rank, in_features), dtype, &device)?;
                let b = Tensor::zeros((out_features, cfg.rank), dtype, &device)?;
                let adapter = LoraAdapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: cfg.alpha / cfg.rank as f64,
                    dropout: cfg.dropout,
                };
                let p = format!("model.layers.{i}.{name}");
                vars.push((format!("{p}.lora_A.weight"), adapter.a.clone()));
                vars.push((format!("{p}.lora_B.weight"), adapter.b.clone()));
                proj.lora = Some(adapter);
            }
        }
        self.embed = self.embed.detach();
        self.norm = self.norm.detach();
        if let Some(head) = &mut self.lm_head {
            head.weight = head.weight.detach();
        }
        for block in &mut self.blocks {
            for t in [&mut block.input_norm, &mut block.post_attention_norm] {
                *t = t.detach();
            }
            for t in [
                &mut block.pre_feedforward_norm,
                &mut block.post_feedforward_norm,
                &mut block.attn.q_norm,
                &mut block.attn.k_norm,
            ]
            .into_iter()
            .flatten()
            {
                *t = t.detach();
            }
        }

        self.vars = vars;
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// The attached LoRA configuration, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }
}

fn tensor(data: Vec<f32>, shape: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
