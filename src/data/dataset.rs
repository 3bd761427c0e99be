//! A tokenized preference dataset: loading with validation and a report of everything that
//! was skipped, truncated or dropped; pairs stored as spans of one flat id buffer.

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::encode::{encode_pair, EncodedPair, Limits, Truncation};
use super::format::{detect, normalize, Columns, Format, RawPair};
use super::read::{dataset_files, for_each_record, RawRecord};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// What to do with an invalid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInvalid {
    /// Stop loading with an error naming the file, record and field.
    #[default]
    Error,
    /// Leave the record out; it is counted and listed in the report.
    Skip,
}

/// How to read and format a preference dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    /// The record layout; `None` detects it from the first record.
    pub format: Option<Format>,
    /// The dataset's column names.
    pub columns: Columns,
    /// Longest prompt + completion row, in tokens.
    pub max_length: Option<usize>,
    /// Longest prompt, in tokens (its end is kept).
    pub max_prompt_length: Option<usize>,
    /// Which end of a too-long row is kept.
    pub truncation: Truncation,
    /// What to do with invalid records.
    pub on_invalid: OnInvalid,
    /// The split of a folder of shards (`train_prefs`); `None` takes every data file.
    pub split: Option<String>,
    /// Render text-format pairs with the chat template as a user turn and an assistant turn
    /// (true by default; TRL feeds such pairs as raw text, which `false` reproduces).
    pub text_as_chat: bool,
    /// Read at most this many records.
    pub limit: Option<usize>,
}

impl OnInvalid {
    /// `error` or `skip`.
    pub fn from_name(name: &str) -> Option<OnInvalid> {
        match name {
            "error" => Some(OnInvalid::Error),
            "skip" => Some(OnInvalid::Skip),
            _ => None,
        }
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            format: None,
            columns: Columns::default(),
            max_length: None,
            max_prompt_length: None,
            truncation: Truncation::KeepStart,
            on_invalid: OnInvalid::Error,
            split: None,
            text_as_chat: true,
            limit: None,
        }
    }
}

impl LoadConfig {
    fn limits(&self) -> Limits {
        Limits {
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            truncation: self.truncation,
        }
    }
}

/// A record left out of the dataset and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    /// The record's 0-based index over all files.
    pub index: usize,
    /// Why it was left out (names the field).
    pub reason: String,
}

/// What loading did: counts, and the indices of every record not loaded as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// The record format used.
    pub format: Option<Format>,
    /// Records read.
    pub records: usize,
    /// Pairs in the dataset.
    pub loaded: usize,
    /// Invalid records left out (with `on_invalid = skip`).
    pub skipped: Vec<SkippedRecord>,
    /// Record indices of pairs with at least one row truncated.
    pub truncated: Vec<usize>,
    /// Record indices of pairs dropped because their prompt alone fills `max_length`
    /// (`keep_start` would leave no completion token; TRL drops them too).
    pub dropped_prompt_too_long: Vec<usize>,
    /// Tokens stored.
    pub tokens: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        writeln!(f, "files: {}", files.join(", "))?;
        writeln!(f, "format: {}", self.format.map_or("(none)", Format::name))?;
        writeln!(
            f,
            "records: {}, loaded: {}, skipped: {}, truncated: {}, dropped (prompt too long): {}",
            self.records,
            self.loaded,
            self.skipped.len(),
            self.truncated.len(),
            self.dropped_prompt_too_long.len()
        )?;
        for skipped in &self.skipped {
            writeln!(f, "  skipped record {}: {}", skipped.index, skipped.reason)?;
        }
        if !self.dropped_prompt_too_long.is_empty() {
            writeln!(f, "  dropped records: {:?}", self.dropped_prompt_too_long)?;
        }
        write!(f, "tokens: {}", self.tokens)
    }
}

/// Pairs tokenized in parallel at a time: enough to keep every core busy, few enough that
/// the text of a chunk is never much memory.
const PARALLEL_CHUNK: usize = 64;

