//! The crate's one error type: every message names the file, record, field, tensor or shape
//! at fault, so that a researcher can act on it without a debugger.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file's contents could not be parsed (JSON, config, GGUF header, ...).
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file being parsed.
        path: PathBuf,
        /// The 1-based line of the error, when known.
        line: Option<usize>,
        /// What is wrong.
        msg: String,
    },

    /// A dataset record is invalid: names the file, the record index and the field.
    #[error("{}: record {record}, field `{field}`: {msg}", path.display())]
    Record {
        /// The dataset file.
        path: PathBuf,
        /// The 0-based index of the record in the file.
        record: usize,
        /// The offending field.
        field: String,
        /// What is wrong.
        msg: String,
    },

    /// A tensor expected in a checkpoint is absent.
    #[error("tensor `{name}` not found in {}", path.display())]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The checkpoint file searched.
        path: PathBuf,
    },

    /// Two shapes that must agree do not.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor or argument at fault.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },

    /// A model architecture this crate does not implement.
    #[error("unsupported architecture `{arch}`; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// The architecture named by the config or GGUF metadata.
        arch: String,
        /// The architectures this crate implements.
        supported: Vec<&'static str>,
    },

    /// A model id was not found in the local Hugging Face cache (no network is used).
    #[error("model `{id}` not found in the Hugging Face cache at {}", cache.display())]
    NotInCache {
        /// The model id, `org/name`.
        id: String,
        /// The cache folder searched.
        cache: PathBuf,
    },

    /// A loss or metric became NaN or infinite during training.
    #[error("non-finite value {value} in `{term}` at step {step}")]
    NonFinite {
        /// The optimisation step at which it happened.
        step: usize,
        /// The loss term or metric.
        term: String,
        /// The offending value.
        value: f64,
    },

    /// An argument is out of range or inconsistent with another.
    #[error("{0}")]
    InvalidArgument(String),

    /// An error from the tokenizer library.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to compile or render (names the line when known).
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A plot could not be drawn or written.
    #[error("plot: {0}")]
    Plot(String),

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(msg.to_string())
    }
}
