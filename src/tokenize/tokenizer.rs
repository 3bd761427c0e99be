//! The project's tokenizer: a Hugging Face `tokenizers::Tokenizer` with its special tokens and
//! chat template, loaded from `tokenizer.json` or from GGUF metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;

use super::chat::{ChatTemplate, Message};
use super::gguf;
use crate::{Error, Result};

/// The special-token names transformers exposes to chat templates.
const SPECIAL_NAMES: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// A tokenizer with its special tokens and optional chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special_tokens: BTreeMap<String, String>,
    chat_template: Option<ChatTemplate>,
    /// Added tokens that end an independently encoded segment of text (see
    /// [`Tokenizer::encode_sharing_prefix`]); empty when segments depend on their position.
    segment_ends: Vec<String>,
}

impl Tokenizer {
    /// Wraps a `tokenizers::Tokenizer`; `special_tokens` maps `bos_token`, `eos_token`, ... to
    /// the token strings.
    pub fn new(
        inner: tokenizers::Tokenizer,
        special_tokens: BTreeMap<String, String>,
        chat_template: Option<&str>,
    ) -> Result<Self> {
        let chat_template = chat_template.map(ChatTemplate::new).transpose()?;
        let segment_ends = segment_ends(&inner);
        Ok(Tokenizer {
            inner,
            special_tokens,
            chat_template,
            segment_ends,
        })
    }

    /// Loads `tokenizer.json` from `dir`, plus `tokenizer_config.json` (special tokens and chat
    /// template) and `chat_template.jinja` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Parse {
            path: json_path.clone(),
            line: None,
            msg: e.to_string(),
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(parse_json(&config_path, &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&config_path, e)),
        };

        let mut inner = inner;
        let mut special_tokens = BTreeMap::new();
        let mut chat_template = None;
        if let Some(config) = &config {
            rebuild_llama_pipeline(&mut inner, config);
            for name in SPECIAL_NAMES {
                if let Some(token) = config.get(name).and_then(token_content) {
                    special_tokens.insert(name.to_string(), token);
                }
            }
            chat_template = config_chat_template(&config_path, config.get("chat_template"))?;
        }

        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            let text =
                std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            chat_template = Some(text);
        }
        Self::new(inner, special_tokens, chat_template.as_deref())
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata (GPT-2 byte-level
    /// BPE or SentencePiece-style `llama` vocabularies), with its chat template.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let built = gguf::read(content)?;
        let bytes = serde_json::to_vec(&built.json)
            .map_err(|e| Error::Tokenizer(format!("GGUF tokenizer: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("GGUF tokenizer: {e}")))?;
        let special_tokens = built.special_tokens.into_iter().collect();
        Self::new(inner, special_tokens, built.chat_template.as_deref())
    }

    /// Opens a `.gguf` file and builds its tokenizer (see [`Tokenizer::from_gguf`]).
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: e.to_string(),
        })?;
        Self::from_gguf(&content)
    }

    /// Token ids of `text`; `add_special` applies the post-processor (e.g. a BOS token).
    /// Special tokens written in the text (`<|im_start|>`) are always recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| Error::Tokenizer(format!("encoding {} chars: {e}", text.len())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids (without special-token post-processing) of several texts that share a long
    /// prefix, e.g. a rendered prompt and the prompt followed by each completion; the same ids
    /// as [`Tokenizer::encode`] gives each text.
    ///
    /// The tokenizer cuts text at added tokens first and encodes the pieces independently, so
    /// when no normalizer or position-dependent pre-tokenizer is present, the shared prefix up
    /// to its last added token is encoded once and its ids reused.
    pub fn encode_sharing_prefix(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let cut = match texts.split_first() {
            Some((first, rest)) if !self.segment_ends.is_empty() => {
                let shared = rest
                    .iter()
                    .map(|t| common_prefix_len(first, t))
                    .min()
                    .unwrap_or(first.len());
                self.last_segment_end(&first[..shared])
            }
            _ => 0,
        };
        if cut == 0 {
            return texts.iter().map(|t| self.encode(t, false)).collect();
        }

        let head = self.encode(&texts[0][..cut], false)?;
        texts
            .iter()
            .map(|text| {
                let mut ids = head.clone();
                ids.extend(self.encode(&text[cut..], false)?);
                Ok(ids)
            })
            .collect()
    }

    /// The byte position just after the last segment-ending added token in `text`, or 0.
    fn last_segment_end(&self, text: &str) -> usize {
        self.segment_ends
            .iter()
            .filter_map(|token| text.rfind(token.as_str()).map(|at| at + token.len()))
            .max()
            .unwrap_or(0)
    }

    /// Text of `ids`; `skip_special` leaves special tokens out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding {} ids: {e}", ids.len())))
    }

    /// The special token registered under `name` (`bos_token`, `eos_token`, ...).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    /// The id of a token string, special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The end-of-sequence token id.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_id("eos_token")
    }

    /// The beginning-of-sequence token id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id("bos_token")
    }

    /// The padding token id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_id("pad_token")
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template's Jinja source, when there is one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// Replaces the chat template (for models without one, or to experiment).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        self.chat_template = Some(ChatTemplate::new(source)?);
        Ok(())
    }

    /// Renders a conversation with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template()?
            .render(messages, add_generation_prompt, &self.special_tokens)
    }

    /// Renders arbitrary JSON-like messages (tool calls, content parts) with extra template
    /// variables (`tools`, `enable_thinking`, ...).
    pub fn apply_chat_template_with(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let extra = extra
            .iter()
            .map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v)))
            .collect();
        self.template()?.render_with(
            minijinja::Value::from_serialize(messages),
            add_generation_prompt,
            &self.special_tokens,
            &extra,
        )
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) into
    /// `dir`, a layout transformers' `AutoTokenizer.from_pretrained` loads.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

        let json_path = dir.join("tokenizer.json");
        self.inner
            .save(&json_path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json_path.display())))?;

        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        for (name, token) in &self.special_tokens {
            config.insert(name.clone(), token.clone().into());
        }
        if let Some(template) = self.chat_template() {
            config.insert("chat_template".into(), template.into());
        }
        let config_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", config_path.display())))?;
        std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        self.special_token(name)
            .and_then(|t| self.inner.token_to_id(t))
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("this tokenizer has no chat template".into()))
    }
}

