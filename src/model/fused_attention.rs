//! Scaled dot-product attention as one graph node (f32, CPU), for the policy's decoder and the
//! discriminators' encoder.
//!
//! Queries, keys and values are read in the layout the projections produce (`[N, T, heads,
//! d]`, no transposed copies) and the output is written as `[N, T, heads * d]`, ready for the
//! output projection. One task per (row, key/value head) runs small matrix products through
//! strided views; the probabilities (and the dropout mask, one byte an element) are the only
//! activations kept for the backward. The additive mask is a constant of the op and gets no
//! gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32_slice, keep_mask, kept, matmul, softmax_in_place, tensor_f32, View};

/// Where one of q, k, v (or an output) lies in its slice: element `(b, position i, head,
/// j)` at `offset + (b * len + i) * rs + head * d + j`, `len` being `t` for queries and
/// outputs, `s` for keys and values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    pub offset: usize,
    pub rs: usize,
}

/// The layout of queries, keys and values: separate `[n, t, h, d]` and `[n, s, kv, d]`
/// tensors, or row blocks of one packed projection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Packing {
    pub q: Strided,
    pub k: Strided,
    pub v: Strided,
}

/// Sizes of one call: `n` rows, `t` queries, `s` keys, `h` query heads sharing `kv` key/value
/// heads in groups of `h / kv`, head width `d`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub n: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.h / self.kv
    }

    /// q, k and v as three tensors of their own.
    pub fn separate(&self) -> Packing {
        Packing {
            q: Strided {
                offset: 0,
                rs: self.h * self.d,
            },
            k: Strided {
                offset: 0,
                rs: self.kv * self.d,
            },
            v: Strided {
                offset: 0,
                rs: self.kv * self.d,
            },
        }
    }

    /// Head `head` of row `b` of a `len`-position input laid out as `at`: `[len, d]`.
    fn head(&self, at: Strided, len: usize, b: usize, head: usize) -> View {
        View {
            offset: at.offset + b * len * at.rs + head * self.d,
            rs: at.rs,
            cs: 1,
        }
    }

    /// Head `head` of row `b` of the output (or its gradient), `[n, t, h * d]`.
    fn out(&self, b: usize, head: usize) -> View {
        let rows = Strided {
            offset: 0,
            rs: self.h * self.d,
        };
        self.head(rows, self.t, b, head)
    }

    /// Elements a slice holding `at` for `len` positions must have.
    fn extent(&self, at: Strided, len: usize, heads: usize) -> usize {
        if self.n * len == 0 {
            return 0;
        }
        at.offset + (self.n * len - 1) * at.rs + heads * self.d
    }

    fn check(&self, (q, k, v): (&[f32], &[f32], &[f32]), at: Packing) {
        assert!(
            q.len() >= self.extent(at.q, self.t, self.h)
                && k.len() >= self.extent(at.k, self.s, self.kv)
                && v.len() >= self.extent(at.v, self.s, self.kv),
            "attention: q, k or v smaller than their layout"
        );
    }
}

/// Attention's forward on raw slices: the output `[n, t, h * d]` and the probabilities `[n,
/// h, t, s]` (before dropout). `bias` is an additive mask `[n, t, s]`; `mask` a keep mask `[n,
/// h, t, s]` (empty: no dropout), kept weights scaled by `keep_scale`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    dims: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    at: Packing,
    bias: Option<&[f32]>,
    scale: f32,
    mask: &[u8],
    keep_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    dims.check((q, k, v), at);
    let Dims { n, t, s, h, d, .. } = dims;
    let group = dims.group();
    let mut probs = vec![0f32; n * h * t * s];
    let mut blocks = vec![0f32; n * h * t * d];
    probs
        .par_chunks_mut(t * s)
        .zip(blocks.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(bh, (p, o))| {
            let (b, head) = (bh / h, bh % h);
            let qv = dims.head(at.q, t, b, head);
            let (kv, vv) = (
                dims.head(at.k, s, b, head / group),
                dims.head(at.v, s, b, head / group),
            );
            matmul((t, s, d), p, false, (q, qv), (k, kv.t()), scale, SERIAL);
            for (i, row) in p.chunks_mut(s).enumerate() {
                if let Some(bias) = &bias {
                    let bias = &bias[(b * t + i) * s..(b * t + i + 1) * s];
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
                softmax_in_place(row);
            }
            let weights: std::borrow::Cow<[f32]> = if mask.is_empty() {
                std::borrow::Cow::Borrowed(p)
            } else {
                let m = &mask[bh * t * s..(bh + 1) * t * s];
                let dropped = p
                    .iter()
                    .zip(m)
                    .map(|(&p, &m)| kept(p, m, keep_scale))
                    .collect();
                std::borrow::Cow::Owned(dropped)
            };
            let w = View::dense(0, s);
            matmul((t, d, s), o, false, (&weights, w), (v, vv), 1.0, SERIAL);
        });
    (heads_to_rows(&blocks, dims), probs)
}

