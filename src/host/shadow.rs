//! Which `vmrestore` a plain `vmrestore` command runs. vmbackup 0.6.0 installs its
//! bash vmrestore as `/usr/local/bin/vmrestore`, which comes before the package's
//! `/usr/bin` in the default `PATH`: after installing this binary a user typing
//! `vmrestore` may still be running the script. Reads `PATH` and file heads only.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A `vmrestore` on `PATH` that answers to the plain name instead of this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    /// The file as found on `PATH` (`/usr/local/bin/vmrestore`).
    pub path: PathBuf,
    /// What it resolves to (`/opt/vmbackup/vmrestore.sh` for vmbackup's symlink).
    pub target: PathBuf,
    /// The `#!` line's interpreter when it is a script (`/bin/bash`), else `None`.
    pub interpreter: Option<String>,
}

impl Shadow {
    /// The WARN line: what runs instead of `me`, and what to do about it.
    pub fn warning(&self, me: &Path) -> String {
        let what = match &self.interpreter {
            Some(i) if i.ends_with("bash") || i.ends_with("/sh") || i == "sh" => {
                format!("a shell script ({i}), probably the bash vmrestore of vmbackup")
            }
            Some(i) => format!("a script run by {i}"),
            None => "another vmrestore program".to_owned(),
        };
        let shown = if self.target == self.path {
            self.path.display().to_string()
        } else {
            format!("{} → {}", self.path.display(), self.target.display())
        };
        format!(
            "A plain 'vmrestore' on this PATH runs {shown}, {what}, not this binary ({}). Call {} by its full path, or put its directory first on PATH (see \"Installing beside vmbackup\" in the README)",
            me.display(),
            me.display()
        )
    }
}

/// The first executable `vmrestore` in the directories of `path_var`, when it is not
/// `me` (same file after symlinks, or same inode). `None` when `me` comes first or
/// when no `vmrestore` is on `PATH` at all.
pub fn shadowing(path_var: &OsStr, me: &Path) -> Option<Shadow> {
    let me_meta = std::fs::metadata(me).ok();
    let me_real = std::fs::canonicalize(me).unwrap_or_else(|_| me.to_path_buf());
    for dir in std::env::split_paths(path_var) {
        // an empty PATH entry is the current directory, as for the shell
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let cand = dir.join("vmrestore");
        let Ok(meta) = std::fs::metadata(&cand) else {
            continue;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        let target = std::fs::canonicalize(&cand).unwrap_or_else(|_| cand.clone());
        let same_inode = me_meta
            .as_ref()
            .is_some_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
        if target == me_real || same_inode {
            return None;
        }
        return Some(Shadow {
            interpreter: interpreter(&target),
            path: cand,
            target,
        });
    }
    None
}

/// The program of a `#!` line (`/bin/bash`; `/usr/bin/env bash` gives `bash`).
fn interpreter(file: &Path) -> Option<String> {
    let mut head = [0u8; 256];
    let n = std::fs::File::open(file).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let prog = words.next()?;
    if prog.ends_with("/env") {
        return words.find(|w| !w.starts_with('-')).map(str::to_owned);
    }
    Some(prog.to_owned())
}

/// The WARN for this process: `PATH` against the running executable.
pub fn check_process() -> Option<String> {
    let me = std::env::current_exe().ok()?;
    let path = std::env::var_os("PATH")?;
    shadowing(&path, &me).map(|s| s.warning(&me))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn exe(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn path_of(dirs: &[&Path]) -> OsString {
        std::env::join_paths(dirs).expect("join")
    }

    #[test]
    fn a_bash_script_earlier_on_path_is_named() {
        let t = tempfile::tempdir().expect("tmp");
        let (local, usr, opt) = (
            t.path().join("local"),
            t.path().join("usr"),
            t.path().join("opt"),
        );
        for d in [&local, &usr, &opt] {
            std::fs::create_dir(d).expect("mkdir");
        }
        let me = usr.join("vmrestore");
        exe(&me, "\x7fELF");
        exe(&opt.join("vmrestore.sh"), "#!/bin/bash\necho 0.6.0\n");
        std::os::unix::fs::symlink(opt.join("vmrestore.sh"), local.join("vmrestore")).expect("ln");
        let s = shadowing(&path_of(&[&local, &usr]), &me).expect("shadowed");
        assert_eq!(s.path, local.join("vmrestore"));
        assert_eq!(
            s.target,
            std::fs::canonicalize(opt.join("vmrestore.sh")).expect("real")
        );
        assert_eq!(s.interpreter.as_deref(), Some("/bin/bash"));
        let w = s.warning(&me);
        assert!(
            w.contains("vmrestore.sh, a shell script (/bin/bash), probably the bash vmrestore"),
            "{w}"
        );
        assert!(
            w.contains(&format!("not this binary ({})", me.display())),
            "{w}"
        );
    }

    #[test]
    fn own_directory_first_or_alone_is_quiet() {
        let t = tempfile::tempdir().expect("tmp");
        let (local, usr) = (t.path().join("local"), t.path().join("usr"));
        std::fs::create_dir(&local).expect("mkdir");
        std::fs::create_dir(&usr).expect("mkdir");
        let me = usr.join("vmrestore");
        exe(&me, "\x7fELF");
        exe(&local.join("vmrestore"), "#!/usr/bin/env bash\n");
        assert_eq!(shadowing(&path_of(&[&usr, &local]), &me), None);
        assert_eq!(shadowing(&path_of(&[&t.path().join("none")]), &me), None);
        // a symlink to this very binary is this binary
        std::fs::remove_file(local.join("vmrestore")).expect("rm");
        std::os::unix::fs::symlink(&me, local.join("vmrestore")).expect("ln");
        assert_eq!(shadowing(&path_of(&[&local, &usr]), &me), None);
    }

    #[test]
    fn non_executables_are_skipped_and_env_scripts_read() {
        let t = tempfile::tempdir().expect("tmp");
        let (a, b, usr) = (t.path().join("a"), t.path().join("b"), t.path().join("usr"));
        for d in [&a, &b, &usr] {
            std::fs::create_dir(d).expect("mkdir");
        }
        std::fs::write(a.join("vmrestore"), "not executable").expect("write");
        exe(&b.join("vmrestore"), "#!/usr/bin/env -S bash -e\n");
        let me = usr.join("vmrestore");
        exe(&me, "\x7fELF");
        let s = shadowing(&path_of(&[&a, &b, &usr]), &me).expect("shadowed");
        assert_eq!(s.path, b.join("vmrestore"));
        assert_eq!(s.interpreter.as_deref(), Some("bash"));
        // a binary that is not this one is still named
        exe(&b.join("vmrestore"), "\x7fELF other");
        let s = shadowing(&path_of(&[&b, &usr]), &me).expect("shadowed");
        assert!(s.warning(&me).contains("another vmrestore program"));
    }
}
