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
use super::fastmath;

/// Whether the fused kernels can run on `x` (f32 on the CPU).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The elements of a contiguous f32 CPU storage.
pub(crate) fn f32_slice<'a>(
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

/// The elements of a contiguous f32 tensor's storage, which must be on the CPU (for a
/// backward that reads tensors rather than storages).
pub(crate) fn tensor_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(storage) = storage else {
        candle_core::bail!("{what} must be on the CPU");
    };
    f32_slice(storage, layout, what)
}

/// Rows per parallel task: enough work to amortise scheduling.
pub(crate) fn chunk_rows(width: usize) -> usize {
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
                    y.copy_from_slice(x);
                    softmax_in_place(y);
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

/// Replaces one row by its softmax.
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for y in row.iter_mut() {
        *y = fastmath::exp(*y - max);
    }
    let inv = 1.0 / fastmath::sum(row);
    row.iter_mut().for_each(|y| *y *= inv);
}

/// `softmax(x + bias)` over the last dimension, with `x` `[N, .., T, S]` and one bias row per
/// (batch row, query position): `bias` `[N, 1, T, S]`, shared by every head. The bias is a
/// constant (an attention mask): no gradient is formed for it.
struct SoftmaxBias;

impl CustomOp2 for SoftmaxBias {
    fn name(&self) -> &'static str {
        "ganpo-softmax-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "softmax with bias")?;
        let bias = f32_slice(s2, l2, "softmax with bias")?;
        let (n, _, t, s) = l2.shape().dims4()?;
        let dims = l1.dims();
        if dims.len() < 3 || dims[0] != n || dims[dims.len() - 2] != t || dims[dims.len() - 1] != s
        {
            candle_core::bail!(
                "softmax with bias: scores {dims:?} do not match the bias {:?}",
                l2.dims()
            );
        }
        let rows_per_batch_row = x.len() / (n * s).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let b = (row / rows_per_batch_row) * t + row % t;
                let b = &bias[b * s..(b + 1) * s];
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                    *y = x + b;
                }
                softmax_in_place(y);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBackward)?;
        Ok((Some(grad), None))
    }
}

/// `softmax(x + bias)` over the last dimension (f32, CPU) for attention scores `x`
/// `[N, .., T, S]` and an additive mask `bias` `[N, 1, T, S]`; differentiable in `x` only.
pub fn softmax_with_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&bias.contiguous()?.detach(), SoftmaxBias)
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
        let y = linear_rows(x, w, None, (rows, out, features));
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
        // Only for inputs in the graph: a frozen weight (LoRA's base, a frozen discriminator)
        // or a detached input gets no gradient, which halves the backward's products.
        let grad_x = if x.track_op() {
            Some(g.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            Some(g.t()?.matmul(&x.detach().reshape((rows, features))?)?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

/// [`Linear`] plus a bias `[out]`, whose gradient (the column sums of the output gradient) is
/// one more matrix product rather than a reduction over a broadcast.
struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "ganpo-linear-bias"
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
        let b = f32_slice(s3, l3, "linear")?;
        let (y, shape) = Linear.cpu_fwd(s1, l1, s2, l2)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("linear: f32 output expected");
        };
        if b.len() != l2.dims()[0] {
            candle_core::bail!("linear: bias {:?} for weight {:?}", l3.dims(), l2.dims());
        }
        add_bias(&mut y, b);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w) = Linear.bwd(x, w, res, grad_res)?;
        if !b.track_op() {
            return Ok((grad_x, grad_w, None));
        }
        let out = w.dim(0)?;
        let rows = grad_res.elem_count() / out.max(1);
        let g = grad_res.contiguous()?.reshape((rows, out))?;
        let ones = Tensor::ones((1, rows), DType::F32, g.device())?;
        let grad_b = ones.matmul(&g)?.reshape(out)?;
        Ok((grad_x, grad_w, Some(grad_b)))
    }
}

