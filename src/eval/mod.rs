//! Evaluation: AlpacaEval answer files, held-out preference accuracy, robustness to sampling.
//!
//! - [`alpaca`]: answers to the AlpacaEval instructions in the file format the `alpaca_eval`
//!   tool reads, batched, resumable, on a subset if asked.
//! - [`preference`]: implicit-reward accuracy and margins (DPO's and SimPO's definitions) and
//!   the policy's own log-prob accuracy on held-out pairs, without a gradient.
//! - [`robustness`]: answers at several temperatures with per-temperature statistics
//!   ([`stats`]), as a table and a PNG plot ([`plot`]) comparing models side by side.
//!
//! The library does not print: long loops report through a progress callback.

pub mod alpaca;
pub mod plot;
pub mod preference;
pub mod robustness;
pub mod stats;

pub use alpaca::{
    generate_alpaca_answers, read_alpaca_file, AlpacaConfig, AlpacaItem, AlpacaReport, Subset,
};
pub use plot::plot_robustness;
pub use preference::{evaluate_preferences, PreferenceEvalConfig, PreferenceEvalReport};
pub use robustness::{run_robustness, RobustnessConfig, RobustnessTable, TemperatureStats};

use crate::model::{CausalLm, GenerateOptions};
use crate::tokenize::{Message, Tokenizer};
use crate::Result;

/// How far a long evaluation has come: `done` of `total` items, with a short label.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What is being done (`"alpaca"`, `"robustness t=0.7"`, ...).
    pub label: String,
    /// Items finished so far (including those found finished when resuming).
    pub done: usize,
    /// Items in all.
    pub total: usize,
}

/// The token ids of `instruction` as one user turn under the tokenizer's chat template, with
/// the generation prompt; an optional system turn comes first. Without a chat template the
/// instruction is encoded as it is (a base model's plain continuation).
pub fn chat_prompt_ids(
    tokenizer: &Tokenizer,
    instruction: &str,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if tokenizer.chat_template().is_none() {
        return tokenizer.encode(instruction, true);
    }

    let mut messages = Vec::with_capacity(2);
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", instruction));
    let text = tokenizer.apply_chat_template(&messages, true)?;
    tokenizer.encode(&text, false)
}

/// The generated tokens without a final EOS, decoded with special tokens skipped and trimmed:
/// the answer as a reader (or a judge) should see it.
pub fn clean_answer(tokenizer: &Tokenizer, tokens: &[u32], eos: &[u32]) -> Result<String> {
    let body = match tokens.split_last() {
        Some((last, rest)) if eos.contains(last) => rest,
        _ => tokens,
    };
    Ok(tokenizer.decode(body, true)?.trim().to_string())
}

/// The first special (added) token's text found in `answer`, if any: template residue such as
/// `<|im_end|>` or `<|im_start|>assistant` that a clean answer must not contain.
pub fn template_residue(tokenizer: &Tokenizer, answer: &str) -> Option<String> {
    tokenizer
        .inner()
        .get_added_tokens_decoder()
        .values()
        .filter(|t| t.special && !t.content.is_empty())
        .find(|t| answer.contains(t.content.as_str()))
        .map(|t| t.content.clone())
}

/// The tokens that end an answer: the options' own list, else the model's EOS tokens plus the
/// tokenizer's EOS (chat models often end a turn with a token the config does not list).
pub fn eos_ids(model: &CausalLm, tokenizer: &Tokenizer, opts: &GenerateOptions) -> Vec<u32> {
    if !opts.eos_token_ids.is_empty() {
        return opts.eos_token_ids.clone();
    }

    let mut eos = model.config().eos_token_ids.clone();
    if let Some(id) = tokenizer.eos_token_id() {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    eos
}
