//! Every recipe in scripts/ runs to completion on a tiny random model and a tiny preference
//! file, writing the outputs it promises (what CI runs; the real-model defaults take minutes).

use std::path::{Path, PathBuf};
use std::process::Command;

fn ganpo_run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ganpo-run"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("ganpo-run starts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tiny Llama with the byte-level tokenizer, 12 arithmetic preference pairs, 3 prompts.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (code, _, err) = ganpo_run(&[
            "--out",
            root.to_str().unwrap(),
            "-e",
            "random_model(#{family: \"llama\", seed: 3}).save(\"model\")",
        ]);
        assert_eq!(code, 0, "{err}");

        let pairs: Vec<serde_json::Value> = (1..=12)
            .map(|i| {
                serde_json::json!({
                    "prompt": format!("What is {i} plus {i}?"),
                    "chosen": format!("{i} plus {i} is {}.", 2 * i),
                    "rejected": format!("Maybe {}.", i * i + 1),
                })
            })
            .collect();
        std::fs::write(
            root.join("pairs.json"),
            serde_json::to_string(&pairs).unwrap(),
        )
        .unwrap();
        let prompts: Vec<serde_json::Value> = ["cats", "rain", "tea"]
            .iter()
            .map(|w| {
                serde_json::json!({"instruction": format!("Tell me about {w}."),
                "output": "", "generator": "example", "dataset": "tiny", "datasplit": "eval"})
            })
            .collect();
        std::fs::write(
            root.join("prompts.json"),
            serde_json::to_string(&prompts).unwrap(),
        )
        .unwrap();
        Self { _dir: dir, root }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// Runs `scripts/NAME.rhai` with the tiny settings, asserting success; returns its --out.
    fn run(&self, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.root.join(format!("run-{name}"));
        let script = format!("scripts/{name}.rhai");
        let model = format!("model={}", self.path("model"));
        let data = format!("data={}", self.path("pairs.json"));
        let mut args = vec![
            script.as_str(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            &model,
            "--set",
            &data,
            "--set",
            "max_steps=2",
            "--set",
            "max_length=64",
            "--set",
            "eval_fraction=0.25",
        ];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = ganpo_run(&args);
        assert_eq!(code, 0, "{name} failed:\n{stdout}\n{stderr}");
        out
    }
}

fn assert_files(dir: &Path, names: &[&str]) {
    for name in names {
        assert!(
            dir.join(name).exists(),
            "{} missing in {}",
            name,
            dir.display()
        );
    }
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn preference_recipes_train_log_plot_and_save_on_a_tiny_model() {
    let fx = Fixture::new();

    for name in ["dpo", "simpo"] {
        let out = fx.run(name, &[]);

        assert_files(
            &out,
            &["metrics.jsonl", "loss.png", "margins.png", "summary.json"],
        );
        assert_files(&out, &["final/model.safetensors", "final/config.json"]);
        let lines = metric_lines(&out);
        assert_eq!(lines.len(), 2, "{name}: one line per step");
        assert!(lines[1]["loss"].as_f64().unwrap().is_finite());
        assert!(lines[1].get("rewards/margins").is_some());
    }
}

#[test]
fn ganpo_recipes_log_discriminator_metrics_and_script_schedules() {
    let fx = Fixture::new();

    let plain = fx.run("ganpo", &["--set", "disc=mlp"]);
    let scheduled = fx.run(
        "ganpo_schedule",
        &[
            "--set",
            "disc=mlp",
            "--set",
            "lambda_warmup=2",
            "--set",
            "early_steps=1",
        ],
    );

    assert_files(
        &plain,
        &["metrics.jsonl", "loss.png", "disc.png", "margins.png"],
    );
    assert!(metric_lines(&plain)[0]["disc_loss_pos"].as_f64().is_some());
    assert_files(&scheduled, &["schedule.png", "disc.png"]);
    let lines = metric_lines(&scheduled);
    // lambda(step) = step / 2 for the first two steps; k = 3 at step 0, then 1.
    assert_eq!(lines[0]["lambda"].as_f64(), Some(0.0));
    assert_eq!(lines[1]["lambda"].as_f64(), Some(0.5));
    assert_eq!(lines[0]["disc_steps"].as_i64(), Some(3));
    assert_eq!(lines[1]["disc_steps"].as_i64(), Some(1));
}

#[test]
fn probe_and_generate_recipes_write_their_plots_and_tables() {
    let fx = Fixture::new();

    let probe = fx.run("probe", &["--set", "pairs=4"]);
    let prompts = format!("prompts={}", fx.path("prompts.json"));
    let generate = fx.run(
        "generate",
        &[
            "--set",
            &prompts,
            "--set",
            "n=3",
            "--set",
            "max_new_tokens=6",
        ],
    );

    assert_files(&probe, &["pca.png", "layer_distance.png", "probe.json"]);
    let probe_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(probe.join("probe.json")).unwrap()).unwrap();
    // Policy and reference are the same model here, so every layer's distance is zero.
    for d in probe_json["layer_distance"].as_array().unwrap() {
        assert_eq!(d.as_f64(), Some(0.0));
    }
    assert_files(&generate, &["answers.json", "stats.json", "lengths.png"]);
    let answers: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(generate.join("answers.json")).unwrap())
            .unwrap();
    assert_eq!(answers.len(), 3 * 4, "3 prompts at 4 temperatures");
}

