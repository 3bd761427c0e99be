//! AlpacaEval answer files on a tiny random Llama with the tiny ChatML tokenizer: the file has
//! the shipped file's keys in order, answers decode cleanly, and a run resumes from its
//! sidecar without redoing finished items.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ganpo::eval::alpaca::sidecar_path;
use ganpo::eval::{
    generate_alpaca_answers, read_alpaca_file, template_residue, AlpacaConfig, AlpacaItem,
    Progress, Subset,
};
use ganpo::model::{CausalLm, Family, GenerateOptions, LoadOptions, ModelConfig};
use ganpo::tokenize::Tokenizer;

const KEYS: [&str; 5] = ["instruction", "output", "generator", "dataset", "datasplit"];

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_chatml");
    Tokenizer::from_dir(&dir).unwrap()
}

/// A random tiny Llama whose vocabulary and EOS are the tiny tokenizer's.
fn tiny_model(tokenizer: &Tokenizer) -> CausalLm {
    let mut config = ModelConfig::tiny(Family::Llama);
    config.vocab_size = tokenizer.vocab_size();
    config.eos_token_ids = vec![tokenizer.eos_token_id().unwrap()];
    config.max_position_embeddings = 512;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: false,
    };
    CausalLm::new_random(config, &opts, 7).unwrap()
}

fn instructions() -> Vec<AlpacaItem> {
    [
        "Say hi.",
        "Name a colour.",
        "Count to three.",
        "Tell a joke.",
    ]
    .iter()
    .enumerate()
    .map(|(i, text)| AlpacaItem {
        instruction: text.to_string(),
        output: "an example answer to ignore".into(),
        generator: "example".into(),
        dataset: format!("set{i}"),
        datasplit: "eval".into(),
    })
    .collect()
}

fn config(subset: Subset) -> AlpacaConfig {
    AlpacaConfig {
        generator: "tiny-model".into(),
        batch_size: 2,
        generate: GenerateOptions {
            max_new_tokens: 12,
            temperature: 0.0,
            ..GenerateOptions::default()
        },
        subset,
        system: None,
    }
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ganpo-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_answer_file_has_the_shipped_keys_in_order_and_clean_answers() {
    let tok = tokenizer();
    let model = tiny_model(&tok);
    let out = out_dir("format").join("answers.json");
    let mut seen = vec![];

    let report = generate_alpaca_answers(
        &model,
        &tok,
        &instructions(),
        &out,
        &config(Subset::First(3)),
        &mut |p: &Progress| seen.push(p.done),
    )
    .unwrap();

    assert_eq!((report.items, report.generated, report.resumed), (3, 3, 0));
    assert_eq!(seen, vec![0, 2, 3], "progress after every batch of 2");
    let text = std::fs::read_to_string(&out).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let records = parsed.as_array().unwrap();
    assert_eq!(records.len(), 3);
    for (record, source) in records.iter().zip(instructions()) {
        let keys: Vec<&str> = record
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, KEYS);
        assert_eq!(record["instruction"], source.instruction.as_str());
        assert_eq!(record["generator"], "tiny-model");
        assert_eq!(record["dataset"], source.dataset.as_str());
        let output = record["output"].as_str().unwrap();
        assert_eq!(output, output.trim());
        assert_eq!(template_residue(&tok, output), None, "{output:?}");
    }
    assert_eq!(read_alpaca_file(&out).unwrap().len(), 3);
}

#[test]
fn the_shipped_instruction_file_parses_when_present() {
    let assets = std::env::var("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"));
    let path = assets.join("alpaca_eval/outputs.json");
    if !path.exists() {
        println!(
            "SKIPPED the_shipped_instruction_file_parses_when_present: asset {} absent \
             (run scripts/fetch-assets.sh)",
            path.display()
        );
        return;
    }

    let items = read_alpaca_file(&path).unwrap();
    assert_eq!(items.len(), 805);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys: Vec<&str> = raw[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, KEYS, "our record order is the shipped one");
}

#[test]
fn a_half_written_run_resumes_without_redoing_finished_items() {
    let tok = tokenizer();
    let model = tiny_model(&tok);
    let out = out_dir("resume").join("answers.json");
    let noop = &mut |_: &Progress| {};

    let first = generate_alpaca_answers(
        &model,
        &tok,
        &instructions(),
        &out,
        &config(Subset::First(2)),
        noop,
    )
    .unwrap();
    assert_eq!(first.generated, 2);
    let sidecar = sidecar_path(&out);
    let marked = std::fs::read_to_string(&sidecar).unwrap().replacen(
        "\"output\":\"",
        "\"output\":\"FROM THE SIDECAR ",
        1,
    );
    std::fs::write(&sidecar, marked).unwrap();

    let resumed = generate_alpaca_answers(
        &model,
        &tok,
        &instructions(),
        &out,
        &config(Subset::All),
        noop,
    )
    .unwrap();

    assert_eq!(
        (resumed.items, resumed.resumed, resumed.generated),
        (4, 2, 2)
    );
    let items = read_alpaca_file(&out).unwrap();
    assert_eq!(items.len(), 4);
    assert!(
        items[0].output.starts_with("FROM THE SIDECAR"),
        "item 0 was not redone"
    );
    let order: Vec<&str> = items.iter().map(|i| i.instruction.as_str()).collect();
    let expected: Vec<String> = instructions().into_iter().map(|i| i.instruction).collect();
    assert_eq!(order, expected);
}

#[test]
fn a_sidecar_from_another_generator_is_refused_naming_both() {
    let tok = tokenizer();
    let model = tiny_model(&tok);
    let out = out_dir("other").join("answers.json");
    let noop = &mut |_: &Progress| {};
    generate_alpaca_answers(
        &model,
        &tok,
        &instructions(),
        &out,
        &config(Subset::First(1)),
        noop,
    )
    .unwrap();

    let mut other = config(Subset::All);
    other.generator = "another-model".into();
    let err = generate_alpaca_answers(&model, &tok, &instructions(), &out, &other, noop)
        .unwrap_err()
        .to_string();

    assert!(
        err.contains("tiny-model") && err.contains("another-model"),
        "{err}"
    );
    assert!(err.contains("partial.jsonl"), "{err}");
}

#[test]
fn a_seeded_sample_is_reproducible_and_in_file_order() {
    let a = Subset::Sample { n: 5, seed: 3 }.indices(805);
    let b = Subset::Sample { n: 5, seed: 3 }.indices(805);
    let c = Subset::Sample { n: 5, seed: 4 }.indices(805);

    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(Subset::First(3).indices(2), vec![0, 1]);
}