/// Both threads' worth of gemm parallelism (none on one thread).
pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A matrix inside a slice: element `(i, j)` at `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// Row-major `[rows, cols]` at `offset`.
    pub fn dense(offset: usize, cols: usize) -> Self {
        Self {
            offset,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of this view.
    pub fn t(self) -> Self {
        Self {
            offset: self.offset,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The element one past the last one a `[rows, cols]` matrix addresses.
    fn end(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs + 1
    }
}

/// `dst[m×n] (+)= beta · lhs[m×k] · rhs[k×n]` on strided views; `dst` is row-major with row
/// stride `n`. Bounds are checked here, so callers need no `unsafe`.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    (lhs, l): (&[f32], View),
    (rhs, r): (&[f32], View),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(
        k == 0 || l.end(m, k) <= lhs.len(),
        "matmul: lhs out of range"
    );
    assert!(
        k == 0 || r.end(k, n) <= rhs.len(),
        "matmul: rhs out of range"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every element the views address inside their slices,
    // and `dst` is a distinct, exclusively borrowed buffer of at least m × n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.offset),
            r.cs as isize,
            r.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `y [rows, out] = x [rows, features] · Wᵀ (+ b)`, Wᵀ read through W's strides.
pub(crate) fn linear_rows(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (rows, out, features): (usize, usize, usize),
) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    matmul(
        (rows, out, features),
        &mut y,
        false,
        (x, View::dense(0, features)),
        (w, View::dense(0, features).t()),
        1.0,
        parallelism(),
    );
    if let Some(b) = b {
        add_bias(&mut y, b);
    }
    y
}

/// Adds `b` to every row of `y` (rows of `b.len()`).
fn add_bias(y: &mut [f32], b: &[f32]) {
    let width = b.len();
    y.par_chunks_mut(chunk_rows(width) * width).for_each(|y| {
        for row in y.chunks_mut(width) {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    });
}

/// `x W^T` for `x` `[.., in]` and `W` `[out, in]` (f32, CPU), differentiable in both.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// `x W^T + b` for `x` `[.., in]`, `W` `[out, in]` and `b` `[out]` (f32, CPU), differentiable
/// in all three.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)
}

/// The gated MLP's `act(gate) * up`, with SiLU or tanh-approximated GELU.
struct Gated {
    activation: Activation,
}

/// Runs `$body` with `$act` bound to the function giving `act(x)` and `act'(x)` of
/// `$activation`: the match happens once, outside the loops in `$body`, and each arm's loops
/// call a known function that inlines and vectorises.
macro_rules! with_activation {
    ($activation:expr, $act:ident => $body:expr) => {
        match $activation {
            Activation::Silu => {
                let $act = fastmath::silu;
                $body
            }
            Activation::GeluTanh => {
                let $act = fastmath::gelu_tanh;
                $body
            }
            Activation::GeluErf => {
                let $act = fastmath::gelu_erf;
                $body
            }
        }
    };
}

/// Elements per parallel task of the elementwise kernels.
pub(crate) const ELEMENT_CHUNK: usize = 16384;

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
        let mut out = vec![0f32; gate.len()];
        let chunks = out.par_chunks_mut(ELEMENT_CHUNK).zip(
            gate.par_chunks(ELEMENT_CHUNK)
                .zip(up.par_chunks(ELEMENT_CHUNK)),
        );
        with_activation!(self.activation, act => chunks.for_each(|(out, (gate, up))| {
            for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *y = act(g).0 * u;
            }
        }));
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
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let chunks = d_gate
            .par_chunks_mut(ELEMENT_CHUNK)
            .zip(d_up.par_chunks_mut(ELEMENT_CHUNK))
            .zip(gate.par_chunks(ELEMENT_CHUNK))
            .zip(
                up.par_chunks(ELEMENT_CHUNK)
                    .zip(grad.par_chunks(ELEMENT_CHUNK)),
            );
        with_activation!(self.activation, act => chunks.for_each(
            |(((d_gate, d_up), gate), (up, grad))| {
                for i in 0..gate.len() {
                    let (value, slope) = act(gate[i]);
                    d_gate[i] = grad[i] * up[i] * slope;
                    d_up[i] = grad[i] * value;
                }
            }
        ));
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
        let mut out = vec![0f32; x.len()];
        let chunks = out
            .par_chunks_mut(ELEMENT_CHUNK)
            .zip(x.par_chunks(ELEMENT_CHUNK));
        with_activation!(self.activation, act => chunks.for_each(|(out, x)| {
            for (y, &x) in out.iter_mut().zip(x) {
                *y = act(x).0;
            }
        }));
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
        let mut out = vec![0f32; x.len()];
        let chunks = out.par_chunks_mut(ELEMENT_CHUNK).zip(
            x.par_chunks(ELEMENT_CHUNK)
                .zip(grad.par_chunks(ELEMENT_CHUNK)),
        );
        with_activation!(self.activation, act => chunks.for_each(|(out, (x, grad))| {
            for ((d, &x), &g) in out.iter_mut().zip(x).zip(grad) {
                *d = g * act(x).1;
            }
        }));
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

/// One row of torch's `LayerNorm`: `y = (x − mean) · rstd · w + b`.
fn layer_norm_row(x: &[f32], (w, b): (&[f32], &[f32]), eps: f32, y: &mut [f32]) {
    let (mean, rstd) = row_moments(x, eps);
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * rstd * w + b;
    }
}

