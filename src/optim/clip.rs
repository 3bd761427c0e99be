//! Global-norm gradient clipping and gradient accumulation over micro-batches.

use candle_core::{backprop::GradStore, DType, Var};

use crate::Result;

/// Scales the gradients of `vars` in place so that their global L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_` does (coefficient
/// `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(vars: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(vars, grads)?;
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for (_, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `vars` present in `grads`.
pub fn grad_norm(vars: &[(String, Var)], grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// Sums the gradients of several micro-batches (each scaled, typically by
/// `1 / micro_batches`) into one store for a single optimizer step.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    grads: GradStore,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `scale ·` the gradients of `vars` found in `grads`.
    pub fn add(&mut self, vars: &[(String, Var)], grads: &GradStore, scale: f64) -> Result<()> {
        for (_, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Scale 1 (the steps pre-scale their losses) shares the gradient's storage
            // instead of copying every parameter's gradient.
            let g = if scale == 1.0 {
                g.detach()
            } else {
                g.affine(scale, 0.0)?.detach()
            };
            let sum = match self.grads.remove(var.as_tensor()) {
                Some(old) => old.add(&g)?,
                None => g,
            };
            self.grads.insert(var.as_tensor(), sum);
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradients, leaving the accumulator empty.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        std::mem::take(&mut self.grads)
    }

    /// The accumulated gradients so far.
    pub fn grads(&self) -> &GradStore {
        &self.grads
    }

    /// Mutable access (for clipping before the step).
    pub fn grads_mut(&mut self) -> &mut GradStore {
        &mut self.grads
    }
}
