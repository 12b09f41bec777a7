//! Staged outputs: a restored file is written under a temporary name in its final
//! directory and takes its final name only after it was synced and verified.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary path that becomes `final_path` on [`commit`](Self::commit) and is
/// removed if dropped uncommitted (failure, cancellation).
#[derive(Debug)]
pub struct StagedPath {
    final_path: PathBuf,
    temp_path: PathBuf,
    committed: bool,
}

impl StagedPath {
    /// `.<name>.vmrestore-<pid>.part` beside `final_path`.
    pub fn new(final_path: &Path) -> Self {
        let dir = final_path.parent().unwrap_or_else(|| Path::new("."));
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp_path = dir.join(format!(".{name}.vmrestore-{}.part", std::process::id()));
        Self {
            final_path: final_path.to_path_buf(),
            temp_path,
            committed: false,
        }
    }

    /// Where to write.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Where it will end up.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Renames to the final name and syncs the directory. Without `replace`, an
    /// existing final file makes this fail (and the temporary file is removed).
    pub fn commit(mut self, replace: bool) -> Result<PathBuf> {
        if !replace && std::fs::symlink_metadata(&self.final_path).is_ok() {
            return Err(Error::target(
                "renaming into",
                &self.final_path,
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
            ));
        }
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| Error::target("renaming into", &self.final_path, e))?;
        self.committed = true;
        if let Some(dir) = self.final_path.parent() {
            let d = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(f) = std::fs::File::open(d) {
                f.sync_all()
                    .map_err(|e| Error::target("syncing directory", d, e))?;
            }
        }
        Ok(self.final_path.clone())
    }
}

impl Drop for StagedPath {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the file may never have been created.
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}
