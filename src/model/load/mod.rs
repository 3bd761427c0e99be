//! Loading a [`CausalLm`] from a folder of safetensors, a GGUF file or a Hugging Face cache id.

mod gguf;
mod hub;
mod safetensors;

use std::path::Path;

use candle_core::Tensor;

use super::{CausalLm, LoadOptions, Loaded};
use crate::{Error, Result};

pub use gguf::{load_gguf, read_gguf_content};
pub use hub::resolve_hub_id;
pub use safetensors::{load_dir, SafetensorsSource};

impl CausalLm {
    /// Loads a model from `source`: a folder (config.json + safetensors, single or sharded),
    /// a `.gguf` file, or a hub id `org/name` found in the local Hugging Face cache (never
    /// downloaded).
    pub fn load(source: &str, opts: &LoadOptions) -> Result<Loaded> {
        let path = Path::new(source);
        if path.is_dir() {
            return load_dir(path, opts);
        }
        if path.is_file() {
            if source.to_ascii_lowercase().ends_with(".gguf") {
                return load_gguf(path, opts);
            }
            return Err(Error::invalid(format!(
                "{source}: expected a folder with config.json, a .gguf file or a hub id"
            )));
        }
        if looks_like_hub_id(source) {
            let dir = resolve_hub_id(source)?;
            return load_dir(&dir, opts);
        }
        Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ))
    }
}

/// `org/name`, unless it names a file by its extension or its first part is a local folder
/// (`assets/model.gguf` that is missing is a missing file, not a hub id).
fn looks_like_hub_id(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    let file_like = [".gguf", ".safetensors", ".bin", ".json", ".pt"]
        .iter()
        .any(|ext| lower.ends_with(ext));
    let parts: Vec<&str> = source.split('/').collect();
    !file_like
        && !Path::new(parts[0]).is_dir()
        && parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Converts a loaded tensor to the asked dtype and device after checking its shape.
pub(crate) fn finish_tensor(
    tensor: Tensor,
    name: &str,
    file: &Path,
    shape: &[usize],
    opts: &LoadOptions,
) -> Result<Tensor> {
    if tensor.dims() != shape {
        return Err(Error::ShapeMismatch {
            name: format!("{name} in {}", file.display()),
            expected: shape.to_vec(),
            got: tensor.dims().to_vec(),
        });
    }
    Ok(tensor.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}
