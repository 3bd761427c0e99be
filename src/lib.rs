//! A research environment for latent adversarial preference optimization (GANPO).
//!
//! The crate is layered so that each layer depends only on the ones below it:
//!
//! - [`model`]: trainable decoder-only transformers (Llama, Qwen2, Gemma2, Gemma3) that return
//!   logits at every position and hidden states, loaded from safetensors, GGUF or the Hugging
//!   Face cache; LoRA, generation and saving.
//! - [`tokenize`]: tokenizers from `tokenizer.json` or GGUF metadata, and chat templates.
//! - [`data`]: preference datasets in every common format, chat-formatted and batched.
//! - [`objective`]: sequence log-probabilities, DPO-family and SimPO losses, GANPO's
//!   relativistic adversarial losses and their moving-average means.
//! - [`disc`]: the discriminators of GANPO (transformer and MLP, spectral normalisation).
//! - [`optim`]: AdamW and SGD with PyTorch's semantics, schedules, clipping, accumulation.
//! - [`train`]: the fused training steps, checkpoints and the metrics log.
//! - [`eval`]: AlpacaEval answer files, held-out preference accuracy, robustness to sampling.
//! - [`plot`]: PNG plots of metrics, histograms and PCA scatters.
//! - [`script`]: the rhai scripting host used by the `ganpo-run` and `ganpo-repl` binaries.
//!
//! Nothing below [`script`] knows that rhai exists: the library is usable from plain Rust.
#![warn(missing_docs)]

pub mod data;
pub mod disc;
pub mod error;
pub mod eval;
mod fsio;
pub mod model;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod script;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
