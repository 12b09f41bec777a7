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

    /// Removes the temporary files that killed runs left for `final_path`
    /// (`.<name>.vmrestore-<pid>.part`, and `..<name>.vmrestore-<pid>.new.vmrestore-<pid>.part`
    /// of a disk swapped in place) whose process no longer exists. Returns what was
    /// removed. Files of a live process (another restore) are never touched.
    pub fn remove_stale(final_path: &Path) -> Vec<PathBuf> {
        let dir = final_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        let Some(name) = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let ours = std::process::id();
        let mut removed = Vec::new();
        for e in rd.flatten() {
            let entry = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = stale_pid(&entry, &name) else {
                continue;
            };
            let alive = pid == ours
                || i32::try_from(pid).map_or(true, |p| {
                    !matches!(
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
                        Err(nix::errno::Errno::ESRCH)
                    )
                });
            let path = e.path();
            // only plain files: never follow or remove anything else planted there
            if !alive
                && e.file_type().is_ok_and(|t| t.is_file())
                && std::fs::remove_file(&path).is_ok()
            {
                removed.push(path);
            }
        }
        removed
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

/// The PID in `entry` when it is a temporary file of [`StagedPath`] for `name`.
fn stale_pid(entry: &str, name: &str) -> Option<u32> {
    let rest = entry
        .strip_prefix(&format!(".{name}.vmrestore-"))
        .or_else(|| entry.strip_prefix(&format!("..{name}.vmrestore-")))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let pid: u32 = rest[..digits].parse().ok()?;
    let tail = &rest[digits..];
    let nested = tail
        .strip_prefix(".new.vmrestore-")
        .and_then(|t| t.strip_suffix(".part"))
        .is_some_and(|p| p.parse::<u32>() == Ok(pid));
    (tail == ".part" || nested).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names() {
        assert_eq!(stale_pid(".d.qcow2.vmrestore-42.part", "d.qcow2"), Some(42));
        assert_eq!(
            stale_pid("..d.qcow2.vmrestore-42.new.vmrestore-42.part", "d.qcow2"),
            Some(42)
        );
        assert_eq!(
            stale_pid("..d.qcow2.vmrestore-42.new.vmrestore-43.part", "d.qcow2"),
            None
        );
        assert_eq!(stale_pid(".d.qcow2.vmrestore-42.new", "d.qcow2"), None);
        assert_eq!(stale_pid(".d.qcow2.vmrestore-.part", "d.qcow2"), None);
        assert_eq!(stale_pid(".e.qcow2.vmrestore-42.part", "d.qcow2"), None);
        assert_eq!(stale_pid("d.qcow2", "d.qcow2"), None);
    }

    #[test]
    fn remove_stale_spares_live_and_foreign_files() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("d.qcow2");
        // PID 0x7ffffffe does not exist; our own PID does
        let dead = d.path().join(".d.qcow2.vmrestore-2147483646.part");
        let mine = d
            .path()
            .join(format!(".d.qcow2.vmrestore-{}.part", std::process::id()));
        let other = d.path().join(".x.qcow2.vmrestore-2147483646.part");
        let link = d.path().join(".d.qcow2.vmrestore-2147483645.part");
        for p in [&dead, &mine, &other] {
            std::fs::write(p, b"x").expect("write");
        }
        std::os::unix::fs::symlink(&other, &link).expect("symlink");
        assert_eq!(StagedPath::remove_stale(&f), vec![dead.clone()]);
        assert!(!dead.exists() && mine.exists() && other.exists() && link.exists());
    }
}
