//! The fused CPU kernels (softmax, RMSNorm, layer norm, rotary, linear, activations) agree with
//! the composed candle ops in value and gradient; the composed ops are the reference (they match
//! transformers, see model_parity.rs).

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

#[test]
fn fused_linear_matches_matmul_in_value_and_both_gradients() {
    let x = Var::from_tensor(&random(&[2, 5, 12], 8.0)).unwrap();
    let w = Var::from_tensor(&random(&[7, 12], 9.0)).unwrap();
    let r = random(&[2, 5, 7], 10.0);
    let run = |fused_path: bool| {
        let y = if fused_path {
            fused::linear(x.as_tensor(), w.as_tensor()).unwrap()
        } else {
            x.as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        let gw = grads.get(w.as_tensor()).unwrap().clone();
        (y, gx, gw)
    };
    let (y1, gx1, gw1) = run(true);
    let (y2, gx2, gw2) = run(false);
    assert_eq!(y1.dims(), &[2, 5, 7]);
    assert!(max_diff(&y1, &y2) < 1e-5);
    assert!(max_diff(&gx1, &gx2) < 1e-5);
    assert!(max_diff(&gw1, &gw2) < 1e-5);
    assert!(fused::linear(x.as_tensor(), &random(&[7, 11], 1.0)).is_err());
}

#[test]
fn fused_gated_activation_matches_composed_for_silu_and_gelu() {
    use ganpo::model::config::Activation;
    for activation in [Activation::Silu, Activation::GeluTanh] {
        let gate =
            Var::from_tensor(&((random(&[3, 4, 10], 11.0) - 0.5).unwrap() * 8.0).unwrap()).unwrap();
        let up = Var::from_tensor(&random(&[3, 4, 10], 12.0)).unwrap();
        let r = random(&[3, 4, 10], 13.0);
        let run = |fused_path: bool| {
            let (g, u) = (gate.as_tensor(), up.as_tensor());
            let y = if fused_path {
                fused::gated_activation(g, u, activation).unwrap()
            } else {
                (layers::activate(g, activation).unwrap() * u).unwrap()
            };
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = grads.get(g).unwrap().clone();
            let gu = grads.get(u).unwrap().clone();
            (y, gg, gu)
        };
        let (y1, gg1, gu1) = run(true);
        let (y2, gg2, gu2) = run(false);
        assert!(max_diff(&y1, &y2) < 1e-5, "{activation:?} value");
        assert!(max_diff(&gg1, &gg2) < 1e-5, "{activation:?} gate gradient");
        assert!(max_diff(&gu1, &gu2) < 1e-5, "{activation:?} up gradient");
    }
}

#[test]
fn fused_activation_matches_composed_for_every_activation() {
    use ganpo::model::config::Activation;
    for activation in [Activation::Silu, Activation::GeluTanh, Activation::GeluErf] {
        let x = Var::from_tensor(&((random(&[4, 9], 14.0) - 0.5).unwrap() * 8.0).unwrap()).unwrap();
        let r = random(&[4, 9], 15.0);
        let (y1, g1) = value_and_grad(&x, &r, |x| fused::activation(x, activation).unwrap());
        let (y2, g2) = value_and_grad(&x, &r, |x| layers::activate(x, activation).unwrap());
        assert!(max_diff(&y1, &y2) < 1e-5, "{activation:?} value");
        assert!(max_diff(&g1, &g2) < 1e-5, "{activation:?} gradient");
    }
}

#[test]
fn fused_layer_norm_matches_composed_in_value_and_all_gradients() {
    let x = Var::from_tensor(&((random(&[3, 5, 16], 16.0) * 4.0).unwrap() + 1.0).unwrap()).unwrap();
    let w = Var::from_tensor(&(random(&[16], 17.0) + 0.5).unwrap()).unwrap();
    let b = Var::from_tensor(&random(&[16], 18.0)).unwrap();
    let r = random(&[3, 5, 16], 19.0);
    let run = |fused_path: bool| {
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = if fused_path {
            fused::layer_norm(xt, wt, bt, 1e-5).unwrap()
        } else {
            let mean = xt.mean_keepdim(2).unwrap();
            let centered = xt.broadcast_sub(&mean).unwrap();
            let var = centered.sqr().unwrap().mean_keepdim(2).unwrap();
            let std = (var + 1e-5).unwrap().sqrt().unwrap();
            let normed = centered.broadcast_div(&std).unwrap();
            normed.broadcast_mul(wt).unwrap().broadcast_add(bt).unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        (y, get(&x), get(&w), get(&b))
    };
    let (y1, gx1, gw1, gb1) = run(true);
    let (y2, gx2, gw2, gb2) = run(false);
    assert!(max_diff(&y1, &y2) < 1e-5);
    assert!(max_diff(&gx1, &gx2) < 1e-5);
    assert!(max_diff(&gw1, &gw2) < 1e-5);
    assert!(max_diff(&gb1, &gb2) < 1e-5);
}

#[test]
fn fused_softmax_with_bias_matches_composed_and_gives_the_bias_no_gradient() {
    let x = Var::from_tensor(&(random(&[2, 3, 4, 5], 20.0) * 6.0).unwrap()).unwrap();
    let flat: Vec<f32> = random(&[2 * 4 * 5], 21.0)
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| if v < 0.3 { -1e30 } else { v })
        .collect();
    let bias = Tensor::from_vec(flat, (2, 1, 4, 5), &Device::Cpu).unwrap();
    let r = random(&[2, 3, 4, 5], 22.0);
    let (y1, g1) = value_and_grad(&x, &r, |x| fused::softmax_with_bias(x, &bias).unwrap());
    let (y2, g2) = value_and_grad(&x, &r, |x| {
        layers::softmax_last_dim(&x.broadcast_add(&bias).unwrap()).unwrap()
    });
    assert!(max_diff(&y1, &y2) < 1e-6);
    assert!(max_diff(&g1, &g2) < 1e-6);
    assert!(fused::softmax_with_bias(x.as_tensor(), &random(&[2, 1, 3, 5], 1.0)).is_err());
}

#[test]
fn fused_dropout_keeps_about_one_minus_p_scales_and_passes_gradient_through_its_mask() {
    let x = Var::from_tensor(&(random(&[64, 1000], 23.0) + 1.0).unwrap()).unwrap();
    let r = random(&[64, 1000], 24.0);
    let (y, g) = value_and_grad(&x, &r, |x| fused::dropout(x, 0.25, 7).unwrap());
    let (y_again, _) = value_and_grad(&x, &r, |x| fused::dropout(x, 0.25, 7).unwrap());
    let (y_other, _) = value_and_grad(&x, &r, |x| fused::dropout(x, 0.25, 8).unwrap());
    assert_eq!(max_diff(&y, &y_again), 0.0, "same seed, same mask");
    assert!(max_diff(&y, &y_other) > 0.0, "another seed, another mask");

    let xs = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gs = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rs = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let kept = ys.iter().filter(|&&v| v != 0.0).count() as f64 / ys.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    for i in 0..xs.len() {
        let expected = if ys[i] != 0.0 { rs[i] / 0.75 } else { 0.0 };
        assert!((gs[i] - expected).abs() < 1e-5, "gradient at {i}");
        if ys[i] != 0.0 {
            assert!((ys[i] - xs[i] / 0.75).abs() < 1e-5, "scaling at {i}");
        }
    }
}

#[test]
fn fused_linear_with_bias_matches_composed_in_value_and_all_gradients() {
    let x = Var::from_tensor(&random(&[3, 4, 6], 25.0)).unwrap();
    let w = Var::from_tensor(&random(&[5, 6], 26.0)).unwrap();
    let b = Var::from_tensor(&random(&[5], 27.0)).unwrap();
    let r = random(&[3, 4, 5], 28.0);
    let run = |fused_path: bool| {
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = if fused_path {
            fused::linear_bias(xt, wt, bt).unwrap()
        } else {
            let y = xt.broadcast_matmul(&wt.t().unwrap()).unwrap();
            y.broadcast_add(bt).unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        (y, get(&x), get(&w), get(&b))
    };
    let (y1, gx1, gw1, gb1) = run(true);
    let (y2, gx2, gw2, gb2) = run(false);
    assert!(max_diff(&y1, &y2) < 1e-5);
    assert!(max_diff(&gx1, &gx2) < 1e-5);
    assert!(max_diff(&gw1, &gw2) < 1e-5);
    assert!(max_diff(&gb1, &gb2) < 1e-5);
}

/// `[N, T, H, d]` to the `[N, H, T, d]` layout of the composed attention.
fn heads_first(x: &Tensor) -> Tensor {
    x.transpose(1, 2).unwrap().contiguous().unwrap()
}

#[test]
fn fused_attention_matches_composed_with_grouped_heads_and_a_mask() {
    use ganpo::model::fused_attention;
    let (n, t, h, kv, d) = (2, 5, 4, 2, 3);
    let q = Var::from_tensor(&random(&[n, t, h, d], 29.0)).unwrap();
    let k = Var::from_tensor(&random(&[n, t, kv, d], 30.0)).unwrap();
    let v = Var::from_tensor(&random(&[n, t, kv, d], 31.0)).unwrap();
    let real = vec![vec![true; t], vec![true, true, true, false, false]];
    let bias =
        layers::attention_bias(&real, 0, t, None, candle_core::DType::F32, &Device::Cpu).unwrap();
    let r = random(&[n, t, h * d], 32.0);
    let scale = 0.7;
    let run = |fused_path: bool| {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let y = if fused_path {
            fused_attention::attention(qt, kt, vt, Some(&bias), scale, None).unwrap()
        } else {
            let qs = (heads_first(qt) * scale).unwrap();
            layers::attention(&qs, &heads_first(kt), &heads_first(vt), &bias, None, false).unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        (y, get(&q), get(&k), get(&v))
    };
    let (y1, gq1, gk1, gv1) = run(true);
    let (y2, gq2, gk2, gv2) = run(false);
    assert_eq!(y1.dims(), &[n, t, h * d]);
    assert!(max_diff(&y1, &y2) < 1e-5);
    assert!(max_diff(&gq1, &gq2) < 1e-5);
    assert!(max_diff(&gk1, &gk2) < 1e-5);
    assert!(max_diff(&gv1, &gv2) < 1e-5);
}

#[test]
fn fused_attention_with_dropout_has_the_gradient_of_its_own_forward() {
    use ganpo::model::fused_attention::{attention, AttentionDropout};
    let (n, t, h, d) = (1, 6, 2, 4);
    let dropout = Some(AttentionDropout { p: 0.3, seed: 11 });
    let q = random(&[n, t, h, d], 33.0);
    let k = random(&[n, t, h, d], 34.0);
    let v = random(&[n, t, h, d], 35.0);
    let r = random(&[n, t, h * d], 36.0);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        let y = attention(q, k, v, None, 0.5, dropout).unwrap();
        let l = (y.to_dtype(candle_core::DType::F64).unwrap()
            * r.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap();
        l.sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let vars: Vec<Var> = [&q, &k, &v]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let y = attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        None,
        0.5,
        dropout,
    )
    .unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-2f32;
    for (which, var) in vars.iter().enumerate() {
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        assert!(g.iter().any(|&x| x != 0.0), "input {which} got no gradient");
        for i in [0, 5, 17, 30] {
            let bump = |delta: f32| {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                let mut flat = inputs[which]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                flat[i] += delta;
                inputs[which] =
                    Tensor::from_vec(flat, inputs[which].shape(), &Device::Cpu).unwrap();
                loss(&inputs[0], &inputs[1], &inputs[2])
            };
            let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            assert!(
                (numeric - g[i] as f64).abs() < 2e-3,
                "input {which} element {i}: numeric {numeric}, backward {}",
                g[i]
            );
        }
    }
}
