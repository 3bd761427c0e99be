//! Robustness to sampling noise: answers to a set of prompts at several temperatures, with
//! per-temperature statistics a researcher compares between models.

use std::fmt::Write;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::preference::answer_logps;
use super::stats::{distinct_n, repetition_rate};
use super::{chat_prompt_ids, clean_answer, eos_ids, Progress};
use crate::data::PreferenceBatch;
use crate::model::{CausalLm, GenerateOptions};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustnessConfig {
    /// The temperatures to sample at (each > 0).
    pub temperatures: Vec<f64>,
    /// The most tokens per answer.
    pub max_new_tokens: usize,
    /// Nucleus sampling threshold, if any.
    pub top_p: Option<f64>,
    /// Top-k filter, if any.
    pub top_k: Option<usize>,
    /// Seed of the sampler (the same for every temperature and model).
    pub seed: u64,
    /// Prompts generated (and scored) at once.
    pub batch_size: usize,
    /// An optional system turn before each prompt.
    pub system: Option<String>,
}

impl Default for RobustnessConfig {
    /// Temperatures 0.7, 1.0, 1.5; 64 new tokens; no top-p/top-k; seed 0; 8 at once.
    fn default() -> Self {
        Self {
            temperatures: vec![0.7, 1.0, 1.5],
            max_new_tokens: 64,
            top_p: None,
            top_k: None,
            seed: 0,
            batch_size: 8,
            system: None,
        }
    }
}

/// Statistics of one model's answers at one temperature. Token statistics are on the answer
/// tokens with a final EOS removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperatureStats {
    /// The sampling temperature.
    pub temperature: f64,
    /// Answers generated (one per prompt).
    pub answers: usize,
    /// Mean answer length in tokens.
    pub mean_length: f64,
    /// Distinct-1 over all answers ([`distinct_n`]); `None` when every answer is empty.
    pub distinct_1: Option<f64>,
    /// Distinct-2 over all answers.
    pub distinct_2: Option<f64>,
    /// Fraction of 4-grams that repeat one earlier in the same answer ([`repetition_rate`]).
    pub repetition_4: Option<f64>,
    /// Fraction of answers that ended with an EOS token (not cut by the length limit).
    pub eos_fraction: f64,
    /// Mean over answers of the per-token log-prob of the answer (EOS included when produced)
    /// under the reference model; `None` when every answer is empty.
    pub reference_mean_logp: Option<f64>,
    /// The decoded answers, in prompt order.
    pub texts: Vec<String>,
}

/// One model's statistics at every temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustnessTable {
    /// The model's name in tables and plots.
    pub model: String,
    /// One row per temperature, in the configured order.
    pub rows: Vec<TemperatureStats>,
}

impl RobustnessTable {
    /// This table as aligned text (see [`tables_text`]).
    pub fn to_text(&self) -> String {
        tables_text(std::slice::from_ref(self))
    }
}

/// Several models' tables as one aligned text table, a row per model and temperature.
pub fn tables_text(tables: &[RobustnessTable]) -> String {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let width = tables
        .iter()
        .map(|t| t.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:<width$}  {:>5}  {:>3}  {:>7}  {:>6}  {:>6}  {:>6}  {:>5}  {:>8}\n",
        "model", "temp", "n", "len", "dist-1", "dist-2", "rep-4", "eos", "ref logp"
    );
    for table in tables {
        for row in &table.rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>5.2}  {:>3}  {:>7.1}  {:>6}  {:>6}  {:>6}  {:>5.2}  {:>8}",
                table.model,
                row.temperature,
                row.answers,
                row.mean_length,
                fmt(row.distinct_1),
                fmt(row.distinct_2),
                fmt(row.repetition_4),
                row.eos_fraction,
                fmt(row.reference_mean_logp),
            );
        }
    }
    out
}

