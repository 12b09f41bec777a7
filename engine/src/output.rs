//! Staged outputs: a restored file is written under a temporary name in its final
//! directory and takes its final name only after it was synced and verified.
//!
//! Names this module creates beside `<dir>/<name>` (and nothing else):
//! - `.<name>.vmrestore-<pid>.part`: the new content while it is written. It only ever
//!   holds new content, so [`StagedPath::remove_stale`] may delete it once `<pid>` is gone.
//! - `.<name>.vmrestore-<pid>.swap`: only on filesystems without hard links, for the
//!   instant of a [`StagedPath::commit_replacing`] exchange. Left behind by a kill, it
//!   holds either the original or the new content (the final name holds the other), so it
//!   is never removed automatically: see [`StagedPath::interrupted_exchanges`].

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use crate::error::{Error, Result};

/// A temporary path that becomes `final_path` on [`commit`](Self::commit) or
/// [`commit_replacing`](Self::commit_replacing) and is removed if dropped uncommitted
/// (failure, cancellation).
#[derive(Debug)]
pub struct StagedPath {
    final_path: PathBuf,
    temp_path: PathBuf,
    committed: bool,
}

/// The steps of [`StagedPath::commit_replacing`] after which a kill leaves a distinct
/// state on disk (tests stop there to look at it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Hard-link path: the original has its second name (the rollback name).
    Linked,
    /// Exchange path: the new content was renamed from `.part` to `.swap`.
    Parked,
    /// Exchange path: the final name holds the new content, `.swap` the original.
    Exchanged,
}

/// How [`StagedPath::commit_replacing`] keeps the original (tests force the fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Hard link, falling back to an exchange where the filesystem has no hard links.
    Auto,
    /// Exchange only.
    #[cfg(test)]
    Exchange,
}

impl StagedPath {
    /// `.<name>.vmrestore-<pid>.part` beside `final_path`.
    pub fn new(final_path: &Path) -> Self {
        let temp_path = sibling(final_path, "part");
        Self {
            final_path: final_path.to_path_buf(),
            temp_path,
            committed: false,
        }
    }

    /// Removes the temporary files that killed runs left for `final_path`
    /// (`.<name>.vmrestore-<pid>.part`, see the [module docs](self)) whose process no
    /// longer exists. Returns what was removed. Files of a live process (another
    /// restore) are never touched, nor anything that is not a plain file.
    pub fn remove_stale(final_path: &Path) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for path in dead_siblings(final_path, "part") {
            if std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        removed
    }

    /// The `.<name>.vmrestore-<pid>.swap` files that a killed
    /// [`commit_replacing`](Self::commit_replacing) left for `final_path` (fallback for
    /// filesystems without hard links only), whose process no longer exists. Each holds
    /// either the original or the restored content, the final name holding the other;
    /// which is which cannot be told from names, so nothing removes them: a caller
    /// should refuse to restore `final_path` again and name them to the administrator.
    pub fn interrupted_exchanges(final_path: &Path) -> Vec<PathBuf> {
        dead_siblings(final_path, "swap")
    }

