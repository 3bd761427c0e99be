//! Model ids (`org/name`) resolved in the local Hugging Face cache, offline.

use std::path::PathBuf;

use crate::{Error, Result};

/// The snapshot folder of `id` in the local Hugging Face cache (`HF_HOME` or
/// `~/.cache/huggingface/hub`). Nothing is downloaded: a model absent from the cache is an
/// error naming the id and the cache folder searched.
pub fn resolve_hub_id(id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    match repo.get("config.json") {
        Some(config) => Ok(config
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.path().clone())),
        None => Err(Error::NotInCache {
            id: id.to_string(),
            cache: cache.path().clone(),
        }),
    }
}
