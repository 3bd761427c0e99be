//! The discriminator's pre-norm encoder layer as one graph node (f32, CPU).
//!
//! A composed layer is some twenty candle nodes, and candle's backward gives every node's
//! input a fresh zero tensor plus an addition; on the discriminator's small matrices that
//! bookkeeping cost as much as the products. Here the whole layer,
//!
//! ```text
//! x1  = x  + drop(out_proj(attention(norm1(x))))
//! out = x1 + drop(linear2(drop(gelu(linear1(norm2(x1))))))
//! ```
//!
//! runs as one op over `(x, params)`, `params` being the layer's twelve tensors flattened and
//! concatenated ([`FLAT_ORDER`]); the forward keeps what the backward needs (the packed q|k|v
//! projection, the attention probabilities, the attention output, `x1`, the FFN's
//! pre-activation, and the dropout masks as bytes; the dropped GELU activation is recomputed),
//! and the backward computes every gradient in place. Dropout masks come from the same
//! generator and seeds as the composed layer's, so both give the same numbers.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::fastmath;
use crate::model::fused::{
    chunk_rows, f32_slice, keep_mask, kept, layer_norm_backward_rows, layer_norm_rows, linear_rows,
    matmul, parallelism, tensor_f32, View, ELEMENT_CHUNK,
};
use crate::model::fused_attention::{self, Dims, Packing, Strided};

/// The layer's tensors in the order [`encoder_layer`] expects them concatenated, torch names.
pub const FLAT_ORDER: [&str; 12] = [
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
];

/// Sizes and settings of one call.
#[derive(Debug, Clone, Copy)]
pub struct EncoderLayerSpec {
    /// Model width.
    pub d: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub ffn: usize,
    /// LayerNorm epsilons (norm1, norm2).
    pub eps: (f64, f64),
    /// Dropout probability and the seeds of its four masks (attention weights, attention
    /// output, FFN inner, FFN output); `None`: no dropout.
    pub dropout: Option<(f64, [u64; 4])>,
}

impl EncoderLayerSpec {
    /// Element count of the flattened parameters.
    pub fn param_count(&self) -> usize {
        let (d, f) = (self.d, self.ffn);
        3 * d * d + 3 * d + d * d + d + f * d + f + d * f + d + 4 * d
    }

    /// Offsets of the twelve tensors in the flat parameters, plus the end.
    fn offsets(&self) -> [usize; 13] {
        let (d, f) = (self.d, self.ffn);
        let sizes = [3 * d * d, 3 * d, d * d, d, f * d, f, d * f, d, d, d, d, d];
        let mut at = [0; 13];
        for (i, n) in sizes.iter().enumerate() {
            at[i + 1] = at[i] + n;
        }
        at
    }
}

/// The twelve parameter slices of a flat buffer.
struct Params<'a>([&'a [f32]; 12]);

impl<'a> Params<'a> {
    fn split(spec: &EncoderLayerSpec, flat: &'a [f32]) -> Self {
        let at = spec.offsets();
        Self(std::array::from_fn(|i| &flat[at[i]..at[i + 1]]))
    }
}

/// Mutable views of the twelve gradient slices of a flat buffer.
fn split_mut<'a>(spec: &EncoderLayerSpec, flat: &'a mut [f32]) -> [&'a mut [f32]; 12] {
    let at = spec.offsets();
    let mut rest = flat;
    let mut parts: Vec<&'a mut [f32]> = Vec::with_capacity(12);
    for i in 0..12 {
        let (head, tail) = rest.split_at_mut(at[i + 1] - at[i]);
        parts.push(head);
        rest = tail;
    }
    parts
        .try_into()
        .unwrap_or_else(|_| unreachable!("twelve parts"))
}

/// The two kinds of dropout probability rounding the composed layer uses, kept identical so
/// that both draw the same masks: the attention kernel's and the elementwise kernel's.
struct Keep {
    /// Keep probability and scale of the attention weights.
    attention: (f64, f32),
    /// Keep probability and scale of the elementwise dropouts.
    element: (f64, f32),
}

impl Keep {
    fn new(p: f64) -> Self {
        let p32 = p as f32;
        let keep32 = (1.0 - p) as f32;
        Self {
            attention: (1.0 - p32 as f64, 1.0 / (1.0 - p32)),
            element: (keep32 as f64, 1.0 / keep32),
        }
    }
}

