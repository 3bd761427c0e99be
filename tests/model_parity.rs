//! Parity of our decoders with transformers on tiny random configs of every family.
//!
//! Expected values come from `tests/fixtures/model/make_fixtures.py` (transformers 5.25.0,
//! torch 2.9.1, f32, eager attention; see `tests/fixtures/model/versions.json`): the logits
//! and every hidden state of a right-padded batch of two rows (7 and 4 real tokens).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ganpo::model::{CausalLm, ForwardOptions, HiddenStates, LoadOptions};

const TOLERANCE: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(family)
}

/// The largest absolute difference over real-token positions of `[N, T, ..]` tensors.
fn max_error_on_real_tokens(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    let diff = (ours - theirs).unwrap().abs().unwrap();
    let mask = mask.unsqueeze(2).unwrap();
    let masked = diff.broadcast_mul(&mask).unwrap();
    masked
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check_family(family: &str) {
    let dir = fixture(family);
    let loaded = CausalLm::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let model = loaded.model;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let input_ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = io["attention_mask"].clone();

    let opts = ForwardOptions {
        logits: true,
        hidden: HiddenStates::All,
    };
    let out = model.forward(&input_ids, &mask, &opts).unwrap();

    let logits_error = max_error_on_real_tokens(out.logits.as_ref().unwrap(), &io["logits"], &mask);
    println!("{family}: logits max abs error {logits_error:.2e}");
    assert!(
        logits_error <= TOLERANCE,
        "{family} logits error {logits_error}"
    );

    let layers = model.config().num_hidden_layers;
    assert_eq!(out.hidden_states.len(), layers + 1);
    for (index, hidden) in &out.hidden_states {
        let expected = &io[&format!("hidden.{index}")];
        let error = max_error_on_real_tokens(hidden, expected, &mask);
        println!("{family}: hidden {index} max abs error {error:.2e}");
        assert!(error <= TOLERANCE, "{family} hidden {index} error {error}");
    }
}

#[test]
fn llama_matches_transformers_on_a_padded_batch() {
    check_family("llama");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_family("llama3_scaled");
}

#[test]
fn qwen2_matches_transformers_on_a_padded_batch() {
    check_family("qwen2");
}

#[test]
fn gemma2_matches_transformers_on_a_padded_batch() {
    check_family("gemma2");
}

#[test]
fn gemma3_matches_transformers_on_a_padded_batch() {
    check_family("gemma3");
}

/// A GGUF file written as llama.cpp's converter writes Gemma (`make_gemma_ggufs.py`): norms
/// stored with the `+1` folded in, llama.cpp's names and metadata, no per-layer kinds.
fn check_gemma_gguf(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let path = dir.join(format!("{name}.gguf"));
    let model = CausalLm::load(path.to_str().unwrap(), &LoadOptions::default())
        .unwrap()
        .model;
    let io = candle_core::safetensors::load(
        dir.join(format!("{name}_gguf.io.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let input_ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = io["attention_mask"].clone();
    let out = model
        .forward(&input_ids, &mask, &ForwardOptions::default())
        .unwrap();
    let error = max_error_on_real_tokens(out.logits.as_ref().unwrap(), &io["logits"], &mask);
    println!("{name} GGUF: logits max abs error {error:.2e}");
    assert!(error <= TOLERANCE, "{name} GGUF logits error {error}");
}

#[test]
fn gemma2_gguf_matches_transformers() {
    check_gemma_gguf("gemma2");
}

#[test]
fn gemma3_gguf_matches_transformers() {
    check_gemma_gguf("gemma3");
}