/// Samples one answer per prompt at every temperature with `model`, and scores the answers
/// under `reference` (pass the model itself to score under its own distribution).
///
/// `progress` is called after every batch, counting prompts over all temperatures.
pub fn run_robustness(
    name: &str,
    model: &CausalLm,
    tokenizer: &Tokenizer,
    reference: &CausalLm,
    prompts: &[String],
    cfg: &RobustnessConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RobustnessTable> {
    if prompts.is_empty() {
        return Err(Error::invalid("robustness: no prompts"));
    }
    if cfg.batch_size == 0 {
        return Err(Error::invalid("robustness: batch_size must be at least 1"));
    }
    if let Some(t) = cfg
        .temperatures
        .iter()
        .find(|t| !(**t > 0.0 && t.is_finite()))
    {
        return Err(Error::invalid(format!(
            "robustness: temperature {t} must be a positive number"
        )));
    }
    let prompt_ids = prompts
        .iter()
        .map(|p| chat_prompt_ids(tokenizer, p, cfg.system.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let base = GenerateOptions {
        max_new_tokens: cfg.max_new_tokens,
        temperature: 1.0,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        seed: cfg.seed,
        eos_token_ids: vec![],
        stop_strings: vec![],
    };
    let eos = eos_ids(model, tokenizer, &base);
    let total = prompts.len() * cfg.temperatures.len();

    let mut rows = Vec::with_capacity(cfg.temperatures.len());
    for (k, &temperature) in cfg.temperatures.iter().enumerate() {
        let mut answers: Vec<Vec<u32>> = Vec::with_capacity(prompts.len());
        let mut texts = Vec::with_capacity(prompts.len());
        let mut ended = 0usize;
        let mut logps = Vec::with_capacity(prompts.len());
        for (b, chunk) in prompt_ids.chunks(cfg.batch_size).enumerate() {
            let opts = GenerateOptions {
                temperature,
                seed: cfg.seed.wrapping_add((b * cfg.batch_size) as u64),
                eos_token_ids: eos.clone(),
                ..base.clone()
            };
            let generations = model.generate(chunk, &opts, None)?;
            let tokens: Vec<Vec<u32>> = generations.into_iter().map(|g| g.tokens).collect();
            logps.extend(mean_answer_logps(reference, chunk, &tokens)?);
            for answer in tokens {
                texts.push(clean_answer(tokenizer, &answer, &eos)?);
                let body = match answer.split_last() {
                    Some((last, rest)) if eos.contains(last) => {
                        ended += 1;
                        rest.to_vec()
                    }
                    _ => answer,
                };
                answers.push(body);
            }
            progress(&Progress {
                label: format!("robustness {name} t={temperature}"),
                done: k * prompts.len() + answers.len(),
                total,
            });
        }
        rows.push(temperature_stats(
            temperature,
            &answers,
            ended,
            &logps,
            texts,
        ));
    }
    Ok(RobustnessTable {
        model: name.to_string(),
        rows,
    })
}

/// The statistics of `answers` (EOS removed), `ended` of which stopped at EOS, with their
/// per-answer mean reference log-probs.
pub fn temperature_stats(
    temperature: f64,
    answers: &[Vec<u32>],
    ended: usize,
    logps: &[Option<f64>],
    texts: Vec<String>,
) -> TemperatureStats {
    let n = answers.len().max(1) as f64;
    let scored: Vec<f64> = logps.iter().flatten().copied().collect();
    TemperatureStats {
        temperature,
        answers: answers.len(),
        mean_length: answers.iter().map(Vec::len).sum::<usize>() as f64 / n,
        distinct_1: distinct_n(answers, 1),
        distinct_2: distinct_n(answers, 2),
        repetition_4: repetition_rate(answers, 4),
        eos_fraction: ended as f64 / n,
        reference_mean_logp: (!scored.is_empty())
            .then(|| scored.iter().sum::<f64>() / scored.len() as f64),
        texts,
    }
}

/// The mean per-token log-prob of each answer (following its prompt) under `model`; `None`
/// for an empty answer.
pub fn mean_answer_logps(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
) -> Result<Vec<Option<f64>>> {
    let width = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| p.len() + a.len())
        .max()
        .unwrap_or(0);
    let n = prompts.len();
    let mut ids = vec![0u32; n * width];
    let mut attention = vec![0f32; n * width];
    let mut completion = vec![0f32; n * width];
    for (r, (prompt, answer)) in prompts.iter().zip(answers).enumerate() {
        let row = r * width;
        let end = prompt.len() + answer.len();
        ids[row..row + prompt.len()].copy_from_slice(prompt);
        ids[row + prompt.len()..row + end].copy_from_slice(answer);
        attention[row..row + end].fill(1.0);
        completion[row + prompt.len()..row + end].fill(1.0);
    }

    let device = model.device();
    let batch = PreferenceBatch {
        input_ids: Tensor::from_vec(ids, (n, width), device)?,
        attention_mask: Tensor::from_vec(attention, (n, width), device)?,
        completion_mask: Tensor::from_vec(completion, (n, width), device)?,
        prompt_lengths: prompts.iter().map(Vec::len).collect(),
        indices: vec![],
    };
    let (sum, count) = answer_logps(model, &batch)?;
    Ok(sum
        .iter()
        .zip(&count)
        .map(|(s, c)| (*c > 0.0).then(|| s / c))
        .collect())
}
