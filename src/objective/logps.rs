//! Sequence log-probabilities of completions, computed without materialising log-softmax.
//!
//! On the CPU a custom op computes, for every position, the log-probability of the next token
//! (one pass for the log-sum-exp, one gather) and the mean logit over the vocabulary; its
//! backward writes `g * (onehot - softmax)` directly, so the only `[N, T, V]` float tensors
//! alive are the logits themselves and, during backward, their gradient. Other devices fall
//! back to composed candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::fastmath;
use crate::{Error, Result};

/// Per-sequence log-probabilities of the completion tokens.
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// Sum of the completion tokens' log-probabilities, `[N]` f32.
    pub sum: Tensor,
    /// Number of completion tokens counted, `[N]` f32.
    pub count: Tensor,
    /// Sum over completion-predicting positions of the mean logit over the vocabulary, `[N]`
    /// f32, detached. TRL's `logits/chosen` is `sum(mean_logit_sum) / sum(count)` over rows.
    pub mean_logit_sum: Tensor,
}

impl SequenceLogps {
    /// Length-normalised log-probabilities (`sum / count`, SimPO's and IPO's), `[N]`.
    pub fn mean(&self) -> Result<Tensor> {
        let count = self.count.clamp(1f32, f32::MAX)?;
        Ok(self.sum.div(&count)?)
    }

