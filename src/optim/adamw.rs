//! AdamW with PyTorch's semantics: decoupled weight decay, bias correction as `torch.optim.AdamW`.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::{freeze_by_prefix, step_tensor, Optimizer};
use crate::{Error, Result};

/// Hyper-parameters of [`AdamW`]; the defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.999).
    pub beta2: f64,
    /// Added to the denominator (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters. Each update, per parameter `p` with gradient `g`:
/// `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps)`. Moments are kept in f32.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    frozen: BTreeSet<String>,
    step: usize,
}

impl AdamW {
    /// An optimiser over `vars` with zeroed moments.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Slot {
                    name,
                    var,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            frozen: BTreeSet::new(),
            step: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Names of the parameters it updates.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bias1;

        for slot in &mut self.slots {
            if self.frozen.contains(&slot.name) {
                continue;
            }
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let p = slot.var.as_tensor().to_dtype(DType::F32)?;

            let p = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            slot.exp_avg = slot
                .exp_avg
                .affine(c.beta1, 0.0)?
                .add(&g.affine(1.0 - c.beta1, 0.0)?)?;
            slot.exp_avg_sq = slot
                .exp_avg_sq
                .affine(c.beta2, 0.0)?
                .add(&g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let denom = slot.exp_avg_sq.sqrt()?.affine(1.0 / bias2_sqrt, c.eps)?;
            let p = p.sub(&slot.exp_avg.div(&denom)?.affine(step_size, 0.0)?)?;

            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.cfg.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn step_count(&self) -> usize {
        self.step
    }

    fn set_frozen(&mut self, prefix: &str, frozen: bool) -> usize {
        let names = self.slots.iter().map(|s| s.name.as_str());
        freeze_by_prefix(&mut self.frozen, names, prefix, frozen)
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), step_tensor(self.step)?)];
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), s.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.clone()));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let step = state
            .get("step")
            .ok_or_else(|| Error::invalid("optimizer state lacks `step`"))?;
        let step = step.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
        for s in &mut self.slots {
            for (suffix, target) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let name = format!("{}.{suffix}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| Error::invalid(format!("optimizer state lacks `{name}`")))?;
                if t.dims() != target.dims() {
                    return Err(Error::ShapeMismatch {
                        name,
                        expected: target.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                *target = t.to_dtype(DType::F32)?.to_device(target.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
