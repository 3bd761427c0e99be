//! SGD with PyTorch's semantics: coupled weight decay, momentum with dampening, Nesterov.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::{freeze_by_prefix, step_tensor, Optimizer};
use crate::{Error, Result};

/// Hyper-parameters of [`Sgd`] (torch's meaning).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the momentum's gradient term.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    buf: Option<Tensor>,
}

/// Stochastic gradient descent over named parameters.
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    slots: Vec<Slot>,
    frozen: BTreeSet<String>,
    step: usize,
}

impl Sgd {
    /// An optimiser over `vars`; Nesterov needs momentum > 0 and no dampening, as in torch.
    pub fn new(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            return Err(Error::invalid(
                "Nesterov momentum requires a momentum > 0 and zero dampening",
            ));
        }
        let slots = vars
            .into_iter()
            .map(|(name, var)| Slot {
                name,
                var,
                buf: None,
            })
            .collect();
        Ok(Self {
            cfg,
            slots,
            frozen: BTreeSet::new(),
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        for slot in &mut self.slots {
            if self.frozen.contains(&slot.name) {
                continue;
            }
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = slot.var.as_tensor().to_dtype(DType::F32)?;
            let mut g = g.to_dtype(DType::F32)?;

            if c.weight_decay != 0.0 {
                g = g.add(&p.affine(c.weight_decay, 0.0)?)?;
            }
            if c.momentum != 0.0 {
                let buf = match &slot.buf {
                    None => g.clone(),
                    Some(b) => b
                        .affine(c.momentum, 0.0)?
                        .add(&g.affine(1.0 - c.dampening, 0.0)?)?,
                };
                g = if c.nesterov {
                    g.add(&buf.affine(c.momentum, 0.0)?)?
                } else {
                    buf.clone()
                };
                slot.buf = Some(buf);
            }

            let p = p.sub(&g.affine(c.lr, 0.0)?)?;
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
            if let Some(b) = &s.buf {
                out.push((format!("{}.momentum_buffer", s.name), b.clone()));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let step = state
            .get("step")
            .ok_or_else(|| Error::invalid("optimizer state lacks `step`"))?;
        self.step = step.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
        for s in &mut self.slots {
            s.buf = state.get(&format!("{}.momentum_buffer", s.name)).cloned();
        }
        Ok(())
    }
}
