//! Safetensors checkpoints: a single `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, in f32, bf16 or f16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::finish_tensor;
use crate::model::{CausalLm, LoadOptions, Loaded, ModelConfig};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// Memory-mapped safetensors files with a map from tensor name to the file holding it.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    by_name: HashMap<String, usize>,
    /// The file named in a missing-tensor error (the index for sharded checkpoints).
    listing: PathBuf,
}

impl SafetensorsSource {
    /// Opens the checkpoint of a model folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(vec![single.clone()], single);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors",
                ),
            ));
        }
        let listing = dir.to_path_buf();
        Self::open(found, listing)
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: index.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Parse {
                path: index.to_path_buf(),
                line: None,
                msg: "missing object `weight_map`".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str().map(|s| dir.join(s)))
            .collect();
        shards.sort();
        shards.dedup();
        Self::open(shards, index.to_path_buf())
    }

    fn open(paths: Vec<PathBuf>, listing: PathBuf) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut by_name = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(Error::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "shard not found"),
                ));
            }
            // SAFETY: the file is mapped read-only; like every mmap it must not be modified
            // by another process while the model loads.
            let mapped = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Parse {
                path: path.clone(),
                line: None,
                msg: format!("not a valid safetensors file: {e}"),
            })?;
            for (name, _) in mapped.tensors() {
                by_name.insert(name, files.len());
            }
            files.push((path, mapped));
        }
        Ok(Self {
            files,
            by_name,
            listing,
        })
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Loads `name` on the CPU in its stored dtype, with the file it came from.
    pub fn get(&self, name: &str) -> Result<(Tensor, &Path)> {
        let index = *self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.listing.clone(),
        })?;
        let (path, mapped) = &self.files[index];
        let tensor = mapped.load(name, &Device::Cpu).map_err(|e| Error::Parse {
            path: path.clone(),
            line: None,
            msg: format!("tensor `{name}`: {e}"),
        })?;
        Ok((tensor, path))
    }
}

/// Loads a Hugging Face model folder: `config.json` plus its safetensors.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let config = ModelConfig::from_json_file(&dir.join("config.json"))?;
    let source = SafetensorsSource::open_dir(dir)?;

    let model = CausalLm::build(config, opts, |name, shape| {
        let (tensor, file) = source.get(name)?;
        finish_tensor(tensor, name, file, shape, opts)
    })?;

    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(Tokenizer::from_dir(dir)?)
    } else {
        None
    };
    Ok(Loaded { model, tokenizer })
}
