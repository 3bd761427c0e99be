//! GANPO's relativistic-average ("quad") adversarial losses and their six moving means.
//!
//! Notation of GANPO.md: `D_c` orders ref-chosen > policy-chosen > ref-rejected, `D_r` orders
//! ref-rejected > policy-rejected > ref-chosen. Each discriminator's loss is formed against
//! exponential moving averages of its own batch-mean scores, updated (momentum 0.9, first value
//! seeds) once per discriminator update, before the loss is formed.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::preference::{scalar, softplus};
use crate::{Error, Result};

/// One of the six moving means: which discriminator, scoring which states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MeanKey {
    /// m̄_c[h^r_w]: chosen discriminator on reference chosen states.
    ChosenDiscRefChosen,
    /// m̄_c[h^r_l]: chosen discriminator on reference rejected states.
    ChosenDiscRefRejected,
    /// m̄_c[h^θ_w]: chosen discriminator on policy chosen states.
    ChosenDiscPolicyChosen,
    /// m̄_r[h^r_w]: rejected discriminator on reference chosen states.
    RejectedDiscRefChosen,
    /// m̄_r[h^r_l]: rejected discriminator on reference rejected states.
    RejectedDiscRefRejected,
    /// m̄_r[h^θ_l]: rejected discriminator on policy rejected states.
    RejectedDiscPolicyRejected,
}

impl MeanKey {
    /// All six keys, in a fixed order.
    pub const ALL: [MeanKey; 6] = [
        MeanKey::ChosenDiscRefChosen,
        MeanKey::ChosenDiscRefRejected,
        MeanKey::ChosenDiscPolicyChosen,
        MeanKey::RejectedDiscRefChosen,
        MeanKey::RejectedDiscRefRejected,
        MeanKey::RejectedDiscPolicyRejected,
    ];

