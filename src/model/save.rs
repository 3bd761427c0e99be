//! Saving a model as Hugging Face-layout safetensors with its config.json.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::json;

use super::decoder::CausalLm;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

impl CausalLm {
    /// Writes `model.safetensors` (HF names, LoRA adapters merged, tied output omitted),
    /// `config.json` and, when given, the tokenizer files into `dir`, creating it. Weights and
    /// config are written to a temporary name first and renamed, so an interrupted save never
    /// leaves a half-written file behind.
    pub fn save(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

        let tensors: HashMap<String, candle_core::Tensor> = self
            .merged_tensors()?
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_device(&candle_core::Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let weights = dir.join("model.safetensors");
        let partial = part_path(&weights);
        crate::fsio::save_safetensors(&tensors, &partial)?;
        std::fs::rename(&partial, &weights).map_err(|e| Error::io(&weights, e))?;

        let mut config = self.config.to_hf_json();
        let dtype = dtype_name(self.dtype);
        if let Some(obj) = config.as_object_mut() {
            obj.insert("torch_dtype".into(), json!(dtype));
            if obj.contains_key("dtype") {
                obj.insert("dtype".into(), json!(dtype));
            }
        }
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::invalid(format!("config.json: {e}")))?;
        let config_path = dir.join("config.json");
        let partial = part_path(&config_path);
        std::fs::write(&partial, text).map_err(|e| Error::io(&partial, e))?;
        std::fs::rename(&partial, &config_path).map_err(|e| Error::io(&config_path, e))?;

        if let Some(tokenizer) = tokenizer {
            tokenizer.save(dir)?;
        }
        Ok(())
    }
}

fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}