    /// Rows `start..start + len` of every field (e.g. the chosen half of a pair batch).
    pub fn rows(&self, start: usize, len: usize) -> Result<SequenceLogps> {
        Ok(SequenceLogps {
            sum: self.sum.narrow(0, start, len)?,
            count: self.count.narrow(0, start, len)?,
            mean_logit_sum: self.mean_logit_sum.narrow(0, start, len)?,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.sum.dims1().unwrap_or(0)
    }

    /// True when there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Log-probabilities of each completion under the model that produced `logits`.
///
/// `logits` `[N, T, V]` (any float dtype), `input_ids` `[N, T]` u32, `completion_mask` `[N, T]`
/// f32 with 1 at each completion token's own position. The logit at position `t` scores the
/// token at `t + 1`, so a completion token at `t + 1` is counted with the logit at `t`.
/// Gradients flow into `logits` through `sum`.
pub fn sequence_logps(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<SequenceLogps> {
    let (n, t, _v) = logits.dims3().map_err(|_| Error::ShapeMismatch {
        name: "logits".into(),
        expected: vec![
            input_ids.dim(0).unwrap_or(0),
            input_ids.dim(1).unwrap_or(0),
            0,
        ],
        got: logits.dims().to_vec(),
    })?;
    check_shape("input_ids", input_ids, &[n, t])?;
    check_shape("completion_mask", completion_mask, &[n, t])?;
    if input_ids.dtype() != DType::U32 {
        return Err(Error::invalid(format!(
            "input_ids must be u32, got {:?}",
            input_ids.dtype()
        )));
    }

    let (labels, mask) = shift_left(input_ids, &completion_mask.to_dtype(DType::F32)?)?;
    // TODO: the fused op has only a CPU kernel; on CUDA the composed ops hold several
    // [N, T, V] tensors. A CUDA kernel (forward and backward) would bring the GPU path to the
    // same memory bound.
    let per_position = if logits.device().is_cpu() {
        token_logps_fused(logits, &labels)?
    } else {
        token_logps_composed(logits, &labels)?
    };
    let token_logps = per_position.narrow(2, 0, 1)?.squeeze(2)?;
    let mean_logits = per_position.narrow(2, 1, 1)?.squeeze(2)?.detach();

    Ok(SequenceLogps {
        sum: token_logps.mul(&mask)?.sum(1)?,
        count: mask.sum(1)?,
        mean_logit_sum: mean_logits.mul(&mask)?.sum(1)?,
    })
}

/// Log-probabilities computed by composed candle ops only (log-softmax then gather).
///
/// Holds several `[N, T, V]` tensors; used on devices without the fused op and as the
/// reference the fused op is tested against.
pub fn sequence_logps_composed(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<SequenceLogps> {
    let (n, t, _v) = logits.dims3()?;
    check_shape("input_ids", input_ids, &[n, t])?;
    check_shape("completion_mask", completion_mask, &[n, t])?;

    let (labels, mask) = shift_left(input_ids, &completion_mask.to_dtype(DType::F32)?)?;
    let per_position = token_logps_composed(logits, &labels)?;
    let token_logps = per_position.narrow(2, 0, 1)?.squeeze(2)?;
    let mean_logits = per_position.narrow(2, 1, 1)?.squeeze(2)?.detach();

    Ok(SequenceLogps {
        sum: token_logps.mul(&mask)?.sum(1)?,
        count: mask.sum(1)?,
        mean_logit_sum: mean_logits.mul(&mask)?.sum(1)?,
    })
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::ShapeMismatch {
            name: name.into(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Labels and mask moved one position left: position `t` holds what the logit at `t` predicts;
/// the last position predicts nothing (label 0, mask 0).
fn shift_left(input_ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, t) = input_ids.dims2()?;
    let device = input_ids.device();
    let pad_ids = Tensor::zeros((n, 1), DType::U32, device)?;
    let pad_mask = Tensor::zeros((n, 1), DType::F32, device)?;
    if t < 2 {
        return Ok((pad_ids, pad_mask));
    }

    let labels = Tensor::cat(&[&input_ids.narrow(1, 1, t - 1)?, &pad_ids], 1)?;
    let mask = Tensor::cat(&[&mask.narrow(1, 1, t - 1)?, &pad_mask], 1)?;
    Ok((labels.contiguous()?, mask.contiguous()?))
}

/// `[N, T, 2]` f32: log-probability of each label and the mean logit, by composed ops.
fn token_logps_composed(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&lse)?;
    let picked = log_probs.gather(&labels.unsqueeze(2)?, 2)?;
    let mean_logit = logits.mean_keepdim(D::Minus1)?;
    Ok(Tensor::cat(&[&picked, &mean_logit], 2)?)
}

/// `[N, T, 2]` f32 by the fused CPU op, with its own backward.
fn token_logps_fused(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let labels = labels.contiguous()?;
    Ok(logits.apply_op2(&labels, TokenLogps)?)
}

/// Row `[start, start + v)` of a float storage as f32: borrowed when it is f32, converted into
/// `buf` otherwise.
fn row_f32<'a>(
    s: &'a CpuStorage,
    start: usize,
    v: usize,
    buf: &'a mut [f32],
) -> candle_core::Result<&'a [f32]> {
    if let CpuStorage::F32(d) = s {
        return Ok(&d[start..start + v]);
    }
    read_row(s, start, v, buf)?;
    Ok(buf)
}

/// Reads row `i` (length `v`) of a float storage as f32 into `out`.
fn read_row(s: &CpuStorage, start: usize, v: usize, out: &mut [f32]) -> candle_core::Result<()> {
    match s {
        CpuStorage::F32(d) => out.copy_from_slice(&d[start..start + v]),
        CpuStorage::BF16(d) => {
            for (o, x) in out.iter_mut().zip(&d[start..start + v]) {
                *o = x.to_f32();
            }
        }
        CpuStorage::F16(d) => {
            for (o, x) in out.iter_mut().zip(&d[start..start + v]) {
                *o = x.to_f32();
            }
        }
        CpuStorage::F64(d) => {
            for (o, x) in out.iter_mut().zip(&d[start..start + v]) {
                *o = *x as f32;
            }
        }
        _ => candle_core::bail!("token log-probs: logits must be a float dtype"),
    }
    Ok(())
}

/// Log-sum-exp of a row: f32 exponentials, accumulated in f64 for accuracy.
fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    // f32 exponentials summed in blocks, the blocks accumulated in f64.
    let mut sum = 0f64;
    let mut block = [0f32; 1024];
    for chunk in row.chunks(block.len()) {
        let block = &mut block[..chunk.len()];
        for (e, &x) in block.iter_mut().zip(chunk) {
            *e = fastmath::exp(x - max);
        }
        sum += fastmath::sum(block) as f64;
    }
    max + sum.ln() as f32
}

fn contiguous_start(l: &Layout, what: &str) -> candle_core::Result<usize> {
    match l.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => candle_core::bail!("token log-probs: {what} must be contiguous"),
    }
}

/// Fused forward: `(logits [N,T,V], labels [N,T] u32) -> [N,T,2]` f32 holding the label's
/// log-probability and the mean logit of each position.
struct TokenLogps;

impl CustomOp2 for TokenLogps {
    fn name(&self) -> &'static str {
        "ganpo-token-logps"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, t, v) = l1.shape().dims3()?;
        let start = contiguous_start(l1, "logits")?;
        let label_start = contiguous_start(l2, "labels")?;
        let labels = match s2 {
            CpuStorage::U32(d) => &d[label_start..label_start + n * t],
            _ => candle_core::bail!("token log-probs: labels must be u32"),
        };

        let mut out = vec![0f32; n * t * 2];
        out.par_chunks_mut(2).enumerate().try_for_each_init(
            || {
                vec![
                    0f32;
                    if matches!(s1, CpuStorage::F32(_)) {
                        0
                    } else {
                        v
                    }
                ]
            },
            |buf, (i, o)| -> candle_core::Result<()> {
                let row = row_f32(s1, start + i * v, v, buf)?;
                let label = labels[i] as usize;
                if label >= v {
                    candle_core::bail!("token log-probs: label {label} >= vocabulary {v}");
                }
                o[0] = row[label] - logsumexp(row);
                o[1] = (row.iter().map(|&x| x as f64).sum::<f64>() / v as f64) as f32;
                Ok(())
            },
        )?;
        Ok((CpuStorage::F32(out), Shape::from((n, t, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // [2, N, T]: the incoming gradient, then the forward's log-probs (from which the
        // backward recovers each row's log-sum-exp without another pass over the row).
        let first = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.narrow(2, 0, 1)?.squeeze(2)?.to_dtype(DType::F32)
        };
        let aux = Tensor::stack(&[first(grad_res)?, first(res)?], 0)?.contiguous()?;
        let grad_logits = logits.apply_op3_no_bwd(labels, &aux, &TokenLogpsGrad)?;
        Ok((Some(grad_logits), None))
    }
}

/// Fused backward: `(logits, labels, g [N,T]) -> g * (onehot(label) - softmax(logits))`, in
/// the logits' dtype.
struct TokenLogpsGrad;

impl CustomOp3 for TokenLogpsGrad {
    fn name(&self) -> &'static str {
        "ganpo-token-logps-grad"
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
        let (n, t, v) = l1.shape().dims3()?;
        let start = contiguous_start(l1, "logits")?;
        let label_start = contiguous_start(l2, "labels")?;
        let grad_start = contiguous_start(l3, "grad")?;
        let labels = match s2 {
            CpuStorage::U32(d) => &d[label_start..label_start + n * t],
            _ => candle_core::bail!("token log-probs grad: labels must be u32"),
        };
        let (grads, logps) = match s3 {
            CpuStorage::F32(d) => d[grad_start..grad_start + 2 * n * t].split_at(n * t),
            _ => candle_core::bail!("token log-probs grad: grad must be f32"),
        };

        let fill = |i: usize, buf: &mut [f32], out: &mut [f32]| -> candle_core::Result<()> {
            let g = grads[i];
            if g == 0.0 {
                out.fill(0.0);
                return Ok(());
            }
            let row = row_f32(s1, start + i * v, v, buf)?;
            let label = labels[i] as usize;
            // logp = x[label] - lse, so the forward already holds lse.
            let lse = if logps[i].is_finite() {
                row[label] - logps[i]
            } else {
                logsumexp(row)
            };
            for (o, &x) in out.iter_mut().zip(row.iter()) {
                *o = -g * fastmath::exp(x - lse);
            }
            out[label] += g;
            Ok(())
        };

        let storage = match s1 {
            CpuStorage::F32(_) => {
                let mut out = vec![0f32; n * t * v];
                out.par_chunks_mut(v)
                    .enumerate()
                    .try_for_each_init(Vec::new, |buf, (i, o)| fill(i, buf, o))?;
                CpuStorage::F32(out)
            }
            CpuStorage::BF16(_) => CpuStorage::BF16(convert_rows(n * t, v, &fill, bf16::from_f32)?),
            CpuStorage::F16(_) => CpuStorage::F16(convert_rows(n * t, v, &fill, f16::from_f32)?),
            CpuStorage::F64(_) => CpuStorage::F64(convert_rows(n * t, v, &fill, |x| x as f64)?),
            _ => candle_core::bail!("token log-probs grad: logits must be a float dtype"),
        };
        Ok((storage, l1.shape().clone()))
    }
}

/// Computes each gradient row in f32 and stores it converted to the logits' dtype.
fn convert_rows<T, F, C>(rows: usize, v: usize, fill: &F, convert: C) -> candle_core::Result<Vec<T>>
where
    T: Copy + Send + Default,
    F: Fn(usize, &mut [f32], &mut [f32]) -> candle_core::Result<()> + Sync,
    C: Fn(f32) -> T + Sync,
{
    let mut out = vec![T::default(); rows * v];
    out.par_chunks_mut(v).enumerate().try_for_each_init(
        || (vec![0f32; v], vec![0f32; v]),
        |(row, tmp), (i, o)| -> candle_core::Result<()> {
            fill(i, row, tmp)?;
            for (dst, &src) in o.iter_mut().zip(tmp.iter()) {
                *dst = convert(src);
            }
            Ok(())
        },
    )?;
    Ok(out)
}