    /// After a kill between the two steps of a hard-link
    /// [`commit_replacing`](Self::commit_replacing), `keep_original_as` is a second name
    /// of the unchanged original under `final_path` (same device and inode). This
    /// removes that second name, so a rerun starts from the original alone. Returns
    /// whether it did; `false` (nothing touched) when either path is missing or they are
    /// different files, e.g. after a completed commit, where `keep_original_as` is the
    /// real rollback copy.
    ///
    /// # Errors
    /// Removing the second name failed.
    pub fn discard_unfinished_rollback(final_path: &Path, keep_original_as: &Path) -> Result<bool> {
        let (Ok(f), Ok(k)) = (
            std::fs::symlink_metadata(final_path),
            std::fs::symlink_metadata(keep_original_as),
        ) else {
            return Ok(false);
        };
        if f.dev() != k.dev() || f.ino() != k.ino() {
            return Ok(false);
        }
        std::fs::remove_file(keep_original_as)
            .map_err(|e| Error::target("removing the unfinished rollback", keep_original_as, e))?;
        sync_parent(keep_original_as)?;
        Ok(true)
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
                io::Error::new(io::ErrorKind::AlreadyExists, "file exists"),
            ));
        }
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| Error::target("renaming into", &self.final_path, e))?;
        self.committed = true;
        sync_parent(&self.final_path)?;
        Ok(self.final_path.clone())
    }

    /// Gives the new content the final name, replacing what is there, with the final
    /// path present at every instant (also under kill -9). The caller has synced the
    /// new content (the target's `finish`).
    ///
    /// With `keep_original_as` = `None`: one atomic `rename(temp, final)` (the final
    /// file need not exist), then the directory is synced.
    ///
    /// With `Some(keep)`: the existing final file ends up under `keep` and the new
    /// content under the final name. `keep` must not exist (refused, nothing changed)
    /// and must be on the final file's filesystem; the final file must exist and not be
    /// a directory (a symlink is kept as the symlink itself).
    /// 1. `link(final, keep)`: the original gets its second name.
    /// 2. `rename(temp, final)`: the new content replaces it atomically.
    /// 3. `fsync` of the directories of `final` and `keep`.
    ///
    /// A kill after 1 leaves `final` = original and `keep` = the same inode (see
    /// [`discard_unfinished_rollback`](Self::discard_unfinished_rollback)), plus the
    /// `.part` file of a dead process ([`remove_stale`](Self::remove_stale)).
    ///
    /// Where the filesystem has no hard links (`link` fails with `EPERM`,
    /// `EOPNOTSUPP`, `EMLINK` or `ENOSYS`), instead:
    /// 1. `rename(temp, .<name>.vmrestore-<pid>.swap)` (never replacing),
    /// 2. `renameat2(swap, final, RENAME_EXCHANGE)`: final = new, swap = original,
    /// 3. `renameat2(swap, keep, RENAME_NOREPLACE)`, 4. the `fsync`s.
    ///
    /// A kill after 1 or 2 leaves the `.swap` file: see
    /// [`interrupted_exchanges`](Self::interrupted_exchanges).
    ///
    /// # Errors
    /// `keep` exists (`AlreadyExists`, naming `keep`); the final file is missing; the
    /// filesystem supports neither hard links nor `RENAME_EXCHANGE` (`Unsupported`); any
    /// OS error, naming the path. When an error comes from steps 1–2 nothing has
    /// changed (the temporary file is removed). A failure of the directory sync comes
    /// after the names were switched.
    pub fn commit_replacing(self, keep_original_as: Option<&Path>) -> Result<PathBuf> {
        self.commit_replacing_with(keep_original_as, Keep::Auto, &mut |_| true)
    }

    /// [`commit_replacing`](Self::commit_replacing) with a way to force the fallback and
    /// a hook called after each step; when it returns `false`, stop right there, as a
    /// kill would (no cleanup), returning `Err(Cancelled(9))`.
    fn commit_replacing_with(
        mut self,
        keep_original_as: Option<&Path>,
        how: Keep,
        hook: &mut dyn FnMut(Step) -> bool,
    ) -> Result<PathBuf> {
        let Some(keep) = keep_original_as else {
            return self.commit(true);
        };
        if std::fs::symlink_metadata(keep).is_ok() {
            return Err(exists(keep));
        }
        let md = std::fs::symlink_metadata(&self.final_path)
            .map_err(|e| Error::target("keeping the original of", &self.final_path, e))?;
        if md.is_dir() {
            // an exchange would happily move a whole directory to `keep`
            return Err(Error::Unsupported(format!(
                "{} is a directory, not a disk image",
                self.final_path.display()
            )));
        }
        let linked = match how {
            Keep::Auto => match std::fs::hard_link(&self.final_path, keep) {
                Ok(()) => true,
                Err(e) if no_hard_links(&e) => false,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists(keep)),
                Err(e) => return Err(Error::target("keeping the original as", keep, e)),
            },
            #[cfg(test)]
            Keep::Exchange => false,
        };
        if linked {
            if !hook(Step::Linked) {
                return Err(self.killed());
            }
            if let Err(e) = std::fs::rename(&self.temp_path, &self.final_path) {
                // `keep` is only a second name of the untouched original.
                let _ = std::fs::remove_file(keep);
                return Err(Error::target("renaming into", &self.final_path, e));
            }
            self.committed = true;
        } else {
            self.exchange(keep, hook)?;
        }
        sync_parent(&self.final_path)?;
        if keep.parent() != self.final_path.parent() {
            sync_parent(keep)?;
        }
        Ok(self.final_path.clone())
    }

    /// Steps 1–3 of the fallback of [`commit_replacing`](Self::commit_replacing).
    fn exchange(&mut self, keep: &Path, hook: &mut dyn FnMut(Step) -> bool) -> Result<()> {
        let swap = sibling(&self.final_path, "swap");
        rename_noreplace(&self.temp_path, &swap)
            .map_err(|e| Error::target("renaming into", &swap, e))?;
        if !hook(Step::Parked) {
            return Err(self.killed());
        }
        if let Err(e) = renameat2(
            AT_FDCWD,
            &swap,
            AT_FDCWD,
            &self.final_path,
            RenameFlags::RENAME_EXCHANGE,
        ) {
            // Nothing switched: the new content goes, as an uncommitted one does.
            let _ = std::fs::remove_file(&swap);
            return Err(if e == Errno::EINVAL || e == Errno::ENOSYS {
                Error::Unsupported(format!(
                    "cannot replace {} keeping the original as {}: the filesystem supports \
                     neither hard links nor exchanging two names",
                    self.final_path.display(),
                    keep.display()
                ))
            } else {
                Error::target("exchanging with", &self.final_path, e.into())
            });
        }
        self.committed = true;
        if !hook(Step::Exchanged) {
            return Err(Error::Cancelled(9));
        }
        if let Err(e) = rename_noreplace(&swap, keep) {
            // Put the original back under the final name, drop the new content.
            let undone = renameat2(
                AT_FDCWD,
                &swap,
                AT_FDCWD,
                &self.final_path,
                RenameFlags::RENAME_EXCHANGE,
            )
            .is_ok();
            if undone {
                let _ = std::fs::remove_file(&swap);
                return Err(Error::target("keeping the original as", keep, e));
            }
            return Err(Error::target(
                "keeping the original (now held by the .swap file beside it) as",
                keep,
                e,
            ));
        }
        Ok(())
    }

    /// Test hook stop: leave everything as a kill would.
    fn killed(&mut self) -> Error {
        self.committed = true;
        Error::Cancelled(9)
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

/// `.<name>.vmrestore-<pid>.<suffix>` beside `final_path`, for this process.
fn sibling(final_path: &Path, suffix: &str) -> PathBuf {
    let dir = final_path.parent().unwrap_or_else(|| Path::new("."));
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.vmrestore-{}.{suffix}", std::process::id()))
}

/// The plain files `.<name>.vmrestore-<pid>.<suffix>` beside `final_path` whose process
/// no longer exists.
fn dead_siblings(final_path: &Path, suffix: &str) -> Vec<PathBuf> {
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
    let mut found = Vec::new();
    for e in rd.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&entry, &name, suffix) else {
            continue;
        };
        let alive = pid == ours
            || i32::try_from(pid).map_or(true, |p| {
                !matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
                    Err(Errno::ESRCH)
                )
            });
        // only plain files: never follow or report anything else planted there
        if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
            found.push(e.path());
        }
    }
    found.sort();
    found
}

/// The PID in `entry` when it is `.<name>.vmrestore-<pid>.<suffix>`.
fn stale_pid(entry: &str, name: &str, suffix: &str) -> Option<u32> {
    let rest = entry.strip_prefix(&format!(".{name}.vmrestore-"))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let pid: u32 = rest[..digits].parse().ok()?;
    (rest[digits..].strip_prefix('.') == Some(suffix)).then_some(pid)
}

/// `link` errors meaning "this filesystem has no hard links (for this file)".
fn no_hard_links(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EPERM | Errno::EOPNOTSUPP | Errno::EMLINK | Errno::ENOSYS)
    )
}

fn exists(keep: &Path) -> Error {
    Error::target(
        "keeping the original as",
        keep,
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file with this name already exists (left by an earlier restore?)",
        ),
    )
}

/// `rename` that never replaces `to` (`RENAME_NOREPLACE`; where the filesystem lacks
/// the flag, a check then a plain rename).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from_raw_os_error(Errno::EEXIST as i32));
            }
            std::fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

/// `fsync` of the directory holding `path`, making a rename or link in it durable.
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(f) = std::fs::File::open(dir) {
        f.sync_all()
            .map_err(|e| Error::target("syncing directory", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
