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
