//! Offline preference losses (DPO sigmoid, hinge, IPO, SimPO, reference-free DPO) and their
//! metrics under TRL's names.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::SequenceLogps;
use crate::{Error, Result};

/// Which preference loss to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceLossKind {
    /// DPO: `-(1-ε)·logσ(z) - ε·logσ(-z)` with `z = β·(policy logratio - reference logratio)`.
    Sigmoid,
    /// DPO hinge: `relu(1 - z)`.
    Hinge,
    /// IPO: `(z/β - 1/(2β))²`, on length-normalised log-probabilities as TRL does.
    Ipo,
    /// SimPO: `-logσ(β·(mean logp chosen - mean logp rejected) - γ)`; no reference model.
    SimPo,
}

impl PreferenceLossKind {
    /// Parses `sigmoid`/`dpo`, `hinge`, `ipo`, `simpo`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sigmoid" | "dpo" => Ok(Self::Sigmoid),
            "hinge" => Ok(Self::Hinge),
            "ipo" => Ok(Self::Ipo),
            "simpo" => Ok(Self::SimPo),
            other => Err(Error::invalid(format!(
                "unknown preference loss `{other}`; known: sigmoid, hinge, ipo, simpo"
            ))),
        }
    }

    /// True when the loss works on length-normalised (mean) log-probabilities.
    pub fn uses_mean_logps(self) -> bool {
        matches!(self, Self::Ipo | Self::SimPo)
    }

    /// True when the loss needs reference log-probabilities (unless reference-free).
    pub fn needs_reference(self) -> bool {
        !matches!(self, Self::SimPo)
    }
}

/// Settings of a preference loss.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceConfig {
    /// The loss.
    pub kind: PreferenceLossKind,
    /// Temperature β (DPO default 0.1; SimPO's reference recipe uses 2.0).
    pub beta: f64,
    /// Label smoothing ε of the sigmoid loss (conservative DPO), in `[0, 0.5]`.
    pub label_smoothing: f64,
    /// SimPO's target margin γ (its recipe: γ/β = 0.25).
    pub simpo_gamma: f64,
    /// Treat the reference log-probabilities as zero (reference-free DPO).
    pub reference_free: bool,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            kind: PreferenceLossKind::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            reference_free: false,
        }
    }
}

/// Per-pair losses and implicit rewards.
#[derive(Debug, Clone)]
pub struct PairLosses {
    /// Loss of each pair, `[B]`.
    pub losses: Tensor,
    /// Implicit reward of each chosen completion, `[B]`, detached.
    pub chosen_rewards: Tensor,
    /// Implicit reward of each rejected completion, `[B]`, detached.
    pub rejected_rewards: Tensor,
}

/// `softplus(x) = log(1 + e^x)`, computed stably by differentiable ops.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(x.relu()?.add(&tail)?)
}

/// `log σ(x) = -softplus(-x)`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// Per-pair preference losses from log-probabilities already in the loss's form (sums for
/// DPO and hinge, means for IPO and SimPO). Reference log-probabilities may be absent for
/// SimPO or reference-free DPO.
pub fn preference_losses(
    cfg: &PreferenceConfig,
    chosen_logps: &Tensor,
    rejected_logps: &Tensor,
    reference: Option<(&Tensor, &Tensor)>,
) -> Result<PairLosses> {
    let beta = cfg.beta;
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(Error::invalid(format!("beta must be positive, got {beta}")));
    }
    same_shape(
        "chosen_logps",
        chosen_logps,
        "rejected_logps",
        rejected_logps,
    )?;

    if cfg.kind == PreferenceLossKind::SimPo {
        let z = chosen_logps
            .sub(rejected_logps)?
            .affine(beta, -cfg.simpo_gamma)?;
        return Ok(PairLosses {
            losses: log_sigmoid(&z)?.neg()?,
            chosen_rewards: chosen_logps.affine(beta, 0.0)?.detach(),
            rejected_rewards: rejected_logps.affine(beta, 0.0)?.detach(),
        });
    }

    let (chosen_ratio, rejected_ratio) = match (reference, cfg.reference_free) {
        (_, true) => (chosen_logps.clone(), rejected_logps.clone()),
        (Some((ref_chosen, ref_rejected)), false) => {
            same_shape(
                "chosen_logps",
                chosen_logps,
                "reference_chosen_logps",
                ref_chosen,
            )?;
            same_shape(
                "rejected_logps",
                rejected_logps,
                "reference_rejected_logps",
                ref_rejected,
            )?;
            (
                chosen_logps.sub(ref_chosen)?,
                rejected_logps.sub(ref_rejected)?,
            )
        }
        (None, false) => {
            return Err(Error::invalid(format!(
                "{:?} loss needs reference log-probabilities (or reference_free)",
                cfg.kind
            )))
        }
    };
    let z = chosen_ratio.sub(&rejected_ratio)?.affine(beta, 0.0)?;

    let losses = match cfg.kind {
        PreferenceLossKind::Sigmoid => {
            let eps = cfg.label_smoothing;
            let pos = log_sigmoid(&z)?.affine(-(1.0 - eps), 0.0)?;
            let neg = log_sigmoid(&z.neg()?)?.affine(-eps, 0.0)?;
            pos.add(&neg)?
        }
        PreferenceLossKind::Hinge => z.affine(-1.0, 1.0)?.relu()?,
        PreferenceLossKind::Ipo => z.affine(1.0 / beta, -1.0 / (2.0 * beta))?.sqr()?,
        PreferenceLossKind::SimPo => unreachable!("handled above"),
    };

    Ok(PairLosses {
        losses,
        chosen_rewards: chosen_ratio.affine(beta, 0.0)?.detach(),
        rejected_rewards: rejected_ratio.affine(beta, 0.0)?.detach(),
    })
}

