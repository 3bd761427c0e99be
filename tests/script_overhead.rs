//! Benchmark, not a test (ignored by default): the same DPO training loop driven from rhai and
//! from Rust, interleaved, on a small random model; the script's extra wall time must stay
//! under 3%. Run: `cargo test --test script_overhead -- --ignored --nocapture`.

use std::time::Instant;

use ganpo::data::BatchSampler;
use ganpo::script::api::data::{DatasetHandle, SamplerHandle};
use ganpo::script::api::model::ModelHandle;
use ganpo::script::api::train::OptimizerHandle;
use ganpo::script::{Host, HostOptions};
use ganpo::train::{dpo_step, DpoStepConfig, StepInputs};

const SETUP: &str = r#"
let policy = random_model(#{family: "llama", seed: 1, hidden_size: 64, layers: 4});
let reference = policy.freeze();
let pairs = load_preferences(config.data, policy, #{max_length: 96});
let sampler = pairs.sampler(pairs.split(0.0)[0], #{batch_size: 4});
let opt = adamw(policy, #{lr: 1e-4});
"#;

/// The same loop with the step replaced by building its options: what the host adds per step.
const LOOP_WITHOUT_STEP: &str = r#"
for step in 0..config.steps {
    let b = pairs.batch(sampler.next());
    let m = #{beta: 0.1, step: step};
}
"#;

const LOOP: &str = r#"
for step in 0..config.steps {
    let b = pairs.batch(sampler.next());
    let m = dpo_step(policy, reference, b, opt, #{beta: 0.1, step: step});
}
"#;

fn rust_loop(host: &Host, steps: usize, train: bool) {
    let scope = host.scope();
    let policy = scope.get_value::<ModelHandle>("policy").unwrap();
    let reference = scope.get_value::<ModelHandle>("reference").unwrap();
    let pairs = scope.get_value::<DatasetHandle>("pairs").unwrap();
    let sampler = scope.get_value::<SamplerHandle>("sampler").unwrap();
    let opt = scope.get_value::<OptimizerHandle>("opt").unwrap();
    let cfg = DpoStepConfig::default();
    let device = candle_core::Device::Cpu;

    for step in 0..steps {
        let indices = BatchSampler::next_batch(&mut sampler.0.borrow_mut()).1;
        let batch = pairs.0.batch(&indices, &device).unwrap();
        if !train {
            continue;
        }
        let policy = policy.0.borrow();
        let reference = reference.0.borrow();
        let inputs = StepInputs {
            policy: &policy.model,
            reference: Some(&reference.model),
            batch: &batch,
            reference_logps: None,
            step,
        };
        dpo_step(&inputs, &mut **opt.inner.borrow_mut(), &cfg).unwrap();
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn script_driven_loop_costs_at_most_three_percent_more_than_rust() {
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<serde_json::Value> = (0..32)
        .map(|i| {
            serde_json::json!({"prompt": format!("Question number {i}: what is {i} squared?"),
                "chosen": format!("It is {}, since {i} times {i} is {}.", i * i, i * i),
                "rejected": format!("No idea, perhaps {} or so.", i + 7)})
        })
        .collect();
    let data = dir.path().join("pairs.json");
    std::fs::write(&data, serde_json::to_string(&pairs).unwrap()).unwrap();
    let steps = 20;
    let options = HostOptions {
        out_dir: dir.path().into(),
        config: [
            ("data", data.display().to_string()),
            ("steps", steps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    };
    let mut host = Host::new(options).unwrap();
    host.run(SETUP).unwrap();
    let ast = host.compile(LOOP).unwrap();
    let bare = host.compile(LOOP_WITHOUT_STEP).unwrap();
    let _ = host.run_ast(&ast).unwrap();

    let (mut script_best, mut rust_best) = (f64::MAX, f64::MAX);
    let (mut script_bare, mut rust_bare) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        let _ = host.run_ast(&ast).unwrap();
        script_best = script_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        rust_loop(&host, steps, true);
        rust_best = rust_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = host.run_ast(&bare).unwrap();
        script_bare = script_bare.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        rust_loop(&host, steps, false);
        rust_bare = rust_bare.min(t.elapsed().as_secs_f64());
    }

    let overhead = script_best / rust_best - 1.0;
    println!(
        "{steps} DPO steps: rhai {:.1} ms/step, Rust {:.1} ms/step, overhead {:+.2}%",
        script_best * 1e3 / steps as f64,
        rust_best * 1e3 / steps as f64,
        overhead * 100.0
    );
    let per_step_us = (script_bare - rust_bare).max(0.0) * 1e6 / steps as f64;
    println!(
        "host cost per step without the training step: {per_step_us:.1} us ({:.4}% of a step)",
        per_step_us * 1e-6 / (rust_best / steps as f64) * 100.0
    );
    assert!(
        overhead < 0.03,
        "scripting overhead {:.2}%",
        overhead * 100.0
    );
}
