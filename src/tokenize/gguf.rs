//! Rebuilds a Hugging Face tokenizer from the tokenizer metadata of a GGUF file, following
//! transformers' GGUF loader: byte-level BPE for `tokenizer.ggml.model = "gpt2"` and a
//! byte-fallback BPE with `▁` word marks for SentencePiece-style `"llama"` vocabularies.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};

use crate::{Error, Result};

/// GGUF token type of a control token (`<s>`, `<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of a user-defined added token (matched whole, not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer families this module can rebuild.
const SUPPORTED: [&str; 2] = ["gpt2", "llama"];

/// What a GGUF file says about its tokenizer, ready to become a `tokenizers::Tokenizer`.
pub(crate) struct GgufTokenizer {
    /// The `tokenizer.json` document.
    pub json: serde_json::Value,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` spelled as tokens.
    pub special_tokens: Vec<(String, String)>,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
}

/// Reads the `tokenizer.*` metadata of `content`.
pub(crate) fn read(content: &Content) -> Result<GgufTokenizer> {
    let meta = Meta(&content.metadata);
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let token_types = meta.ints_or_empty("tokenizer.ggml.token_type")?;

    let mut special_tokens = Vec::new();
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta.optional_int(key)? {
            let token = tokens.get(id as usize).ok_or_else(|| {
                gguf_error(format!(
                    "{key} = {id} is outside the {}-token vocabulary",
                    tokens.len()
                ))
            })?;
            special_tokens.push((name.to_string(), token.clone()));
        }
    }
    let special = |name: &str| {
        special_tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    };

    let json = match model.as_str() {
        "gpt2" => {
            let merges = meta.strings("tokenizer.ggml.merges")?;
            let pre = meta.optional_string("tokenizer.ggml.pre")?;
            let split = pre.as_deref().and_then(split_regex);
            byte_level_json(&tokens, &merges, &token_types, split)
        }
        "llama" => {
            let scores = meta.floats("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(gguf_error(format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            let merges = match meta.optional_strings("tokenizer.ggml.merges")? {
                Some(merges) => merges,
                None => merges_from_scores(&tokens, &scores),
            };
            let add_bos = meta
                .optional_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(true);
            let unk = special("unk_token").unwrap_or_else(|| "<unk>".to_string());
            let bos = if add_bos { special("bos_token") } else { None };
            sentencepiece_json(&tokens, &merges, &token_types, &unk, bos.as_deref())
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{other}` is not supported; supported: {}",
                SUPPORTED.join(", ")
            )))
        }
    };

    let chat_template = meta.optional_string("tokenizer.chat_template")?;
    Ok(GgufTokenizer {
        json,
        special_tokens,
        chat_template,
    })
}

/// GPT-2's map from bytes to printable characters, indexed by byte.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for byte in 0..=255u32 {
        let printable = (33..=126).contains(&byte)
            || (161..=172).contains(&byte)
            || (174..=255).contains(&byte);
        let code = if printable {
            byte
        } else {
            shifted += 1;
            255 + shifted
        };
        table[byte as usize] = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

/// The text-splitting regex of a `tokenizer.ggml.pre` family, where transformers knows one
/// (others, like `smollm` or `gpt2`, use ByteLevel's own GPT-2 split).
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const QWEN2: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const QWEN35: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const TEKKEN: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const GPT4O: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "tekken" => Some(TEKKEN),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2),
        "qwen35" => Some(QWEN35),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => Some(GPT4O),
        _ => None,
    }
}

/// The byte-level BPE of GPT-2-family GGUF files, as transformers builds it: the family's
/// split regex when it has one, no BOS added, control tokens special, user-defined tokens
/// added.
fn byte_level_json(
    tokens: &[String],
    merges: &[String],
    token_types: &[i64],
    split: Option<&str>,
) -> serde_json::Value {
    let alphabet = byte_to_char();
    let in_alphabet = |token: &str| token.chars().all(|c| alphabet.contains(&c));

    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(spelled, json!(id));
    }

    let merges = split_merges(merges);
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let kind = token_types.get(id).copied();
        if kind == Some(TOKEN_TYPE_CONTROL) && in_alphabet(token) {
            added.push(added_token(id, token, true));
        } else if kind == Some(TOKEN_TYPE_USER_DEFINED) && vocab.contains_key(token) {
            added.push(added_token(id, token, false));
        }
    }

    let pre_tokenizer = match split {
        None => json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        }),
        Some(regex) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
                 "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false}
            ]
        }),
    };

    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {}
        },
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// The SentencePiece-style BPE of `llama` GGUF vocabularies (as transformers' LlamaTokenizer:
/// `▁` prepended to the first word, byte fallback, BOS added when the file asks for it).
fn sentencepiece_json(
    tokens: &[String],
    merges: &[String],
    token_types: &[i64],
    unk: &str,
    bos: Option<&str>,
) -> serde_json::Value {
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
    }

    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let kind = token_types.get(id).copied();
        if kind == Some(TOKEN_TYPE_CONTROL) || token == unk {
            added.push(added_token(id, token, true));
        } else if kind == Some(TOKEN_TYPE_USER_DEFINED) {
            added.push(added_token(id, token, false));
        }
    }

    let post_processor = match bos.and_then(|b| vocab.get(b).map(|id| (b, id.clone()))) {
        Some((bos, id)) => json!({
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}
        }),
        None => serde_json::Value::Null,
    };

    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first",
            "split": false
        },
        "post_processor": post_processor,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]
        },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": split_merges(merges)
        }
    })
}