/// The preference loss of a pair batch and its metrics.
///
/// `policy` holds `2B` rows (chosen then rejected, the [`crate::data`] batch order);
/// `reference_sums` the reference model's summed log-probabilities of the same rows. The
/// loss is the batch mean; metrics use TRL's names (`rewards/chosen`, `rewards/rejected`,
/// `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
/// `logits/chosen`, `logits/rejected`) plus `loss`.
pub fn preference_loss(
    cfg: &PreferenceConfig,
    policy: &SequenceLogps,
    reference_sums: Option<&Tensor>,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let n = policy.len();
    if n == 0 || n % 2 != 0 {
        return Err(Error::invalid(format!(
            "preference loss needs 2B rows (chosen then rejected), got {n}"
        )));
    }
    let b = n / 2;
    if let Some(r) = reference_sums {
        if r.dims() != [n] {
            return Err(Error::ShapeMismatch {
                name: "reference_logps".into(),
                expected: vec![n],
                got: r.dims().to_vec(),
            });
        }
    }

    let policy_logps = if cfg.kind.uses_mean_logps() {
        policy.mean()?
    } else {
        policy.sum.clone()
    };
    let reference_logps = match reference_sums {
        Some(r) if cfg.kind.uses_mean_logps() => Some(
            r.to_dtype(DType::F32)?
                .div(&policy.count.clamp(1f32, f32::MAX)?)?,
        ),
        Some(r) => Some(r.to_dtype(DType::F32)?),
        None => None,
    };
    let chosen = policy_logps.narrow(0, 0, b)?;
    let rejected = policy_logps.narrow(0, b, b)?;
    let reference = match &reference_logps {
        Some(r) => Some((r.narrow(0, 0, b)?, r.narrow(0, b, b)?)),
        None => None,
    };
    let pair = preference_losses(
        cfg,
        &chosen,
        &rejected,
        reference.as_ref().map(|(c, r)| (c, r)),
    )?;
    let loss = pair.losses.mean_all()?;

    let mut metrics = reward_metrics(&pair.chosen_rewards, &pair.rejected_rewards)?;
    metrics.insert("loss".into(), scalar(&loss)?);
    metrics.insert("logps/chosen".into(), scalar(&chosen.mean_all()?)?);
    metrics.insert("logps/rejected".into(), scalar(&rejected.mean_all()?)?);
    let (logits_chosen, logits_rejected) = logits_metrics(policy)?;
    metrics.insert("logits/chosen".into(), logits_chosen);
    metrics.insert("logits/rejected".into(), logits_rejected);
    Ok((loss, metrics))
}

/// `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (fraction of pairs whose chosen
/// reward is strictly greater) and `rewards/margins`, each a batch mean.
pub fn reward_metrics(chosen: &Tensor, rejected: &Tensor) -> Result<BTreeMap<String, f64>> {
    let margins = chosen.sub(rejected)?;
    let accuracies = margins.gt(0f32)?.to_dtype(DType::F32)?;
    let mut m = BTreeMap::new();
    m.insert("rewards/chosen".into(), scalar(&chosen.mean_all()?)?);
    m.insert("rewards/rejected".into(), scalar(&rejected.mean_all()?)?);
    m.insert(
        "rewards/accuracies".into(),
        scalar(&accuracies.mean_all()?)?,
    );
    m.insert("rewards/margins".into(), scalar(&margins.mean_all()?)?);
    Ok(m)
}

/// TRL's `logits/chosen` and `logits/rejected`: the mean of the logits over every vocabulary
/// entry at every completion-predicting position of the chosen (rejected) half.
pub fn logits_metrics(policy: &SequenceLogps) -> Result<(f64, f64)> {
    let b = policy.len() / 2;
    let half = |start: usize| -> Result<f64> {
        let total = scalar(&policy.mean_logit_sum.narrow(0, start, b)?.sum_all()?)?;
        let count = scalar(&policy.count.narrow(0, start, b)?.sum_all()?)?;
        Ok(if count > 0.0 { total / count } else { f64::NAN })
    };
    Ok((half(0)?, half(b)?))
}

/// A scalar tensor's value as f64.
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn same_shape(a_name: &str, a: &Tensor, b_name: &str, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(format!(
            "`{a_name}` has shape {:?} but `{b_name}` has shape {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}