/// Attention's backward on raw slices: from the output gradient `grad` `[n, t, h * d]` and
/// the forward's `probs` and `mask`, writes dq, dk and dv into `dst` laid out as `dst_at`
/// (every element of those three is written).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dims: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    at: Packing,
    grad: &[f32],
    (probs, mask): (&[f32], &[u8]),
    scale: f32,
    keep_scale: f32,
    (dst, dst_at): (&mut [f32], Packing),
) {
    dims.check((q, k, v), at);
    let Dims { n, t, s, h, kv, d } = dims;
    assert_eq!(
        probs.len(),
        n * h * t * s,
        "attention backward: probabilities"
    );
    assert!(
        grad.len() >= n * t * h * d,
        "attention backward: output gradient"
    );
    let group = dims.group();

    // One task per (row, key/value head): it owns that head's dk, dv and its queries' dq.
    let block = group * t * d + 2 * s * d;
    let mut parts = vec![0f32; n * kv * block];
    parts
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(bk, part)| {
            let (b, kvh) = (bk / kv, bk % kv);
            let (dq_all, rest) = part.split_at_mut(group * t * d);
            let (dk, dv) = rest.split_at_mut(s * d);
            let (kview, vview) = (dims.head(at.k, s, b, kvh), dims.head(at.v, s, b, kvh));
            let mut dp = vec![0f32; t * s];
            let mut weights = vec![0f32; t * s];
            for g in 0..group {
                let head = kvh * group + g;
                let bh = b * h + head;
                let p = &probs[bh * t * s..(bh + 1) * t * s];
                let m = (!mask.is_empty()).then(|| &mask[bh * t * s..(bh + 1) * t * s]);
                match m {
                    Some(m) => weights
                        .iter_mut()
                        .zip(p)
                        .zip(m)
                        .for_each(|((w, &p), &m)| *w = kept(p, m, keep_scale)),
                    None => weights.copy_from_slice(p),
                }
                let go = dims.out(b, head);
                let dense = View::dense(0, s);
                // dv += weightsᵀ · dO
                let wt = (&weights[..], dense.t());
                matmul((s, d, t), dv, true, wt, (grad, go), 1.0, SERIAL);
                // dP = dO · vᵀ, through the dropout mask
                matmul(
                    (t, s, d),
                    &mut dp,
                    false,
                    (grad, go),
                    (v, vview.t()),
                    1.0,
                    SERIAL,
                );
                if let Some(m) = m {
                    dp.iter_mut()
                        .zip(m)
                        .for_each(|(g, &m)| *g = kept(*g, m, keep_scale));
                }
                // dS = P ∘ (dP − rowsum(dP ∘ P)), in place of dP
                for (dp, p) in dp.chunks_mut(s).zip(p.chunks(s)) {
                    let dot: f32 = dp.iter().zip(p).map(|(g, p)| g * p).sum();
                    dp.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot));
                }
                // dq = scale · dS · k ;  dk += scale · dSᵀ · q
                let dq = &mut dq_all[g * t * d..(g + 1) * t * d];
                matmul(
                    (t, d, s),
                    dq,
                    false,
                    (&dp, dense),
                    (k, kview),
                    scale,
                    SERIAL,
                );
                let qv = dims.head(at.q, t, b, head);
                matmul(
                    (s, d, t),
                    dk,
                    true,
                    (&dp, dense.t()),
                    (q, qv),
                    scale,
                    SERIAL,
                );
            }
        });

    // Scatter the per-task blocks into dq, dk and dv of `dst` (serially: in a packed layout
    // the three share destination rows; it is a few milliseconds of copying).
    let mut write = |at: Strided, row: usize, head: usize, src: usize| {
        let o = at.offset + row * at.rs + head * d;
        dst[o..o + d].copy_from_slice(&parts[src..src + d]);
    };
    for row in 0..n * t {
        let (b, i) = (row / t, row % t);
        for head in 0..h {
            let (kvh, g) = (head / group, head % group);
            write(
                dst_at.q,
                row,
                head,
                (b * kv + kvh) * block + (g * t + i) * d,
            );
        }
    }
    for row in 0..n * s {
        let (b, j) = (row / s, row % s);
        for kvh in 0..kv {
            let base = (b * kv + kvh) * block + group * t * d + j * d;
            write(dst_at.k, row, kvh, base);
            write(dst_at.v, row, kvh, base + s * d);
        }
    }
}

