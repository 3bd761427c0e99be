//! Trainability and masking of the decoders: every parameter receives a gradient, padding
//! never changes real tokens, the frozen copy is independent, LoRA trains only adapters.

use candle_core::{DType, Device, Tensor, D};
use ganpo::model::{
    CausalLm, Family, ForwardOptions, HiddenStates, LoadOptions, LoraConfig, ModelConfig,
};

const FAMILIES: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Gemma2, Family::Gemma3];

fn trainable() -> LoadOptions {
    LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    }
}

/// Two rows: 6 real tokens, and 3 real tokens then padding.
fn padded_batch() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[[5u32, 9, 17, 33, 2, 40], [7, 12, 60, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 1., 1.], [1., 1., 1., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask)
}

/// Mean log-probability of the next token: a loss through log-softmax over the vocabulary.
fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let t = ids.dim(1).unwrap();
    let logits = logits.narrow(1, 0, t - 1).unwrap();
    let labels = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let max = logits.max_keepdim(D::Minus1).unwrap().detach();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let log_z = shifted
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    let log_probs = shifted.broadcast_sub(&log_z).unwrap();
    log_probs
        .gather(&labels, 2)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

fn assert_all_gradients_finite_and_nonzero(model: &CausalLm, loss: &Tensor, skip: &[&str]) {
    let grads = loss.backward().unwrap();
    let vars = model.vars();
    assert!(!vars.is_empty());
    for (name, var) in vars {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm² {norm}"
        );
    }
}

#[test]
fn a_loss_on_the_logits_reaches_every_parameter_of_every_family() {
    for family in FAMILIES {
        let model = CausalLm::new_random(ModelConfig::tiny(family), &trainable(), 1).unwrap();
        let (ids, mask) = padded_batch();
        let out = model
            .forward(&ids, &mask, &ForwardOptions::default())
            .unwrap();
        let loss = next_token_loss(out.logits.as_ref().unwrap(), &ids);
        assert_all_gradients_finite_and_nonzero(&model, &loss, &[]);
    }
}

#[test]
fn a_loss_on_the_last_hidden_state_reaches_every_parameter_but_the_output_head() {
    for family in FAMILIES {
        let config = ModelConfig::tiny(family);
        let last = config.num_hidden_layers;
        let model = CausalLm::new_random(config, &trainable(), 2).unwrap();
        let (ids, mask) = padded_batch();
        let opts = ForwardOptions {
            logits: false,
            hidden: HiddenStates::Layers(vec![last]),
        };
        let out = model.forward(&ids, &mask, &opts).unwrap();
        assert!(out.logits.is_none());
        let hidden = out.hidden(last).unwrap();
        let weights = Tensor::rand(-1f32, 1f32, hidden.shape(), &Device::Cpu).unwrap();
        let loss = (hidden * weights).unwrap().sum_all().unwrap();
        // An untied output head is not on the path from the hidden state to the loss.
        assert_all_gradients_finite_and_nonzero(&model, &loss, &["lm_head.weight"]);
    }
}

#[test]
fn only_requested_hidden_states_are_returned() {
    let model =
        CausalLm::new_random(ModelConfig::tiny(Family::Llama), &LoadOptions::default(), 3).unwrap();
    let (ids, mask) = padded_batch();
    let opts = ForwardOptions {
        logits: false,
        hidden: HiddenStates::Layers(vec![1]),
    };
    let out = model.forward(&ids, &mask, &opts).unwrap();
    let indices: Vec<usize> = out.hidden_states.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![1]);

    let all = ForwardOptions {
        logits: true,
        hidden: HiddenStates::All,
    };
    let full = model.forward(&ids, &mask, &all).unwrap();
    assert_eq!(full.hidden_states.len(), 3);
    let diff = (out.hidden(1).unwrap() - full.hidden(1).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn padding_never_changes_real_tokens_and_gives_no_nan() {
    for family in FAMILIES {
        let model =
            CausalLm::new_random(ModelConfig::tiny(family), &LoadOptions::default(), 4).unwrap();
        let (ids, mask) = padded_batch();
        let batched = model
            .forward(&ids, &mask, &ForwardOptions::default())
            .unwrap();
        let batched = batched.logits.unwrap();
        let finite = batched
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            finite.is_finite(),
            "{family:?}: non-finite logits with padding"
        );

        let alone_ids = Tensor::new(&[[7u32, 12, 60]], &Device::Cpu).unwrap();
        let alone_mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
        let alone = model
            .forward(&alone_ids, &alone_mask, &ForwardOptions::default())
            .unwrap();
        let real = batched.get(1).unwrap().narrow(0, 0, 3).unwrap();
        let diff = (real - alone.logits.unwrap().get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        let error = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            error < 1e-5,
            "{family:?}: padding changed real tokens by {error}"
        );
    }
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error() {
    let model =
        CausalLm::new_random(ModelConfig::tiny(Family::Llama), &LoadOptions::default(), 5).unwrap();
    let ids = Tensor::new(&[[1u32, 64]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("64") && err.contains("vocabulary"), "{err}");

    let short_mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let err = model
        .forward(&ids, &short_mask, &ForwardOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("[1, 2]") && err.to_string().contains("[1, 3]"),
        "{err}"
    );
}

#[test]
fn the_frozen_copy_does_not_follow_updates_of_the_policy() {
    let policy = CausalLm::new_random(ModelConfig::tiny(Family::Llama), &trainable(), 6).unwrap();
    let reference = policy.frozen_copy().unwrap();
    assert!(reference.vars().is_empty());
    let (ids, mask) = padded_batch();
    let before = reference
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap();

    for (_, var) in policy.vars() {
        var.set(&var.as_tensor().affine(1.5, 0.01).unwrap())
            .unwrap();
    }
    let after = reference
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let moved = policy
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let same = (before.logits.as_ref().unwrap() - after.logits.unwrap()).unwrap();
    assert_eq!(
        same.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let changed = (before.logits.unwrap() - moved.logits.unwrap()).unwrap();
    assert!(
        changed
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    );
}

#[test]
fn lora_trains_only_its_adapters_and_starts_equal_to_the_base() {
    let mut model =
        CausalLm::new_random(ModelConfig::tiny(Family::Qwen2), &trainable(), 7).unwrap();
    let (ids, mask) = padded_batch();
    let base = model
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap();

    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    model.attach_lora(&cfg, 0).unwrap();
    let names: Vec<String> = model.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 3 * 2, "{names:?}");
    assert!(names.iter().all(|n| n.contains(".lora_")));

    let out = model
        .forward(&ids, &mask, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap();
    let diff = (&out - &base).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(
        diff.to_scalar::<f32>().unwrap(),
        0.0,
        "B = 0 leaves the model unchanged"
    );

    let loss = next_token_loss(&out, &ids);
    let grads = loss.backward().unwrap();
    for (name, var) in model.vars() {
        let grad = grads.get(var.as_tensor()).unwrap();
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // With B = 0 only B's gradient is non-zero at the start (as in PEFT).
        if name.contains("lora_B") {
            assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
        }
    }
}
