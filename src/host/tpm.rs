//! TPM state (spec §4.11): vmbackup keeps a copy of swtpm's state in
//! `<data dir>/tpm-state/tpm2`; a restore puts it at `<swtpm root>/<UUID>/tpm2`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// swtpm's state root; `VMRESTORE_SWTPM_ROOT` overrides it (tests, packaging).
pub fn swtpm_root() -> PathBuf {
    std::env::var_os("VMRESTORE_SWTPM_ROOT")
        .map_or_else(|| PathBuf::from("/var/lib/libvirt/swtpm"), PathBuf::from)
}

/// TPM backup material found in a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmMaterial {
    /// `.tpm-backup-marker` exists.
    pub marker: bool,
    /// `tpm-state/`, when it exists.
    pub state_dir: Option<PathBuf>,
    /// `VM UUID:` from `tpm-state/BACKUP_METADATA.txt`.
    pub metadata_uuid: Option<String>,
}

/// A directory itself, not a symlink to one: the backup tree is a replica anyone may
/// have written, and a `tpm-state` link to `/etc` would copy root's files into a
/// state directory owned by `tss`.
fn real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Looks for TPM material; `None` when the VM has none.
pub fn detect(data_dir: &Path) -> Option<TpmMaterial> {
    let marker = data_dir.join(".tpm-backup-marker").is_file();
    let state = data_dir.join("tpm-state");
    let state_dir = real_dir(&state).then_some(state);
    if !marker && state_dir.is_none() {
        return None;
    }
    let metadata_uuid = state_dir
        .as_ref()
        .and_then(|d| {
            nbdfmt::small::read_small_file(&d.join("BACKUP_METADATA.txt"), 64 * 1024).ok()
        })
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .and_then(|t| {
            t.lines().find_map(|l| {
                let rest = l.trim_start().strip_prefix("VM UUID:")?;
                rest.split_whitespace().next().map(str::to_owned)
            })
        });
    Some(TpmMaterial {
        marker,
        state_dir,
        metadata_uuid,
    })
}

/// Why a TPM restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// Marker without state, or state without `tpm2/`.
    #[error("Marker present but no tpm-state/ in {0}")]
    NoState(PathBuf),
    /// `tpm-state/` has no `tpm2/`.
    #[error("no tpm2/ in {0}")]
    NoTpm2(PathBuf),
    /// I/O.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmRestored {
    /// `<root>/<uuid>`.
    pub target: PathBuf,
    /// Where a previous state was moved.
    pub saved_previous: Option<PathBuf>,
    /// Owner of the copied state (`tss`, `swtpm`), if one existed.
    pub owner: Option<String>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TpmError + 'a {
    move |source| TpmError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), TpmError> {
    fs::create_dir_all(dst).map_err(io("creating", dst))?;
    let md = fs::metadata(src).map_err(io("reading", src))?;
    fs::set_permissions(dst, md.permissions()).map_err(io("chmod", dst))?;
    for e in fs::read_dir(src).map_err(io("reading", src))? {
        let e = e.map_err(io("reading", src))?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().map_err(io("reading", &s))?;
        if ft.is_dir() {
            copy_tree(&s, &d)?;
        } else if ft.is_file() {
            fs::copy(&s, &d).map_err(io("copying", &s))?;
            if let Ok(m) = fs::metadata(&s).and_then(|m| m.modified()) {
                let _ = fs::File::options()
                    .write(true)
                    .open(&d)
                    .and_then(|f| f.set_modified(m));
            }
        }
        // symlinks in a TPM state copy are not followed: they could point anywhere
    }
    Ok(())
}