/// `"a b"` merge strings as `["a", "b"]` pairs (the first space separates).
fn split_merges(merges: &[String]) -> Vec<serde_json::Value> {
    merges
        .iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
        .collect()
}

/// Merges implied by a scored vocabulary: every split of a token into two vocabulary pieces,
/// ordered by the token's score (best first), then by the pieces' lengths, as transformers'
/// `generate_merges` orders them.
pub(crate) fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<String> {
    let mut first_id: HashMap<&str, usize> = HashMap::new();
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if !first_id.contains_key(token.as_str()) {
            order.push(token);
        }
        first_id.insert(token, id);
        score_of.insert(token, scores[id]);
    }

    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for token in order {
        let mut local = Vec::new();
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if first_id.contains_key(left) && first_id.contains_key(right) {
                local.push((left, right, score_of[token]));
            }
        }
        local.sort_by_key(|(l, r, _)| (first_id[l], first_id[r]));
        merges.extend(local);
    }

    // Python's sorted(reverse=True) is stable: equal keys keep their order.
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| format!("{l} {r}"))
        .collect()
}

/// One entry of `added_tokens`.
fn added_token(id: usize, content: &str, special: bool) -> serde_json::Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special
    })
}

/// A tokenizer error about GGUF metadata.
fn gguf_error(msg: String) -> Error {
    Error::Tokenizer(format!("GGUF metadata: {msg}"))
}

/// Typed access to GGUF metadata, with errors that name the key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| gguf_error(format!("key `{key}` is missing")))
    }

    fn wrong(key: &str, what: &str, value: &Value) -> Error {
        gguf_error(format!(
            "key `{key}` should be {what}, found {:?}",
            value.value_type()
        ))
    }

    fn string(&self, key: &str) -> Result<String> {
        let value = self.get(key)?;
        value
            .to_string()
            .cloned()
            .map_err(|_| Self::wrong(key, "a string", value))
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.0.contains_key(key) {
            true => self.string(key).map(Some),
            false => Ok(None),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        let value = self.get(key)?;
        value
            .to_vec()
            .map_err(|_| Self::wrong(key, "an array", value))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| Self::wrong(key, "an array of strings", v))
            })
            .collect()
    }

    fn optional_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.0.contains_key(key) {
            true => self.strings(key).map(Some),
            false => Ok(None),
        }
    }

    fn floats(&self, key: &str) -> Result<Vec<f64>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                other => Err(Self::wrong(key, "an array of floats", other)),
            })
            .collect()
    }

    fn ints_or_empty(&self, key: &str) -> Result<Vec<i64>> {
        if !self.0.contains_key(key) {
            return Ok(Vec::new());
        }
        self.array(key)?
            .iter()
            .map(|v| int_of(v).ok_or_else(|| Self::wrong(key, "an array of integers", v)))
            .collect()
    }

    fn optional_int(&self, key: &str) -> Result<Option<i64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => int_of(v)
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "an integer", v)),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_bool()
                .map(Some)
                .map_err(|_| Self::wrong(key, "a boolean", v)),
        }
    }
}

/// Any GGUF integer as `i64`.
fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_maps_space_to_g_dot_and_newline_to_c_dot() {
        let table = byte_to_char();
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert_eq!(table[b'\n' as usize], '\u{10a}');
        assert_eq!(table[b'a' as usize], 'a');
    }

    #[test]
    fn merges_from_scores_put_the_best_scored_token_first() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"].map(String::from).into();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        assert_eq!(merges, ["a b", "b c", "ab c", "a bc"]);
    }
}
