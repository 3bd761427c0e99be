//! The decoder shared by every family: one block structure whose family differences (biases,
//! Gemma's norms and soft-capping, q/k norms, sliding windows) are switches of the config,
//! rather than four near-copies of the same forward.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::config::{AttentionKind, Family, ModelConfig};
use super::fused_attention;
use super::layers::{self, Linear, RotaryTables};
use super::lora::{LoraAdapter, LoraConfig};
use super::{ForwardOptions, ForwardOutput, HiddenStates, LoadOptions};
use crate::{Error, Result};

/// A projection with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    pub(crate) base: Linear,
    pub(crate) lora: Option<LoraAdapter>,
}

impl Proj {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            Some(adapter) => Ok((y + adapter.forward(x, train)?)?),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q: Proj,
    pub(crate) k: Proj,
    pub(crate) v: Proj,
    pub(crate) o: Proj,
    pub(crate) q_norm: Option<Tensor>,
    pub(crate) k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate: Proj,
    pub(crate) up: Proj,
    pub(crate) down: Proj,
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) input_norm: Tensor,
    pub(crate) post_attention_norm: Tensor,
    pub(crate) pre_feedforward_norm: Option<Tensor>,
    pub(crate) post_feedforward_norm: Option<Tensor>,
    pub(crate) attn: Attention,
    pub(crate) mlp: Mlp,
    pub(crate) kind: AttentionKind,
}

/// Cached keys and values of one layer during generation, `[N, KV, S, d]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    pub(crate) k: Option<Tensor>,
    pub(crate) v: Option<Tensor>,
}

/// Per-call inputs shared by every block.
pub(crate) struct Context<'a> {
    pub(crate) rotary_full: &'a RotaryTables,
    pub(crate) rotary_local: &'a RotaryTables,
    pub(crate) bias_full: &'a Tensor,
    pub(crate) bias_sliding: &'a Tensor,
    pub(crate) fused: bool,
    pub(crate) train: bool,
}

/// A decoder-only causal language model whose every position's logits and hidden states are
/// available and differentiable.
#[derive(Debug)]
pub struct CausalLm {
    pub(crate) config: ModelConfig,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Option<Linear>,
    pub(crate) vars: Vec<(String, Var)>,
    pub(crate) trainable: bool,
    pub(crate) lora: Option<LoraConfig>,
    pub(crate) training: bool,
}

/// The HF names and shapes of every parameter of a config, in a stable order.
pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.hidden_size;
    let hd = config.head_dim;
    let q_out = config.num_attention_heads * hd;
    let kv_out = config.num_key_value_heads * hd;
    let ffn = config.intermediate_size;
    let gemma = config.is_gemma();
    let mut shapes = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, d],
    )];

    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![d]);
        add("self_attn.q_proj.weight", vec![q_out, d]);
        add("self_attn.k_proj.weight", vec![kv_out, d]);
        add("self_attn.v_proj.weight", vec![kv_out, d]);
        add("self_attn.o_proj.weight", vec![d, q_out]);
        if config.attention_bias {
            add("self_attn.q_proj.bias", vec![q_out]);
            add("self_attn.k_proj.bias", vec![kv_out]);
            add("self_attn.v_proj.bias", vec![kv_out]);
        }
        if config.family == Family::Gemma3 {
            add("self_attn.q_norm.weight", vec![hd]);
            add("self_attn.k_norm.weight", vec![hd]);
        }
        add("post_attention_layernorm.weight", vec![d]);
        if gemma {
            add("pre_feedforward_layernorm.weight", vec![d]);
            add("post_feedforward_layernorm.weight", vec![d]);
        }
        add("mlp.gate_proj.weight", vec![ffn, d]);
        add("mlp.up_proj.weight", vec![ffn, d]);
        add("mlp.down_proj.weight", vec![d, ffn]);
        if config.mlp_bias {
            add("mlp.gate_proj.bias", vec![ffn]);
            add("mlp.up_proj.bias", vec![ffn]);
            add("mlp.down_proj.bias", vec![d]);
        }
    }

    shapes.push(("model.norm.weight".to_string(), vec![d]));
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![config.vocab_size, d]));
    }
    shapes
}