/// Installs the state for `uuid` (spec §4.11): an existing non-empty target is moved
/// to `<target>.pre-restore-<epoch>`; target root-owned 0711, `tpm2` owned by tss
/// (else swtpm) 0700.
pub fn restore(
    material: &TpmMaterial,
    root: &Path,
    uuid: &str,
    epoch: u64,
) -> Result<TpmRestored, TpmError> {
    let state = material
        .state_dir
        .as_ref()
        .ok_or_else(|| TpmError::NoState(root.to_path_buf()))?;
    let tpm2 = state.join("tpm2");
    if !real_dir(&tpm2) {
        return Err(TpmError::NoTpm2(state.clone()));
    }
    if uuid.is_empty() || uuid.contains('/') || uuid.starts_with('.') {
        return Err(TpmError::Io {
            op: "using UUID",
            path: PathBuf::from(uuid),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a UUID"),
        });
    }
    let target = root.join(uuid);
    let mut saved_previous = None;
    if fs::read_dir(&target).is_ok_and(|mut d| d.next().is_some()) {
        let aside = root.join(format!("{uuid}.pre-restore-{epoch}"));
        fs::rename(&target, &aside).map_err(io("moving aside", &target))?;
        saved_previous = Some(aside);
    }
    fs::create_dir_all(&target).map_err(io("creating", &target))?;
    crate::host::ownership::chown_to(&target, &["root"]).map_err(io("chown", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o711))
        .map_err(io("chmod", &target))?;
    let dst = target.join("tpm2");
    copy_tree(&tpm2, &dst)?;
    let owner =
        crate::host::ownership::chown_tree(&dst, &["tss", "swtpm"]).map_err(io("chown", &dst))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &dst))?;
    Ok(TpmRestored {
        target,
        saved_previous,
        owner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_restores_with_previous_state_kept() {
        let d = tempfile::tempdir().expect("tmp");
        let data = d.path().join("data");
        fs::create_dir_all(data.join("tpm-state/tpm2")).expect("mkdir");
        fs::write(data.join("tpm-state/tpm2/tpm2-00.permall"), b"state").expect("w");
        fs::write(
            data.join("tpm-state/BACKUP_METADATA.txt"),
            "Backup: x\nVM UUID:            abc-123\n",
        )
        .expect("w");
        fs::write(data.join(".tpm-backup-marker"), "2026").expect("w");
        let m = detect(&data).expect("material");
        assert_eq!(m.metadata_uuid.as_deref(), Some("abc-123"));
        let root = d.path().join("swtpm");
        fs::create_dir_all(root.join("abc-123/tpm2")).expect("mkdir");
        fs::write(root.join("abc-123/tpm2/old"), b"old").expect("w");
        let r = restore(&m, &root, "abc-123", 42).expect("restore");
        assert_eq!(r.saved_previous, Some(root.join("abc-123.pre-restore-42")));
        assert_eq!(
            fs::read(root.join("abc-123/tpm2/tpm2-00.permall")).expect("r"),
            b"state"
        );
        assert!(!root.join("abc-123/tpm2/old").exists());
        let mode = fs::metadata(root.join("abc-123/tpm2"))
            .expect("md")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        assert!(detect(d.path()).is_none());
        fs::remove_dir_all(data.join("tpm-state")).expect("rm");
        let m = detect(&data).expect("marker only");
        assert!(matches!(
            restore(&m, &root, "abc-123", 43),
            Err(TpmError::NoState(_))
        ));
    }

    #[test]
    fn symlinked_tpm_state_is_not_tpm_state() {
        let d = tempfile::tempdir().expect("tmp");
        let secret = d.path().join("secret/tpm2");
        fs::create_dir_all(&secret).expect("mkdir");
        fs::write(secret.join("key"), b"root's").expect("w");
        let data = d.path().join("data");
        fs::create_dir_all(&data).expect("mkdir");
        fs::write(data.join(".tpm-backup-marker"), "2026").expect("w");
        std::os::unix::fs::symlink(d.path().join("secret"), data.join("tpm-state")).expect("ln");
        let m = detect(&data).expect("marker");
        assert!(m.state_dir.is_none());
        // and a real tpm-state whose tpm2 is a link
        fs::remove_file(data.join("tpm-state")).expect("rm");
        fs::create_dir(data.join("tpm-state")).expect("mkdir");
        std::os::unix::fs::symlink(&secret, data.join("tpm-state/tpm2")).expect("ln");
        let m = detect(&data).expect("material");
        let root = d.path().join("swtpm");
        assert!(matches!(
            restore(&m, &root, "abc-123", 1),
            Err(TpmError::NoTpm2(_))
        ));
        assert!(!root.join("abc-123/tpm2/key").exists());
    }
}