/// transformers 5 builds a `LlamaTokenizer` class's pipeline itself, whatever tokenizer.json
/// says: no normalizer, a `Metaspace` pre-tokenizer (prepending `▁` always when `legacy`, to
/// the first piece otherwise, never without `add_prefix_space`) and a matching decoder. The
/// same is done here so that ids agree (they differ on text that starts with spaces).
// TODO: transformers 5 rebuilds a few other classes too (e.g. Phi-3-style normalizers); only
// LlamaTokenizer is mirrored, the one whose ids were seen to differ (Llama 2, leading spaces).
fn rebuild_llama_pipeline(inner: &mut tokenizers::Tokenizer, config: &serde_json::Value) {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip, DecoderWrapper,
    };
    use tokenizers::normalizers::{replace::Replace, NormalizerWrapper};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

    let class = config["tokenizer_class"].as_str().unwrap_or_default();
    if !matches!(class, "LlamaTokenizer" | "LlamaTokenizerFast") {
        return;
    }
    let add_prefix_space = config["add_prefix_space"].as_bool().unwrap_or(true);
    let legacy = config["legacy"].as_bool().unwrap_or(false);
    let scheme = match (add_prefix_space, legacy) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };

    inner.with_normalizer(None::<NormalizerWrapper>);
    inner.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
    let mut steps: Vec<DecoderWrapper> = Vec::new();
    if let Ok(replace) = Replace::new("\u{2581}", " ") {
        steps.push(replace.into());
    }
    steps.push(ByteFallback::default().into());
    steps.push(Fuse::default().into());
    if add_prefix_space {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Sequence::new(steps)));
}

/// Added tokens after which text can be encoded separately without changing any id: matched
/// verbatim (not normalized, no stripping, not a prefix of another added token), in a
/// tokenizer without normalizer or `Metaspace`/prepending pre-tokenizer.
fn segment_ends(inner: &tokenizers::Tokenizer) -> Vec<String> {
    let pre_tokenizer = inner
        .get_pre_tokenizer()
        .and_then(|p| serde_json::to_string(p).ok())
        .unwrap_or_default();
    if inner.get_normalizer().is_some()
        || pre_tokenizer.contains("Metaspace")
        || pre_tokenizer.contains("prepend")
    {
        return Vec::new();
    }

    let added: Vec<_> = inner.get_added_tokens_decoder().into_values().collect();
    added
        .iter()
        .filter(|t| !t.normalized && !t.lstrip && !t.rstrip && !t.single_word)
        .filter(|t| {
            !added
                .iter()
                .any(|o| o.content.len() > t.content.len() && o.content.starts_with(&t.content))
        })
        .map(|t| t.content.clone())
        .collect()
}

/// Length in bytes of the longest common prefix of `a` and `b`, at a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// Parses a JSON file's text, reporting `file:line` on error.
fn parse_json(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::Parse {
        path: PathBuf::from(path),
        line: Some(e.line()),
        msg: e.to_string(),
    })
}

/// A special token given as a string or as an AddedToken object `{"content": ...}`.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{name, template}` from
/// which the one named `default` is taken.
fn config_chat_template(path: &Path, value: Option<&serde_json::Value>) -> Result<Option<String>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(items)) => {
            let default = items.iter().find(|item| item["name"] == "default");
            Ok(default.and_then(|item| item["template"].as_str().map(String::from)))
        }
        Some(other) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: format!("`chat_template` should be a string or a list, found {other}"),
        }),
    }
}
