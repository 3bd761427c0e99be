//! Model configuration: one struct for every supported family, read from `config.json` or
//! from GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

use crate::{Error, Result};

/// The decoder families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral-style models.
    Llama,
    /// Qwen2: Llama with biased q/k/v projections.
    Qwen2,
    /// Gemma 2: scaled embeddings, (1 + w) norms, GeGLU, pre+post norms, soft-capping.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 plus q/k norms and a local rotary base on sliding layers.
    Gemma3,
}

/// The `model_type` / GGUF architecture names accepted, with their family.
pub const SUPPORTED: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("mistral", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("gemma3", Family::Gemma3),
];

/// The names listed in an unsupported-architecture error.
pub fn supported_names() -> Vec<&'static str> {
    SUPPORTED.iter().map(|(name, _)| *name).collect()
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU), used by Llama and Qwen2.
    Silu,
    /// GELU with the tanh approximation (GeGLU), used by Gemma.
    GeluTanh,
    /// Exact GELU through erf (transformers' and torch's `gelu`); the discriminators use it.
    GeluErf,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain rotary embeddings.
    None,
    /// Frequencies divided by `factor` (`rope_type = "linear"`).
    Linear {
        /// The division factor.
        factor: f64,
    },
    /// Llama 3.1's piecewise rescaling (`rope_type = "llama3"`).
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding parameters of one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base `theta`.
    pub theta: f64,
    /// The frequency rescaling.
    pub scaling: RopeScaling,
}

/// The kind of attention a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Causal attention over the whole prefix.
    Full,
    /// Causal attention over the last `sliding_window` positions only.
    Sliding,
}

/// Everything needed to build a decoder, whatever the family.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The family, which fixes the block structure.
    pub family: Family,
    /// The `model_type` as written in `config.json` (or derived from GGUF).
    pub model_type: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary parameters of full-attention layers (all layers outside Gemma 3).
    pub rope: RopeConfig,
    /// Rotary parameters of sliding layers when they differ (Gemma 3).
    pub rope_local: Option<RopeConfig>,
    /// Maximum positions the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases (Qwen2, some Llama variants).
    pub attention_bias: bool,
    /// Whether the MLP projections carry biases.
    pub mlp_bias: bool,
    /// The MLP activation.
    pub activation: Activation,
    /// The sliding window width, for layers of kind [`AttentionKind::Sliding`].
    pub sliding_window: Option<usize>,
    /// The attention kind of every layer.
    pub layer_types: Vec<AttentionKind>,
    /// Gemma's `query_pre_attn_scalar`: queries are scaled by its inverse square root.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2's attention logit soft-capping.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2's final logit soft-capping.
    pub final_logit_softcapping: Option<f64>,
    /// Beginning-of-sequence token, when known.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens, when known.
    pub eos_token_ids: Vec<u32>,
    /// The original `config.json`, kept so that saving writes back what was read.
    pub raw: Option<Value>,
}

impl ModelConfig {
    /// Whether norms use Gemma's `(1 + w)` scale, embeddings are scaled by `sqrt(hidden)` and
    /// blocks carry post-attention and post-feed-forward norms.
    pub fn is_gemma(&self) -> bool {
        matches!(self.family, Family::Gemma2 | Family::Gemma3)
    }

    /// A tiny config of `family` (vocabulary 64, width 32, 2 layers, 4 query and 2 key/value
    /// heads), for tests and quick experiments with [`crate::model::CausalLm::new_random`].
    pub fn tiny(family: Family) -> Self {
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        Self {
            family,
            model_type: SUPPORTED
                .iter()
                .find(|(_, f)| *f == family)
                .map_or("llama", |(name, _)| name)
                .to_string(),
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope: RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
            },
            rope_local: (family == Family::Gemma3).then_some(RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
            }),
            max_position_embeddings: 128,
            tie_word_embeddings: gemma,
            attention_bias: family == Family::Qwen2,
            mlp_bias: false,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            sliding_window: gemma.then_some(4),
            layer_types: if gemma {
                vec![AttentionKind::Sliding, AttentionKind::Full]
            } else {
                vec![AttentionKind::Full; 2]
            },
            query_pre_attn_scalar: gemma.then_some(8.0),
            attn_logit_softcapping: (family == Family::Gemma2).then_some(50.0),
            final_logit_softcapping: (family == Family::Gemma2).then_some(30.0),
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            raw: None,
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    /// Reads a parsed Hugging Face config; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let cfg = JsonFields { value, path };
        let model_type = cfg.string("model_type")?;
        let family = family_of(&model_type)?;

