//! The `Model` and `Tokenizer` script types: loading, forward passes with hidden states,
//! log-probabilities, generation and chat, parameters, freezing, LoRA and saving.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Tensor};
use rhai::{Array, Dynamic, EvalAltResult, Map};

use super::opts::Opts;
use super::tensor::{parse_dtype, TensorHandle};
use crate::model::{
    CausalLm, Family, ForwardOptions, GenerateOptions, HiddenStates, LoadOptions, LoraConfig,
    ModelConfig,
};
use crate::objective::sequence_logps;
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;
use crate::tokenize::{Message, Tokenizer};

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// A model and its tokenizer, shared by every script variable that holds it.
pub struct ModelState {
    /// The network.
    pub model: CausalLm,
    /// Its tokenizer, when one was found or set.
    pub tokenizer: Option<TokenizerHandle>,
}

/// A model as a rhai value (cloning shares it).
#[derive(Clone)]
pub struct ModelHandle(pub Rc<RefCell<ModelState>>);

/// A tokenizer as a rhai value (cloning shares it).
#[derive(Clone)]
pub struct TokenizerHandle(pub Rc<Tokenizer>);

impl ModelHandle {
    /// The tokenizer, or an error saying how to give one.
    pub fn tokenizer(&self) -> RResult<TokenizerHandle> {
        self.0.borrow().tokenizer.clone().ok_or_else(|| {
            script_err("this model has no tokenizer; use m.set_tokenizer(load_tokenizer(path))")
        })
    }
}

fn load_tokenizer_at(path: &str) -> RResult<Tokenizer> {
    let p = Path::new(path);
    let tok = if p.is_dir() {
        Tokenizer::from_dir(p)
    } else if path.to_ascii_lowercase().ends_with(".gguf") {
        Tokenizer::from_gguf_file(p)
    } else {
        return Err(script_err(format!(
            "{path}: expected a folder with tokenizer.json or a .gguf file"
        )));
    };
    tok.map_err(script_err)
}

/// GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

/// A byte-level tokenizer with no merges (one token per byte, ids 0..256) plus
/// `<|endoftext|>` (256), `<|im_start|>` (257), `<|im_end|>` (258) and a ChatML template:
/// what tiny random models use so that scripts run end to end without downloads.
pub fn byte_level_tokenizer() -> crate::Result<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0u8..=255)
        .map(|b| (byte_char(b).to_string(), (b as u64).into()))
        .collect();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    let bytes = serde_json::to_vec(&json).map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
    let inner = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
    let special_tokens = BTreeMap::from([
        ("eos_token".to_string(), "<|im_end|>".to_string()),
        ("pad_token".to_string(), "<|endoftext|>".to_string()),
        ("bos_token".to_string(), "<|im_start|>".to_string()),
    ]);
    let template = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
                    {{ message['content'] }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    Tokenizer::new(inner, special_tokens, Some(template))
}

