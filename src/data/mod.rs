//! Preference datasets in every common format, chat-formatted, tokenized and batched.
//!
//! [`PreferenceDataset::load`] reads JSON arrays, JSON Lines or Parquet (a file or a folder of
//! shards) in the TRL standard, TRL conversational, implicit-prompt or ShareGPT /
//! LLaMA-Factory layout, tokenizes each pair as TRL's DPOTrainer does and reports what it
//! skipped, truncated or dropped. [`PreferenceDataset::batch`] turns pairs into a
//! [`PreferenceBatch`], and a [`BatchSampler`] walks epochs from a seed, resumably.

mod batch;
mod dataset;
mod encode;
mod format;
mod read;

pub use batch::{BatchConfig, BatchPosition, BatchSampler, PreferenceBatch};
pub use dataset::{LoadConfig, LoadReport, OnInvalid, PairIds, PreferenceDataset, SkippedRecord};
pub use encode::{encode_pair, EncodedPair, Limits, Truncation};
pub use format::{detect, normalize, Columns, Format, Invalid, RawPair, Turns};
pub use read::{dataset_files, for_each_record, Container, RawRecord};
