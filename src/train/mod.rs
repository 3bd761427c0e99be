//! Training: the fused DPO and GANPO steps, atomic checkpoints with exact resume, and the
//! metrics log.

pub mod checkpoint;
pub mod log;
pub mod step;

pub use checkpoint::{Checkpoint, RngState};
pub use log::{read_metrics, MetricsLogger};
pub use step::{
    dpo_step, ganpo_step, reference_logps, Adversary, DpoStepConfig, GanpoStepConfig, StepInputs,
};
