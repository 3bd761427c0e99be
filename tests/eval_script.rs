//! The evaluation functions from a rhai script, on a tiny random Llama saved as a model folder
//! with the tiny ChatML tokenizer: answer file, preference eval, robustness table and plot.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ganpo::model::{CausalLm, Family, LoadOptions, ModelConfig};
use ganpo::script::engine::{Host, HostOptions};
use ganpo::tokenize::Tokenizer;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ganpo-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves a random tiny Llama with the tiny tokenizer into `dir`.
fn save_tiny_model(dir: &Path) {
    let tok_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_chatml");
    let tok = Tokenizer::from_dir(&tok_dir).unwrap();
    let mut config = ModelConfig::tiny(Family::Llama);
    config.vocab_size = tok.vocab_size();
    config.eos_token_ids = vec![tok.eos_token_id().unwrap()];
    config.max_position_embeddings = 512;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: false,
    };
    let model = CausalLm::new_random(config, &opts, 4).unwrap();
    model.save(dir, Some(&tok)).unwrap();
}

#[test]
fn a_script_writes_answers_preference_metrics_and_a_robustness_plot() {
    let root = temp_dir("script");
    let model = root.join("model");
    save_tiny_model(&model);
    let instructions = root.join("instructions.json");
    let items: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"instruction": format!("Question {i}?"), "output": "",
                "generator": "example", "dataset": "tiny", "datasplit": "eval"})
        })
        .collect();
    std::fs::write(&instructions, serde_json::to_string(&items).unwrap()).unwrap();
    let data = root.join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Hi?\", \"chosen\": \"Hello.\", \"rejected\": \"No.\"}\n\
         {\"prompt\": \"Sky?\", \"chosen\": \"Blue.\", \"rejected\": \"Green.\"}\n",
    )
    .unwrap();
    let out = root.join("out");
    let mut host = Host::new(HostOptions {
        out_dir: out.clone(),
        ..HostOptions::default()
    })
    .unwrap();
    let script = format!(
        r#"
        let r = alpaca_answers(#{{model: "{m}", instructions: "{i}", out: "answers.json",
            generator: "tiny", n: 2, batch_size: 2, max_new_tokens: 6}});
        if r.generated != 2 {{ throw "generated " + r.generated; }}
        let p = preference_eval(#{{model: "{m}", reference: "{m}", data: "{d}"}});
        if p["rewards/margins"] != 0.0 {{ throw "margin " + p["rewards/margins"]; }}
        let handle = load_model("{m}");
        let t = robustness(#{{model: handle, name: "tiny", prompts: ["a", "b"],
            temperatures: [0.7, 1.5], max_new_tokens: 5}});
        if t.rows.len() != 2 {{ throw "rows"; }}
        let text = robustness_text([t, t]);
        write_text("table.txt", text);
        plot_robustness("robustness.png", [t, t]);
        "#,
        m = model.display(),
        i = instructions.display(),
        d = data.display(),
    );

    host.run(&script).unwrap();

    let answers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("answers.json")).unwrap()).unwrap();
    assert_eq!(answers.as_array().unwrap().len(), 2);
    assert_eq!(answers[1]["generator"], "tiny");
    let table = std::fs::read_to_string(out.join("table.txt")).unwrap();
    assert_eq!(table.lines().count(), 5, "{table}");
    assert!(std::fs::metadata(out.join("robustness.png")).unwrap().len() > 1000);
}