        let hidden_size = cfg.usize("hidden_size")?;
        let num_attention_heads = cfg.usize("num_attention_heads")?;
        let num_hidden_layers = cfg.usize("num_hidden_layers")?;
        let head_dim = cfg
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let is_gemma = matches!(family, Family::Gemma2 | Family::Gemma3);

        let (rope, rope_local) = read_rope(&cfg, family)?;
        let sliding_window = cfg.opt_usize("sliding_window")?;
        let layer_types = read_layer_types(&cfg, family, num_hidden_layers, sliding_window)?;

        let activation_name = cfg
            .opt_string("hidden_activation")?
            .or(cfg.opt_string("hidden_act")?)
            .unwrap_or_else(|| "silu".into());
        let activation = match activation_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu" if is_gemma => Activation::GeluTanh,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            other => {
                return Err(cfg.error(format!("unsupported activation `{other}`")));
            }
        };

        Self {
            family,
            model_type,
            vocab_size: cfg.usize("vocab_size")?,
            hidden_size,
            intermediate_size: cfg.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: cfg
                .opt_usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            rope_local,
            max_position_embeddings: cfg.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: cfg.opt_bool("tie_word_embeddings")?.unwrap_or(is_gemma),
            attention_bias: cfg
                .opt_bool("attention_bias")?
                .unwrap_or(family == Family::Qwen2)
                || family == Family::Qwen2,
            mlp_bias: cfg.opt_bool("mlp_bias")?.unwrap_or(false),
            activation,
            sliding_window,
            layer_types,
            query_pre_attn_scalar: cfg.opt_f64("query_pre_attn_scalar")?,
            attn_logit_softcapping: cfg.opt_f64("attn_logit_softcapping")?,
            final_logit_softcapping: cfg.opt_f64("final_logit_softcapping")?,
            bos_token_id: cfg.opt_usize("bos_token_id")?.map(|id| id as u32),
            eos_token_ids: read_eos(value),
            raw: Some(value.clone()),
        }
        .validated(path)
    }

    /// Builds the config of a GGUF file from its metadata (llama.cpp key names).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = GgufFields {
            metadata: &content.metadata,
            path,
        };
        let arch = meta.string("general.architecture")?;
        let family = match arch.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    arch: format!("{other} (GGUF)"),
                    supported: vec!["llama", "mistral", "qwen2", "gemma2", "gemma3"],
                });
            }
        };
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        let key = |k: &str| format!("{arch}.{k}");

        let hidden_size = meta.usize(&key("embedding_length"))?;
        let num_attention_heads = meta.usize(&key("attention.head_count"))?;
        let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims()[0],
                None => {
                    return Err(Error::MissingTensor {
                        name: "token_embd.weight".into(),
                        path: path.to_path_buf(),
                    })
                }
            },
        };
        let head_dim = meta
            .opt_usize(&key("attention.key_length"))?
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let num_hidden_layers = meta.usize(&key("block_count"))?;
        let sliding_window = meta.opt_usize(&key("attention.sliding_window"))?;
        // GGUF stores no per-layer kinds: llama.cpp slides every layer of a Llama-family
        // model with a window, and fixes Gemma's patterns by architecture (Gemma 2: even
        // layers slide; Gemma 3: five sliding layers, then one full).
        let layer_types = (0..num_hidden_layers)
            .map(|i| {
                let sliding = match family {
                    _ if sliding_window.is_none() => false,
                    Family::Gemma2 => i % 2 == 0,
                    Family::Gemma3 => (i + 1) % 6 != 0,
                    _ => true,
                };
                if sliding {
                    AttentionKind::Sliding
                } else {
                    AttentionKind::Full
                }
            })
            .collect();
        let scaling = match meta.opt_string(&key("rope.scaling.type"))?.as_deref() {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line: None,
                    msg: format!("GGUF rope scaling `{other}` is not supported (linear is)"),
                })
            }
        };
        // Not in the metadata either; llama.cpp's values: Gemma 3's sliding layers rotate
        // with base 10000, and queries are scaled by 1/sqrt(head_dim) except in the 27B
        // models (46 layers for Gemma 2, 62 for Gemma 3), which use 1/sqrt(hidden / heads).
        let rope_local = (family == Family::Gemma3).then_some(RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        });
        let is_27b = matches!(
            (family, num_hidden_layers),
            (Family::Gemma2, 46) | (Family::Gemma3, 62)
        );
        let query_pre_attn_scalar = gemma.then_some(if is_27b {
            (hidden_size / num_attention_heads.max(1)) as f64
        } else {
            head_dim as f64
        });

        let eos = meta.opt_usize("tokenizer.ggml.eos_token_id")?;
        Self {
            family,
            model_type: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: meta
                .opt_usize(&key("attention.head_count_kv"))?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: meta
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
            rope: RopeConfig {
                theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
                scaling,
            },
            rope_local,
            max_position_embeddings: meta.opt_usize(&key("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: family == Family::Qwen2,
            mlp_bias: false,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            sliding_window,
            layer_types,
            query_pre_attn_scalar,
            attn_logit_softcapping: meta.opt_f64(&key("attn_logit_softcapping"))?,
            final_logit_softcapping: meta.opt_f64(&key("final_logit_softcapping"))?,
            bos_token_id: meta
                .opt_usize("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_ids: eos.map(|v| vec![v as u32]).unwrap_or_default(),
            raw: None,
        }
        .validated(path)
    }

    fn validated(self, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(bad("head counts must be positive".into()));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            )));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(bad(format!(
                "layer_types has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            )));
        }
        Ok(self)
    }

    /// The config as a Hugging Face `config.json` value: the one read, if any, else one
    /// written from the fields (for models that came from GGUF).
    pub fn to_hf_json(&self) -> Value {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let arch = match self.family {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        };
        let model_type = match self.family {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
        };
        let mut value = json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": match self.activation {
                Activation::Silu => "silu",
                Activation::GeluTanh => "gelu_pytorch_tanh",
                Activation::GeluErf => "gelu",
            },
            "torch_dtype": "float32",
        });
        if let Some(bos) = self.bos_token_id {
            value["bos_token_id"] = json!(bos);
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => value["eos_token_id"] = json!(one),
            many => value["eos_token_id"] = json!(many),
        }
        if let Some(w) = self.sliding_window {
            value["sliding_window"] = json!(w);
        }
        if self.is_gemma() {
            value["hidden_activation"] = value["hidden_act"].clone();
            let kinds: Vec<&str> = self
                .layer_types
                .iter()
                .map(|k| match k {
                    AttentionKind::Full => "full_attention",
                    AttentionKind::Sliding => "sliding_attention",
                })
                .collect();
            value["layer_types"] = json!(kinds);
            // transformers types this field as an integer.
            value["query_pre_attn_scalar"] = json!(self.query_pre_attn_scalar.map(|s| s as u64));
            value["attn_logit_softcapping"] = json!(self.attn_logit_softcapping);
            value["final_logit_softcapping"] = json!(self.final_logit_softcapping);
        }
        if let Some(local) = &self.rope_local {
            value["rope_local_base_freq"] = json!(local.theta);
        }
        match &self.rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                value["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                value["rope_scaling"] = json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                });
            }
        }
        value
    }
}