/// Single-threaded products: the attention kernels parallelise over heads themselves.
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// Inverted dropout on the attention probabilities.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDropout {
    /// Probability of dropping a weight.
    pub p: f32,
    /// Seed of the mask (one ChaCha8 stream per row and head).
    pub seed: u64,
}

/// What the forward keeps for the backward.
#[derive(Default)]
struct Saved {
    /// Probabilities `[n, h, t, s]` before dropout.
    probs: Vec<f32>,
    /// Keep mask `[n, h, t, s]`, empty without dropout.
    mask: Vec<u8>,
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    /// Additive mask `[n, 1, t, s]` (or none).
    bias: Option<Tensor>,
    dropout: Option<AttentionDropout>,
    saved: Mutex<Saved>,
}

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout) -> candle_core::Result<Dims> {
        let (n, t, h, d) = q.shape().dims4()?;
        let (n2, s, kv, d2) = k.shape().dims4()?;
        if n2 != n || d2 != d || h != self.heads || kv != self.kv_heads || kv == 0 || h % kv != 0 {
            candle_core::bail!(
                "attention: queries {:?} and keys {:?} do not fit {} heads over {} key/value heads",
                q.dims(),
                k.dims(),
                self.heads,
                self.kv_heads
            );
        }
        Ok(Dims { n, t, s, h, kv, d })
    }

    fn check_bias(&self, dims: Dims) -> candle_core::Result<()> {
        match &self.bias {
            Some(bias) if bias.dims() != [dims.n, 1, dims.t, dims.s] => candle_core::bail!(
                "attention: mask {:?} for {} rows, {} queries and {} keys",
                bias.dims(),
                dims.n,
                dims.t,
                dims.s
            ),
            _ => Ok(()),
        }
    }

    fn keep_mask(&self, dims: Dims) -> Vec<u8> {
        let Some(dropout) = self.dropout else {
            return Vec::new();
        };
        let keep = (1.0 - dropout.p as f64).clamp(0.0, 1.0);
        let block = dims.t * dims.s;
        keep_mask(dims.n * dims.h * block, block, keep, dropout.seed)
    }

    fn keep_scale(&self) -> f32 {
        self.dropout.map_or(1.0, |d| 1.0 / (1.0 - d.p))
    }
}