/// What the forward keeps for the backward.
#[derive(Default)]
struct Saved {
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attention_mask: Vec<u8>,
    attended: Vec<f32>,
    mask1: Vec<u8>,
    x1: Vec<f32>,
    pre_activation: Vec<f32>,
    mask2: Vec<u8>,
    mask3: Vec<u8>,
}

struct EncoderLayer {
    spec: EncoderLayerSpec,
    saved: Mutex<Saved>,
}

/// Rows of `width` elements per parallel task, as elements.
fn row_chunk(width: usize) -> usize {
    chunk_rows(width) * width
}

/// `dW[out, in] = gᵀ · x` for `g` `[R, out]` and `x` `[R, in]`, into `dw`.
fn weight_grad(dw: &mut [f32], g: &[f32], x: &[f32], (rows, out, features): (usize, usize, usize)) {
    let gt = View::dense(0, out).t();
    let xv = View::dense(0, features);
    matmul(
        (out, features, rows),
        dw,
        false,
        (g, gt),
        (x, xv),
        1.0,
        parallelism(),
    );
}

/// `dx[R, in] = g · W` for `g` `[R, out]` and `W` `[out, in]`.
fn input_grad(g: &[f32], w: &[f32], (rows, out, features): (usize, usize, usize)) -> Vec<f32> {
    let mut dx = vec![0f32; rows * features];
    let (gv, wv) = (View::dense(0, out), View::dense(0, features));
    matmul(
        (rows, features, out),
        &mut dx,
        false,
        (g, gv),
        (w, wv),
        1.0,
        parallelism(),
    );
    dx
}

/// Column sums of `m` `[R, width]` into `out` `[width]`.
fn column_sums(m: &[f32], out: &mut [f32]) {
    let width = out.len();
    let partial: Vec<Vec<f32>> = m
        .par_chunks(row_chunk(width))
        .map(|rows| {
            let mut sum = vec![0f32; width];
            for row in rows.chunks(width) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sum
        })
        .collect();
    out.fill(0.0);
    for part in partial {
        out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
    }
}

/// `residual + kept(y, mask)` elementwise, into `y` (no mask: `residual + y`).
fn add_dropped(y: &mut [f32], residual: &[f32], mask: &[u8], scale: f32) {
    y.par_chunks_mut(ELEMENT_CHUNK)
        .zip(residual.par_chunks(ELEMENT_CHUNK))
        .enumerate()
        .for_each(|(c, (y, r))| {
            if mask.is_empty() {
                y.iter_mut().zip(r).for_each(|(y, r)| *y += r);
            } else {
                let m = &mask[c * ELEMENT_CHUNK..c * ELEMENT_CHUNK + y.len()];
                for ((y, r), &m) in y.iter_mut().zip(r).zip(m) {
                    *y = r + kept(*y, m, scale);
                }
            }
        });
}

/// `kept(g, mask)` elementwise into a new buffer (no mask: a copy).
fn dropped(g: &[f32], mask: &[u8], scale: f32) -> Vec<f32> {
    if mask.is_empty() {
        return g.to_vec();
    }
    g.par_iter()
        .zip(mask.par_iter())
        .map(|(&g, &m)| kept(g, m, scale))
        .collect()
}

/// `kept(gelu(u), mask)` elementwise (no mask: `gelu(u)`).
fn gelu_dropped(pre_activation: &[f32], mask: &[u8], scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; pre_activation.len()];
    out.par_chunks_mut(ELEMENT_CHUNK)
        .zip(pre_activation.par_chunks(ELEMENT_CHUNK))
        .enumerate()
        .for_each(|(c, (a, u))| {
            for (a, &u) in a.iter_mut().zip(u) {
                *a = fastmath::gelu_erf(u).0;
            }
            if !mask.is_empty() {
                let m = &mask[c * ELEMENT_CHUNK..c * ELEMENT_CHUNK + a.len()];
                a.iter_mut()
                    .zip(m)
                    .for_each(|(a, &m)| *a = kept(*a, m, scale));
            }
        });
    out
}

fn element_mask(n: usize, keep: f64, seed: Option<u64>) -> Vec<u8> {
    match seed {
        Some(seed) => keep_mask(n, ELEMENT_CHUNK, keep, seed),
        None => Vec::new(),
    }
}

impl EncoderLayer {
    fn dims(&self, n: usize, t: usize) -> Dims {
        let h = self.spec.heads;
        Dims {
            n,
            t,
            s: t,
            h,
            kv: h,
            d: self.spec.d / h,
        }
    }