fn family_of(model_type: &str) -> Result<Family> {
    SUPPORTED
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, family)| *family)
        .ok_or_else(|| Error::UnsupportedArchitecture {
            arch: model_type.to_string(),
            supported: supported_names(),
        })
}

fn read_eos(value: &Value) -> Vec<u32> {
    match value.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => vec![],
    }
}

/// Reads rotary parameters from either the transformers 5 `rope_parameters` layout or the
/// older `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`) layout.
fn read_rope(cfg: &JsonFields, family: Family) -> Result<(RopeConfig, Option<RopeConfig>)> {
    let default_theta = if family == Family::Gemma3 { 1e6 } else { 1e4 };

    if let Some(params) = cfg.value.get("rope_parameters").filter(|v| v.is_object()) {
        let per_kind = params.get("full_attention").is_some();
        if per_kind {
            let full = rope_from_object(cfg, &params["full_attention"], default_theta)?;
            let local = match params.get("sliding_attention") {
                Some(v) => Some(rope_from_object(cfg, v, 1e4)?),
                None => None,
            };
            return Ok((full, local));
        }
        let rope = rope_from_object(cfg, params, default_theta)?;
        let local = (family == Family::Gemma3).then_some(RopeConfig {
            theta: 1e4,
            scaling: RopeScaling::None,
        });
        return Ok((rope, local));
    }

    let theta = cfg.opt_f64("rope_theta")?.unwrap_or(default_theta);
    let scaling = match cfg.value.get("rope_scaling").filter(|v| v.is_object()) {
        Some(obj) => scaling_from_object(cfg, obj)?,
        None => RopeScaling::None,
    };
    let local = (family == Family::Gemma3).then(|| -> Result<RopeConfig> {
        Ok(RopeConfig {
            theta: cfg.opt_f64("rope_local_base_freq")?.unwrap_or(1e4),
            scaling: RopeScaling::None,
        })
    });
    Ok((RopeConfig { theta, scaling }, local.transpose()?))
}

