//! CPU kernels with their own backward for the layers a training step spends its time in
//! outside the matrix products' arithmetic: softmax, RMSNorm, rotary embeddings, dense
//! projections and the gated activation of the MLP. One graph node each instead of a chain of
//! candle ops, and only what the backward needs is kept alive. f32 on the CPU only; callers
//! fall back to composed ops elsewhere (see [`supported`]).
//!
//! Fewer nodes is the point: candle's backward gives every node's input a fresh zero tensor
//! and adds the incoming gradient to it, so each reshape, transpose or elementwise op of a
//! composed layer costs two full-size passes over memory in the backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::config::Activation;

/// Whether the fused kernels can run on `x` (f32 on the CPU).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Rows per parallel task: enough work to amortise scheduling.
fn chunk_rows(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// Softmax over the last dimension; the backward uses only the output.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ganpo-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "softmax")?;
        let width = layout.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        let rows = chunk_rows(width) * width;
        out.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(width).zip(x.chunks(width)) {
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - max).exp();
                        sum += *y;
                    }
                    let inv = 1.0 / sum;
                    y.iter_mut().for_each(|y| *y *= inv);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBackward)?;
        Ok(Some(grad))
    }
}

/// `dx = y * (g - sum(g * y))` row by row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "ganpo-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax backward")?;
        let g = f32_slice(s2, l2, "softmax backward")?;
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; y.len()];
        let rows = chunk_rows(width) * width;
        out.par_chunks_mut(rows)
            .zip(y.par_chunks(rows).zip(g.par_chunks(rows)))
            .for_each(|(out, (y, g))| {
                for ((dx, y), g) in out
                    .chunks_mut(width)
                    .zip(y.chunks(width))
                    .zip(g.chunks(width))
                {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a one-pass backward (f32, CPU).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `y = x / rms(x) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ganpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let width = w.len();
        let mut out = vec![0f32; x.len()];
        let rows = chunk_rows(width) * width;
        let eps = self.eps;
        out.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(width).zip(x.chunks(width)) {
                    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    let inv_rms = 1.0 / (mean_square + eps).sqrt();
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * inv_rms * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let width = w.dim(0)?;
        let rows = x.elem_count() / width.max(1);
        let both = x.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad_res.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        let grad_x = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let grad_w = both.narrow(0, rows, 1)?.reshape(width)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// Gradients of [`RmsNorm`]: rows `0..R` hold `dx`, row `R` holds `dw`.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "ganpo-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm backward")?;
        let w = f32_slice(s2, l2, "rms_norm backward")?;
        let g = f32_slice(s3, l3, "rms_norm backward")?;
        let width = w.len();
        let rows = x.len() / width.max(1);
        let mut out = vec![0f32; x.len() + width];
        let (dx_all, _) = out.split_at_mut(x.len());
        let chunk = chunk_rows(width) * width;
        let eps = self.eps;

        let partial_dw: Vec<Vec<f32>> = dx_all
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; width];
                for ((dx, x), g) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(g.chunks(width))
                {
                    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    let inv_rms = 1.0 / (mean_square + eps).sqrt();
                    let mut dot = 0f32;
                    for i in 0..width {
                        let xhat = x[i] * inv_rms;
                        dot += g[i] * w[i] * xhat;
                        dw[i] += g[i] * xhat;
                    }
                    let mean_dot = dot / width as f32;
                    for i in 0..width {
                        let xhat = x[i] * inv_rms;
                        dx[i] = inv_rms * (g[i] * w[i] - xhat * mean_dot);
                    }
                }
                dw
            })
            .collect();

        let dw = &mut out[x.len()..];
        for part in partial_dw {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, width))))
    }
}

/// RMSNorm `x / rms(x) * w` over the last dimension (f32, CPU), differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Rotary embedding of `x` `[N, T, H, d]` with tables `[T, d]` (rotate-half convention);
/// the backward is the same rotation with `-sin`.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ganpo-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rope")?;
        let cos = f32_slice(s2, l2, "rope")?;
        let sin = f32_slice(s3, l3, "rope")?;
        let dims = l1.dims();
        let (t, h, d) = (dims[1], dims[2], dims[3]);
        let half = d / 2;
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; x.len()];

        // One task per (row, position): its H heads share one line of the tables.
        out.par_chunks_mut(h * d)
            .zip(x.par_chunks(h * d))
            .enumerate()
            .for_each(|(index, (out, x))| {
                let pos = index % t;
                let cos = &cos[pos * d..(pos + 1) * d];
                let sin = &sin[pos * d..(pos + 1) * d];
                for (y, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    for i in 0..half {
                        let (x1, x2) = (x[i], x[i + half]);
                        y[i] = x1 * cos[i] - sign * x2 * sin[i];
                        y[i + half] = x2 * cos[i + half] + sign * x1 * sin[i + half];
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            inverse: !self.inverse,
        };
        let grad = grad_res
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(grad), None, None))
    }
}

/// Rotates `x` `[N, T, H, d]` (before the head transpose) with `cos`/`sin` `[T, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?.detach(),
        &sin.contiguous()?.detach(),
        Rope { inverse: false },
    )
}

/// `y = x W^T` for `x` `[.., in]` and `W` `[out, in]`, as one node whose backward is two
/// matrix products (no reshape or transposed-weight nodes in between).
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "ganpo-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        let (out, features) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&features) {
            candle_core::bail!(
                "linear: input {:?} does not end in the weight's {features} features",
                l1.dims()
            );
        }
        let rows = x.len() / features.max(1);
        let mut y = vec![0f32; rows * out];
        // y [rows, out] = x [rows, features] · Wᵀ, Wᵀ read through W's strides.
        unsafe {
            gemm::gemm(
                rows,
                out,
                features,
                y.as_mut_ptr(),
                1,
                out as isize,
                false,
                x.as_ptr(),
                1,
                features as isize,
                w.as_ptr(),
                features as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, features) = w.dims2()?;
        let rows = x.elem_count() / features.max(1);
        let g = grad_res.contiguous()?.reshape((rows, out))?;
        let grad_x = g.matmul(&w.detach())?.reshape(x.shape())?;
        let grad_w = g.t()?.matmul(&x.detach().reshape((rows, features))?)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `x W^T` for `x` `[.., in]` and `W` `[out, in]` (f32, CPU), differentiable in both.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// The gated MLP's `act(gate) * up`, with SiLU or tanh-approximated GELU.
struct Gated {
    activation: Activation,
}

/// `act(x)` and `act'(x)`.
fn activation_and_slope(activation: Activation, x: f32) -> (f32, f32) {
    match activation {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            const A: f32 = 0.044_715;
            let t = (C * (x + A * x * x * x)).tanh();
            let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x * x);
            (0.5 * x * (1.0 + t), slope)
        }
        Activation::GeluErf => {
            const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
            let cdf =
                0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
            let density = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
            (x * cdf, cdf + x * density)
        }
    }
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENT_CHUNK: usize = 16384;

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "ganpo-gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate = f32_slice(s1, l1, "gated activation")?;
        let up = f32_slice(s2, l2, "gated activation")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "gated activation: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let activation = self.activation;
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(ELEMENT_CHUNK)
            .zip(
                gate.par_chunks(ELEMENT_CHUNK)
                    .zip(up.par_chunks(ELEMENT_CHUNK)),
            )
            .for_each(|(out, (gate, up))| {
                for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *y = activation_and_slope(activation, g).0 * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let both = gate.apply_op3_no_bwd(
            up,
            &grad_res.contiguous()?,
            &GatedBackward {
                activation: self.activation,
            },
        )?;
        let grad_gate = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let grad_up = both.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(grad_gate), Some(grad_up)))
    }
}