/// `[n, h, t, d]` blocks back to `[n, t, h * d]`.
fn heads_to_rows(blocks: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { t, h, d, .. } = dims;
    let mut out = vec![0f32; blocks.len()];
    out.par_chunks_mut(h * d)
        .enumerate()
        .for_each(|(row, out)| {
            let (b, i) = (row / t, row % t);
            for head in 0..h {
                let src = ((b * h + head) * t + i) * d;
                out[head * d..(head + 1) * d].copy_from_slice(&blocks[src..src + d]);
            }
        });
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "ganpo-attention"
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
        let dims = self.dims(l1, l2)?;
        if l3.dims() != l2.dims() {
            candle_core::bail!("attention: keys {:?} but values {:?}", l2.dims(), l3.dims());
        }
        let (q, k, v) = (
            f32_slice(s1, l1, "attention queries")?,
            f32_slice(s2, l2, "attention keys")?,
            f32_slice(s3, l3, "attention values")?,
        );
        self.check_bias(dims)?;
        let bias_storage = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &bias_storage {
            Some((storage, layout)) => Some(tensor_f32(storage, layout, "attention mask")?),
            None => None,
        };
        let mask = self.keep_mask(dims);
        let (out, probs) = forward(
            dims,
            (q, k, v),
            dims.separate(),
            bias,
            self.scale,
            &mask,
            self.keep_scale(),
        );
        let Dims { n, t, h, d, .. } = dims;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: saved state lock".into()))? =
            Saved { probs, mask };
        Ok((CpuStorage::F32(out), Shape::from((n, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: saved state lock".into()))?;
        let backward = AttentionBackward {
            op: self,
            probs: &saved.probs,
            mask: &saved.mask,
        };
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        // One buffer `[dq | dk | dv]`, split below.
        let packed = q.apply_op3_no_bwd(&k, &v, &GradInputs(grad_res.contiguous()?, backward))?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

struct AttentionBackward<'a> {
    op: &'a Attention,
    probs: &'a [f32],
    mask: &'a [u8],
}

/// The backward as an op over (q, k, v), carrying the output gradient.
struct GradInputs<'a>(Tensor, AttentionBackward<'a>);

impl CustomOp3 for GradInputs<'_> {
    fn name(&self) -> &'static str {
        "ganpo-attention-backward"
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
        let AttentionBackward { op, probs, mask } = &self.1;
        let dims = op.dims(l1, l2)?;
        let (q, k, v) = (
            f32_slice(s1, l1, "attention queries")?,
            f32_slice(s2, l2, "attention keys")?,
            f32_slice(s3, l3, "attention values")?,
        );
        let (grad_storage, grad_layout) = self.0.storage_and_layout();
        let grad = tensor_f32(&grad_storage, grad_layout, "attention output gradient")?;
        let Dims { n, t, s, h, kv, d } = dims;
        if probs.len() != n * h * t * s {
            candle_core::bail!("attention backward: the forward's probabilities are missing");
        }
        // One buffer [dq (n, t, h, d) | dk (n, s, kv, d) | dv (n, s, kv, d)].
        let (nq, nk) = (n * t * h * d, n * s * kv * d);
        let mut out = vec![0f32; nq + 2 * nk];
        let separate = dims.separate();
        let dst_at = Packing {
            q: separate.q,
            k: Strided {
                offset: nq,
                ..separate.k
            },
            v: Strided {
                offset: nq + nk,
                ..separate.v
            },
        };
        backward(
            dims,
            (q, k, v),
            separate,
            grad,
            (probs, mask),
            op.scale,
            op.keep_scale(),
            (&mut out, dst_at),
        );
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}

/// Scaled dot-product attention, differentiable in `q`, `k` and `v` (f32, CPU).
///
/// `q` is `[N, T, H, d]`, `k` and `v` are `[N, S, KV, d]` with `H` a multiple of `KV` (query
/// head `i` reads key/value head `i / (H / KV)`); `bias` is an additive mask `[N, 1, T, S]`;
/// scores are `scale · q kᵀ`. Returns `[N, T, H * d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    dropout: Option<AttentionDropout>,
) -> candle_core::Result<Tensor> {
    let (_, _, heads, _) = q.dims4()?;
    let (_, _, kv_heads, _) = k.dims4()?;
    let op = Attention {
        heads,
        kv_heads,
        scale: scale as f32,
        bias: bias
            .map(|b| b.contiguous().map(|b| b.detach()))
            .transpose()?,
        dropout: dropout.filter(|d| d.p > 0.0),
        saved: Mutex::new(Saved::default()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}