    /// q, k and v as row blocks of the packed `[R, 3d]` projection.
    fn packing(&self) -> Packing {
        let d = self.spec.d;
        let at = |offset| Strided { offset, rs: 3 * d };
        Packing {
            q: at(0),
            k: at(d),
            v: at(2 * d),
        }
    }

    fn scale(&self) -> f32 {
        1.0 / ((self.spec.d / self.spec.heads) as f32).sqrt()
    }

    fn keep(&self) -> Keep {
        Keep::new(self.spec.dropout.map_or(0.0, |(p, _)| p))
    }

    fn seed(&self, i: usize) -> Option<u64> {
        self.spec.dropout.map(|(_, seeds)| seeds[i])
    }
}

impl CustomOp2 for EncoderLayer {
    fn name(&self) -> &'static str {
        "ganpo-encoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "encoder layer input")?;
        let flat = f32_slice(s2, l2, "encoder layer parameters")?;
        let spec = &self.spec;
        let (n, t, d) = l1.shape().dims3()?;
        if d != spec.d || flat.len() != spec.param_count() {
            candle_core::bail!(
                "encoder layer: input {:?} and {} parameters for width {} and FFN {}",
                l1.dims(),
                flat.len(),
                spec.d,
                spec.ffn
            );
        }
        let [w_in, b_in, w_out, b_out, w1, b1, w2, b2, g1, be1, g2, be2] =
            Params::split(spec, flat).0;
        let (rows, f) = (n * t, spec.ffn);
        let keep = self.keep();

        let normed = layer_norm_rows(x, (g1, be1), spec.eps.0 as f32);
        let qkv = linear_rows(&normed, w_in, Some(b_in), (rows, 3 * d, d));
        drop(normed);
        let dims = self.dims(n, t);
        let attention_mask = match self.seed(0) {
            Some(seed) => keep_mask(n * dims.h * t * t, t * t, keep.attention.0, seed),
            None => Vec::new(),
        };
        let (attended, probs) = fused_attention::forward(
            dims,
            (&qkv, &qkv, &qkv),
            self.packing(),
            None,
            self.scale(),
            &attention_mask,
            keep.attention.1,
        );

        let mut x1 = linear_rows(&attended, w_out, Some(b_out), (rows, d, d));
        let mask1 = element_mask(rows * d, keep.element.0, self.seed(1));
        add_dropped(&mut x1, x, &mask1, keep.element.1);

