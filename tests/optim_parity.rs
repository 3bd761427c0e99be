//! Optimisers, clipping and schedules against torch 2.9.1 and transformers 5.25.0
//! (tests/fixtures/objective/make_fixtures.py).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use ganpo::optim::{
    clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, Optimizer, Schedule, ScheduleKind, Sgd,
    SgdConfig, Warmup,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/objective")
}

fn load() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("optim.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap();
    let b = b.flatten_all().unwrap();
    a.sub(&b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn params(f: &HashMap<String, Tensor>) -> Vec<(String, Var)> {
    vec![
        ("w".to_string(), Var::from_tensor(&f["p0"]).unwrap()),
        ("b".to_string(), Var::from_tensor(&f["b0"]).unwrap()),
    ]
}

fn grads_for(vars: &[(String, Var)], f: &HashMap<String, Tensor>, i: usize) -> GradStore {
    let mut g = GradStore::default();
    g.insert(vars[0].1.as_tensor(), f[&format!("grad{i}.w")].clone());
    g.insert(vars[1].1.as_tensor(), f[&format!("grad{i}.b")].clone());
    g
}

fn check_three_steps(
    tag: &str,
    opt: &mut dyn Optimizer,
    vars: &[(String, Var)],
    f: &HashMap<String, Tensor>,
) {
    for i in 0..3 {
        opt.step(&grads_for(vars, f, i)).unwrap();
        let dw = max_abs_diff(vars[0].1.as_tensor(), &f[&format!("{tag}.step{i}.w")]);
        let db = max_abs_diff(vars[1].1.as_tensor(), &f[&format!("{tag}.step{i}.b")]);
        assert!(dw <= 1e-6 && db <= 1e-6, "{tag} step {i}: {dw} {db}");
    }
}

#[test]
fn adamw_with_default_settings_matches_torch_for_three_steps() {
    let f = load();
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    check_three_steps("adamw_default", &mut opt, &vars, &f);
}

#[test]
fn adamw_with_custom_betas_eps_and_decay_matches_torch() {
    let f = load();
    let vars = params(&f);
    let cfg = AdamWConfig {
        lr: 0.05,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    check_three_steps("adamw_custom", &mut opt, &vars, &f);
}

#[test]
fn sgd_with_nesterov_and_with_dampened_momentum_match_torch() {
    let f = load();
    let vars = params(&f);
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        dampening: 0.0,
    };
    check_three_steps(
        "sgd_nesterov",
        &mut Sgd::new(vars.clone(), cfg).unwrap(),
        &vars,
        &f,
    );

    let vars = params(&f);
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.1,
        ..Default::default()
    };
    check_three_steps(
        "sgd_momentum",
        &mut Sgd::new(vars.clone(), cfg).unwrap(),
        &vars,
        &f,
    );
}

#[test]
fn clip_grad_norm_returns_the_pre_clip_norm_and_scales_like_torch() {
    let f = load();
    let vars = params(&f);
    let mut g = GradStore::default();
    g.insert(
        vars[0].1.as_tensor(),
        f["grad0.w"].affine(3.0, 0.0).unwrap(),
    );
    g.insert(
        vars[1].1.as_tensor(),
        f["grad0.b"].affine(3.0, 0.0).unwrap(),
    );

    let norm = clip_grad_norm(&vars, &mut g, 1.5).unwrap();

    let expected: Vec<f32> = f["clip.norm"].to_vec1().unwrap();
    assert!((norm - expected[0] as f64).abs() <= 1e-5 * norm);
    assert!(max_abs_diff(g.get(vars[0].1.as_tensor()).unwrap(), &f["clip.w"]) <= 1e-6);
    assert!(max_abs_diff(g.get(vars[1].1.as_tensor()).unwrap(), &f["clip.b"]) <= 1e-6);
}

#[test]
fn schedules_equal_transformers_at_every_step() {
    let text = std::fs::read_to_string(fixtures().join("losses.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = &json["schedules"];

    for (name, kind) in [
        ("cosine", ScheduleKind::Cosine),
        ("linear", ScheduleKind::Linear),
        ("constant", ScheduleKind::Constant),
    ] {
        let schedule = Schedule::new(kind, 0.5, Warmup::Steps(10), 100).unwrap();
        for (step, lr) in s["lrs"][name].as_array().unwrap().iter().enumerate() {
            let want = lr.as_f64().unwrap();
            assert!(
                (schedule.lr_at(step) - want).abs() <= 1e-12,
                "{name} step {step}"
            );
        }
    }
}

#[test]
fn warmup_ratio_rounds_up_like_transformers() {
    let s = Schedule::new(ScheduleKind::Cosine, 1.0, Warmup::Ratio(0.1), 95).unwrap();
    assert_eq!(s.warmup_steps(), 10);
    assert_eq!(s.lr_at(0), 0.0);
    assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
}

#[test]
fn accumulated_half_gradients_step_like_one_full_batch() {
    let d = Device::Cpu;
    let a = Var::new(&[1f32, 2., 3.], &d).unwrap();
    let b = Var::new(&[1f32, 2., 3.], &d).unwrap();
    let va = vec![("p".to_string(), a.clone())];
    let vb = vec![("p".to_string(), b.clone())];
    let x1 = Tensor::new(&[1f32, -1., 2.], &d).unwrap();
    let x2 = Tensor::new(&[0.5f32, 3., -2.], &d).unwrap();

    let mut acc = GradAccumulator::new();
    for x in [&x1, &x2] {
        let g = a
            .as_tensor()
            .mul(x)
            .unwrap()
            .sum_all()
            .unwrap()
            .sqr()
            .unwrap()
            .backward()
            .unwrap();
        acc.add(&va, &g, 0.5).unwrap();
    }
    let full = b
        .as_tensor()
        .mul(&x1)
        .unwrap()
        .sum_all()
        .unwrap()
        .sqr()
        .unwrap()
        .add(
            &b.as_tensor()
                .mul(&x2)
                .unwrap()
                .sum_all()
                .unwrap()
                .sqr()
                .unwrap(),
        )
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .backward()
        .unwrap();
    let mut oa = AdamW::new(va, AdamWConfig::default()).unwrap();
    let mut ob = AdamW::new(vb, AdamWConfig::default()).unwrap();
    oa.step(&acc.take()).unwrap();
    ob.step(&full).unwrap();

    assert!(max_abs_diff(a.as_tensor(), b.as_tensor()) <= 1e-7);
}

#[test]
fn frozen_parameters_are_not_updated() {
    let f = load();
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();

    assert_eq!(opt.set_frozen("b", true), 1);
    opt.step(&grads_for(&vars, &f, 0)).unwrap();

    assert_eq!(max_abs_diff(vars[1].1.as_tensor(), &f["b0"]), 0.0);
    assert!(max_abs_diff(vars[0].1.as_tensor(), &f["p0"]) > 0.0);
}

#[test]
fn adamw_state_round_trips_through_named_tensors() {
    let f = load();
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    opt.step(&grads_for(&vars, &f, 0)).unwrap();
    let state: std::collections::BTreeMap<String, Tensor> =
        opt.state_tensors().unwrap().into_iter().collect();

    let copies: Vec<(String, Var)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), Var::from_tensor(v.as_tensor()).unwrap()))
        .collect();
    let mut resumed = AdamW::new(copies.clone(), AdamWConfig::default()).unwrap();
    resumed.load_state(&state).unwrap();
    opt.step(&grads_for(&vars, &f, 1)).unwrap();
    resumed.step(&grads_for(&copies, &f, 1)).unwrap();

    assert_eq!(resumed.step_count(), 2);
    assert_eq!(
        max_abs_diff(vars[0].1.as_tensor(), copies[0].1.as_tensor()),
        0.0
    );
    let _ = DType::F32;
}
