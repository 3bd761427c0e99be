//! Learning-rate schedules equal to transformers' `get_*_schedule_with_warmup`.

use crate::{Error, Result};

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Half a cosine wave down to zero at the last step.
    Cosine,
}

impl ScheduleKind {
    /// Parses `constant`, `linear`, `cosine`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(Error::invalid(format!(
                "unknown schedule `{other}`; known: constant, linear, cosine"
            ))),
        }
    }
}

/// How long the linear warmup from zero lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// A number of optimizer steps.
    Steps(usize),
    /// A fraction of the total steps, rounded up (transformers' `warmup_ratio`).
    Ratio(f64),
}

/// A learning-rate schedule: `lr_at(step) = base_lr · factor(step)`, where `step` counts the
/// optimizer steps already taken (the LambdaLR convention: the first update uses step 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup length.
    pub warmup: Warmup,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
}

impl Schedule {
    /// A schedule; errors on a negative or non-finite rate or a ratio outside `[0, 1]`.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup: Warmup,
        total_steps: usize,
    ) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(Error::invalid(format!(
                "learning rate must be >= 0, got {base_lr}"
            )));
        }
        if let Warmup::Ratio(r) = warmup {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::invalid(format!(
                    "warmup ratio must be in [0, 1], got {r}"
                )));
            }
        }
        Ok(Self {
            kind,
            base_lr,
            warmup,
            total_steps,
        })
    }

    /// Warmup length in steps.
    pub fn warmup_steps(&self) -> usize {
        match self.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (r * self.total_steps as f64).ceil() as usize,
        }
    }

    /// The multiplier of `base_lr` at `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let warmup = self.warmup_steps();
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let remaining = self.total_steps.saturating_sub(warmup).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (self.total_steps as f64 - step as f64).max(0.0) / remaining,
            ScheduleKind::Cosine => {
                let progress = (step - warmup) as f64 / remaining;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}