fn rope_from_object(cfg: &JsonFields, obj: &Value, default_theta: f64) -> Result<RopeConfig> {
    let theta = obj
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(default_theta);
    Ok(RopeConfig {
        theta,
        scaling: scaling_from_object(cfg, obj)?,
    })
}

fn scaling_from_object(cfg: &JsonFields, obj: &Value) -> Result<RopeScaling> {
    let kind = obj
        .get("rope_type")
        .or(obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        obj.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| cfg.error(format!("rope scaling `{kind}` needs the number `{k}`")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(cfg.error(format!(
            "unsupported rope_type `{other}` (supported: default, linear, llama3)"
        ))),
    }
}

fn read_layer_types(
    cfg: &JsonFields,
    family: Family,
    layers: usize,
    sliding_window: Option<usize>,
) -> Result<Vec<AttentionKind>> {
    if let Some(Value::Array(items)) = cfg.value.get("layer_types") {
        return items
            .iter()
            .map(|item| match item.as_str() {
                Some("full_attention") => Ok(AttentionKind::Full),
                Some("sliding_attention") => Ok(AttentionKind::Sliding),
                other => Err(cfg.error(format!("unsupported layer type {other:?}"))),
            })
            .collect();
    }

    let kinds = (0..layers).map(|i| match family {
        Family::Gemma2 if i % 2 == 0 => AttentionKind::Sliding,
        Family::Gemma3 => {
            let pattern = cfg
                .value
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6) as usize;
            if (i + 1) % pattern.max(1) == 0 {
                AttentionKind::Full
            } else {
                AttentionKind::Sliding
            }
        }
        Family::Llama if sliding_window.is_some() => AttentionKind::Sliding,
        _ => AttentionKind::Full,
    });
    Ok(kinds.collect())
}

struct JsonFields<'a> {
    value: &'a Value,
    path: &'a Path,
}

impl JsonFields<'_> {
    fn error(&self, msg: String) -> Error {
        Error::Parse {
            path: self.path.to_path_buf(),
            line: None,
            msg,
        }
    }

    fn missing(&self, key: &str) -> Error {
        self.error(format!("missing or invalid field `{key}`"))
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.missing(key)),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.missing(key)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.missing(key)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.missing(key)),
        }
    }
}

struct GgufFields<'a> {
    metadata: &'a HashMap<String, gguf_file::Value>,
    path: &'a Path,
}

impl GgufFields<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::Parse {
            path: self.path.to_path_buf(),
            line: None,
            msg: format!("GGUF metadata `{key}` missing or of the wrong type"),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        self.metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| self.missing(key))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| self.missing(key)),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = v
                    .to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .map_err(|_| self.missing(key))?;
                Ok(Some(n as usize))
            }
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| self.missing(key)),
        }
    }
}
