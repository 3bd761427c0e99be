//! Benchmark (not a test; run by hand): the cost of a GANPO step relative to a DPO step on
//! SmolLM2-135M-Instruct, and the fused log-prob op's memory against composed ops.
//!
//! ```text
//! GANPO_BENCH_STEP=dpo   cargo test --test train_bench -- --ignored --nocapture
//! GANPO_BENCH_STEP=ganpo cargo test --test train_bench -- --ignored --nocapture
//! GANPO_BENCH_STEP=both  cargo test --test train_bench -- --ignored --nocapture
//! ```
//! Each run prints the mean step time and the process's peak resident memory (VmHWM); run
//! the two in separate processes so that their peaks do not mix.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ganpo::data::PreferenceBatch;
use ganpo::disc::{Discriminator, TransformerDiscConfig};
use ganpo::model::{CausalLm, LoadOptions};
use ganpo::objective::MovingMeans;
use ganpo::optim::{AdamW, AdamWConfig, Optimizer};
use ganpo::train::{dpo_step, ganpo_step, Adversary, DpoStepConfig, GanpoStepConfig, StepInputs};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<PathBuf> {
    let root = std::env::var("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
    let path = root.join(MODEL_FILE);
    path.exists().then_some(path)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `pairs` pairs of `t` tokens: ids drawn from the vocabulary, completions from `t / 3`.
fn synthetic_batch(pairs: usize, t: usize, vocab: usize) -> PreferenceBatch {
    let d = Device::Cpu;
    let rows = 2 * pairs;
    let ids: Vec<u32> = (0..rows * t)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let comp: Vec<f32> = (0..rows * t)
        .map(|i| if i % t >= t / 3 { 1. } else { 0. })
        .collect();
    PreferenceBatch {
        input_ids: Tensor::from_vec(ids, (rows, t), &d).unwrap(),
        attention_mask: Tensor::ones((rows, t), DType::F32, &d).unwrap(),
        completion_mask: Tensor::from_vec(comp, (rows, t), &d).unwrap(),
        prompt_lengths: vec![t / 3; rows],
        indices: (0..pairs).collect(),
    }
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn bench_ganpo_step_against_dpo_step_on_smollm2() {
    let Some(path) = model_path() else {
        println!("SKIPPED bench_ganpo_step_against_dpo_step_on_smollm2: asset {MODEL_FILE} absent (run scripts/fetch-assets.sh)");
        return;
    };
    let mode = std::env::var("GANPO_BENCH_STEP").unwrap_or_else(|_| "dpo".into());
    let (pairs, t, steps) = (
        env_usize("GANPO_BENCH_PAIRS", 2),
        env_usize("GANPO_BENCH_T", 128),
        env_usize("GANPO_BENCH_STEPS", 3),
    );

    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: true,
    };
    let policy = CausalLm::load(path.to_str().unwrap(), &opts).unwrap().model;
    let reference = policy.frozen_copy().unwrap();
    let batch = synthetic_batch(pairs, t, policy.config().vocab_size);
    let mut opt = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 1e-6,
            ..Default::default()
        },
    )
    .unwrap();
    let width = policy.config().hidden_size;
    let disc = |seed| {
        Discriminator::transformer(TransformerDiscConfig::new(width), seed, &Device::Cpu).unwrap()
    };
    let (chosen, rejected) = (disc(1), disc(2));
    let disc_opt = |d: &Discriminator| -> Box<dyn Optimizer> {
        Box::new(
            AdamW::new(
                d.vars(),
                AdamWConfig {
                    lr: 5e-7,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    let mut adversary = Adversary {
        chosen_optimizer: disc_opt(&chosen),
        rejected_optimizer: disc_opt(&rejected),
        chosen,
        rejected,
        means: MovingMeans::default(),
    };
    let before = peak_rss_mib();

    // "both" alternates the two steps in one process, so that a shared machine's changing
    // load affects both alike; the peak memory of each alone needs its own process.
    let modes: Vec<&str> = match mode.as_str() {
        "both" => vec!["dpo", "ganpo"],
        "ganpo" => vec!["ganpo"],
        _ => vec!["dpo"],
    };
    let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for step in 0..=steps {
        for &m in &modes {
            let inputs = StepInputs {
                policy: &policy,
                reference: Some(&reference),
                batch: &batch,
                reference_logps: None,
                step,
            };
            let start = Instant::now();
            match m {
                "ganpo" => {
                    let cfg = GanpoStepConfig::default();
                    ganpo_step(&inputs, &mut opt, &mut adversary, &cfg).unwrap()
                }
                _ => dpo_step(&inputs, &mut opt, &DpoStepConfig::default()).unwrap(),
            };
            if step > 0 {
                times
                    .entry(m)
                    .or_default()
                    .push(start.elapsed().as_secs_f64());
            }
        }
    }

    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    for (m, v) in &times {
        println!(
            "BENCH mode={m} pairs={pairs} T={t} step_s={:.3} steps={v:?}",
            mean(v)
        );
    }
    if let (Some(d), Some(g)) = (times.get("dpo"), times.get("ganpo")) {
        println!("BENCH ganpo/dpo time ratio {:.3}", mean(g) / mean(d));
    }
    println!(
        "BENCH peak_rss_mib={:.0} rss_before_steps_mib={before:.0}",
        peak_rss_mib()
    );
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn bench_fused_log_probs_memory_against_composed_ops() {
    let fused = std::env::var("GANPO_BENCH_LOGPS")
        .map(|v| v != "composed")
        .unwrap_or(true);
    let (n, t, v) = (4, 256, 49152);
    let d = Device::Cpu;
    let logits = candle_core::Var::randn(0f32, 1.0, (n, t, v), &d).unwrap();
    let ids = Tensor::zeros((n, t), DType::U32, &d).unwrap();
    let mask = Tensor::ones((n, t), DType::F32, &d).unwrap();
    let before = peak_rss_mib();

    let start = Instant::now();
    let out = if fused {
        ganpo::objective::sequence_logps(logits.as_tensor(), &ids, &mask).unwrap()
    } else {
        ganpo::objective::sequence_logps_composed(logits.as_tensor(), &ids, &mask).unwrap()
    };
    let grads = out.sum.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(logits.as_tensor()).is_some());

    println!(
        "BENCH logps fused={fused} [4,256,49152] fwd+bwd_s={:.3} peak_rss_mib={:.0} before_mib={before:.0} (one [N,T,V] f32 = {:.0} MiB)",
        start.elapsed().as_secs_f64(),
        peak_rss_mib(),
        (n * t * v * 4) as f64 / 1048576.0
    );
}
