//! UEFI NVRAM pairing (spec §4.10): the NVRAM copy saved with the restore point's
//! checkpoint is installed, and whatever was at the destination is kept aside.

use std::fs;
use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, SetKind};

/// libvirt's NVRAM directory for the system instance (`VMRESTORE_NVRAM_DIR` overrides
/// it, as `VMRESTORE_SWTPM_ROOT` does swtpm's root): the only directory a restore
/// writes NVRAM files into.
pub fn home() -> PathBuf {
    std::env::var_os("VMRESTORE_NVRAM_DIR").map_or_else(
        || PathBuf::from("/var/lib/libvirt/qemu/nvram"),
        PathBuf::from,
    )
}

/// Where an NVRAM file that a domain XML puts at `path` is written for domain `owner`:
/// into `dir` under the path's own file name when that is libvirt's name for the
/// domain's NVRAM (`<owner>_VARS…`), else as `<owner>_VARS.fd`. The XML comes from
/// the backup, a replica anyone may have written, and vmrestore runs as root: a path
/// such as `/etc/cron.d/x` or `…/nvram/../../../root/.ssh/authorized_keys` would have
/// made it install the backup's bytes there, and `…/nvram/<other vm>_VARS.fd` would
/// have replaced another domain's NVRAM. A path already in `dir` (after symlinks)
/// under such a name is kept as it is.
pub fn confined(path: &Path, dir: &Path, owner: &str) -> PathBuf {
    use crate::host::paths::canonicalize_lenient;
    let in_dir = path.is_absolute()
        && path.parent().is_some_and(|p| {
            !path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
                && canonicalize_lenient(p) == canonicalize_lenient(dir)
        });
    let own = format!("{owner}_VARS");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| crate::host::names::unsafe_component(n).is_none() && n.starts_with(&own));
    match name {
        Some(_) if in_dir => path.to_path_buf(),
        Some(n) => dir.join(n),
        None => dir.join(format!("{own}.fd")),
    }
}

/// A domain XML whose `<nvram>` uses libvirt's element form (`<source file=…/>`, or a
/// network source) names a host file vmrestore would neither install nor rewrite: a
/// crafted backup could make libvirt create, take over or (`undefine --nvram`) delete
/// any file. Refused (exit 5), naming the XML.
pub fn refuse_element_form(
    cfg: &nbdfmt::DomainConfig,
    xml: &Path,
) -> Result<(), crate::error::AppError> {
    if !cfg.nvram_elements {
        return Ok(());
    }
    Err(crate::error::AppError::Vm(format!(
        "{}: <nvram> names its file in a <source> element, which vmrestore does not restore or rewrite — give it the path as text (<nvram>/var/lib/libvirt/qemu/nvram/<vm>_VARS.fd</nvram>) or restore with --skip-config",
        xml.display()
    )))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvram_destinations_stay_in_the_nvram_directory() {
        let d = tempfile::tempdir().expect("tmp");
        let home = d.path().join("nvram");
        std::fs::create_dir(&home).expect("mkdir");
        let inside = home.join("vm_VARS.fd");
        assert_eq!(confined(&inside, &home, "vm"), inside);
        // a symlinked spelling of the same directory is the same directory
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&home, &link).expect("ln");
        let via = link.join("vm_VARS.fd");
        assert_eq!(confined(&via, &home, "vm"), via);
        let own = home.join("vm_VARS.fd");
        for hostile in [
            "/etc/cron.d/x",
            "/root/.ssh/authorized_keys",
            "relative_VARS.fd",
            "/",
        ] {
            assert_eq!(confined(Path::new(hostile), &home, "vm"), own, "{hostile}");
        }
        // elsewhere under the domain's own name: moved into the directory
        assert_eq!(confined(Path::new("/etc/x/vm_VARS.fd"), &home, "vm"), own);
        assert_eq!(
            confined(&home.join("../../../etc/shadow"), &home, "vm"),
            own
        );
        // another domain's NVRAM is never the target
        assert_eq!(confined(&home.join("other_VARS.fd"), &home, "vm"), own);
        assert_eq!(confined(&home.join("vm_b_VARS.fd"), &home, "vm"), own);
        assert_eq!(confined(&home.join("vm_VARS\nb"), &home, "vm"), own);
        assert_eq!(
            confined(&home.join("vm_VARS.qcow2"), &home, "vm"),
            home.join("vm_VARS.qcow2")
        );
    }
}
