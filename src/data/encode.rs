//! Tokenizing a pair the way TRL's DPOTrainer does, and the truncation rules applied when
//! sequences are too long.

use super::format::{RawPair, Turns};
use crate::tokenize::{Message, Tokenizer};
use crate::{Error, Result};

/// Which end of a too-long sequence to keep (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Keep the first `max_length` tokens (TRL's default): the completion's end is cut.
    #[default]
    KeepStart,
    /// Keep the last `max_length` tokens: the prompt's start is cut first.
    KeepEnd,
}

impl Truncation {
    /// `keep_start` or `keep_end`.
    pub fn from_name(name: &str) -> Option<Truncation> {
        match name {
            "keep_start" => Some(Truncation::KeepStart),
            "keep_end" => Some(Truncation::KeepEnd),
            _ => None,
        }
    }
}

/// Length limits of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Longest prompt + completion row.
    pub max_length: Option<usize>,
    /// Longest prompt; a longer one keeps its end (the turns nearest the completion).
    pub max_prompt_length: Option<usize>,
    /// Which end of a too-long row survives.
    pub truncation: Truncation,
}

impl Limits {
    /// The prompt and completion of one row after truncation.
    pub fn apply<'a>(&self, prompt: &'a [u32], completion: &'a [u32]) -> (&'a [u32], &'a [u32]) {
        let prompt = match self.max_prompt_length {
            Some(max) if prompt.len() > max => &prompt[prompt.len() - max..],
            _ => prompt,
        };
        let total = prompt.len() + completion.len();
        let max = match self.max_length {
            Some(max) if total > max => max,
            _ => return (prompt, completion),
        };

        match self.truncation {
            Truncation::KeepStart if prompt.len() >= max => (&prompt[..max], &[]),
            Truncation::KeepStart => (prompt, &completion[..max - prompt.len()]),
            Truncation::KeepEnd => {
                let cut = total - max;
                if cut >= prompt.len() {
                    (&[], &completion[cut - prompt.len()..])
                } else {
                    (&prompt[cut..], completion)
                }
            }
        }
    }

    /// Prompt and completion lengths after truncation.
    pub fn apply_lengths(&self, prompt: usize, completion: usize) -> (usize, usize) {
        let prompt = self.max_prompt_length.map_or(prompt, |m| prompt.min(m));
        match self.max_length {
            Some(max) if prompt + completion > max => match self.truncation {
                Truncation::KeepStart => (prompt.min(max), max - prompt.min(max)),
                Truncation::KeepEnd => {
                    let cut = prompt + completion - max;
                    (prompt.saturating_sub(cut), completion.min(max))
                }
            },
            _ => (prompt, completion),
        }
    }

    /// Whether a row of these lengths loses tokens.
    pub fn truncates(&self, prompt_len: usize, completion_len: usize) -> bool {
        let prompt = self
            .max_prompt_length
            .map_or(prompt_len, |m| prompt_len.min(m));
        prompt < prompt_len || self.max_length.is_some_and(|m| prompt + completion_len > m)
    }

    /// Whether the prompt alone fills `max_length` under `keep_start`, leaving no completion
    /// token to learn from (TRL drops such rows).
    pub fn leaves_no_completion(&self, prompt_len: usize) -> bool {
        let prompt = self
            .max_prompt_length
            .map_or(prompt_len, |m| prompt_len.min(m));
        self.truncation == Truncation::KeepStart && self.max_length.is_some_and(|m| prompt >= m)
    }
}

/// A pair's token ids: the shared prompt and each completion (ending with EOS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// The prompt, up to where chosen and rejected diverge from it.
    pub prompt: Vec<u32>,
    /// The preferred completion.
    pub chosen: Vec<u32>,
    /// The dispreferred completion.
    pub rejected: Vec<u32>,
}

/// Tokenizes a pair as TRL 1.16's DPOTrainer does.
///
/// Conversations: the prompt is rendered with the generation prompt, prompt + completion
/// without it, and the completion is what follows the common prefix of their ids; the
/// template's end-of-turn tokens (`<|im_end|>\n` in ChatML) end the completion, and no
/// further EOS is added. Text (when `text_as_chat` is false or the tokenizer has no
/// template): the EOS token string is appended to each completion that lacks it, and prompt
/// + completion is tokenized with special tokens (BOS) as one text.
pub fn encode_pair(
    pair: &RawPair,
    tokenizer: &Tokenizer,
    text_as_chat: bool,
) -> Result<EncodedPair> {
    let as_chat = text_as_chat && tokenizer.chat_template().is_some();
    match (&pair.prompt, &pair.chosen, &pair.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) if !as_chat => {
            encode_text(tokenizer, p, c, r)
        }
        _ => {
            let prompt = as_messages(&pair.prompt, "user");
            let chosen = as_messages(&pair.chosen, "assistant");
            let rejected = as_messages(&pair.rejected, "assistant");
            encode_chat(tokenizer, &prompt, &chosen, &rejected)
        }
    }
}

