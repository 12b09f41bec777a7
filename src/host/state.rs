//! The `_state` directory of a backup root (spec §5.1, §6), opened one component at
//! a time without following symlinks.
//!
//! The backup tree is often a replica or a carried disk, so its `_state`, `_state/locks`
//! and `_state/vmbackup.db` may be symlinks planted to make a root process create locks
//! or write catalogue rows somewhere else. The state root itself is what the user typed
//! (or configured) and is followed; every piece below it must be a real directory or
//! regular file of its parent. This module only opens and refuses; the lock and the
//! catalogue decide what a refusal means (a WARN, never an exit code).

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, mkdirat, FileStat, Mode, SFlag};

/// Why a `_state` piece is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It does not exist (and was not to be created).
    Missing(PathBuf),
    /// It is a symlink: never followed.
    Symlink(PathBuf),
    /// It is something else than expected (a file where a directory belongs, a FIFO…).
    WrongType {
        /// The piece.
        path: PathBuf,
        /// What it should have been.
        expected: &'static str,
    },
    /// The system refused.
    Io {
        /// The piece.
        path: PathBuf,
        /// Why.
        errno: Errno,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(p) => write!(f, "{} does not exist", p.display()),
            Self::Symlink(p) => write!(
                f,
                "{} is a symbolic link (not followed out of the backup tree)",
                p.display()
            ),
            Self::WrongType { path, expected } => {
                write!(f, "{} is not a {expected}", path.display())
            }
            Self::Io { path, errno } => write!(
                f,
                "{}: {}",
                path.display(),
                std::io::Error::from_raw_os_error(*errno as i32)
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// One open directory of the state tree, with its path for messages.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What kind of inode a stat names.
fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// True when `st` is a regular file.
pub fn is_regular(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFREG
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOCTTY);

impl Dir {
    /// `<state root>/_state`; `create` makes it (mode 0755 less the umask) when it is
    /// missing, as vmbackup's `mkdir -p` does.
    pub fn state(state_root: &Path, create: bool) -> Result<Dir, Refusal> {
        let state_root = if state_root.as_os_str().is_empty() {
            Path::new(".")
        } else {
            state_root
        };
        // the root is trusted (typed or configured) and may be a symlink itself
        let fd = openat(AT_FDCWD, state_root, DIR_FLAGS, Mode::empty()).map_err(
            |errno| match errno {
                Errno::ENOENT => Refusal::Missing(state_root.to_path_buf()),
                Errno::ENOTDIR => Refusal::WrongType {
                    path: state_root.to_path_buf(),
                    expected: "directory",
                },
                errno => Refusal::Io {
                    path: state_root.to_path_buf(),
                    errno,
                },
            },
        )?;
        Dir {
            fd,
            path: state_root.to_path_buf(),
        }
        .subdir("_state", create)
    }

    /// The directory `name` inside this one, never through a symlink; `create`
    /// makes it when missing.
    pub fn subdir(&self, name: &str, create: bool) -> Result<Dir, Refusal> {
        let path = self.path.join(name);
        let open = || openat(&self.fd, name, DIR_FLAGS | OFlag::O_NOFOLLOW, Mode::empty());
        let mut res = open();
        if create && matches!(res, Err(Errno::ENOENT)) {
            match mkdirat(&self.fd, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => res = open(),
                Err(errno) => return Err(Refusal::Io { path, errno }),
            }
        }
        match res {
            Ok(fd) => Ok(Dir { fd, path }),
            Err(Errno::ENOENT) => Err(Refusal::Missing(path)),
            // O_NOFOLLOW|O_DIRECTORY: ELOOP for a symlink, ENOTDIR for anything else
            Err(Errno::ELOOP | Errno::ENOTDIR) => Err(self.wrong(name, "directory")),
            Err(errno) => Err(Refusal::Io { path, errno }),
        }
    }

    /// `name` as it is, without following it: `None` when it does not exist.
    pub fn lstat(&self, name: &str) -> Result<Option<FileStat>, Refusal> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(errno) => Err(Refusal::Io {
                path: self.join(name),
                errno,
            }),
        }
    }

    /// Checks that `name` is a regular file of this directory, not a symlink.
    pub fn regular_file(&self, name: &str) -> Result<FileStat, Refusal> {
        match self.lstat(name)? {
            None => Err(Refusal::Missing(self.join(name))),
            Some(st) if is_regular(&st) => Ok(st),
            Some(_) => Err(self.wrong(name, "regular file")),
        }
    }

    /// The refusal for `name` not being a `expected`: a symlink says so.
    pub fn wrong(&self, name: &str, expected: &'static str) -> Refusal {
        let path = self.join(name);
        match self.lstat(name) {
            Ok(Some(st)) if kind(&st) == SFlag::S_IFLNK => Refusal::Symlink(path),
            Ok(None) => Refusal::Missing(path),
            _ => Refusal::WrongType { path, expected },
        }
    }

    /// `<this dir>/<name>` (for messages and for APIs that take paths).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// This directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn creates_real_dirs_and_refuses_symlinks() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let root = t.path();
        let s = Dir::state(root, true).expect("created");
        assert!(root.join("_state").is_dir());
        s.subdir("locks", true).expect("locks");
        assert!(root.join("_state/locks").is_dir());
        assert_eq!(
            s.regular_file("vmbackup.db"),
            Err(Refusal::Missing(root.join("_state/vmbackup.db")))
        );

        std::fs::remove_dir(root.join("_state/locks")).expect("rmdir");
        symlink(outside.path(), root.join("_state/locks")).expect("symlink");
        assert_eq!(
            s.subdir("locks", true).map(|_| ()),
            Err(Refusal::Symlink(root.join("_state/locks")))
        );
        std::fs::write(outside.path().join("db"), b"x").expect("write");
        symlink(outside.path().join("db"), root.join("_state/vmbackup.db")).expect("symlink");
        assert_eq!(
            s.regular_file("vmbackup.db"),
            Err(Refusal::Symlink(root.join("_state/vmbackup.db")))
        );

        let u = tempfile::tempdir().expect("tmp");
        symlink(outside.path(), u.path().join("_state")).expect("symlink");
        assert_eq!(
            Dir::state(u.path(), true).map(|_| ()),
            Err(Refusal::Symlink(u.path().join("_state")))
        );
        // a dangling symlink is refused, not created through
        let v = tempfile::tempdir().expect("tmp");
        symlink(outside.path().join("new"), v.path().join("_state")).expect("symlink");
        assert!(matches!(
            Dir::state(v.path(), true),
            Err(Refusal::Symlink(_))
        ));
        assert!(!outside.path().join("new").exists());
        let names: Vec<_> = std::fs::read_dir(outside.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, ["db"]);
    }

    #[test]
    fn a_file_where_a_directory_belongs() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(t.path().join("_state"), b"x").expect("write");
        let e = Dir::state(t.path(), true).map(|_| ()).expect_err("refused");
        assert_eq!(
            e.to_string(),
            format!("{} is not a directory", t.path().join("_state").display())
        );
        assert!(matches!(
            Dir::state(&t.path().join("missing"), true),
            Err(Refusal::Missing(_))
        ));
    }
}
