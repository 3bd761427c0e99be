//! Bad input is an error that names what is wrong, never a panic.

use std::path::Path;

use ganpo::model::{CausalLm, Family, LoadOptions, ModelConfig};
use ganpo::Error;

fn saved_tiny(dir: &Path) {
    let model = CausalLm::new_random(
        ModelConfig::tiny(Family::Llama),
        &LoadOptions::default(),
        21,
    )
    .unwrap();
    model.save(dir, None).unwrap();
}

fn load(dir: &Path) -> Result<CausalLm, Error> {
    CausalLm::load(dir.to_str().unwrap(), &LoadOptions::default()).map(|l| l.model)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, value.to_string()).unwrap();
}

#[test]
fn an_unsupported_architecture_is_named_with_the_supported_list() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    edit_config(dir.path(), |v| v["model_type"] = "gpt2".into());
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("gpt2") && err.contains("llama") && err.contains("gemma2"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_names_the_tensor_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("model.safetensors"));
}

#[test]
fn a_shape_mismatch_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    edit_config(dir.path(), |v| v["intermediate_size"] = 40.into());
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("[40, 32]") && msg.contains("[48, 32]"),
        "{msg}"
    );
    assert!(msg.contains("gate_proj"), "{msg}");
}

#[test]
fn a_truncated_safetensors_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn a_corrupt_or_truncated_gguf_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00 definitely not a model").unwrap();
    let msg = CausalLm::load(garbage.to_str().unwrap(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("garbage.gguf"), "{msg}");

    let real = std::env::var("GANPO_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !real.exists() {
        println!(
            "SKIPPED a_corrupt_or_truncated_gguf_file_is_an_error (truncated part): asset {} \
             absent (run scripts/fetch-assets.sh)",
            real.display()
        );
        return;
    }
    let bytes = std::fs::read(&real).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let msg = CausalLm::load(truncated.to_str().unwrap(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated.gguf"), "{msg}");
}

/// One test for both hub cases: they set `HF_HOME`, which parallel tests would race on.
#[test]
fn hub_ids_load_offline_from_the_cache_and_a_missing_one_names_id_and_folder() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("hub/models--tiny--llama");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    saved_tiny(&snapshot);
    std::env::set_var("HF_HOME", cache.path());

    let loaded = CausalLm::load("tiny/llama", &LoadOptions::default()).unwrap();
    assert_eq!(loaded.model.config().num_hidden_layers, 2);

    let err = CausalLm::load("HuggingFaceTB/NoSuchModel-1M", &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotInCache { .. }), "{msg}");
    assert!(msg.contains("HuggingFaceTB/NoSuchModel-1M"), "{msg}");
    assert!(msg.contains(&cache.path().display().to_string()), "{msg}");
}

#[test]
fn a_missing_model_file_under_a_local_folder_is_a_missing_file_not_a_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let cwd_relative = format!("{}/missing.gguf", dir.path().display());
    for source in [
        cwd_relative.as_str(),
        "tests/missing.gguf",
        "tests/missing-model",
    ] {
        let err = CausalLm::load(source, &LoadOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(!matches!(err, Error::NotInCache { .. }), "{source}: {msg}");
        assert!(msg.contains("no such file or folder"), "{source}: {msg}");
        assert!(msg.contains(source), "{source}: {msg}");
    }
}