/// Where one pair's ids lie in the flat buffer: `[prompt | chosen | rejected]` from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PairSpan {
    start: usize,
    prompt: u32,
    chosen: u32,
    rejected: u32,
    record: u32,
}

/// Tokenized preference pairs, ready to batch.
#[derive(Debug, Clone)]
pub struct PreferenceDataset {
    ids: Vec<u32>,
    pairs: Vec<PairSpan>,
    limits: Limits,
    pad_token_id: u32,
    report: LoadReport,
}

impl PreferenceDataset {
    /// Reads, validates and tokenizes the dataset at `path` (a `.json`, `.jsonl` or `.parquet`
    /// file, or a folder of shards).
    pub fn load(path: &Path, tokenizer: &Tokenizer, config: &LoadConfig) -> Result<Self> {
        let files = dataset_files(path, config.split.as_deref())?;
        let mut builder = Builder::new(tokenizer, config);
        builder.report.files = files.clone();

        let mut next_index = 0;
        for file in &files {
            if config.limit.is_some_and(|l| next_index >= l) {
                break;
            }
            let left = config.limit.map(|l| l - next_index);
            next_index += for_each_record(file, next_index, left, &mut |r| builder.add(r))?;
        }
        builder.finish()
    }

    /// Tokenizes pairs already in normal form (built in code or by a script); their indices
    /// stand for record indices in the report.
    pub fn from_pairs(
        pairs: &[RawPair],
        tokenizer: &Tokenizer,
        config: &LoadConfig,
    ) -> Result<Self> {
        let mut builder = Builder::new(tokenizer, config);
        for (index, pair) in pairs.iter().enumerate() {
            builder.add_pair(index, pair.clone())?;
        }
        builder.finish()
    }

    /// What loading did.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The id used to pad `input_ids` (the tokenizer's pad token, else EOS, else 0).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// The length limits applied when batching.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The index, in the source files, of pair `i`'s record.
    pub fn record_index(&self, i: usize) -> Option<usize> {
        self.pairs.get(i).map(|span| span.record as usize)
    }

    /// Pair `i` as stored (before truncation).
    pub fn pair(&self, i: usize) -> Result<PairIds<'_>> {
        let span = self.pairs.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "pair {i} is out of range: the dataset has {}",
                self.len()
            ))
        })?;
        let prompt_end = span.start + span.prompt as usize;
        let chosen_end = prompt_end + span.chosen as usize;
        let rejected_end = chosen_end + span.rejected as usize;
        Ok(PairIds {
            prompt: &self.ids[span.start..prompt_end],
            chosen: &self.ids[prompt_end..chosen_end],
            rejected: &self.ids[chosen_end..rejected_end],
        })
    }

    /// The longer of pair `i`'s two rows after truncation, in tokens (`i` must be in range).
    pub(crate) fn row_length(&self, i: usize) -> usize {
        let span = self.pairs[i];
        let row = |completion: u32| {
            let (p, c) = self
                .limits
                .apply_lengths(span.prompt as usize, completion as usize);
            p + c
        };
        row(span.chosen).max(row(span.rejected))
    }
}

/// One pair's ids, borrowed from the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairIds<'a> {
    /// The prompt.
    pub prompt: &'a [u32],
    /// The preferred completion, EOS included.
    pub chosen: &'a [u32],
    /// The dispreferred completion, EOS included.
    pub rejected: &'a [u32],
}

/// Accumulates pairs while records stream in.
struct Builder<'a> {
    tokenizer: &'a Tokenizer,
    config: &'a LoadConfig,
    format: Option<Format>,
    limits: Limits,
    ids: Vec<u32>,
    pairs: Vec<PairSpan>,
    report: LoadReport,
    pending: Vec<(usize, RawPair)>,
}

impl<'a> Builder<'a> {
    fn new(tokenizer: &'a Tokenizer, config: &'a LoadConfig) -> Self {
        Builder {
            tokenizer,
            config,
            format: config.format,
            limits: config.limits(),
            ids: Vec::new(),
            pairs: Vec::new(),
            report: LoadReport::default(),
            pending: Vec::new(),
        }
    }