/// The backward of [`layer_norm_row`] for the output gradient `g`: writes `dx` (or adds to it
/// when the flag is set) and, when given, adds the row's `dw` to `dwb[..width]` and `db` to
/// `dwb[width..]`. The moments are recomputed from `x`.
fn layer_norm_row_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    (dx, accumulate): (&mut [f32], bool),
    dwb: Option<&mut [f32]>,
) {
    let width = x.len();
    let (mean, rstd) = row_moments(x, eps);
    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f32, 0f32);
    for i in 0..width {
        let xhat = (x[i] - mean) * rstd;
        let dxhat = g[i] * w[i];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
    }
    if let Some(dwb) = dwb {
        let (dw, db) = dwb.split_at_mut(width);
        for i in 0..width {
            dw[i] += g[i] * (x[i] - mean) * rstd;
            db[i] += g[i];
        }
    }
    let (mean_dxhat, mean_dxhat_xhat) = (sum_dxhat / width as f32, sum_dxhat_xhat / width as f32);
    for i in 0..width {
        let xhat = (x[i] - mean) * rstd;
        let d = rstd * (g[i] * w[i] - mean_dxhat - xhat * mean_dxhat_xhat);
        if accumulate {
            dx[i] += d;
        } else {
            dx[i] = d;
        }
    }
}

/// [`layer_norm_row`] over every row of `x`, into a new buffer.
pub(crate) fn layer_norm_rows(x: &[f32], (w, b): (&[f32], &[f32]), eps: f32) -> Vec<f32> {
    let width = w.len();
    let chunk = chunk_rows(width) * width;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(width).zip(x.chunks(width)) {
                layer_norm_row(x, (w, b), eps, y);
            }
        });
    y
}

/// [`layer_norm_row_backward`] over every row: writes (or, with the flag, adds to) `dx`, and
/// adds the weight and bias gradients to `dwb` when given.
pub(crate) fn layer_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    (dx, accumulate): (&mut [f32], bool),
    dwb: Option<(&mut [f32], &mut [f32])>,
) {
    let width = w.len();
    let chunk = chunk_rows(width) * width;
    let want = dwb.is_some();
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(dx, (x, g))| {
            // This task's dw in the first half, db in the second.
            let mut part = vec![0f32; if want { 2 * width } else { 0 }];
            for ((dx, x), g) in dx
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(g.chunks(width))
            {
                let dwb = want.then_some(&mut part[..]);
                layer_norm_row_backward(x, w, g, eps, (dx, accumulate), dwb);
            }
            part
        })
        .collect();
    if let Some((dw, db)) = dwb {
        for part in partial {
            let (pw, pb) = part.split_at(width);
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
    }
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
        let out = layer_norm_rows(x, (w, b), self.eps);
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
        let (dx, dwb) = out.split_at_mut(x.len());
        let (dw, db) = dwb.split_at_mut(width);
        layer_norm_backward_rows(x, w, g, self.eps, (dx, false), Some((dw, db)));
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

/// Inverted dropout whose keep mask lives in the op (one byte an element), so the graph holds
/// no mask tensor and the backward computes no gradient for one.
struct Dropout {
    keep: f32,
    seed: u64,
    mask: std::sync::Mutex<Vec<u8>>,
}

/// A keep mask of `n` bytes (1 = kept) with probability `keep`: one ChaCha8 stream of `seed`
/// per `chunk` elements, so the mask is the same whatever the thread count.
pub(crate) fn keep_mask(n: usize, chunk: usize, keep: f64, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let threshold = (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let mut mask = vec![0u8; n];
    mask.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(stream, mask)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream as u64);
            for m in mask {
                *m = u8::from(rng.next_u32() < threshold);
            }
        });
    mask
}

/// `x` through inverted dropout: scaled when kept, zero when dropped.
pub(crate) fn kept(x: f32, mask: u8, scale: f32) -> f32 {
    if mask == 1 {
        x * scale
    } else {
        0.0
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "ganpo-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "dropout")?;
        let mask = keep_mask(x.len(), ELEMENT_CHUNK, self.keep as f64, self.seed);
        let scale = 1.0 / self.keep;
        let out = x
            .par_iter()
            .zip(mask.par_iter())
            .map(|(&x, &m)| kept(x, m, scale))
            .collect();
        *self
            .mask
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout mask lock".into()))? = mask;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mask = self
            .mask
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout mask lock".into()))?;
        let backward = DropoutBackward {
            scale: 1.0 / self.keep,
            mask: &mask,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&backward)?))
    }
}

/// `grad * mask / keep` with the mask of the forward.
struct DropoutBackward<'a> {
    scale: f32,
    mask: &'a [u8],
}

impl CustomOp1 for DropoutBackward<'_> {
    fn name(&self) -> &'static str {
        "ganpo-dropout-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let grad = f32_slice(storage, layout, "dropout backward")?;
        if grad.len() != self.mask.len() {
            candle_core::bail!(
                "dropout backward: gradient of {} elements for a mask of {}",
                grad.len(),
                self.mask.len()
            );
        }
        let scale = self.scale;
        let out = grad
            .par_iter()
            .zip(self.mask.par_iter())
            .map(|(&g, &m)| kept(g, m, scale))
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Inverted dropout (f32, CPU): keeps each element with probability `1 - p`, scaled by
/// `1 / (1 - p)`; the mask is drawn from `seed` alone. Differentiable.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout {
        keep: (1.0 - p) as f32,
        seed,
        mask: std::sync::Mutex::new(Vec::new()),
    })
}
