//! AdamW with PyTorch's semantics: decoupled weight decay, bias correction as `torch.optim.AdamW`.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use rayon::prelude::*;

use super::{freeze_by_prefix, step_tensor, Optimizer};
use crate::model::fused::tensor_f32;
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

/// The step's scalars in f32, as the composed ops apply them.
struct Constants {
    decay: f32,
    beta1: (f32, f32),
    beta2: (f32, f32),
    inv_bias2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// A parameter's new values, exp_avg and exp_avg_sq.
type Updated = (Vec<f32>, Vec<f32>, Vec<f32>);

/// New (parameter, exp_avg, exp_avg_sq) of one f32 parameter on the CPU in one parallel pass
/// over the four inputs, with the composed path's arithmetic in the same order (so the same
/// numbers); `None` for other dtypes, devices or layouts, which take the composed path. The
/// composed path allocates about a dozen parameter-sized tensors per parameter.
fn fused_update(slot: &Slot, grad: &Tensor, k: &Constants) -> Result<Option<Updated>> {
    let tensors = [slot.var.as_tensor(), grad, &slot.exp_avg, &slot.exp_avg_sq];
    if tensors
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous())
        || tensors.iter().any(|t| t.dims() != slot.var.dims())
    {
        return Ok(None);
    }
    let guards = tensors.map(|t| t.storage_and_layout());
    let slice = |i: usize, what: &str| {
        let (storage, layout) = &guards[i];
        tensor_f32(storage, layout, what)
    };
    let (p, g, m, v) = (
        slice(0, "parameter")?,
        slice(1, "gradient")?,
        slice(2, "exp_avg")?,
        slice(3, "exp_avg_sq")?,
    );
    let n = p.len();
    let (mut new_p, mut new_m, mut new_v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    new_p
        .par_chunks_mut(CHUNK)
        .zip(new_m.par_chunks_mut(CHUNK))
        .zip(new_v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((out_p, out_m), out_v))| {
            let at = c * CHUNK;
            for i in 0..out_p.len() {
                let (p, g) = (p[at + i], g[at + i]);
                let m = m[at + i] * k.beta1.0 + g * k.beta1.1;
                let v = v[at + i] * k.beta2.0 + g * g * k.beta2.1;
                let denom = v.sqrt() * k.inv_bias2_sqrt + k.eps;
                out_p[i] = p * k.decay - m / denom * k.step_size;
                out_m[i] = m;
                out_v[i] = v;
            }
        });
    Ok(Some((new_p, new_m, new_v)))
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 16;

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
            let constants = Constants {
                decay: (1.0 - c.lr * c.weight_decay) as f32,
                beta1: (c.beta1 as f32, (1.0 - c.beta1) as f32),
                beta2: (c.beta2 as f32, (1.0 - c.beta2) as f32),
                inv_bias2_sqrt: (1.0 / bias2_sqrt) as f32,
                eps: c.eps as f32,
                step_size: step_size as f32,
            };
            if let Some((p, m, v)) = fused_update(slot, g, &constants)? {
                let shape = slot.var.shape().clone();
                let device = slot.var.device().clone();
                slot.exp_avg = Tensor::from_vec(m, shape.clone(), &device)?;
                slot.exp_avg_sq = Tensor::from_vec(v, shape.clone(), &device)?;
                slot.var.set(&Tensor::from_vec(p, shape, &device)?)?;
                continue;
            }
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
