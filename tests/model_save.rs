//! Saving: what we write loads back (through our own loader) to identical logits, and LoRA
//! adapters are merged into the saved weights.

use candle_core::{DType, Device, Tensor};
use ganpo::model::{CausalLm, Family, ForwardOptions, LoadOptions, LoraConfig, ModelConfig};

fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 26], [5, 35, 8, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask)
}

fn logits(model: &CausalLm) -> Tensor {
    let (ids, mask) = batch();
    model
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_saved_model_loads_back_to_identical_logits_in_every_family() {
    for family in [Family::Llama, Family::Qwen2, Family::Gemma2, Family::Gemma3] {
        let model =
            CausalLm::new_random(ModelConfig::tiny(family), &LoadOptions::default(), 11).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path(), None).unwrap();
        assert!(dir.path().join("config.json").is_file());
        assert!(!dir.path().join("model.safetensors.part").exists());

        let loaded = CausalLm::load(dir.path().to_str().unwrap(), &LoadOptions::default())
            .unwrap()
            .model;
        assert_eq!(loaded.config().family, family);
        assert_eq!(
            max_diff(&logits(&model), &logits(&loaded)),
            0.0,
            "{family:?}"
        );
    }
}

#[test]
fn saving_merges_lora_adapters_into_the_weights() {
    let opts = LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    };
    let mut model = CausalLm::new_random(ModelConfig::tiny(Family::Llama), &opts, 12).unwrap();
    model.attach_lora(&LoraConfig::default(), 1).unwrap();
    for (name, var) in model.vars() {
        if name.contains("lora_B") {
            let noise = Tensor::rand(-0.5f32, 0.5, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
    }
    let adapted = logits(&model);

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), None).unwrap();
    let names =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.keys().all(|n| !n.contains("lora")));

    let loaded = CausalLm::load(dir.path().to_str().unwrap(), &LoadOptions::default())
        .unwrap()
        .model;
    let error = max_diff(&adapted, &logits(&loaded));
    assert!(error < 1e-5, "merged model differs by {error}");
}

#[test]
fn a_bf16_load_keeps_the_asked_dtype() {
    let model = CausalLm::new_random(
        ModelConfig::tiny(Family::Llama),
        &LoadOptions::default(),
        13,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), None).unwrap();
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let loaded = CausalLm::load(dir.path().to_str().unwrap(), &opts)
        .unwrap()
        .model;
    let bf16 = logits(&loaded);
    assert_eq!(bf16.dtype(), DType::BF16);
    let error = max_diff(&bf16.to_dtype(DType::F32).unwrap(), &logits(&model));
    assert!(error < 0.1, "bf16 logits differ from f32 by {error}");
}

#[cfg(unix)]
#[test]
fn saved_weights_get_the_permissions_of_any_new_file_not_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let model =
        CausalLm::new_random(ModelConfig::tiny(Family::Llama), &LoadOptions::default(), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("final");
    model.save(&out, None).unwrap();

    // What the umask gives a plain new file here (0644 under the usual 022).
    let probe = out.join("probe");
    std::fs::write(&probe, b"").unwrap();
    let expected = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    for file in ["model.safetensors", "config.json"] {
        let mode = std::fs::metadata(out.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, expected, "{file}: {mode:o} vs {expected:o}");
    }
}
