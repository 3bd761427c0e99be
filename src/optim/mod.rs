//! Optimisation: AdamW and SGD with PyTorch's semantics, learning-rate schedules equal to
//! transformers', global-norm clipping, gradient accumulation and parameter freezing.

pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{backprop::GradStore, Device, Tensor};

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm, GradAccumulator};
pub use schedule::{Schedule, ScheduleKind, Warmup};
pub use sgd::{Sgd, SgdConfig};

use crate::Result;

/// What the training steps need of an optimiser.
pub trait Optimizer: Send {
    /// One update from `grads`; parameters without a gradient, or frozen, are left alone.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// Current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (schedules call this before each step).
    fn set_lr(&mut self, lr: f64);
    /// Updates taken so far.
    fn step_count(&self) -> usize;
    /// Freezes (or unfreezes) every parameter whose name starts with `prefix`; returns how
    /// many matched.
    fn set_frozen(&mut self, prefix: &str, frozen: bool) -> usize;
    /// The optimiser's state as named tensors (`step`, then per-parameter buffers).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores a state written by [`Optimizer::state_tensors`].
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// Adds to `frozen` (or removes from it) every name of `names` that starts with `prefix`;
/// returns how many matched. The body of [`Optimizer::set_frozen`] for every optimiser.
fn freeze_by_prefix<'a>(
    frozen: &mut BTreeSet<String>,
    names: impl Iterator<Item = &'a str>,
    prefix: &str,
    freeze: bool,
) -> usize {
    let mut matched = 0;
    for name in names.filter(|n| n.starts_with(prefix)) {
        matched += 1;
        if freeze {
            frozen.insert(name.to_string());
        } else {
            frozen.remove(name);
        }
    }
    matched
}

fn step_tensor(step: usize) -> Result<Tensor> {
    Ok(Tensor::new(step as f64, &Device::Cpu)?)
}
