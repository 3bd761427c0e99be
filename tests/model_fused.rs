//! The fused CPU kernels (softmax, RMSNorm, rotary) agree with the composed candle ops in
//! value and gradient; the composed ops are the reference (they match transformers, see
//! model_parity.rs).

use candle_core::{Device, Tensor, Var};
use ganpo::model::config::{RopeConfig, RopeScaling};
use ganpo::model::fused;
use ganpo::model::layers::{self, RotaryTables};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

fn random(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 12.9898 + seed).sin() * 43758.547).fract())
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Value and input gradient of `sum(f(x) * r)` for a fixed random `r`.
fn value_and_grad(x: &Var, r: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let y = f(x.as_tensor());
    let loss = (&y * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    (y, grads.get(x.as_tensor()).unwrap().clone())
}

#[test]
fn fused_softmax_matches_composed_in_value_and_gradient() {
    let x = Var::from_tensor(&(random(&[3, 5, 17], 1.0) * 6.0).unwrap()).unwrap();
    let r = random(&[3, 5, 17], 2.0);
    let (y1, g1) = value_and_grad(&x, &r, |x| fused::softmax_last_dim(x).unwrap());
    let (y2, g2) = value_and_grad(&x, &r, |x| layers::softmax_last_dim(x).unwrap());
    assert!(max_diff(&y1, &y2) < 1e-6);
    assert!(max_diff(&g1, &g2) < 1e-6);
}

#[test]
fn fused_rms_norm_matches_composed_in_value_and_both_gradients() {
    let x = Var::from_tensor(&random(&[2, 7, 24], 3.0)).unwrap();
    let w = Var::from_tensor(&(random(&[24], 4.0) + 0.5).unwrap()).unwrap();
    let r = random(&[2, 7, 24], 5.0);
    let run = |fused_path: bool| {
        let y = if fused_path {
            fused::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap()
        } else {
            layers::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, false).unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        let gw = grads.get(w.as_tensor()).unwrap().clone();
        (y, gx, gw)
    };
    let (y1, gx1, gw1) = run(true);
    let (y2, gx2, gw2) = run(false);
    assert!(max_diff(&y1, &y2) < 1e-5);
    assert!(max_diff(&gx1, &gx2) < 1e-5);
    assert!(max_diff(&gw1, &gw2) < 1e-4);
}

#[test]
fn fused_rope_matches_composed_in_value_and_gradient() {
    let rope = RopeConfig {
        theta: 10000.0,
        scaling: RopeScaling::None,
    };
    let tables = RotaryTables::for_len(&rope, 8, 6, candle_core::DType::F32, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&random(&[2, 6, 3, 8], 6.0)).unwrap();
    let r = random(&[2, 3, 6, 8], 7.0);
    let (y1, g1) = value_and_grad(&x, &r, |x| tables.apply_before_transpose(x).unwrap());
    let (y2, g2) = value_and_grad(&x, &r, |x| {
        tables.apply(&x.transpose(1, 2).unwrap()).unwrap()
    });
    assert!(max_diff(&y1, &y2) < 1e-6);
    assert!(max_diff(&g1, &g2) < 1e-6);
}
