//! File writes that a crash cannot leave half done.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Flushes a file or folder to the disk.
pub(crate) fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Gives `path` the permissions a file newly created in its folder gets (0666 less the
/// umask, on Unix). Writers that go through a private temporary file, as the safetensors
/// crate does, leave their file readable by its owner only (0600).
pub(crate) fn default_permissions(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".ganpo-mode-probe-{}", std::process::id()));
    let permissions = File::create(&probe)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .map_err(|e| Error::io(&probe, e));
    let _ = std::fs::remove_file(&probe);
    std::fs::set_permissions(path, permissions?).map_err(|e| Error::io(path, e))
}

/// Writes `tensors` as a safetensors file at `path` with the folder's default permissions.
pub(crate) fn save_safetensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    default_permissions(path)
}

/// Writes `bytes` to a temporary file next to `path` (folders created), flushes it, then
/// renames it over `path`: readers see the old file or the whole new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