fn encode_text(
    tokenizer: &Tokenizer,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<EncodedPair> {
    let eos = tokenizer.special_token("eos_token").unwrap_or("");
    let with_eos = |text: &str| {
        if text.ends_with(eos) {
            text.to_string()
        } else {
            format!("{text}{eos}")
        }
    };

    let prompt_ids = tokenizer.encode(prompt, true)?;
    let chosen_ids = tokenizer.encode(&format!("{prompt}{}", with_eos(chosen)), true)?;
    let rejected_ids = tokenizer.encode(&format!("{prompt}{}", with_eos(rejected)), true)?;
    Ok(split_at_common_prefix(prompt_ids, chosen_ids, rejected_ids))
}

fn encode_chat(
    tokenizer: &Tokenizer,
    prompt: &[Message],
    chosen: &[Message],
    rejected: &[Message],
) -> Result<EncodedPair> {
    if tokenizer.chat_template().is_none() {
        return Err(Error::ChatTemplate(
            "conversational data needs a chat template, and this tokenizer has none".into(),
        ));
    }
    let full = |completion: &[Message]| -> Result<String> {
        let mut messages = prompt.to_vec();
        messages.extend_from_slice(completion);
        tokenizer.apply_chat_template(&messages, false)
    };

    let texts = [
        tokenizer.apply_chat_template(prompt, true)?,
        full(chosen)?,
        full(rejected)?,
    ];
    let [prompt_ids, chosen_ids, rejected_ids]: [Vec<u32>; 3] = tokenizer
        .encode_sharing_prefix(&texts.each_ref().map(String::as_str))?
        .try_into()
        .map_err(|_| Error::Tokenizer("expected three encodings".into()))?;
    Ok(split_at_common_prefix(prompt_ids, chosen_ids, rejected_ids))
}

/// The prompt is the part of `prompt_ids` that both full sequences start with.
fn split_at_common_prefix(prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32>) -> EncodedPair {
    let shared = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let n = shared(&prompt, &chosen).min(shared(&prompt, &rejected));
    EncodedPair {
        prompt: prompt[..n].to_vec(),
        chosen: chosen[n..].to_vec(),
        rejected: rejected[n..].to_vec(),
    }
}

fn as_messages(turns: &Turns, role: &str) -> Vec<Message> {
    match turns {
        Turns::Messages(messages) => messages.clone(),
        Turns::Text(text) => vec![Message::new(role, text.clone())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: [u32; 4] = [1, 2, 3, 4];
    const COMPLETION: [u32; 3] = [5, 6, 7];

    fn limits(max_length: usize, max_prompt: Option<usize>, truncation: Truncation) -> Limits {
        Limits {
            max_length: Some(max_length),
            max_prompt_length: max_prompt,
            truncation,
        }
    }

    #[test]
    fn keep_start_cuts_the_end_of_the_completion() {
        let (p, c) = limits(5, None, Truncation::KeepStart).apply(&PROMPT, &COMPLETION);
        assert_eq!((p, c), (&PROMPT[..], &[5][..]));
    }

    #[test]
    fn keep_end_cuts_the_start_of_the_prompt_then_of_the_completion() {
        let (p, c) = limits(5, None, Truncation::KeepEnd).apply(&PROMPT, &COMPLETION);
        assert_eq!((p, c), (&[3, 4][..], &COMPLETION[..]));
        let (p, c) = limits(2, None, Truncation::KeepEnd).apply(&PROMPT, &COMPLETION);
        assert_eq!((p, c), (&[][..], &[6, 7][..]));
    }

    #[test]
    fn max_prompt_length_keeps_the_end_of_the_prompt() {
        let (p, c) = limits(10, Some(2), Truncation::KeepStart).apply(&PROMPT, &COMPLETION);
        assert_eq!((p, c), (&[3, 4][..], &COMPLETION[..]));
        assert!(limits(10, Some(2), Truncation::KeepStart).truncates(4, 3));
        assert!(!limits(10, None, Truncation::KeepStart).truncates(4, 3));
    }

    #[test]
    fn a_prompt_filling_max_length_leaves_no_completion_under_keep_start_only() {
        assert!(limits(4, None, Truncation::KeepStart).leaves_no_completion(4));
        assert!(!limits(4, None, Truncation::KeepEnd).leaves_no_completion(4));
        assert!(!limits(4, Some(3), Truncation::KeepStart).leaves_no_completion(4));
    }
}
