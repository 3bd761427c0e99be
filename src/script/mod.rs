//! The rhai scripting host: every library primitive as a documented script function.
//!
//! [`Host`] owns a rhai engine with the whole API registered through one [`registry::Api`],
//! whose documentation gives `help`, `help NAME`, REPL completion and the README reference
//! (`ganpo-run --help-markdown`). Scripts cannot run shell commands, their writes are confined
//! to the output folder unless allowed, and operation and call-depth limits are settable.

pub mod api;
pub mod engine;
pub mod registry;
pub mod repl;

pub use api::tensor::TensorHandle;
pub use engine::{render_error, Host, HostContext, HostOptions, NoProgress, ProgressSink};
pub use registry::{closest_name, FnDoc, Registry};