impl CausalLm {
    /// Builds a model from a function that returns each parameter (by HF name) already in the
    /// right dtype, device and shape. Trainable models wrap every tensor in a [`Var`].
    pub(crate) fn build(
        config: ModelConfig,
        opts: &LoadOptions,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut tensors = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let tensor = get(&name, &shape)?;
            if tensor.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: shape,
                    got: tensor.dims().to_vec(),
                });
            }
            let tensor = if opts.trainable {
                let var = Var::from_tensor(&tensor)?;
                let t = var.as_tensor().clone();
                vars.push((name.clone(), var));
                t
            } else {
                tensor.detach()
            };
            tensors.insert(name, tensor);
        }
        Self::assemble(config, opts, tensors, vars)
    }

    fn assemble(
        config: ModelConfig,
        opts: &LoadOptions,
        mut tensors: BTreeMap<String, Tensor>,
        vars: Vec<(String, Var)>,
    ) -> Result<Self> {
        let mut pool = Pool(&mut tensors);
        let embed = pool.req("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = |name: &str, bias: bool| -> Result<Proj> {
                Ok(Proj {
                    base: Linear {
                        weight: pool.req(&format!("{p}.{name}.weight"))?,
                        bias: pool.opt(&format!("{p}.{name}.bias"), bias)?,
                    },
                    lora: None,
                })
            };
            let ab = config.attention_bias;
            let mb = config.mlp_bias;
            let attn = Attention {
                q: proj("self_attn.q_proj", ab)?,
                k: proj("self_attn.k_proj", ab)?,
                v: proj("self_attn.v_proj", ab)?,
                o: proj("self_attn.o_proj", false)?,
                q_norm: None,
                k_norm: None,
            };
            let mlp = Mlp {
                gate: proj("mlp.gate_proj", mb)?,
                up: proj("mlp.up_proj", mb)?,
                down: proj("mlp.down_proj", mb)?,
            };
            let gemma3 = config.family == Family::Gemma3;
            let gemma = config.is_gemma();
            let attn = Attention {
                q_norm: pool.opt(&format!("{p}.self_attn.q_norm.weight"), gemma3)?,
                k_norm: pool.opt(&format!("{p}.self_attn.k_norm.weight"), gemma3)?,
                ..attn
            };
            blocks.push(Block {
                input_norm: pool.req(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: pool.req(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_feedforward_norm: pool
                    .opt(&format!("{p}.pre_feedforward_layernorm.weight"), gemma)?,
                post_feedforward_norm: pool
                    .opt(&format!("{p}.post_feedforward_layernorm.weight"), gemma)?,
                attn,
                mlp,
                kind: config.layer_types[i],
            });
        }
        let norm = pool.req("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear {
                weight: pool.req("lm_head.weight")?,
                bias: None,
            })
        };

        Ok(Self {
            config,
            dtype: opts.dtype,
            device: opts.device.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            vars,
            trainable: opts.trainable,
            lora: None,
            training: false,
        })
    }

    /// A model with random weights (uniform, scaled by fan-in; norms at their neutral value),
    /// reproducible from `seed`: for tests and experiments that need no checkpoint.
    pub fn new_random(config: ModelConfig, opts: &LoadOptions, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let gemma = config.is_gemma();
        Self::build(config, opts, |name, shape| {
            let count: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 1 && name.contains("norm") {
                let neutral = if gemma { 0.0 } else { 1.0 };
                (0..count)
                    .map(|_| neutral + rng.random_range(-0.1..0.1))
                    .collect()
            } else if shape.len() == 1 {
                (0..count).map(|_| rng.random_range(-0.1..0.1)).collect()
            } else {
                let bound = (3.0 / shape[1] as f32).sqrt();
                (0..count)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            };
            let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
            Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the model was loaded with trainable weights.
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Switches training mode (LoRA dropout on) or evaluation mode (off, the default).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// The trainable parameters with their Hugging Face names: every weight of a trainable
    /// model, only the adapters once LoRA is attached, nothing for a frozen model.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    /// Every weight (and LoRA adapter) by Hugging Face name, for checkpoints.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut push = |name: &str, t: &Tensor| out.push((format!("{p}.{name}"), t.clone()));
            push("input_layernorm.weight", &block.input_norm);
            push(
                "post_attention_layernorm.weight",
                &block.post_attention_norm,
            );
            if let Some(t) = &block.pre_feedforward_norm {
                push("pre_feedforward_layernorm.weight", t);
            }
            if let Some(t) = &block.post_feedforward_norm {
                push("post_feedforward_layernorm.weight", t);
            }
            if let Some(t) = &block.attn.q_norm {
                push("self_attn.q_norm.weight", t);
            }
            if let Some(t) = &block.attn.k_norm {
                push("self_attn.k_norm.weight", t);
            }
            for (name, proj) in block.projections() {
                push(&format!("{name}.weight"), &proj.base.weight);
                if let Some(b) = &proj.base.bias {
                    push(&format!("{name}.bias"), b);
                }
                if let Some(adapter) = &proj.lora {
                    push(&format!("{name}.lora_A.weight"), adapter.a.as_tensor());
                    push(&format!("{name}.lora_B.weight"), adapter.b.as_tensor());
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.weight.clone()));
        }
        out
    }

    /// Overwrites weights from named tensors (a checkpoint). Every name must be one of
    /// [`CausalLm::named_tensors`] with the same shape; names not given are left unchanged.
    pub fn load_named_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let current: BTreeMap<String, Tensor> = self.named_tensors().into_iter().collect();
        let vars: BTreeMap<String, Var> = self.vars.iter().cloned().collect();
        let mut replaced = BTreeMap::new();

        for (name, tensor) in tensors {
            let Some(existing) = current.get(name) else {
                return Err(Error::MissingTensor {
                    name: name.clone(),
                    path: "<model parameters>".into(),
                });
            };
            if existing.dims() != tensor.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: existing.dims().to_vec(),
                    got: tensor.dims().to_vec(),
                });
            }
            let value = tensor.to_dtype(self.dtype)?.to_device(&self.device)?;
            match vars.get(name) {
                Some(var) => var.set(&value)?,
                None => {
                    replaced.insert(name.clone(), value.detach());
                }
            }
        }

        if !replaced.is_empty() {
            self.replace_tensors(replaced)?;
        }
        Ok(())
    }

    /// Swaps non-trainable tensors by name (used for frozen weights).
    fn replace_tensors(&mut self, mut replaced: BTreeMap<String, Tensor>) -> Result<()> {
        let mut swap = |name: String, slot: &mut Tensor| {
            if let Some(t) = replaced.remove(&name) {
                *slot = t;
            }
        };
        swap("model.embed_tokens.weight".into(), &mut self.embed);
        swap("model.norm.weight".into(), &mut self.norm);
        if let Some(head) = &mut self.lm_head {
            swap("lm_head.weight".into(), &mut head.weight);
        }
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            swap(format!("{p}.input_layernorm.weight"), &mut block.input_norm);
            swap(
                format!("{p}.post_attention_layernorm.weight"),
                &mut block.post_attention_norm,
            );
            if let Some(t) = &mut block.pre_feedforward_norm {
                swap(format!("{p}.pre_feedforward_layernorm.weight"), t);
            }
            if let Some(t) = &mut block.post_feedforward_norm {
                swap(format!("{p}.post_feedforward_layernorm.weight"), t);
            }
            if let Some(t) = &mut block.attn.q_norm {
                swap(format!("{p}.self_attn.q_norm.weight"), t);
            }
            if let Some(t) = &mut block.attn.k_norm {
                swap(format!("{p}.self_attn.k_norm.weight"), t);
            }
            for (name, proj) in block.projections_mut() {
                swap(format!("{p}.{name}.weight"), &mut proj.base.weight);
                if let Some(b) = &mut proj.base.bias {
                    swap(format!("{p}.{name}.bias"), b);
                }
            }
        }
        Ok(())
    }

    /// A frozen copy for use as the reference model: every tensor is copied into fresh
    /// storage, nothing is a [`Var`], and no later update of this model reaches it.
    pub fn frozen_copy(&self) -> Result<Self> {
        let merged = self.merged_tensors()?;
        let tensors = merged
            .into_iter()
            .map(|(name, t)| Ok((name, t.copy()?.detach())))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let opts = LoadOptions {
            dtype: self.dtype,
            device: self.device.clone(),
            trainable: false,
        };
        Self::assemble(self.config.clone(), &opts, tensors, vec![])
    }

    /// Every base weight by HF name, with LoRA adapters merged into their projections.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut merged = Vec::new();
        let adapters: BTreeMap<String, &LoraAdapter> = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(i, block)| {
                block
                    .projections()
                    .into_iter()
                    .filter_map(move |(name, proj)| {
                        proj.lora
                            .as_ref()
                            .map(|a| (format!("model.layers.{i}.{name}.weight"), a))
                    })
            })
            .collect();
        for (name, tensor) in self.named_tensors() {
            if name.contains(".lora_") {
                continue;
            }
            let tensor = match adapters.get(&name) {
                Some(adapter) => (tensor.detach() + adapter.delta_weight()?)?,
                None => tensor.detach(),
            };
            merged.push((name, tensor));
        }
        Ok(merged)
    }

    /// Runs the model on a right-padded batch.
    ///
    /// `input_ids` is `[N, T]` u32, `attention_mask` is `[N, T]` (1 for real tokens). Logits
    /// at position `t` predict the token at `t + 1`. Only the hidden states requested are
    /// kept, and layers past the last one needed are not run when logits are not asked for.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let (n, t) = self.check_inputs(input_ids, attention_mask)?;
        let layers = self.config.num_hidden_layers;
        let wanted: BTreeSet<usize> = match &opts.hidden {
            HiddenStates::None => BTreeSet::new(),
            HiddenStates::All => (0..=layers).collect(),
            HiddenStates::Layers(list) => list.iter().copied().collect(),
        };
        if let Some(&bad) = wanted.iter().find(|&&i| i > layers) {
            return Err(Error::invalid(format!(
                "hidden state {bad} requested, the model has {layers} layers (indices 0..={layers})"
            )));
        }

        let key_real: Vec<Vec<bool>> = attention_mask
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| row.into_iter().map(|m| m > 0.5).collect())
            .collect();
        let positions = Tensor::arange(0u32, t as u32, &self.device)?.unsqueeze(0)?;
        let ctx_tensors = self.context_tensors(&key_real, &positions, 0, t)?;
        let ctx = ctx_tensors.context(false, self.training);

        let mut hidden_states = Vec::new();
        let mut x = self.embed_tokens(input_ids, n, t)?;
        if wanted.contains(&0) {
            hidden_states.push((0, x.clone()));
        }

        let needs_final = opts.logits || wanted.contains(&layers);
        let run_layers = if needs_final {
            layers
        } else {
            wanted.iter().next_back().copied().unwrap_or(0)
        };
        for (i, block) in self.blocks.iter().take(run_layers).enumerate() {
            x = block.forward(&x, &self.config, &ctx, None)?;
            if i + 1 < layers && wanted.contains(&(i + 1)) {
                hidden_states.push((i + 1, x.clone()));
            }
        }

        let mut logits = None;
        if needs_final {
            let normed = self.final_norm(&x, false)?;
            if opts.logits {
                logits = Some(self.project_logits(&normed)?);
            }
            if wanted.contains(&layers) {
                hidden_states.push((layers, normed));
            }
        }
        Ok(ForwardOutput {
            logits,
            hidden_states,
        })
    }

    /// Checks shapes, dtypes and the id range; returns `(N, T)`.
    fn check_inputs(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(usize, usize)> {
        let (n, t) = input_ids.dims2().map_err(|_| Error::ShapeMismatch {
            name: "input_ids (expected [N, T])".into(),
            expected: vec![],
            got: input_ids.dims().to_vec(),
        })?;
        if attention_mask.dims() != input_ids.dims() {
            return Err(Error::ShapeMismatch {
                name: "attention_mask (must match input_ids)".into(),
                expected: input_ids.dims().to_vec(),
                got: attention_mask.dims().to_vec(),
            });
        }
        if input_ids.dtype() != DType::U32 {
            return Err(Error::invalid(format!(
                "input_ids must be u32, got {:?}",
                input_ids.dtype()
            )));
        }
        if n == 0 || t == 0 {
            return Err(Error::invalid(format!(
                "empty batch: input_ids has shape [{n}, {t}]"
            )));
        }
        let max_id = input_ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(Error::invalid(format!(
                "token id {max_id} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok((n, t))
    }

    pub(crate) fn embed_tokens(&self, input_ids: &Tensor, n: usize, t: usize) -> Result<Tensor> {
        let d = self.config.hidden_size;
        let x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((n, t, d))?;
        if self.config.is_gemma() {
            let normalizer =
                Tensor::new(&[(d as f64).sqrt() as f32], &self.device)?.to_dtype(self.dtype)?;
            Ok(x.broadcast_mul(&normalizer)?)
        } else {
            Ok(x)
        }
    }

    pub(crate) fn final_norm(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        norm(x, &self.norm, &self.config, fused)
    }

    pub(crate) fn project_logits(&self, normed: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(normed)?,
            None => Linear {
                weight: self.embed.clone(),
                bias: None,
            }
            .forward(normed)?,
        };
        match self.config.final_logit_softcapping {
            Some(cap) => layers::soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Rotary tables and attention biases for queries at `offset..offset + t`.
    pub(crate) fn context_tensors(
        &self,
        key_real: &[Vec<bool>],
        positions: &Tensor,
        offset: usize,
        t: usize,
    ) -> Result<ContextTensors> {
        let cfg = &self.config;
        let rotary_full = RotaryTables::new(&cfg.rope, cfg.head_dim, positions, self.dtype)?;
        let rotary_local = match &cfg.rope_local {
            Some(rope) => RotaryTables::new(rope, cfg.head_dim, positions, self.dtype)?,
            None => rotary_full.clone(),
        };
        let bias_full =
            layers::attention_bias(key_real, offset, t, None, self.dtype, &self.device)?;
        let has_sliding = cfg.layer_types.contains(&AttentionKind::Sliding);
        let bias_sliding = match (has_sliding, cfg.sliding_window) {
            (true, Some(w)) => {
                layers::attention_bias(key_real, offset, t, Some(w), self.dtype, &self.device)?
            }
            _ => bias_full.clone(),
        };
        Ok(ContextTensors {
            rotary_full,
            rotary_local,
            bias_full,
            bias_sliding,
        })
    }
}

/// Parameters not yet placed in the model, taken out by name.
struct Pool<'a>(&'a mut BTreeMap<String, Tensor>);

impl Pool<'_> {
    fn req(&mut self, name: &str) -> Result<Tensor> {
        self.0.remove(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: "<model parameters>".into(),
        })
    }

    fn opt(&mut self, name: &str, present: bool) -> Result<Option<Tensor>> {
        if present {
            self.req(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Owned per-call tensors behind a [`Context`].
pub(crate) struct ContextTensors {
    rotary_full: RotaryTables,
    rotary_local: RotaryTables,
    bias_full: Tensor,
    bias_sliding: Tensor,
}

impl ContextTensors {
    pub(crate) fn context(&self, fused: bool, train: bool) -> Context<'_> {
        Context {
            rotary_full: &self.rotary_full,
            rotary_local: &self.rotary_local,
            bias_full: &self.bias_full,
            bias_sliding: &self.bias_sliding,
            fused,
            train,
        }
    }
}

fn norm(x: &Tensor, weight: &Tensor, config: &ModelConfig, fused: bool) -> Result<Tensor> {
    let eps = config.rms_norm_eps;
    let gemma = config.is_gemma();
    if fused {
        layers::rms_norm_fused(x, weight, eps, gemma)
    } else if super::fused::supported(x) && weight.dtype() == DType::F32 {
        let scale = if gemma {
            (weight + 1.0)?
        } else {
            weight.clone()
        };
        Ok(super::fused::rms_norm(x, &scale, eps)?)
    } else {
        layers::rms_norm(x, weight, eps, gemma)
    }
}

impl Block {
    pub(crate) fn projections(&self) -> Vec<(&'static str, &Proj)> {
        vec![
            ("self_attn.q_proj", &self.attn.q),
            ("self_attn.k_proj", &self.attn.k),
            ("self_attn.v_proj", &self.attn.v),
            ("self_attn.o_proj", &self.attn.o),
            ("mlp.gate_proj", &self.mlp.gate),
            ("mlp.up_proj", &self.mlp.up),
            ("mlp.down_proj", &self.mlp.down),
        ]
    }

    pub(crate) fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj)> {
        vec![
            ("self_attn.q_proj", &mut self.attn.q),
            ("self_attn.k_proj", &mut self.attn.k),
            ("self_attn.v_proj", &mut self.attn.v),
            ("self_attn.o_proj", &mut self.attn.o),
            ("mlp.gate_proj", &mut self.mlp.gate),
            ("mlp.up_proj", &mut self.mlp.up),
            ("mlp.down_proj", &mut self.mlp.down),
        ]
    }

    /// One decoder block; with a cache, new keys/values are appended to it and attention runs
    /// over the whole cache.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        ctx: &Context,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let gemma = cfg.is_gemma();

        let h = norm(x, &self.input_norm, cfg, ctx.fused)?;
        let attn = self.attention(&h, cfg, ctx, cache)?;
        let attn = if gemma {
            norm(&attn, &self.post_attention_norm, cfg, ctx.fused)?
        } else {
            attn
        };
        let x = (x + attn)?;

        let ffn_norm = if gemma {
            self.pre_feedforward_norm
                .as_ref()
                .expect("gemma blocks have this norm")
        } else {
            &self.post_attention_norm
        };
        let h = norm(&x, ffn_norm, cfg, ctx.fused)?;
        let gate = self.mlp.gate.forward(&h, ctx.train)?;
        let up = self.mlp.up.forward(&h, ctx.train)?;
        let ffn = self
            .mlp
            .down
            .forward(&layers::gated(&gate, &up, cfg.activation)?, ctx.train)?;
        let ffn = match &self.post_feedforward_norm {
            Some(w) => norm(&ffn, w, cfg, ctx.fused)?,
            None => ffn,
        };
        Ok((x + ffn)?)
    }

    fn attention(
        &self,
        h: &Tensor,
        cfg: &ModelConfig,
        ctx: &Context,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (n, t, _) = h.dims3()?;
        let hd = cfg.head_dim;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads;

        let q = self
            .attn
            .q
            .forward(h, ctx.train)?
            .reshape((n, t, heads, hd))?;
        let k = self
            .attn
            .k
            .forward(h, ctx.train)?
            .reshape((n, t, kv_heads, hd))?;
        let v = self
            .attn
            .v
            .forward(h, ctx.train)?
            .reshape((n, t, kv_heads, hd))?;
        let (q, k) = match (&self.attn.q_norm, &self.attn.k_norm) {
            (Some(qn), Some(kn)) => (norm(&q, qn, cfg, ctx.fused)?, norm(&k, kn, cfg, ctx.fused)?),
            _ => (q, k),
        };
        let (rotary, bias) = match self.kind {
            AttentionKind::Full => (ctx.rotary_full, ctx.bias_full),
            AttentionKind::Sliding => (ctx.rotary_local, ctx.bias_sliding),
        };
        let scale = match cfg.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (hd as f64).sqrt(),
        };

        // Training on the CPU in f32: rotary and attention as single nodes, in the
        // projections' layout (no transposed copies, no scores tensor in the graph).
        let fusable = !ctx.fused
            && cache.is_none()
            && cfg.attn_logit_softcapping.is_none()
            && bias.dtype() == DType::F32;
        if fusable {
            if let (Some(q), Some(k)) =
                (rotary.rotate_heads_last(&q)?, rotary.rotate_heads_last(&k)?)
            {
                let out = fused_attention::attention(&q, &k, &v, Some(bias), scale, None)?;
                return self.attn.o.forward(&out, ctx.train);
            }
        }

        let q = rotary.apply_before_transpose(&q)?;
        let k = rotary.apply_before_transpose(&k)?;
        let v = v.transpose(1, 2)?;
        let q = (q * scale)?;

        let (k, v) = match cache {
            Some(cache) => {
                let v = v.contiguous()?;
                let (k, v) = match (&cache.k, &cache.v) {
                    (Some(ck), Some(cv)) => {
                        (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?)
                    }
                    _ => (k, v),
                };
                cache.k = Some(k.clone());
                cache.v = Some(v.clone());
                (k, v)
            }
            None => (k, v),
        };

        let out = layers::attention(&q, &k, &v, bias, cfg.attn_logit_softcapping, ctx.fused)?;
        self.attn.o.forward(&out, ctx.train)
    }
}