    /// Interprets, validates and tokenizes one record read from a file.
    fn add(&mut self, record: RawRecord) -> Result<()> {
        if self.config.limit.is_some_and(|l| record.index >= l) {
            return Ok(());
        }
        self.report.records += 1;

        let value = match record.value {
            Ok(value) => value,
            Err(msg) => {
                let listed = match record.line {
                    Some(line) => format!("line {line}: {msg}"),
                    None => msg.clone(),
                };
                return self.invalid(record.index, listed, || Error::Parse {
                    path: record.path.clone(),
                    line: record.line,
                    msg,
                });
            }
        };
        let format = match self.format.or_else(|| detect(&value, &self.config.columns)) {
            Some(format) => format,
            None => {
                let field = self.config.columns.chosen.clone();
                return self.invalid(
                    record.index,
                    format!("field `{field}`: missing (cannot tell the record's format)"),
                    || Error::Record {
                        path: record.path.clone(),
                        record: record.index,
                        field,
                        msg: "missing (cannot tell the record's format)".into(),
                    },
                );
            }
        };
        self.format = Some(format);
        self.report.format = Some(format);

        match normalize(&value, format, &self.config.columns) {
            Ok(pair) => self.add_pair(record.index, pair),
            Err(bad) => self.invalid(
                record.index,
                format!("field `{}`: {}", bad.field, bad.msg),
                || Error::Record {
                    path: record.path.clone(),
                    record: record.index,
                    field: bad.field.clone(),
                    msg: bad.msg.clone(),
                },
            ),
        }
    }

    /// Queues one valid pair; queued pairs are tokenized in parallel, a chunk at a time.
    fn add_pair(&mut self, index: usize, pair: RawPair) -> Result<()> {
        self.pending.push((index, pair));
        if self.pending.len() >= PARALLEL_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// Tokenizes the queued pairs (on all cores) and stores them in order.
    fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let encoded: Vec<Result<EncodedPair>> = pending
            .par_iter()
            .map(|(_, pair)| encode_pair(pair, self.tokenizer, self.config.text_as_chat))
            .collect();
        for ((index, _), pair) in pending.iter().zip(encoded) {
            self.store(*index, pair?);
        }
        Ok(())
    }

    /// Stores one tokenized pair, noting truncation, or notes that it is dropped.
    fn store(&mut self, index: usize, pair: EncodedPair) {
        let EncodedPair {
            prompt,
            chosen,
            rejected,
        } = pair;

        if self.limits.leaves_no_completion(prompt.len()) {
            self.report.dropped_prompt_too_long.push(index);
            return;
        }
        if self.limits.truncates(prompt.len(), chosen.len())
            || self.limits.truncates(prompt.len(), rejected.len())
        {
            self.report.truncated.push(index);
        }

        let span = PairSpan {
            start: self.ids.len(),
            prompt: prompt.len() as u32,
            chosen: chosen.len() as u32,
            rejected: rejected.len() as u32,
            record: index as u32,
        };
        self.ids.extend(prompt);
        self.ids.extend(chosen);
        self.ids.extend(rejected);
        self.pairs.push(span);
    }

    /// Skips an invalid record (and notes it) or fails, as configured.
    fn invalid(
        &mut self,
        index: usize,
        reason: String,
        error: impl FnOnce() -> Error,
    ) -> Result<()> {
        match self.config.on_invalid {
            OnInvalid::Error => Err(error()),
            OnInvalid::Skip => {
                self.report.skipped.push(SkippedRecord { index, reason });
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<PreferenceDataset> {
        self.flush()?;
        self.ids.shrink_to_fit();
        self.report.loaded = self.pairs.len();
        self.report.tokens = self.ids.len();
        if self.report.format.is_none() {
            self.report.format = self.format;
        }
        let pad_token_id = self
            .tokenizer
            .pad_token_id()
            .or(self.tokenizer.eos_token_id())
            .unwrap_or(0);
        Ok(PreferenceDataset {
            ids: self.ids,
            pairs: self.pairs,
            limits: self.limits,
            pad_token_id,
            report: self.report,
        })
    }
}
