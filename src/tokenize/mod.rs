//! Tokenizers from `tokenizer.json` or GGUF metadata, and chat templates rendered as
//! transformers renders them.

mod chat;
mod gguf;
mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use tokenizer::Tokenizer;
