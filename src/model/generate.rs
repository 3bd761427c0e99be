//! Text generation with a KV cache: greedy or sampled, batched, stopping at EOS or strings.
//!
//! A batch is left-padded and every row gets its own positions (counted from its first real
//! token), so each row computes what it would compute alone. Generation needs no gradient and
//! uses candle's fused norm and softmax.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use super::decoder::{CausalLm, LayerCache};
use crate::{Error, Result};

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Sampling temperature; `0.0` means greedy decoding.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (nucleus sampling).
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end a row; empty means the config's EOS tokens.
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a row (checked on the decoded text; needs a decoder).
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    /// Greedy, 128 new tokens, the model's EOS, no stop strings.
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was produced (it is included in the tokens).
    Eos,
    /// A stop string appeared in the decoded text.
    StopString,
    /// `max_new_tokens` were produced.
    Length,
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated tokens (not the prompt).
    pub tokens: Vec<u32>,
    /// The decoded text, cut before a stop string, when a decoder was given.
    pub text: Option<String>,
    /// Why generation stopped.
    pub finish: FinishReason,
}

/// Turns token ids into text (a tokenizer's decode), for stop strings.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> Result<String>;

impl CausalLm {
    /// Generates a continuation of every prompt (token ids) at once.
    ///
    /// With `decode`, each [`Generation`] carries its text and stop strings are honoured;
    /// stop strings without a decoder are an error.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        decode: Option<Decode>,
    ) -> Result<Vec<Generation>> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::invalid(
                "generate: every prompt needs at least one token",
            ));
        }
        if !opts.stop_strings.is_empty() && decode.is_none() {
            return Err(Error::invalid("generate: stop strings need a decoder"));
        }
        if let Some(&bad) = prompts
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        let eos: Vec<u32> = if opts.eos_token_ids.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            opts.eos_token_ids.clone()
        };

        let n = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * longest);
        let mut positions = Vec::with_capacity(n * longest);
        let mut key_real = Vec::with_capacity(n);
        for prompt in prompts {
            let pad = longest - prompt.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(prompt.iter().copied()));
            positions.extend((0..longest).map(|j| j.saturating_sub(pad) as u32));
            key_real.push((0..longest).map(|j| j >= pad).collect::<Vec<bool>>());
        }
        let mut next_position: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();

        let mut caches = vec![LayerCache::default(); self.blocks.len()];
        let ids = Tensor::from_vec(ids, (n, longest), &self.device)?;
        let positions = Tensor::from_vec(positions, (n, longest), &self.device)?;
        let mut logits = self.forward_step(&ids, &positions, &key_real, 0, &mut caches)?;

        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let mut out: Vec<Generation> = (0..n)
            .map(|_| Generation {
                tokens: vec![],
                text: None,
                finish: FinishReason::Length,
            })
            .collect();
        let mut done = vec![false; n];
        let mut offset = longest;

        for _ in 0..opts.max_new_tokens {
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let mut step_ids = Vec::with_capacity(n);
            for (r, row) in rows.iter().enumerate() {
                if done[r] {
                    step_ids.push(0);
                    continue;
                }
                let token = pick_token(row, opts, &mut rng);
                out[r].tokens.push(token);
                step_ids.push(token);
                if eos.contains(&token) {
                    done[r] = true;
                    out[r].finish = FinishReason::Eos;
                } else if let Some(decode) = decode.filter(|_| !opts.stop_strings.is_empty()) {
                    let text = decode(&out[r].tokens)?;
                    if opts.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                        done[r] = true;
                        out[r].finish = FinishReason::StopString;
                    }
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }

            let ids = Tensor::from_vec(step_ids, (n, 1), &self.device)?;
            let positions = Tensor::from_vec(next_position.clone(), (n, 1), &self.device)?;
            for (real, pos) in key_real.iter_mut().zip(next_position.iter_mut()) {
                real.push(true);
                *pos += 1;
            }
            logits = self.forward_step(&ids, &positions, &key_real, offset, &mut caches)?;
            offset += 1;
        }

        if let Some(decode) = decode {
            for generation in &mut out {
                let mut text = decode(&generation.tokens)?;
                if let Some(cut) = opts
                    .stop_strings
                    .iter()
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    text.truncate(cut);
                }
                generation.text = Some(text);
            }
        }
        Ok(out)
    }

    /// Runs new tokens through the model, appending to the caches; returns the logits of each
    /// row's last new position, `[N, V]`.
    pub(crate) fn forward_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_real: &[Vec<bool>],
        offset: usize,
        caches: &mut [LayerCache],
    ) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        let tensors = self.context_tensors(key_real, positions, offset, t)?;
        let ctx = tensors.context(true, false);

        let mut x = self.embed_tokens(ids, n, t)?;
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            x = block.forward(&x, &self.config, &ctx, Some(cache))?;
        }

        let last = x.narrow(1, t - 1, 1)?;
        let normed = self.final_norm(&last, true)?;
        Ok(self.project_logits(&normed)?.squeeze(1)?)
    }
}

/// Greedy argmax (first maximum) or a sample after temperature, top-k and top-p, in that
/// order (as transformers applies them).
fn pick_token(logits: &[f32], opts: &GenerateOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }

    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let scaled: Vec<f64> = order
        .iter()
        .map(|&i| f64::from(logits[i]) / opts.temperature)
        .collect();
    let max = scaled.first().copied().unwrap_or(0.0);
    let weights: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut probs: Vec<f64> = weights.iter().map(|w| w / total).collect();

    if let Some(p) = opts.top_p.filter(|&p| p < 1.0) {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, prob) in probs.iter().enumerate() {
            cumulative += prob;
            if cumulative >= p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|prob| *prob /= kept);
    }

    let mut draw: f64 = rng.random::<f64>();
    for (i, prob) in probs.iter().enumerate() {
        draw -= prob;
        if draw <= 0.0 {
            return order[i] as u32;
        }
    }
    order[probs.len() - 1] as u32
}