#[test]
fn a_ganpo_run_stopped_and_resumed_logs_what_the_uninterrupted_run_logs() {
    let fx = Fixture::new();
    let settings = ["--set", "disc=mlp", "--set", "max_steps=4"];

    let full = fx.run("ganpo", &settings);
    let part = fx.root.join("run-ganpo-part");
    std::fs::rename(&full, fx.root.join("run-ganpo-full")).unwrap();
    fx.run(
        "ganpo",
        &[&settings[..], &["--set", "stop_after=2"]].concat(),
    );
    std::fs::rename(&full, &part).unwrap();
    assert_files(
        &part,
        &["checkpoints/latest", "checkpoints/step-00000002/state.json"],
    );
    std::fs::rename(&part, &full).unwrap();
    fx.run(
        "ganpo",
        &[&settings[..], &["--set", "resume=true"]].concat(),
    );

    let uninterrupted = metric_lines(&fx.root.join("run-ganpo-full"));
    let resumed = metric_lines(&full);
    assert_eq!(resumed.len(), 4, "2 kept lines + 2 after the resume");
    for (a, b) in uninterrupted.iter().zip(&resumed).skip(2) {
        for (key, x) in a.as_object().unwrap() {
            if key == "elapsed_s" || key.starts_with("time/") {
                continue;
            }
            let (x, y) = (x.as_f64().unwrap(), b[key].as_f64().unwrap());
            // Equal up to float summation order across processes (observed: bit-identical).
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                "step {}: {key} {x} vs {y}",
                a["step"]
            );
        }
    }
}

#[test]
fn train_calls_the_script_schedule_functions_every_step_and_checkpoints() {
    let fx = Fixture::new();
    let out = fx.root.join("run-train");
    let code = "let policy = load_model(config.model);\n\
        let reference = policy.freeze();\n\
        let pairs = load_preferences(config.data, policy, #{max_length: 64});\n\
        let sampler = pairs.sampler(pairs.split(0.0)[0], #{batch_size: 2});\n\
        let opt = adamw(policy, #{lr: 1e-4});\n\
        let adv = adversary(policy, #{kind: \"mlp\", lr: 1e-4});\n\
        let log = metrics_logger(\"metrics.jsonl\");\n\
        let seen = [];\n\
        let done = train(#{steps: 3, policy: policy, reference: reference, optimizer: opt,\n\
            pairs: pairs, sampler: sampler, adversary: adv, logger: log,\n\
            lambda: |step| step / 2.0, disc_steps: |step| if step == 0 { 2 } else { 1 },\n\
            lr: |step| 1e-4 * (step + 1), on_step: |step, m| seen.push(m.lambda),\n\
            checkpoint: \"checkpoints\"});\n\
        print(done); print(seen);";
    let model = format!("model={}", fx.path("model"));
    let data = format!("data={}", fx.path("pairs.json"));

    let (status, stdout, stderr) = ganpo_run(&[
        "--out",
        out.to_str().unwrap(),
        "--set",
        &model,
        "--set",
        &data,
        "-e",
        code,
    ]);

    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, "3\n[0.0, 0.5, 1.0]\n");
    let lines = metric_lines(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["disc_steps"].as_i64(), Some(2));
    assert_eq!(lines[1]["disc_steps"].as_i64(), Some(1));
    // lr(step) = 1e-4 · (step + 1) was set before each step; the step reports it back.
    assert!(
        (lines[2]["lr"].as_f64().unwrap() - 3e-4).abs() < 1e-12,
        "{}",
        lines[2]["lr"]
    );
    assert_files(&out, &["checkpoints/step-00000003/state.json"]);
}

#[test]
fn compare_trains_dpo_and_ganpo_on_the_same_batches_and_tables_both() {
    let fx = Fixture::new();
    let instructions = format!("instructions={}", fx.path("prompts.json"));

    let out = fx.run(
        "compare",
        &["--set", &instructions, "--set", "answer_tokens=6"],
    );

    assert_files(
        &out,
        &[
            "compare.png",
            "disc.png",
            "robustness.png",
            "robustness.json",
            "summary.json",
            "metrics_dpo.jsonl",
            "metrics_ganpo.jsonl",
        ],
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for method in ["dpo", "ganpo"] {
        let acc = summary["after"][method]["reward_accuracy"]
            .as_f64()
            .unwrap();
        assert!((0.0..=1.0).contains(&acc), "{method}: {acc}");
    }
    assert!(summary["disc_loss_pos"].as_f64().unwrap().is_finite());
    let tables: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("robustness.json")).unwrap())
            .unwrap();
    let models: Vec<&str> = tables
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["dpo", "ganpo"]);
    // Same batches, and λ's term is the only difference: the first DPO losses agree.
    let (dpo, ganpo) = (
        std::fs::read_to_string(out.join("metrics_dpo.jsonl")).unwrap(),
        std::fs::read_to_string(out.join("metrics_ganpo.jsonl")).unwrap(),
    );
    let first = |text: &str, key: &str| -> f64 {
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        line[key].as_f64().unwrap()
    };
    assert!((first(&dpo, "loss") - first(&ganpo, "dpo_loss")).abs() < 1e-5);
}