    /// A stable name for logs and checkpoints, e.g. `c_ref_chosen`.
    pub fn name(self) -> &'static str {
        match self {
            MeanKey::ChosenDiscRefChosen => "c_ref_chosen",
            MeanKey::ChosenDiscRefRejected => "c_ref_rejected",
            MeanKey::ChosenDiscPolicyChosen => "c_policy_chosen",
            MeanKey::RejectedDiscRefChosen => "r_ref_chosen",
            MeanKey::RejectedDiscRefRejected => "r_ref_rejected",
            MeanKey::RejectedDiscPolicyRejected => "r_policy_rejected",
        }
    }

    fn index(self) -> usize {
        MeanKey::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// The six exponential moving averages of discriminator batch-mean scores.
#[derive(Debug, Clone, PartialEq)]
pub struct MovingMeans {
    /// Weight of the old value in each update (0.9 in GANPO).
    pub momentum: f64,
    values: [Option<f64>; 6],
}

impl Default for MovingMeans {
    fn default() -> Self {
        Self::new(0.9)
    }
}

impl MovingMeans {
    /// Empty averages with the given momentum.
    pub fn new(momentum: f64) -> Self {
        Self {
            momentum,
            values: [None; 6],
        }
    }

    /// The current value, `None` before the first update.
    pub fn get(&self, key: MeanKey) -> Option<f64> {
        self.values[key.index()]
    }

    /// Sets a value directly (checkpoint restore, scripted resets).
    pub fn set(&mut self, key: MeanKey, value: Option<f64>) {
        self.values[key.index()] = value;
    }

    /// Folds in one batch mean: the first value seeds, later ones give
    /// `momentum · old + (1 - momentum) · new`. Returns the updated value.
    pub fn update(&mut self, key: MeanKey, batch_mean: f64) -> f64 {
        let slot = &mut self.values[key.index()];
        let next = match *slot {
            None => batch_mean,
            Some(old) => self.momentum * old + (1.0 - self.momentum) * batch_mean,
        };
        *slot = Some(next);
        next
    }

    /// Every set value by name, for metrics and checkpoints.
    pub fn named(&self) -> BTreeMap<String, f64> {
        MeanKey::ALL
            .iter()
            .filter_map(|k| self.get(*k).map(|v| (k.name().to_string(), v)))
            .collect()
    }

    /// Restores values written by [`MovingMeans::named`]; absent names become unset.
    pub fn load_named(&mut self, named: &BTreeMap<String, f64>) {
        for key in MeanKey::ALL {
            self.set(key, named.get(key.name()).copied());
        }
    }

    fn require(&self, key: MeanKey) -> Result<f64> {
        self.get(key).ok_or_else(|| {
            Error::invalid(format!(
                "moving mean `{}` is unset: run a discriminator update before the generator term",
                key.name()
            ))
        })
    }
}

/// The relativistic ordering loss `top > middle > bottom` against moving means:
/// `¼[sp(−(top − m_mid)) + sp(mid − m_top) + sp(−(mid − m_bottom)) + sp(bottom − m_mid)]`,
/// each term averaged over the batch.
fn ordering_loss(
    top: &Tensor,
    middle: &Tensor,
    bottom: &Tensor,
    m_top: f64,
    m_middle: f64,
    m_bottom: f64,
) -> Result<Tensor> {
    let terms = [
        softplus(&top.affine(-1.0, m_middle)?)?.mean_all()?,
        softplus(&middle.affine(1.0, -m_top)?)?.mean_all()?,
        softplus(&middle.affine(-1.0, m_bottom)?)?.mean_all()?,
        softplus(&bottom.affine(1.0, -m_middle)?)?.mean_all()?,
    ];
    let sum = terms[0].add(&terms[1])?.add(&terms[2])?.add(&terms[3])?;
    Ok(sum.affine(0.25, 0.0)?)
}

/// Fraction of rows whose scores are strictly ordered `top > middle > bottom`: the
/// discriminator's ordering accuracy.
pub fn ordering_accuracy(top: &Tensor, middle: &Tensor, bottom: &Tensor) -> Result<f64> {
    let upper = top.gt(middle)?.to_dtype(DType::F32)?;
    let lower = middle.gt(bottom)?.to_dtype(DType::F32)?;
    scalar(&upper.mul(&lower)?.mean_all()?)
}

fn batch_mean(t: &Tensor) -> Result<f64> {
    scalar(&t.detach().to_dtype(DType::F32)?.mean_all()?)
}

fn check_scores(names: [&str; 3], scores: [&Tensor; 3]) -> Result<()> {
    let expected = scores[0].dims();
    if expected.len() != 1 {
        return Err(Error::invalid(format!(
            "discriminator scores `{}` must be [B], got {:?}",
            names[0], expected
        )));
    }
    for (name, s) in names.iter().zip(scores).skip(1) {
        if s.dims() != expected {
            return Err(Error::invalid(format!(
                "discriminator scores `{}` {:?} and `{name}` {:?} differ in shape",
                names[0],
                expected,
                s.dims()
            )));
        }
    }
    Ok(())
}

/// L_Dc, the chosen discriminator's loss, from its scores `[B]` on reference-chosen,
/// reference-rejected and policy-chosen states (all detached from the policy). Updates the
/// three `m̄_c` means first. Metrics: `disc_loss_pos`, `disc_acc_pos` (fraction of pairs
/// with D_c(h^r_w) > D_c(h^θ_w) > D_c(h^r_l)).
pub fn chosen_disc_loss(
    means: &mut MovingMeans,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    policy_chosen: &Tensor,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    check_scores(
        ["ref_chosen", "ref_rejected", "policy_chosen"],
        [ref_chosen, ref_rejected, policy_chosen],
    )?;

    let m_top = means.update(MeanKey::ChosenDiscRefChosen, batch_mean(ref_chosen)?);
    let m_bottom = means.update(MeanKey::ChosenDiscRefRejected, batch_mean(ref_rejected)?);
    let m_middle = means.update(MeanKey::ChosenDiscPolicyChosen, batch_mean(policy_chosen)?);

    let loss = ordering_loss(
        ref_chosen,
        policy_chosen,
        ref_rejected,
        m_top,
        m_middle,
        m_bottom,
    )?;
    let mut metrics = BTreeMap::new();
    metrics.insert("disc_loss_pos".into(), scalar(&loss)?);
    metrics.insert(
        "disc_acc_pos".into(),
        ordering_accuracy(ref_chosen, policy_chosen, ref_rejected)?,
    );
    Ok((loss, metrics))
}

/// L_Dr, the rejected discriminator's loss, from its scores `[B]` on reference-chosen,
/// reference-rejected and policy-rejected states. Updates the three `m̄_r` means first.
/// Metrics: `disc_loss_neg`, `disc_acc_neg` (fraction of pairs with
/// D_r(h^r_l) > D_r(h^θ_l) > D_r(h^r_w)).
pub fn rejected_disc_loss(
    means: &mut MovingMeans,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    policy_rejected: &Tensor,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    check_scores(
        ["ref_chosen", "ref_rejected", "policy_rejected"],
        [ref_chosen, ref_rejected, policy_rejected],
    )?;

    let m_bottom = means.update(MeanKey::RejectedDiscRefChosen, batch_mean(ref_chosen)?);
    let m_top = means.update(MeanKey::RejectedDiscRefRejected, batch_mean(ref_rejected)?);
    let m_middle = means.update(
        MeanKey::RejectedDiscPolicyRejected,
        batch_mean(policy_rejected)?,
    );

    let loss = ordering_loss(
        ref_rejected,
        policy_rejected,
        ref_chosen,
        m_top,
        m_middle,
        m_bottom,
    )?;
    let mut metrics = BTreeMap::new();
    metrics.insert("disc_loss_neg".into(), scalar(&loss)?);
    metrics.insert(
        "disc_acc_neg".into(),
        ordering_accuracy(ref_rejected, policy_rejected, ref_chosen)?,
    );
    Ok((loss, metrics))
}

/// L_G, the policy's adversarial term, from the frozen discriminators' scores on the policy's
/// chosen (`D_c`) and rejected (`D_r`) states, gradients flowing into the states:
/// `½[sp(−(D_c(h^θ_w) − m̄_c[h^r_w])) + sp(−(D_r(h^θ_l) − m̄_r[h^r_l]))]`. The means are read,
/// not updated. Metrics: `g_loss_mimic`, `g_loss_mimic_rej`.
pub fn generator_loss(
    means: &MovingMeans,
    chosen_disc_on_policy_chosen: &Tensor,
    rejected_disc_on_policy_rejected: &Tensor,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    check_scores(
        [
            "chosen_disc_on_policy_chosen",
            "rejected_disc_on_policy_rejected",
            "same",
        ],
        [
            chosen_disc_on_policy_chosen,
            rejected_disc_on_policy_rejected,
            rejected_disc_on_policy_rejected,
        ],
    )?;

    let m_c = means.require(MeanKey::ChosenDiscRefChosen)?;
    let m_r = means.require(MeanKey::RejectedDiscRefRejected)?;
    let mimic = softplus(&chosen_disc_on_policy_chosen.affine(-1.0, m_c)?)?.mean_all()?;
    let mimic_rej = softplus(&rejected_disc_on_policy_rejected.affine(-1.0, m_r)?)?.mean_all()?;
    let loss = mimic.add(&mimic_rej)?.affine(0.5, 0.0)?;

    let mut metrics = BTreeMap::new();
    metrics.insert("g_loss_mimic".into(), scalar(&mimic)?);
    metrics.insert("g_loss_mimic_rej".into(), scalar(&mimic_rej)?);
    metrics.insert("g_loss".into(), scalar(&loss)?);
    Ok((loss, metrics))
}
