//! The transformer discriminator against torch (tests/fixtures/objective/make_fixtures.py,
//! torch 2.9.1): a training forward with one spectral-norm power iteration, the backward
//! through every parameter and the input, the updated `u`/`v`, and evaluation forwards.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ganpo::disc::{Discriminator, MlpDiscConfig, TransformerDiscConfig};

fn load() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/objective/disc.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    a.sub(&b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn tiny_disc(f: &HashMap<String, Tensor>) -> Discriminator {
    let cfg = TransformerDiscConfig {
        input_dim: 6,
        d_model: 8,
        heads: 2,
        layers: 2,
        ffn_dim: 16,
        dropout: 0.0,
        max_positions: 10,
        spectral_norm: true,
    };
    let disc = Discriminator::transformer(cfg, 0, &Device::Cpu).unwrap();
    let init: BTreeMap<String, Tensor> = f
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.clone())))
        .collect();
    disc.load_named_tensors(&init, &PathBuf::from("disc.safetensors"))
        .unwrap();
    disc
}

#[test]
fn transformer_discriminator_matches_torch_forward_backward_and_spectral_norm_state() {
    let f = load();
    let disc = tiny_disc(&f);
    let h = candle_core::Var::from_tensor(&f["h"]).unwrap();

    let out = disc.forward(h.as_tensor(), Some(&f["mask"]), true).unwrap();
    let grads = out
        .mul(&f["weights"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    assert!(
        max_abs_diff(&out, &f["out_train"]) <= 1e-5,
        "{}",
        max_abs_diff(&out, &f["out_train"])
    );
    assert!(max_abs_diff(grads.get(h.as_tensor()).unwrap(), &f["grad.h"]) <= 1e-5);
    let mut worst = 0f32;
    for (name, var) in disc.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let diff = max_abs_diff(g, &f[&format!("grad.{name}")]);
        assert!(diff <= 1e-5, "gradient of {name} differs by {diff}");
        worst = worst.max(diff);
    }
    println!(
        "disc parity: out {:.2e}, grad h {:.2e}, worst param grad {worst:.2e}",
        max_abs_diff(&out, &f["out_train"]),
        max_abs_diff(grads.get(h.as_tensor()).unwrap(), &f["grad.h"])
    );
    for (name, t) in disc.named_tensors().unwrap() {
        if name.ends_with("weight_u") || name.ends_with("weight_v") {
            assert!(
                max_abs_diff(&t, &f[&format!("after.{name}")]) <= 1e-6,
                "{name}"
            );
        }
    }
    let eval_mask = disc.forward(&f["h"], Some(&f["mask"]), false).unwrap();
    let eval_all = disc.forward(&f["h"], None, false).unwrap();
    assert!(max_abs_diff(&eval_mask, &f["out_eval_mask"]) <= 1e-5);
    assert!(max_abs_diff(&eval_all, &f["out_eval_nomask"]) <= 1e-5);
}

#[test]
fn evaluation_forward_leaves_the_spectral_norm_vectors_unchanged() {
    let f = load();
    let disc = tiny_disc(&f);
    let before = disc.named_tensors().unwrap();

    disc.forward(&f["h"], None, false).unwrap();

    for ((name, a), (_, b)) in before.iter().zip(disc.named_tensors().unwrap().iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{name} changed in eval mode");
    }
}

#[test]
fn dropout_in_training_changes_scores_and_is_reproducible_from_the_rng_state() {
    let d = Device::Cpu;
    let disc = Discriminator::transformer(
        TransformerDiscConfig {
            d_model: 16,
            heads: 2,
            ffn_dim: 32,
            spectral_norm: false,
            ..TransformerDiscConfig::new(8)
        },
        3,
        &d,
    )
    .unwrap();
    let h = Tensor::randn(0f32, 1.0, (2, 6, 8), &d).unwrap();
    let state = disc.rng_state().unwrap();

    let a = disc.forward(&h, None, true).unwrap();
    disc.set_rng_state(state.0, state.1).unwrap();
    let b = disc.forward(&h, None, true).unwrap();
    let c = disc.forward(&h, None, true).unwrap();

    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&b, &c) > 0.0);
}

#[test]
fn inputs_longer_than_the_position_table_are_cut_to_it() {
    let d = Device::Cpu;
    let cfg = TransformerDiscConfig {
        d_model: 8,
        heads: 2,
        ffn_dim: 16,
        max_positions: 4,
        ..TransformerDiscConfig::new(5)
    };
    let disc = Discriminator::transformer(cfg, 1, &d).unwrap();
    let h = Tensor::randn(0f32, 1.0, (2, 9, 5), &d).unwrap();

    let long = disc.forward(&h, None, false).unwrap();
    let cut = disc
        .forward(&h.narrow(1, 0, 4).unwrap(), None, false)
        .unwrap();

    assert_eq!(long.dims(), &[2]);
    assert!(max_abs_diff(&long, &cut) <= 1e-6);
}