/// Gradients of [`Gated`]: the first half holds `d gate`, the second `d up`.
struct GatedBackward {
    activation: Activation,
}

impl CustomOp3 for GatedBackward {
    fn name(&self) -> &'static str {
        "ganpo-gated-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate = f32_slice(s1, l1, "gated activation backward")?;
        let up = f32_slice(s2, l2, "gated activation backward")?;
        let grad = f32_slice(s3, l3, "gated activation backward")?;
        let n = gate.len();
        let activation = self.activation;
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_chunks_mut(ELEMENT_CHUNK)
            .zip(d_up.par_chunks_mut(ELEMENT_CHUNK))
            .zip(gate.par_chunks(ELEMENT_CHUNK))
            .zip(
                up.par_chunks(ELEMENT_CHUNK)
                    .zip(grad.par_chunks(ELEMENT_CHUNK)),
            )
            .for_each(|(((d_gate, d_up), gate), (up, grad))| {
                for i in 0..gate.len() {
                    let (act, slope) = activation_and_slope(activation, gate[i]);
                    d_gate[i] = grad[i] * up[i] * slope;
                    d_up[i] = grad[i] * act;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// `act(gate) * up` (f32, CPU), differentiable in both.
pub fn gated_activation(
    gate: &Tensor,
    up: &Tensor,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Gated { activation })
}

/// `act(x)` elementwise.
struct Activate {
    activation: Activation,
}

impl CustomOp1 for Activate {
    fn name(&self) -> &'static str {
        "ganpo-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "activation")?;
        let activation = self.activation;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ELEMENT_CHUNK)
            .zip(x.par_chunks(ELEMENT_CHUNK))
            .for_each(|(out, x)| {
                for (y, &x) in out.iter_mut().zip(x) {
                    *y = activation_and_slope(activation, x).0;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = x.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &ActivateBackward {
                activation: self.activation,
            },
        )?;
        Ok(Some(grad))
    }
}

/// `grad * act'(x)`.
struct ActivateBackward {
    activation: Activation,
}

impl CustomOp2 for ActivateBackward {
    fn name(&self) -> &'static str {
        "ganpo-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "activation backward")?;
        let grad = f32_slice(s2, l2, "activation backward")?;
        let activation = self.activation;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ELEMENT_CHUNK)
            .zip(
                x.par_chunks(ELEMENT_CHUNK)
                    .zip(grad.par_chunks(ELEMENT_CHUNK)),
            )
            .for_each(|(out, (x, grad))| {
                for ((d, &x), &g) in out.iter_mut().zip(x).zip(grad) {
                    *d = g * activation_and_slope(activation, x).1;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `act(x)` (f32, CPU), differentiable.
pub fn activation(x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Activate { activation })
}

/// torch's `LayerNorm` over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
struct LayerNorm {
    eps: f32,
}

/// Mean and `1 / sqrt(var + eps)` of one row (the biased variance, as torch uses).
fn row_moments(x: &[f32], eps: f32) -> (f32, f32) {
    let width = x.len() as f32;
    let mean = x.iter().sum::<f32>() / width;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ganpo-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm")?;
        let w = f32_slice(s2, l2, "layer_norm")?;
        let b = f32_slice(s3, l3, "layer_norm")?;
        let width = w.len();
        if b.len() != width || l1.dims().last() != Some(&width) {
            candle_core::bail!(
                "layer_norm: input {:?}, weight {:?} and bias {:?} disagree",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        let rows = chunk_rows(width) * width;
        let eps = self.eps;
        out.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(width).zip(x.chunks(width)) {
                    let (mean, rstd) = row_moments(x, eps);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = w.dim(0)?;
        let rows = x.elem_count() / width.max(1);
        let all = x.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad_res.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let grad_x = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let grad_w = all.narrow(0, rows, 1)?.reshape(width)?;
        let grad_b = all.narrow(0, rows + 1, 1)?.reshape(width)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// Gradients of [`LayerNorm`]: rows `0..R` hold `dx`, row `R` holds `dw`, row `R + 1` `db`.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "ganpo-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm backward")?;
        let w = f32_slice(s2, l2, "layer_norm backward")?;
        let g = f32_slice(s3, l3, "layer_norm backward")?;
        let width = w.len();
        let rows = x.len() / width.max(1);
        let mut out = vec![0f32; x.len() + 2 * width];
        let (dx_all, _) = out.split_at_mut(x.len());
        let chunk = chunk_rows(width) * width;
        let eps = self.eps;

        let partial: Vec<Vec<f32>> = dx_all
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dx, (x, g))| {
                // dw in the first half, db in the second.
                let mut dwb = vec![0f32; 2 * width];
                for ((dx, x), g) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(g.chunks(width))
                {
                    let (mean, rstd) = row_moments(x, eps);
                    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f32, 0f32);
                    for i in 0..width {
                        let xhat = (x[i] - mean) * rstd;
                        let dxhat = g[i] * w[i];
                        sum_dxhat += dxhat;
                        sum_dxhat_xhat += dxhat * xhat;
                        dwb[i] += g[i] * xhat;
                        dwb[width + i] += g[i];
                    }
                    let (mean_dxhat, mean_dxhat_xhat) =
                        (sum_dxhat / width as f32, sum_dxhat_xhat / width as f32);
                    for i in 0..width {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * w[i] - mean_dxhat - xhat * mean_dxhat_xhat);
                    }
                }
                dwb
            })
            .collect();

        let dwb = &mut out[x.len()..];
        for part in partial {
            dwb.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, width))))
    }
}

/// torch's `LayerNorm` over the last dimension (f32, CPU), differentiable in all three.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}
