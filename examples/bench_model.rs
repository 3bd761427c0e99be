//! Training throughput of our decoder: forward + backward on SmolLM2-135M (f32), batch 4 x 256
//! tokens, loss = mean negative log-softmax of the logits at the next-token labels.
//! Also prints the process CPU time per step, a figure that stays meaningful when other
//! processes share the cores.
//!
//! `cargo run --release --example bench_model -- [GGUF] [BATCH] [SEQ] [STEPS]`
//! Prints tokens/s and the peak resident memory (VmHWM). PyTorch 2.9.1 eager on this machine
//! (2 threads) measured 168 training tokens/s for the same workload (../shared/ASSETS.md).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ganpo::model::{CausalLm, ForwardOptions, LoadOptions};
use ganpo::objective::sequence_logps;

/// Mean next-token log-likelihood through the objective module's fused log-softmax gather
/// (every position after the first counts as a completion token).
fn next_token_loss(logits: &Tensor, ids: &Tensor) -> ganpo::Result<Tensor> {
    let mask = ids.ones_like()?.to_dtype(DType::F32)?;
    let logps = sequence_logps(logits, ids, &mask)?;
    let mean = (logps.sum.sum_all()? / logps.count.sum_all()?.to_scalar::<f32>()? as f64)?;
    Ok(mean.neg()?)
}

fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let source = args.get(1).cloned().unwrap_or_else(|| {
        let root = std::env::var("GANPO_ASSETS").unwrap_or_else(|_| "assets".into());
        format!("{root}/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let batch: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let seq: usize = args.get(3).map_or(Ok(256), |s| s.parse())?;
    let steps: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;

    let device = if cfg!(feature = "cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let opts = LoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        trainable: true,
    };
    let start = Instant::now();
    let model = CausalLm::load(&source, &opts)?.model;
    println!(
        "loaded {source} in {:.2?}, rss {:.0} MiB",
        start.elapsed(),
        peak_rss_mib().unwrap_or(0.0)
    );

    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i as u32).wrapping_mul(2654435761) % vocab)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    let mask = Tensor::ones((batch, seq), DType::F32, &device)?;

    let mut times = Vec::new();
    for step in 0..=steps {
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        let out = model.forward(&ids, &mask, &ForwardOptions::default())?;
        let logits = out.logits.expect("logits were asked for");
        let loss = next_token_loss(&logits, &ids)?;
        let forward = start.elapsed();
        let grads = loss.backward()?;
        drop(grads);
        let total = start.elapsed();
        println!(
            "step {step}: loss {:.4}, forward {forward:.2?}, forward+backward {total:.2?} \
             (cpu {:.1} s){}",
            loss.to_scalar::<f32>()?,
            cpu_seconds() - cpu_start,
            if step == 0 { " (warm-up)" } else { "" }
        );
        if step > 0 {
            times.push(total.as_secs_f64());
        }
    }

    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens_per_s = (batch * seq) as f64 / mean;
    println!(
        "forward+backward: {mean:.2} s per step, {tokens_per_s:.0} training tokens/s \
         (PyTorch eager here: 168, ratio {:.2}), peak RSS {:.0} MiB",
        tokens_per_s / 168.0,
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}