/// Chat messages from a string (one user turn) or an array of `#{role, content}` maps.
pub fn messages_of(value: &Dynamic) -> RResult<Vec<Message>> {
    if value.is_string() {
        return Ok(vec![Message::new("user", value.to_string())]);
    }
    let Some(items) = value.read_lock::<Array>() else {
        return Err(script_err(
            "messages: expected a string or an array of #{role, content}",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let map = m.read_lock::<Map>().ok_or_else(|| {
                script_err(format!(
                    "messages[{i}]: expected #{{role, content}}, got {m}"
                ))
            })?;
            let field = |k: &str| {
                map.get(k)
                    .map(|v| v.to_string())
                    .ok_or_else(|| script_err(format!("messages[{i}]: missing `{k}`")))
            };
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

fn generate_options(opts: &Map, ctx: &HostContext, func: &'static str) -> RResult<GenerateOptions> {
    let o = Opts::new(opts, func);
    o.only(&[
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop",
    ])?;
    let top_p = o.f64("top_p", 1.0)?;
    Ok(GenerateOptions {
        max_new_tokens: o.usize("max_new_tokens", 128)?,
        temperature: o.f64("temperature", 0.0)?,
        top_k: o.opt_usize("top_k")?,
        top_p: (top_p < 1.0).then_some(top_p),
        seed: o.usize("seed", ctx.options.seed as usize)? as u64,
        eos_token_ids: vec![],
        stop_strings: o.strings("stop")?.unwrap_or_default(),
    })
}

/// Generates one continuation per prompt text (already formatted), returning the texts.
pub fn generate_texts(
    model: &ModelHandle,
    prompts: &[String],
    opts: &GenerateOptions,
) -> RResult<Vec<String>> {
    let tok = model.tokenizer()?;
    let ids = prompts
        .iter()
        .map(|p| tok.0.encode(p, false))
        .collect::<crate::Result<Vec<_>>>()
        .map_err(script_err)?;
    let mut opts = opts.clone();
    if let Some(eos) = tok.0.eos_token_id() {
        opts.eos_token_ids.push(eos);
        opts.eos_token_ids
            .extend(model.0.borrow().model.config().eos_token_ids.iter());
    }
    let decode = |ids: &[u32]| tok.0.decode(ids, true);
    let state = model.0.borrow();
    let out = state
        .model
        .generate(&ids, &opts, Some(&decode))
        .map_err(script_err)?;
    out.into_iter()
        .map(|g| match g.text {
            Some(text) => Ok(text),
            None => tok.0.decode(&g.tokens, true).map_err(script_err),
        })
        .collect()
}

fn hidden_option(value: Option<&Dynamic>, layers: usize) -> RResult<HiddenStates> {
    let Some(v) = value else {
        return Ok(HiddenStates::None);
    };
    if v.is_string() {
        return match v.to_string().as_str() {
            "all" => Ok(HiddenStates::All),
            "last" => Ok(HiddenStates::Layers(vec![layers])),
            "none" => Ok(HiddenStates::None),
            other => Err(script_err(format!(
                "forward: hidden must be \"all\", \"last\", \"none\" or an array of layer \
                 indices, got \"{other}\""
            ))),
        };
    }
    if let Ok(i) = v.as_int() {
        return Ok(HiddenStates::Layers(vec![resolve_layer(i, layers)?]));
    }
    let items = v
        .clone()
        .into_array()
        .map_err(|_| script_err("forward: bad `hidden` option"))?;
    let list = items
        .iter()
        .map(|x| {
            resolve_layer(
                x.as_int().map_err(|_| script_err("hidden: integers"))?,
                layers,
            )
        })
        .collect::<RResult<Vec<_>>>()?;
    Ok(HiddenStates::Layers(list))
}

/// A hidden-state index in HF's convention; -1 is the final-norm output.
fn resolve_layer(i: i64, layers: usize) -> RResult<usize> {
    let r = if i < 0 { layers as i64 + 1 + i } else { i };
    if r < 0 || r > layers as i64 {
        return Err(script_err(format!(
            "hidden state {i} does not exist: the model has indices 0..={layers}"
        )));
    }
    Ok(r as usize)
}

/// Runs a forward pass from a script: logits and the hidden states asked for.
pub fn forward_map(m: &ModelHandle, ids: &Tensor, mask: &Tensor, opts: &Map) -> RResult<Map> {
    let o = Opts::new(opts, "forward");
    o.only(&["logits", "hidden"])?;
    let state = m.0.borrow();
    let layers = state.model.config().num_hidden_layers;
    let fwd = ForwardOptions {
        logits: o.bool("logits", true)?,
        hidden: hidden_option(o.raw("hidden"), layers)?,
    };
    let out = state.model.forward(ids, mask, &fwd).map_err(script_err)?;

    let mut result = Map::new();
    if let Some(logits) = out.logits {
        result.insert("logits".into(), Dynamic::from(TensorHandle(logits)));
    }
    let mut hidden = Map::new();
    for (i, h) in out.hidden_states {
        hidden.insert(i.to_string().into(), Dynamic::from(TensorHandle(h)));
    }
    result.insert("hidden".into(), hidden.into());
    Ok(result)
}

/// Registers `Model` and `Tokenizer`.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.engine().register_type_with_name::<ModelHandle>("Model");
    api.engine()
        .register_type_with_name::<TokenizerHandle>("Tokenizer");
    api.category("model");

    let c = ctx.clone();
    let load = move |path: &str, opts: Map| -> RResult<ModelHandle> {
        let o = Opts::new(&opts, "load_model");
        o.only(&["dtype", "trainable"])?;
        let load_opts = LoadOptions {
            dtype: parse_dtype(&o.string("dtype", "f32")?)?,
            device: c.options.device.clone(),
            trainable: o.bool("trainable", true)?,
        };
        let loaded = CausalLm::load(path, &load_opts).map_err(script_err)?;
        Ok(ModelHandle(Rc::new(RefCell::new(ModelState {
            model: loaded.model,
            tokenizer: loaded.tokenizer.map(|t| TokenizerHandle(Rc::new(t))),
        }))))
    };
    let load2 = load.clone();
    api.func(
        "load_model",
        "load_model(path) -> Model; load_model(path, #{dtype, trainable}) -> Model",
        "Loads a folder (config.json + safetensors), a .gguf file or a cached hub id; trainable \
         unless trainable: false; its tokenizer comes along.",
        "let policy = load_model(\"assets/SmolLM2-135M-Instruct.Q4_1.gguf\", #{dtype: \"f32\"});",
        move |path: &str| load2(path, Map::new()),
    );
    api.overload("load_model", load);

    let c = ctx.clone();
    api.func(
        "random_model",
        "random_model(#{family, seed, vocab_size, hidden_size, layers}) -> Model",
        "A tiny randomly initialised model (llama, qwen2, gemma2, gemma3) with a byte-level \
         ChatML tokenizer: for tests and CI.",
        "let tiny = random_model(#{family: \"llama\", seed: 1});\ntiny.save(\"tiny\");",
        move |opts: Map| -> RResult<ModelHandle> {
            let o = Opts::new(&opts, "random_model");
            o.only(&["family", "seed", "hidden_size", "layers", "trainable"])?;
            let family = match o.string("family", "llama")?.as_str() {
                "llama" => Family::Llama,
                "qwen2" => Family::Qwen2,
                "gemma2" => Family::Gemma2,
                "gemma3" => Family::Gemma3,
                other => {
                    return Err(script_err(format!(
                        "random_model: unknown family `{other}`; known: llama, qwen2, gemma2, \
                         gemma3"
                    )))
                }
            };
            let tokenizer = byte_level_tokenizer().map_err(script_err)?;
            let mut config = ModelConfig::tiny(family);
            config.vocab_size = tokenizer.vocab_size();
            config.hidden_size = o.usize("hidden_size", config.hidden_size)?;
            config.num_hidden_layers = o.usize("layers", config.num_hidden_layers)?;
            config.layer_types = (0..config.num_hidden_layers)
                .map(|i| config.layer_types[i % config.layer_types.len()])
                .collect();
            config.bos_token_id = tokenizer.bos_token_id();
            config.eos_token_ids = tokenizer.eos_token_id().into_iter().collect();
            let load_opts = LoadOptions {
                dtype: DType::F32,
                device: c.options.device.clone(),
                trainable: o.bool("trainable", true)?,
            };
            let seed = o.usize("seed", c.options.seed as usize)? as u64;
            let model = CausalLm::new_random(config, &load_opts, seed).map_err(script_err)?;
            Ok(ModelHandle(Rc::new(RefCell::new(ModelState {
                model,
                tokenizer: Some(TokenizerHandle(Rc::new(tokenizer))),
            }))))
        },
    );
    api.func(
        "load_tokenizer",
        "load_tokenizer(path) -> Tokenizer",
        "A tokenizer from a folder (tokenizer.json, tokenizer_config.json) or a .gguf file.",
        "let tok = load_tokenizer(\"assets/SmolLM2-135M-Instruct.Q4_1.gguf\");",
        |path: &str| load_tokenizer_at(path).map(|t| TokenizerHandle(Rc::new(t))),
    );
    api.func(
        "byte_tokenizer",
        "byte_tokenizer() -> Tokenizer",
        "The byte-level ChatML tokenizer tiny random models use.",
        "let tok = byte_tokenizer();",
        || {
            byte_level_tokenizer()
                .map(|t| TokenizerHandle(Rc::new(t)))
                .map_err(script_err)
        },
    );

    api.engine()
        .register_get("tokenizer", |m: &mut ModelHandle| m.tokenizer());
    api.doc(
        "tokenizer",
        "m.tokenizer -> Tokenizer",
        "The model's tokenizer.",
        "let tok = policy.tokenizer;",
    );
    api.func(
        "set_tokenizer",
        "m.set_tokenizer(tokenizer)",
        "Gives the model a tokenizer (saved with it).",
        "m.set_tokenizer(load_tokenizer(\"tok_dir\"));",
        |m: &mut ModelHandle, t: TokenizerHandle| m.0.borrow_mut().tokenizer = Some(t),
    );
    api.engine()
        .register_get("config", |m: &mut ModelHandle| -> Map {
            let state = m.0.borrow();
            let c = state.model.config();
            let mut out = Map::new();
            out.insert("model_type".into(), c.model_type.clone().into());
            out.insert("vocab_size".into(), (c.vocab_size as i64).into());
            out.insert("hidden_size".into(), (c.hidden_size as i64).into());
            out.insert("layers".into(), (c.num_hidden_layers as i64).into());
            out.insert("heads".into(), (c.num_attention_heads as i64).into());
            out.insert("kv_heads".into(), (c.num_key_value_heads as i64).into());
            out.insert(
                "dtype".into(),
                format!("{:?}", state.model.dtype()).to_lowercase().into(),
            );
            out
        });
    api.doc(
        "config",
        "m.config -> map",
        "vocab_size, hidden_size, layers, heads, kv_heads, model_type, dtype.",
        "print(policy.config.hidden_size);",
    );

    api.func(
        "forward",
        "m.forward(ids, mask) -> Tensor; m.forward(ids, mask, #{logits, hidden}) -> map",
        "Logits [N, T, V]; with options a map #{logits, hidden} where hidden maps HF indices \
         (0 = embeddings, L = final norm; \"all\", \"last\", -1 or an array) to [N, T, d].",
        "let out = policy.forward(b.input_ids, b.attention_mask, #{hidden: \"last\"});\n\
         let h = out.hidden[\"30\"];",
        |m: &mut ModelHandle, ids: TensorHandle, mask: TensorHandle| -> RResult<TensorHandle> {
            let out = forward_map(m, &ids.0, &mask.0, &Map::new())?;
            out.get("logits")
                .and_then(|l| l.clone().try_cast::<TensorHandle>())
                .ok_or_else(|| script_err("forward returned no logits"))
        },
    );
    api.overload(
        "forward",
        |m: &mut ModelHandle, ids: TensorHandle, mask: TensorHandle, opts: Map| {
            forward_map(m, &ids.0, &mask.0, &opts)
        },
    );
    api.func(
        "logps",
        "m.logps(batch) -> map",
        "Completion log-probabilities of a batch's 2B rows: #{sum, count, mean, logit_sum} \
         ([2B] tensors; rows 0..B chosen). Differentiable for a trainable model.",
        "let lp = policy.logps(b);\nprint(lp.sum);",
        |m: &mut ModelHandle, b: super::data::BatchHandle| -> RResult<Map> {
            let state = m.0.borrow();
            let batch = &b.0;
            let out = state
                .model
                .forward(
                    &batch.input_ids,
                    &batch.attention_mask,
                    &ForwardOptions::default(),
                )
                .map_err(script_err)?;
            let logits = out
                .logits
                .ok_or_else(|| script_err("forward returned no logits"))?;
            let lp = sequence_logps(&logits, &batch.input_ids, &batch.completion_mask)
                .map_err(script_err)?;
            let mean = lp.mean().map_err(script_err)?;
            let mut map = Map::new();
            map.insert("sum".into(), Dynamic::from(TensorHandle(lp.sum)));
            map.insert("count".into(), Dynamic::from(TensorHandle(lp.count)));
            map.insert("mean".into(), Dynamic::from(TensorHandle(mean)));
            map.insert(
                "logit_sum".into(),
                Dynamic::from(TensorHandle(lp.mean_logit_sum)),
            );
            Ok(map)
        },
    );

    let c = ctx.clone();
    let generate = move |m: &mut ModelHandle, prompt: Dynamic, opts: Map| -> RResult<Dynamic> {
        c.interruption_point()?;
        let g = generate_options(&opts, &c, "generate")?;
        if prompt.is_array() {
            let prompts: Vec<String> = prompt
                .into_array()
                .unwrap_or_default()
                .iter()
                .map(|p| p.to_string())
                .collect();
            let texts = generate_texts(m, &prompts, &g)?;
            return Ok(texts
                .into_iter()
                .map(Dynamic::from)
                .collect::<Array>()
                .into());
        }
        let texts = generate_texts(m, &[prompt.to_string()], &g)?;
        Ok(texts.into_iter().next().unwrap_or_default().into())
    };
    let g2 = generate.clone();
    api.func(
        "generate",
        "m.generate(text_or_texts) -> string; m.generate(text_or_texts, opts)",
        "Continues raw text (no chat template); opts: max_new_tokens, temperature (0 = greedy), \
         top_k, top_p, seed, stop. An array of prompts is generated as one batch.",
        "print(policy.generate(\"Once upon a time\", #{max_new_tokens: 20, temperature: 0.7}));",
        move |m: &mut ModelHandle, p: Dynamic| g2(m, p, Map::new()),
    );
    api.overload("generate", generate);

    let c = ctx.clone();
    let chat = move |m: &mut ModelHandle, question: Dynamic, opts: Map| -> RResult<Dynamic> {
        c.interruption_point()?;
        let g = generate_options(&opts, &c, "chat")?;
        let tok = m.tokenizer()?;
        // An array of strings is a batch of questions (answered with an array, even when it
        // holds one); anything else is one question or one conversation.
        let batch = question.is_array()
            && question
                .clone()
                .into_array()
                .unwrap_or_default()
                .iter()
                .all(|q| q.is_string());
        let questions: Vec<Dynamic> = if batch {
            question.into_array().unwrap_or_default()
        } else {
            vec![question]
        };
        let single = !batch;
        let prompts = questions
            .iter()
            .map(|q| {
                tok.0
                    .apply_chat_template(&messages_of(q)?, true)
                    .map_err(script_err)
            })
            .collect::<RResult<Vec<_>>>()?;
        let answers = generate_texts(m, &prompts, &g)?;
        if single {
            return Ok(answers
                .into_iter()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
                .into());
        }
        Ok(answers
            .into_iter()
            .map(|a| Dynamic::from(a.trim().to_string()))
            .collect::<Array>()
            .into())
    };
    let chat2 = chat.clone();
    api.func(
        "chat",
        "m.chat(question) -> string; m.chat(question_or_messages, opts)",
        "Answers with the chat template (greedy unless a temperature is given); an array of \
         questions is answered as one batch, with an array of answers.",
        "print(policy.chat(\"What is the capital of France?\"));",
        move |m: &mut ModelHandle, q: Dynamic| chat2(m, q, Map::new()),
    );
    api.overload("chat", chat);

    let c = ctx.clone();
    api.func(
        "save",
        "m.save(dir)",
        "Writes HF-layout safetensors, config.json and the tokenizer files into dir (under --out).",
        "policy.save(\"final\");",
        move |m: &mut ModelHandle, dir: &str| -> RResult<()> {
            let dir = c.writable(dir).map_err(script_err)?;
            let state = m.0.borrow();
            let tokenizer = state.tokenizer.as_ref().map(|t| &*t.0);
            state.model.save(&dir, tokenizer).map_err(script_err)
        },
    );
    api.func(
        "parameters",
        "m.parameters() -> map",
        "The trainable parameters by HF name (Tensor handles; only LoRA adapters once attached).",
        "for name in policy.parameters().keys() { print(name); }",
        |m: &mut ModelHandle| -> Map {
            m.0.borrow()
                .model
                .vars()
                .into_iter()
                .map(|(n, v)| (n.into(), Dynamic::from(TensorHandle(v.as_tensor().clone()))))
                .collect()
        },
    );
    api.func(
        "num_parameters",
        "m.num_parameters() -> int",
        "How many numbers the trainable parameters hold.",
        "print(policy.num_parameters());",
        |m: &mut ModelHandle| -> i64 {
            m.0.borrow()
                .model
                .vars()
                .iter()
                .map(|(_, v)| v.elem_count() as i64)
                .sum()
        },
    );
    api.func(
        "freeze",
        "m.freeze() -> Model",
        "A frozen copy sharing no state (the reference model): no gradients, no updates.",
        "let reference = policy.freeze();",
        |m: &mut ModelHandle| -> RResult<ModelHandle> {
            let state = m.0.borrow();
            let model = state.model.frozen_copy().map_err(script_err)?;
            Ok(ModelHandle(Rc::new(RefCell::new(ModelState {
                model,
                tokenizer: state.tokenizer.clone(),
            }))))
        },
    );
    let c = ctx.clone();
    api.func(
        "attach_lora",
        "m.attach_lora(#{rank, alpha, dropout, targets})",
        "Adds LoRA adapters (defaults: rank 8, alpha 16, q_proj and v_proj); the base freezes.",
        "policy.attach_lora(#{rank: 16, alpha: 32, targets: [\"q_proj\", \"v_proj\"]});",
        move |m: &mut ModelHandle, opts: Map| -> RResult<()> {
            let o = Opts::new(&opts, "attach_lora");
            o.only(&["rank", "alpha", "dropout", "targets", "seed"])?;
            let d = LoraConfig::default();
            let cfg = LoraConfig {
                rank: o.usize("rank", d.rank)?,
                alpha: o.f64("alpha", d.alpha)?,
                dropout: o.f64("dropout", d.dropout as f64)? as f32,
                target_modules: o.strings("targets")?.unwrap_or(d.target_modules),
            };
            let seed = o.usize("seed", c.options.seed as usize)? as u64;
            m.0.borrow_mut()
                .model
                .attach_lora(&cfg, seed)
                .map_err(script_err)
        },
    );
    api.func(
        "train_mode",
        "m.train_mode(on)",
        "Training mode (LoRA dropout on) or evaluation mode.",
        "policy.train_mode(true);",
        |m: &mut ModelHandle, on: bool| m.0.borrow_mut().model.set_training(on),
    );

    api.category("tokenizer");
    api.func(
        "encode",
        "tok.encode(text) -> array; tok.encode(text, add_special)",
        "Token ids of a text.",
        "let ids = tok.encode(\"Hello world\");",
        |t: &mut TokenizerHandle, text: &str| -> RResult<Array> {
            let ids = t.0.encode(text, false).map_err(script_err)?;
            Ok(ids
                .into_iter()
                .map(|i| Dynamic::from_int(i as i64))
                .collect())
        },
    );
    api.overload(
        "encode",
        |t: &mut TokenizerHandle, text: &str, special: bool| -> RResult<Array> {
            let ids = t.0.encode(text, special).map_err(script_err)?;
            Ok(ids
                .into_iter()
                .map(|i| Dynamic::from_int(i as i64))
                .collect())
        },
    );
    api.func(
        "decode",
        "tok.decode(ids) -> string",
        "Text of token ids (an array or a 1-D tensor), special tokens skipped.",
        "print(tok.decode([19556, 905]));",
        |t: &mut TokenizerHandle, ids: Dynamic| -> RResult<String> {
            let ids: Vec<u32> = super::plot::numbers(&ids, "ids")?
                .iter()
                .map(|&x| x as u32)
                .collect();
            t.0.decode(&ids, true).map_err(script_err)
        },
    );
    api.func(
        "apply_chat_template",
        "tok.apply_chat_template(messages, add_generation_prompt) -> string",
        "Renders messages (a string or [#{role, content}]) with the chat template.",
        "let text = tok.apply_chat_template([#{role: \"user\", content: \"Hi\"}], true);",
        |t: &mut TokenizerHandle, messages: Dynamic, add: bool| -> RResult<String> {
            t.0.apply_chat_template(&messages_of(&messages)?, add)
                .map_err(script_err)
        },
    );
    api.engine()
        .register_get("vocab_size", |t: &mut TokenizerHandle| {
            t.0.vocab_size() as i64
        });
    api.doc(
        "vocab_size",
        "tok.vocab_size -> int",
        "Tokens in the vocabulary, added ones included.",
        "print(tok.vocab_size);",
    );
    api.engine()
        .register_get("eos_token_id", |t: &mut TokenizerHandle| -> Dynamic {
            t.0.eos_token_id()
                .map(|i| Dynamic::from_int(i as i64))
                .unwrap_or(Dynamic::UNIT)
        });
    api.doc(
        "eos_token_id",
        "tok.eos_token_id -> int or ()",
        "The end-of-sequence id.",
        "print(tok.eos_token_id);",
    );
}