        let normed = layer_norm_rows(&x1, (g2, be2), spec.eps.1 as f32);
        let pre_activation = linear_rows(&normed, w1, Some(b1), (rows, f, d));
        drop(normed);
        let mask2 = element_mask(rows * f, keep.element.0, self.seed(2));
        let activation = gelu_dropped(&pre_activation, &mask2, keep.element.1);
        let mut out = linear_rows(&activation, w2, Some(b2), (rows, d, f));
        drop(activation);
        let mask3 = element_mask(rows * d, keep.element.0, self.seed(3));
        add_dropped(&mut out, &x1, &mask3, keep.element.1);

        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("encoder layer: saved state lock".into()))? =
            Saved {
                qkv,
                probs,
                attention_mask,
                attended,
                mask1,
                x1,
                pre_activation,
                mask2,
                mask3,
            };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_params) = (x.track_op(), params.track_op());
        if !want_x && !want_params {
            return Ok((None, None));
        }
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("encoder layer: saved state lock".into()))?;
        if saved.qkv.is_empty() {
            candle_core::bail!("encoder layer backward: the forward's activations are missing");
        }
        let grad_res = grad_res.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (p_storage, p_layout) = params.storage_and_layout();
        let (g_storage, g_layout) = grad_res.storage_and_layout();
        let x_data = tensor_f32(&x_storage, x_layout, "encoder layer input")?;
        let flat = tensor_f32(&p_storage, p_layout, "encoder layer parameters")?;
        let grad = tensor_f32(&g_storage, g_layout, "encoder layer output gradient")?;

        let spec = &self.spec;
        let (n, t, d) = x.dims3()?;
        let (rows, f) = (n * t, spec.ffn);
        let [w_in, _, w_out, _, w1, _, w2, _, g1, be1, g2, be2] = Params::split(spec, flat).0;
        let mut dflat = vec![0f32; if want_params { flat.len() } else { 0 }];
        let mut dp = if want_params {
            Some(split_mut(spec, &mut dflat))
        } else {
            None
        };
        let keep = self.keep();
        let scale = keep.element.1;

        // FFN: out = x1 + drop(activation · W2ᵀ + b2)
        let dy2 = dropped(grad, &saved.mask3, scale);
        if let Some(dp) = dp.as_mut() {
            column_sums(&dy2, dp[7]);
            // The FFN's dropped activation is recomputed rather than kept: it is the layer's
            // largest tensor, and a GELU pass costs far less than holding it.
            let activation = gelu_dropped(&saved.pre_activation, &saved.mask2, scale);
            weight_grad(dp[6], &dy2, &activation, (rows, d, f));
        }
        let mut du = input_grad(&dy2, w2, (rows, d, f));
        drop(dy2);
        du.par_chunks_mut(ELEMENT_CHUNK)
            .zip(saved.pre_activation.par_chunks(ELEMENT_CHUNK))
            .enumerate()
            .for_each(|(c, (g, u))| {
                if !saved.mask2.is_empty() {
                    let m = &saved.mask2[c * ELEMENT_CHUNK..c * ELEMENT_CHUNK + g.len()];
                    g.iter_mut()
                        .zip(m)
                        .for_each(|(g, &m)| *g = kept(*g, m, scale));
                }
                for (g, &u) in g.iter_mut().zip(u) {
                    *g *= fastmath::gelu_erf(u).1;
                }
            });
        if let Some(dp) = dp.as_mut() {
            column_sums(&du, dp[5]);
            let normed = layer_norm_rows(&saved.x1, (g2, be2), spec.eps.1 as f32);
            weight_grad(dp[4], &du, &normed, (rows, f, d));
        }
        let dc = input_grad(&du, w1, (rows, f, d));
        drop(du);
        let mut dx1 = grad.to_vec();
        let dwb = dp.as_mut().map(|dp| {
            let (left, right) = dp.split_at_mut(11);
            (&mut *left[10], &mut *right[0])
        });
        layer_norm_backward_rows(&saved.x1, g2, &dc, spec.eps.1 as f32, (&mut dx1, true), dwb);
        drop(dc);

        // Attention: x1 = x + drop(attended · W_outᵀ + b_out)
        let dy1 = dropped(&dx1, &saved.mask1, scale);
        if let Some(dp) = dp.as_mut() {
            column_sums(&dy1, dp[3]);
            weight_grad(dp[2], &dy1, &saved.attended, (rows, d, d));
        }
        let d_attended = input_grad(&dy1, w_out, (rows, d, d));
        drop(dy1);
        let mut dqkv = vec![0f32; rows * 3 * d];
        let packing = self.packing();
        fused_attention::backward(
            self.dims(n, t),
            (&saved.qkv, &saved.qkv, &saved.qkv),
            packing,
            &d_attended,
            (&saved.probs, &saved.attention_mask),
            self.scale(),
            keep.attention.1,
            (&mut dqkv, packing),
        );
        drop(d_attended);
        if let Some(dp) = dp.as_mut() {
            column_sums(&dqkv, dp[1]);
            let normed = layer_norm_rows(x_data, (g1, be1), spec.eps.0 as f32);
            weight_grad(dp[0], &dqkv, &normed, (rows, 3 * d, d));
        }
        let da = input_grad(&dqkv, w_in, (rows, 3 * d, d));
        drop(dqkv);
        let dwb = dp.as_mut().map(|dp| {
            let (left, right) = dp.split_at_mut(9);
            (&mut *left[8], &mut *right[0])
        });
        layer_norm_backward_rows(x_data, g1, &da, spec.eps.0 as f32, (&mut dx1, true), dwb);

        let device = x.device();
        let grad_x = match want_x {
            true => Some(Tensor::from_vec(dx1, x.shape(), device)?),
            false => None,
        };
        let grad_params = match want_params {
            true => Some(Tensor::from_vec(dflat, params.shape(), device)?),
            false => None,
        };
        Ok((grad_x, grad_params))
    }
}

/// One pre-norm encoder layer over `x` `[N, T, d]` with the flattened parameters `params`
/// ([`FLAT_ORDER`], each tensor row-major), differentiable in both (f32, CPU).
pub fn encoder_layer(
    x: &Tensor,
    params: &Tensor,
    spec: EncoderLayerSpec,
) -> candle_core::Result<Tensor> {
    if spec.heads == 0 || spec.d % spec.heads != 0 {
        candle_core::bail!("encoder layer: width {} over {} heads", spec.d, spec.heads);
    }
    let op = EncoderLayer {
        spec,
        saved: Mutex::new(Saved::default()),
    };
    x.contiguous()?.apply_op2(&params.contiguous()?, op)
}
