//! Checkpoints and the metrics log: a GANPO run stopped, checkpointed and resumed logs exactly
//! the metrics of the same run uninterrupted; checkpoints are complete folders or absent.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use ganpo::data::{BatchPosition, PreferenceBatch};
use ganpo::disc::{Discriminator, TransformerDiscConfig};
use ganpo::model::{CausalLm, Family, LoadOptions, ModelConfig};
use ganpo::objective::MovingMeans;
use ganpo::optim::{AdamW, AdamWConfig, Optimizer};
use ganpo::train::{
    ganpo_step, read_metrics, Adversary, Checkpoint, GanpoStepConfig, MetricsLogger, StepInputs,
};

fn policy() -> CausalLm {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: true,
    };
    CausalLm::new_random(ModelConfig::tiny(Family::Llama), &opts, 5).unwrap()
}

fn batch() -> PreferenceBatch {
    let d = Device::Cpu;
    let ids: Vec<u32> = vec![
        1, 4, 10, 11, 2, 0, 1, 5, 12, 13, 14, 2, 1, 4, 20, 2, 0, 0, 1, 5, 21, 22, 2, 0,
    ];
    let attn: Vec<f32> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if t != 0 || i % 6 == 0 { 1. } else { 0. })
        .collect();
    let comp: Vec<f32> = (0..24)
        .map(|i| if i % 6 >= 2 && attn[i] > 0.0 { 1. } else { 0. })
        .collect();
    PreferenceBatch {
        input_ids: Tensor::from_vec(ids, (4, 6), &d).unwrap(),
        attention_mask: Tensor::from_vec(attn, (4, 6), &d).unwrap(),
        completion_mask: Tensor::from_vec(comp, (4, 6), &d).unwrap(),
        prompt_lengths: vec![2; 4],
        indices: vec![0, 1],
    }
}

struct Run {
    policy: CausalLm,
    reference: CausalLm,
    optimizer: AdamW,
    adversary: Adversary,
}

fn fresh_run(disc_seed: u64) -> Run {
    let policy = policy();
    let reference = policy.frozen_copy().unwrap();
    let optimizer = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let width = policy.config().hidden_size;
    let disc = |seed| {
        let cfg = TransformerDiscConfig {
            d_model: 16,
            heads: 2,
            ffn_dim: 32,
            ..TransformerDiscConfig::new(width)
        };
        Discriminator::transformer(cfg, seed, &Device::Cpu).unwrap()
    };
    let (chosen, rejected) = (disc(disc_seed), disc(disc_seed + 1));
    let opt = |d: &Discriminator| -> Box<dyn Optimizer> {
        Box::new(AdamW::new(d.vars(), AdamWConfig::default()).unwrap())
    };
    let adversary = Adversary {
        chosen_optimizer: opt(&chosen),
        rejected_optimizer: opt(&rejected),
        chosen,
        rejected,
        means: MovingMeans::default(),
    };
    Run {
        policy,
        reference,
        optimizer,
        adversary,
    }
}

fn train(run: &mut Run, steps: std::ops::Range<usize>, logger: &mut MetricsLogger) {
    let batch = batch();
    for step in steps {
        let inputs = StepInputs {
            policy: &run.policy,
            reference: Some(&run.reference),
            batch: &batch,
            reference_logps: None,
            step,
        };
        let m = ganpo_step(
            &inputs,
            &mut run.optimizer,
            &mut run.adversary,
            &GanpoStepConfig::default(),
        )
        .unwrap();
        let lrs = BTreeMap::from([("lr".to_string(), run.optimizer.lr())]);
        logger
            .log(step + 1, (step + 1) as f64 / 10.0, &lrs, &m)
            .unwrap();
    }
}

fn without_time(
    lines: Vec<serde_json::Map<String, serde_json::Value>>,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    lines
        .into_iter()
        .map(|mut l| {
            // Wall-clock figures: the elapsed time and the step's per-phase seconds.
            l.retain(|key, _| key != "elapsed_s" && !key.starts_with("time/"));
            l
        })
        .collect()
}

#[test]
fn a_resumed_ganpo_run_logs_exactly_the_metrics_of_an_uninterrupted_run() {
    let straight_dir = tempfile::tempdir().unwrap();
    let mut run = fresh_run(1);
    let mut logger = MetricsLogger::create(straight_dir.path()).unwrap();
    train(&mut run, 0..6, &mut logger);

    let resumed_dir = tempfile::tempdir().unwrap();
    let mut first = fresh_run(1);
    let mut logger = MetricsLogger::create(resumed_dir.path()).unwrap();
    train(&mut first, 0..3, &mut logger);
    let ckpt = Checkpoint::capture(
        3,
        Some(BatchPosition { epoch: 0, batch: 3 }),
        &first.policy,
        &first.optimizer,
        Some(&first.adversary),
    )
    .unwrap();
    let saved = ckpt.save(&resumed_dir.path().join("checkpoints")).unwrap();
    // The interrupted run got one step past its checkpoint before it stopped.
    train(&mut first, 3..4, &mut logger);
    drop(first);

    let latest = Checkpoint::latest(&resumed_dir.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(latest, saved);
    let loaded = Checkpoint::load(&latest).unwrap();
    let mut second = fresh_run(77);
    loaded
        .restore(
            &latest,
            &mut second.policy,
            &mut second.optimizer,
            Some(&mut second.adversary),
        )
        .unwrap();
    let mut logger = MetricsLogger::resume(resumed_dir.path(), loaded.step).unwrap();
    train(&mut second, loaded.step..6, &mut logger);

    assert_eq!(loaded.position, Some(BatchPosition { epoch: 0, batch: 3 }));
    let straight = without_time(read_metrics(&straight_dir.path().join("metrics.jsonl")).unwrap());
    let resumed = without_time(read_metrics(&resumed_dir.path().join("metrics.jsonl")).unwrap());
    assert_eq!(straight.len(), 6);
    assert_eq!(straight, resumed);
}

#[test]
fn every_metrics_line_has_step_epoch_learning_rate_elapsed_time_and_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = fresh_run(1);
    let mut logger = MetricsLogger::create(dir.path()).unwrap();
    train(&mut run, 0..1, &mut logger);

    let lines = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();

    for key in [
        "step",
        "epoch",
        "lr",
        "elapsed_s",
        "rewards/accuracies",
        "disc_loss_pos",
        "g_loss_mimic",
        "dpo_loss",
    ] {
        assert!(lines[0].contains_key(key), "missing {key}");
    }
}

#[test]
fn an_unfinished_checkpoint_folder_is_never_taken_for_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".step-00000009.tmp-1")).unwrap();

    assert_eq!(Checkpoint::latest(dir.path()).unwrap(), None);

    let run = fresh_run(1);
    let ckpt = Checkpoint::capture(2, None, &run.policy, &run.optimizer, None).unwrap();
    let saved = ckpt.save(dir.path()).unwrap();
    assert_eq!(Checkpoint::latest(dir.path()).unwrap(), Some(saved.clone()));
    assert!(saved.join("policy.safetensors").exists() && saved.join("state.json").exists());
}

#[test]
fn a_checkpoint_missing_a_group_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = fresh_run(1);
    let saved = Checkpoint::capture(1, None, &run.policy, &run.optimizer, None)
        .unwrap()
        .save(dir.path())
        .unwrap();
    std::fs::remove_file(saved.join("policy_optimizer.safetensors")).unwrap();

    let msg = Checkpoint::load(&saved).unwrap_err().to_string();

    assert!(msg.contains("policy_optimizer.safetensors"), "{msg}");
}
