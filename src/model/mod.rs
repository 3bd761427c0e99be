//! Trainable decoder-only transformers and their loading, generation and saving.
//!
//! [`CausalLm`] returns logits at every position and hidden states in the Hugging Face
//! `output_hidden_states` convention, differentiably: every op on the training path has a
//! backward pass. Models load from a folder (config.json + safetensors), a GGUF file, or a
//! model id in the local Hugging Face cache ([`CausalLm::load`]).

pub mod config;
mod decoder;
pub mod fastmath;
pub mod fused;
pub mod fused_attention;
pub mod generate;
pub mod layers;
pub mod load;
pub mod lora;
pub mod process;
pub mod save;

use candle_core::{DType, Device, Tensor};

use crate::tokenize::Tokenizer;

pub use config::{Family, ModelConfig};
pub use decoder::{parameter_shapes, CausalLm};
pub use generate::{GenerateOptions, Generation};
pub use lora::LoraConfig;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype of weights and activations.
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// `true`: every weight is a [`candle_core::Var`] (the policy). `false`: plain tensors
    /// that never enter a gradient graph (the frozen reference).
    pub trainable: bool,
}

impl Default for LoadOptions {
    /// f32 on the CPU, frozen.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: false,
        }
    }
}

/// A loaded model with what is known about its tokenizer.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: CausalLm,
    /// The tokenizer, when the folder has `tokenizer.json` or the GGUF file has tokenizer
    /// metadata.
    pub tokenizer: Option<Tokenizer>,
}

/// Which hidden states a forward pass keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HiddenStates {
    /// None (the default).
    #[default]
    None,
    /// All `L + 1`: the embeddings, then every layer's output, the last after the final norm.
    All,
    /// Only these indices (0 = embeddings, `L` = final-norm output).
    Layers(Vec<usize>),
}

/// What a forward pass returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Whether to compute the logits `[N, T, V]`.
    pub logits: bool,
    /// Which hidden states to keep.
    pub hidden: HiddenStates,
}

impl Default for ForwardOptions {
    /// Logits, no hidden states.
    fn default() -> Self {
        Self {
            logits: true,
            hidden: HiddenStates::None,
        }
    }
}

/// The result of [`CausalLm::forward`].
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[N, T, V]` when asked for.
    pub logits: Option<Tensor>,
    /// `(index, [N, T, d])` in increasing index order, for the requested indices only.
    pub hidden_states: Vec<(usize, Tensor)>,
}

impl ForwardOutput {
    /// The hidden state with HF index `index`, if it was requested.
    pub fn hidden(&self, index: usize) -> Option<&Tensor> {
        self.hidden_states
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, t)| t)
    }
}
