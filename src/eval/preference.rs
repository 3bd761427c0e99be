//! Held-out preference evaluation: implicit-reward accuracy and margins (DPO's and SimPO's
//! definitions) and the policy's own log-prob accuracy, batched, without a gradient.

use std::collections::BTreeMap;

use candle_core::DType;
use serde::Serialize;

use super::Progress;
use crate::data::{PreferenceBatch, PreferenceDataset};
use crate::model::{CausalLm, ForwardOptions};
use crate::objective::sequence_logps;
use crate::{Error, Result};

/// How to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceEvalConfig {
    /// DPO's beta: reward = beta * (policy logp - reference logp), summed over the answer.
    pub beta: f64,
    /// SimPO's beta: reward = beta * mean per-token policy logp of the answer.
    pub simpo_beta: f64,
    /// Pairs per forward pass.
    pub batch_size: usize,
    /// Evaluate only the first `limit` pairs.
    pub limit: Option<usize>,
    /// Evaluate exactly these pairs, in this order (a held-out split); overrides `limit`.
    pub indices: Option<Vec<usize>>,
}

impl Default for PreferenceEvalConfig {
    /// beta 0.1, SimPO beta 2.0, 4 pairs a batch, every pair.
    fn default() -> Self {
        Self {
            beta: 0.1,
            simpo_beta: 2.0,
            batch_size: 4,
            limit: None,
            indices: None,
        }
    }
}

/// Means of one implicit reward over the evaluated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardStats {
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    pub accuracy: f64,
    /// Mean of chosen minus rejected reward.
    pub margin: f64,
    /// Mean chosen reward.
    pub chosen: f64,
    /// Mean rejected reward.
    pub rejected: f64,
}

/// The result of [`evaluate_preferences`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferenceEvalReport {
    /// Pairs evaluated.
    pub pairs: usize,
    /// DPO's implicit reward; `None` without a reference model.
    pub dpo: Option<RewardStats>,
    /// SimPO's length-normalised reward (reference-free).
    pub simpo: RewardStats,
    /// The policy's summed answer log-probs as the reward: accuracy is the fraction of pairs
    /// the policy itself finds the chosen answer more likely.
    pub policy_logps: RewardStats,
    /// Each pair's DPO reward margin (chosen minus rejected), in evaluation order; empty
    /// without a reference model.
    pub margins: Vec<f64>,
}

impl PreferenceEvalReport {
    /// The numbers under TRL's metric names (`rewards/accuracies`, `rewards/margins`, ...),
    /// SimPO's under `simpo/...` and the policy log-probs under `logps/...`.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut put = |prefix: &str, stats: &RewardStats| {
            out.insert(format!("{prefix}/accuracies"), stats.accuracy);
            out.insert(format!("{prefix}/margins"), stats.margin);
            out.insert(format!("{prefix}/chosen"), stats.chosen);
            out.insert(format!("{prefix}/rejected"), stats.rejected);
        };
        if let Some(dpo) = &self.dpo {
            put("rewards", dpo);
        }
        put("simpo/rewards", &self.simpo);
        put("logps", &self.policy_logps);
        out.insert("pairs".into(), self.pairs as f64);
        out
    }
}

/// Evaluates `policy` (against `reference` for DPO's reward) on the pairs of `data`.
///
/// Neither model enters a gradient graph: logits are detached before scoring. `progress` is
/// called after every batch.
pub fn evaluate_preferences(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    data: &PreferenceDataset,
    cfg: &PreferenceEvalConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PreferenceEvalReport> {
    if cfg.batch_size == 0 {
        return Err(Error::invalid(
            "preference eval: batch_size must be at least 1",
        ));
    }
    let indices: Vec<usize> = match &cfg.indices {
        Some(indices) => {
            if let Some(&bad) = indices.iter().find(|&&i| i >= data.len()) {
                return Err(Error::invalid(format!(
                    "preference eval: pair index {bad} is out of range (the dataset has {} pairs)",
                    data.len()
                )));
            }
            indices.clone()
        }
        None => (0..cfg.limit.map_or(data.len(), |l| l.min(data.len()))).collect(),
    };
    let pairs = indices.len();
    if pairs == 0 {
        return Err(Error::invalid("preference eval: no pairs to evaluate"));
    }

    let mut dpo = Vec::new();
    let mut simpo = Vec::new();
    let mut logps = Vec::new();
    for chunk in indices.chunks(cfg.batch_size) {
        let batch = data.batch(chunk, policy.device())?;
        let b = chunk.len();
        let (sum, count) = answer_logps(policy, &batch)?;
        for i in 0..b {
            let j = i + b;
            logps.push((sum[i], sum[j]));
            let mean = |r: usize| sum[r] / count[r].max(1.0);
            simpo.push((cfg.simpo_beta * mean(i), cfg.simpo_beta * mean(j)));
        }
        if let Some(reference) = reference {
            let (ref_sum, _) = answer_logps(reference, &batch)?;
            for i in 0..b {
                let j = i + b;
                dpo.push((
                    cfg.beta * (sum[i] - ref_sum[i]),
                    cfg.beta * (sum[j] - ref_sum[j]),
                ));
            }
        }
        progress(&Progress {
            label: "preference eval".into(),
            done: logps.len(),
            total: pairs,
        });
    }

    Ok(PreferenceEvalReport {
        pairs,
        margins: dpo.iter().map(|(c, r)| c - r).collect(),
        dpo: reference.map(|_| reward_stats(&dpo)),
        simpo: reward_stats(&simpo),
        policy_logps: reward_stats(&logps),
    })
}

/// The summed answer log-probs and answer lengths of every row of `batch` under `model`.
pub fn answer_logps(model: &CausalLm, batch: &PreferenceBatch) -> Result<(Vec<f64>, Vec<f64>)> {
    let out = model.forward(
        &batch.input_ids,
        &batch.attention_mask,
        &ForwardOptions::default(),
    )?;
    let logits = out
        .logits
        .ok_or_else(|| Error::invalid("forward returned no logits"))?
        .detach();
    let scored = sequence_logps(&logits, &batch.input_ids, &batch.completion_mask)?;
    let sum = scored.sum.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let count = scored.count.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok((sum, count))
}

fn reward_stats(pairs: &[(f64, f64)]) -> RewardStats {
    let n = pairs.len().max(1) as f64;
    RewardStats {
        accuracy: pairs.iter().filter(|(c, r)| c > r).count() as f64 / n,
        margin: pairs.iter().map(|(c, r)| c - r).sum::<f64>() / n,
        chosen: pairs.iter().map(|(c, _)| c).sum::<f64>() / n,
        rejected: pairs.iter().map(|(_, r)| r).sum::<f64>() / n,
    }
}
