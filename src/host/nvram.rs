//! UEFI NVRAM pairing (spec §4.10): the NVRAM copy saved with the restore point's
//! checkpoint is installed, and whatever was at the destination is kept aside.

use std::fs;
use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, SetKind};

/// The NVRAM copy chosen for a restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvramPick {
    /// The file in the backup.
    pub source: PathBuf,
    /// Its checkpoint (`None` for a copy backup's bare file).
    pub checkpoint: Option<u32>,
}

/// Picks `<base>.virtnbdbackup.<T>` (or the highest earlier one) for the domain's
/// `<nvram>` path; any `*_VARS*.fd` copy when the base name has none; the bare file
/// for copy backups.
pub fn pick(set: &BackupSet, nvram_path: &str, point: u32) -> Option<NvramPick> {
    let base = Path::new(nvram_path)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if set.kind == SetKind::Copy {
        let p = set.dir.join(&base);
        return p.is_file().then_some(NvramPick {
            source: p,
            checkpoint: None,
        });
    }
    let choose = |pred: &dyn Fn(&str) -> bool| {
        set.boot_files
            .iter()
            .filter(|(b, n, _)| pred(b) && *n <= point)
            .max_by_key(|(_, n, _)| *n)
            .map(|(_, n, p)| NvramPick {
                source: p.clone(),
                checkpoint: Some(*n),
            })
    };
    choose(&|b| b == base).or_else(|| choose(&|b| b.contains("_VARS") && b.ends_with(".fd")))
}

/// Moves an existing file aside as `<path>.before-restore.<epoch>`; returns the new name.
pub fn save_existing(path: &Path, epoch: u64) -> std::io::Result<Option<PathBuf>> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".before-restore.{epoch}"));
    let aside = PathBuf::from(aside);
    fs::copy(path, &aside)?;
    Ok(Some(aside))
}

/// Copies `source` to `dest` (through a temporary name), owned by libvirt-qemu when
/// that user exists, mode 0600.
pub fn install(source: &Path, dest: &Path) -> std::io::Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("vmrestore-tmp");
    fs::copy(source, &tmp)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    crate::host::ownership::chown_to(&tmp, &["libvirt-qemu"])?;
    fs::rename(&tmp, dest)
}
