//! Objectives against the torch fixtures of tests/fixtures/objective/make_fixtures.py
//! (torch 2.9.1, transformers 5.25.0): log-probs and their gradient, every preference loss
//! and metric, GANPO's discriminator and generator terms with their moving means.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use ganpo::objective::ganpo::{chosen_disc_loss, generator_loss, rejected_disc_loss};
use ganpo::objective::{
    preference_loss, sequence_logps, sequence_logps_composed, MovingMeans, PreferenceConfig,
    PreferenceLossKind, SequenceLogps,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/objective")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn losses_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("losses.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    a.sub(&b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn vec_f32(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn sequence_logps_match_torch_values_and_gradient() {
    let f = load("logps.safetensors");
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = Var::from_tensor(&f["logits"]).unwrap();

    let out = sequence_logps(logits.as_tensor(), &ids, &f["completion_mask"]).unwrap();
    let grads = out
        .sum
        .mul(&f["weights"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = grads
        .get(logits.as_tensor())
        .expect("logits receive a gradient");

    println!(
        "logps parity: sum {:.2e}, grad {:.2e}",
        max_abs_diff(&out.sum, &f["sum"]),
        max_abs_diff(grad, &f["grad_logits"])
    );
    assert!(max_abs_diff(&out.sum, &f["sum"]) <= 1e-5);
    assert!(max_abs_diff(&out.count, &f["count"]) == 0.0);
    assert!(max_abs_diff(&out.mean_logit_sum, &f["mean_logit_sum"]) <= 1e-5);
    assert!(
        max_abs_diff(grad, &f["grad_logits"]) <= 1e-6,
        "{}",
        max_abs_diff(grad, &f["grad_logits"])
    );
}

#[test]
fn fused_logps_gradient_equals_composed_ops_gradient() {
    let device = Device::Cpu;
    // Fixed, spread-out inputs (not a random draw, so the test cannot flake): logits of
    // scale ~3, labels over the whole vocabulary, about half the positions in the mask.
    let values: Vec<f32> = (0..4 * 9 * 50)
        .map(|i| 3.0 * (i as f32 * 0.731).sin())
        .collect();
    let logits = Var::from_vec(values, (4, 9, 50), &device).unwrap();
    let ids: Vec<u32> = (0..4 * 9).map(|i| (i * 37 + 11) % 50).collect();
    let ids = Tensor::from_vec(ids, (4, 9), &device).unwrap();
    let mask: Vec<f32> = (0..4 * 9)
        .map(|i| ((i * 5 % 7) >= 3) as u8 as f32)
        .collect();
    let mask = Tensor::from_vec(mask, (4, 9), &device).unwrap();
    let w = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25], &device).unwrap();

    let fused = sequence_logps(logits.as_tensor(), &ids, &mask).unwrap();
    let composed = sequence_logps_composed(logits.as_tensor(), &ids, &mask).unwrap();
    let g_fused = fused
        .sum
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_composed = composed
        .sum
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    assert!(max_abs_diff(&fused.sum, &composed.sum) <= 1e-5);
    let (a, b) = (
        g_fused.get(logits.as_tensor()).unwrap(),
        g_composed.get(logits.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(a, b) <= 1e-6);
}

#[test]
fn fused_logps_accept_bf16_logits_and_return_a_bf16_gradient() {
    let device = Device::Cpu;
    let logits = Var::randn(0f32, 1.0, (2, 5, 16), &device).unwrap();
    let bf = Var::from_tensor(&logits.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &device).unwrap();
    let mask = Tensor::new(&[[0f32, 0., 1., 1., 1.], [0., 1., 1., 0., 0.]], &device).unwrap();

    let full = sequence_logps(logits.as_tensor(), &ids, &mask).unwrap();
    let half = sequence_logps(bf.as_tensor(), &ids, &mask).unwrap();
    let grads = half.sum.sum_all().unwrap().backward().unwrap();

    assert_eq!(grads.get(bf.as_tensor()).unwrap().dtype(), DType::BF16);
    assert!(max_abs_diff(&full.sum, &half.sum) <= 0.1);
}

#[test]
fn sequence_logps_reject_mismatched_shapes_naming_both() {
    let device = Device::Cpu;
    let logits = Tensor::zeros((2, 5, 7), DType::F32, &device).unwrap();
    let ids = Tensor::zeros((2, 4), DType::U32, &device).unwrap();
    let mask = Tensor::zeros((2, 5), DType::F32, &device).unwrap();

    let err = sequence_logps(&logits, &ids, &mask)
        .unwrap_err()
        .to_string();

    assert!(
        err.contains("input_ids") && err.contains("[2, 5]") && err.contains("[2, 4]"),
        "{err}"
    );
}

fn policy_from_json(p: &serde_json::Value) -> (SequenceLogps, Tensor) {
    let d = Device::Cpu;
    let t = |k: &str| Tensor::new(vec_f32(&p[k]), &d).unwrap();
    let policy = SequenceLogps {
        sum: t("policy_sum"),
        count: t("policy_count"),
        mean_logit_sum: t("policy_mean_logit_sum"),
    };
    (policy, t("reference_sum"))
}

#[test]
fn every_preference_loss_and_metric_matches_the_torch_reference() {
    let json = losses_json();
    let pref = &json["preference"];
    let (policy, reference) = policy_from_json(pref);

    for case in pref["cases"].as_array().unwrap() {
        let cfg = PreferenceConfig {
            kind: PreferenceLossKind::parse(case["kind"].as_str().unwrap()).unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            simpo_gamma: case["simpo_gamma"].as_f64().unwrap(),
            reference_free: case["reference_free"].as_bool().unwrap(),
        };
        let reference = if cfg.kind == PreferenceLossKind::SimPo {
            None
        } else {
            Some(&reference)
        };

        let (loss, metrics) = preference_loss(&cfg, &policy, reference).unwrap();

        let expected = case["metrics"].as_object().unwrap();
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - expected["loss"].as_f64().unwrap()).abs() <= 1e-5,
            "{cfg:?}"
        );
        for (name, value) in expected {
            let got = metrics[name];
            let want = value.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{cfg:?} {name}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn dpo_loss_has_a_gradient_on_the_policy_logps() {
    let d = Device::Cpu;
    let sum = Var::new(&[-3f32, -4., -5., -2.], &d).unwrap();
    let policy = SequenceLogps {
        sum: sum.as_tensor().clone(),
        count: Tensor::new(&[3f32, 3., 3., 3.], &d).unwrap(),
        mean_logit_sum: Tensor::zeros(4, DType::F32, &d).unwrap(),
    };
    let reference = Tensor::new(&[-3f32, -4., -5., -2.], &d).unwrap();

    let (loss, _) =
        preference_loss(&PreferenceConfig::default(), &policy, Some(&reference)).unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f32> = grads.get(sum.as_tensor()).unwrap().to_vec1().unwrap();

    // At zero margin dL/dz = -1/2 and z = 0.1 (chosen - rejected) / B pairs = 2.
    assert!(
        (g[0] + 0.025).abs() < 1e-6 && (g[2] - 0.025).abs() < 1e-6,
        "{g:?}"
    );
}

#[test]
fn preference_loss_rejects_a_reference_of_the_wrong_length() {
    let d = Device::Cpu;
    let policy = SequenceLogps {
        sum: Tensor::zeros(4, DType::F32, &d).unwrap(),
        count: Tensor::ones(4, DType::F32, &d).unwrap(),
        mean_logit_sum: Tensor::zeros(4, DType::F32, &d).unwrap(),
    };
    let reference = Tensor::zeros(6, DType::F32, &d).unwrap();

    let err = preference_loss(&PreferenceConfig::default(), &policy, Some(&reference)).unwrap_err();

    let msg = err.to_string();
    assert!(msg.contains("[4]") && msg.contains("[6]"), "{msg}");
}

#[test]
fn ganpo_losses_and_moving_means_match_the_torch_reference_over_three_updates() {
    let json = losses_json();
    let g = &json["ganpo"];
    let mut means = MovingMeans::new(g["momentum"].as_f64().unwrap());
    let d = Device::Cpu;

    for step in g["steps"].as_array().unwrap() {
        let s = |k: &str| Tensor::new(vec_f32(&step["scores"][k]), &d).unwrap();
        let mut metrics = BTreeMap::new();

        let (_, m) = chosen_disc_loss(
            &mut means,
            &s("c_ref_chosen"),
            &s("c_ref_rejected"),
            &s("c_policy_chosen"),
        )
        .unwrap();
        metrics.extend(m);
        let (_, m) = rejected_disc_loss(
            &mut means,
            &s("r_ref_chosen"),
            &s("r_ref_rejected"),
            &s("r_policy_rejected"),
        )
        .unwrap();
        metrics.extend(m);
        let (_, m) =
            generator_loss(&means, &s("g_c_policy_chosen"), &s("g_r_policy_rejected")).unwrap();
        metrics.extend(m);

        for (name, value) in step["expected"].as_object().unwrap() {
            assert!(
                (metrics[name] - value.as_f64().unwrap()).abs() <= 1e-5,
                "{name}"
            );
        }
        for (name, value) in step["means"].as_object().unwrap() {
            assert!(
                (means.named()[name] - value.as_f64().unwrap()).abs() <= 1e-6,
                "{name}"
            );
        }
    }
}

#[test]
fn generator_term_before_any_discriminator_update_is_an_error() {
    let d = Device::Cpu;
    let scores = Tensor::zeros(3, DType::F32, &d).unwrap();

    let err = generator_loss(&MovingMeans::default(), &scores, &scores).unwrap_err();

    assert!(err.to_string().contains("c_ref_chosen"));
}

#[test]
fn a_token_id_outside_the_vocabulary_is_an_error_not_a_panic() {
    let device = Device::Cpu;
    let logits = Tensor::zeros((1, 3, 5), DType::F32, &device).unwrap();
    let ids = Tensor::new(&[[0u32, 9, 1]], &device).unwrap();
    let mask = Tensor::new(&[[0f32, 1., 1.]], &device).unwrap();

    let err = sequence_logps(&logits, &ids, &mask)
        .unwrap_err()
        .to_string();

    assert!(
        err.contains("label 9") && err.contains("vocabulary 5"),
        "{err}"
    );
}