#[test]
fn mlp_discriminator_scores_each_sequence_and_every_parameter_gets_a_gradient() {
    let d = Device::Cpu;
    let disc = Discriminator::mlp(
        MlpDiscConfig {
            hidden_dim: 16,
            ..MlpDiscConfig::new(6)
        },
        2,
        &d,
    )
    .unwrap();
    let h = Tensor::randn(0f32, 1.0, (3, 5, 6), &d).unwrap();
    let mask = Tensor::new(
        &[
            [1f32, 1., 0., 0., 0.],
            [1., 1., 1., 1., 1.],
            [0., 0., 1., 1., 0.],
        ],
        &d,
    )
    .unwrap();

    let out = disc.forward(&h, Some(&mask), true).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();

    assert_eq!(out.dims(), &[3]);
    for (name, var) in disc.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}");
    }
}

#[test]
fn a_hidden_width_mismatch_names_both_shapes() {
    let d = Device::Cpu;
    let disc = Discriminator::mlp(MlpDiscConfig::new(6), 2, &d).unwrap();
    let h = Tensor::zeros((2, 3, 7), DType::F32, &d).unwrap();

    let msg = disc.forward(&h, None, false).unwrap_err().to_string();

    assert!(
        msg.contains("[2, 3, 6]") && msg.contains("[2, 3, 7]"),
        "{msg}"
    );
}

#[test]
fn a_frozen_forward_sends_gradient_to_the_input_but_none_to_the_weights() {
    let d = Device::Cpu;
    let cfg = TransformerDiscConfig {
        d_model: 8,
        heads: 2,
        ffn_dim: 16,
        ..TransformerDiscConfig::new(4)
    };
    let disc = Discriminator::transformer(cfg, 4, &d).unwrap();
    let h = candle_core::Var::randn(0f32, 1.0, (2, 3, 4), &d).unwrap();

    let grads = disc
        .forward_frozen(h.as_tensor(), None, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    assert!(grads.get(h.as_tensor()).is_some());
    for (name, var) in disc.vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
}

/// Scores and every gradient of one forward, with the encoder layers fused or composed.
fn run_pass(
    cfg: &TransformerDiscConfig,
    h: &candle_core::Var,
    pass: ganpo::disc::layers::Pass,
) -> (Tensor, BTreeMap<String, Tensor>) {
    let disc = ganpo::disc::TransformerDisc::new(cfg.clone(), 11, &Device::Cpu).unwrap();
    let scores = disc.forward_pass(h.as_tensor(), None, pass).unwrap();
    // A loss that weighs the rows differently, so that no gradient cancels by symmetry.
    let weights = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
    let grads = scores
        .mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut named = BTreeMap::new();
    if let Some(g) = grads.get(h.as_tensor()) {
        named.insert("input".to_string(), g.clone());
    }
    for (name, var) in disc.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            named.insert(name, g.clone());
        }
    }
    (scores, named)
}

#[test]
fn the_fused_encoder_layer_matches_the_composed_one_in_scores_and_every_gradient() {
    use ganpo::disc::layers::Pass;
    let cfg = TransformerDiscConfig {
        d_model: 32,
        heads: 4,
        ffn_dim: 48,
        dropout: 0.25,
        ..TransformerDiscConfig::new(12)
    };
    let h = candle_core::Var::randn(0f32, 1.0, (3, 9, 12), &Device::Cpu).unwrap();
    let parameters = ganpo::disc::TransformerDisc::new(cfg.clone(), 11, &Device::Cpu)
        .unwrap()
        .vars()
        .len();
    for (train, frozen) in [(true, false), (false, false), (false, true), (true, true)] {
        let pass = Pass {
            train,
            frozen,
            composed: false,
        };
        let (fused, fused_grads) = run_pass(&cfg, &h, pass);
        let (composed, composed_grads) = run_pass(
            &cfg,
            &h,
            Pass {
                composed: true,
                ..pass
            },
        );
        let what = format!("train {train}, frozen {frozen}");
        assert!(max_abs_diff(&fused, &composed) < 1e-5, "{what}: scores");
        let names: Vec<_> = fused_grads.keys().collect();
        assert_eq!(
            names,
            composed_grads.keys().collect::<Vec<_>>(),
            "{what}: which tensors get a gradient"
        );
        // A frozen pass reaches the input only; a trainable one every parameter too.
        let expected = if frozen { 1 } else { 1 + parameters };
        assert_eq!(names.len(), expected, "{what}: {names:?}");
        for (name, g) in &fused_grads {
            let reference = &composed_grads[name];
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_abs_diff(g, reference);
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{what}: gradient of {name} differs by {err} (scale {scale})"
            );
            if name.starts_with("encoder") && !name.ends_with("bias") {
                assert!(scale > 0.0, "{what}: {name} got a zero gradient");
            }
        }
    }
}
