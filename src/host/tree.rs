//! The backup tree around the data dirs (spec §2): VM directories, period
//! candidates in GNU `sort -V` order, archived chains, data-dir resolution (§2.5),
//! VM name resolution (§2.6), the state root (§5.1) and `du`-style disk usage.
//!
//! Everything about the *contents* of one data dir (type, restore points, disk
//! sets, completeness) comes from [`nbdfmt::BackupSet`]; file names are classified
//! only with [`nbdfmt::BackupFile::parse`]. Read-only: nothing here writes.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nbdfmt::backupset::read_domain_config;
use nbdfmt::sidecar::Ident;
use nbdfmt::{BackupFile, StreamLevel};

use crate::error::AppError;

/// The state directory of a backup root; never a VM.
pub const STATE_DIR: &str = "_state";

/// Sub-directories of a VM dir that are never periods.
const NOT_PERIODS: [&str; 3] = ["config", "checkpoints", "tpm-state"];

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

fn is_dir(p: &Path) -> bool {
    p.is_dir()
}

/// Names of the sub-directories of `dir` (following symlinks, like a shell glob).
/// A name that is not UTF-8 cannot be a libvirt name or be typed back: it is left
/// out with a WARN naming it (escaped), never silently.
fn sub_dirs(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| is_dir(&e.path()))
        .filter_map(|e| {
            let name = e.file_name();
            let utf8 = name.to_str().map(str::to_owned);
            if utf8.is_none() {
                tracing::warn!(target: "main", "Skipping {}: the directory name is not UTF-8", e.path().display());
            }
            utf8
        })
        .collect()
}

/// §2.3: `dir` directly holds a regular `*.full.data`, `*.inc.virtnbdbackup.N.data`
/// or `*.copy.data` file (`.partial` leftovers do not count).
pub fn has_backup_data(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else {
        return false;
    };
    rd.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            return false;
        };
        matches!(
            BackupFile::parse(name),
            BackupFile::Stream {
                level: StreamLevel::Full | StreamLevel::Copy | StreamLevel::Inc(_),
                partial: false,
                ..
            }
        ) && fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_file())
    })
}

/// §3.1: the VM directories of a backup root: non-hidden sub-directories except
/// `_state`, in byte order.
pub fn vm_dirs(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = sub_dirs(root)
        .into_iter()
        .filter(|n| !is_hidden(n) && n != STATE_DIR)
        .collect();
    v.sort();
    v
}

/// §2.2: period candidates of a VM dir (any non-hidden sub-directory except
/// `config`, `checkpoints`, `tpm-state`), newest first in version order
/// (`sort -rV`), empty ones included.
pub fn period_candidates(vm_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = sub_dirs(vm_dir)
        .into_iter()
        .filter(|n| !is_hidden(n) && !NOT_PERIODS.contains(&n.as_str()))
        .collect();
    sort_version_desc(&mut v);
    v
}

/// Sorts like GNU `sort -rV`: `filevercmp` descending, ties broken by bytes.
pub fn sort_version_desc(v: &mut [String]) {
    v.sort_by(|a, b| filevercmp(b.as_bytes(), a.as_bytes()).then_with(|| b.cmp(a)));
}

/// `chain-*` directories of `<owner>/.archives`, in name order.
pub fn archive_chains(owner: &Path) -> Vec<PathBuf> {
    let dir = owner.join(".archives");
    let mut v: Vec<String> = sub_dirs(&dir)
        .into_iter()
        .filter(|n| n.starts_with("chain-"))
        .collect();
    v.sort();
    v.into_iter().map(|n| dir.join(n)).collect()
}

/// True when `dir`'s parent is named `.archives` (an archived chain, §2.4).
pub fn is_archive(dir: &Path) -> bool {
    dir.parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == ".archives")
}

/// §2.2 period name patterns: `YYYYMMDD`, `YYYY-Www`, `YYYYMM`.
pub fn is_period_name(name: &str) -> bool {
    let b = name.as_bytes();
    let digits = |r: &[u8]| r.iter().all(u8::is_ascii_digit);
    match b.len() {
        6 => digits(b),
        8 => digits(b) || (digits(&b[..4]) && &b[4..6] == b"-W" && digits(&b[6..])),
        _ => false,
    }
}

/// `du -s` in bytes: allocated blocks × 512 of `path` and everything below it,
/// each inode counted once, symlinks not followed. Unreadable parts count as 0.
pub fn disk_usage(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if seen.insert((md.dev(), md.ino())) {
            total = total.saturating_add(md.blocks().saturating_mul(512));
        }
        if md.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(Result::ok).map(|e| e.path()));
            }
        }
    }
    total
}

/// Why a data dir could not be resolved (§2.5). The caller words the output:
/// logged modes and listings print these differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// `R/V` does not exist.
    VmDirMissing(PathBuf),
    /// `R/V/P` is not a directory.
    PeriodMissing(PathBuf),
    /// The VM dir has no data and no period candidates.
    NoPeriods(PathBuf),
    /// The resolved dir has no data files.
    NoData(PathBuf),
}

/// A resolved data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    /// The directory holding the `*.data` files.
    pub path: PathBuf,
    /// True when the backup root itself is the data dir (step 1).
    pub direct: bool,
}

/// §2.5 data-dir resolution for root `root`, VM label `label`, optional period.
pub fn resolve_data_dir(
    root: &Path,
    label: &str,
    period: Option<&str>,
) -> Result<DataDir, ResolveError> {
    if has_backup_data(root) {
        return Ok(DataDir {
            path: root.to_path_buf(),
            direct: true,
        });
    }
    let vm_dir = root.join(label);
    if !is_dir(&vm_dir) {
        return Err(ResolveError::VmDirMissing(vm_dir));
    }
    let dir = if let Some(p) = period {
        let d = vm_dir.join(p);
        if !is_dir(&d) {
            return Err(ResolveError::PeriodMissing(d));
        }
        d
    } else if has_backup_data(&vm_dir) {
        vm_dir
    } else {
        let periods = period_candidates(&vm_dir);
        let Some(first) = periods.first() else {
            return Err(ResolveError::NoPeriods(vm_dir));
        };
        let with_data = periods.iter().find(|p| has_backup_data(&vm_dir.join(p)));
        vm_dir.join(with_data.unwrap_or(first))
    };
    if !has_backup_data(&dir) {
        return Err(ResolveError::NoData(dir));
    }
    Ok(DataDir {
        path: dir,
        direct: false,
    })
}

/// [`resolve_data_dir`] for the logged modes (restore, verify, dump): logs the
/// spec's INFO/ERROR lines and maps failures to exit 5 errors.
pub fn resolve_data_dir_logged(
    root: &Path,
    label: &str,
    period: Option<&str>,
) -> Result<PathBuf, AppError> {
    let cannot = || AppError::Vm(format!("Cannot resolve data directory for {label}"));
    match resolve_data_dir(root, label, period) {
        Ok(d) => {
            if d.direct {
                tracing::info!(target: "resolve_data_dir", "Using direct backup path: {}", d.path.display());
            }
            Ok(d.path)
        }
        Err(ResolveError::VmDirMissing(p)) => Err(AppError::Vm(format!(
            "VM directory not found: {}",
            p.display()
        ))),
        Err(ResolveError::PeriodMissing(p)) => {
            tracing::error!(target: "resolve_data_dir", "Period not found: {}", p.display());
            Err(cannot())
        }
        Err(ResolveError::NoPeriods(p)) => {
            tracing::error!(target: "resolve_data_dir", "No period directories in: {}", p.display());
            Err(cannot())
        }
        Err(ResolveError::NoData(p)) => Err(AppError::Vm(format!(
            "No backup data files in: {}",
            p.display()
        ))),
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest file of `files` by mtime (ties: the later one in the given order).
fn newest(files: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    files
        .into_iter()
        .filter_map(|p| Some((mtime(&p)?, p)))
        .fold(
            None,
            |best: Option<(SystemTime, PathBuf)>, (t, p)| match best {
                Some((bt, bp)) if bt > t => Some((bt, bp)),
                _ => Some((t, p)),
            },
        )
        .map(|(_, p)| p)
}

fn xml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml") && p.is_file())
        .collect();
    v.sort();
    v
}

/// §2.6 search order for the VM config XML of a data dir: newest
/// `vmconfig.virtnbdbackup.*.xml`, `vmconfig.copy.xml`, newest `config/*.xml` of the
/// data dir, then of its parent.
pub fn vm_config_candidates(data_dir: &Path) -> Vec<PathBuf> {
    let mut vmconfigs: Vec<(u32, PathBuf)> = xml_files(data_dir)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            match BackupFile::parse(&name) {
                BackupFile::VmConfig {
                    ident: Ident::Checkpoint(n),
                } => Some((n, p)),
                _ => None,
            }
        })
        .collect();
    vmconfigs.sort();
    let mut out = Vec::new();
    out.extend(newest(vmconfigs.into_iter().map(|(_, p)| p)));
    let copy = data_dir.join("vmconfig.copy.xml");
    if copy.is_file() {
        out.push(copy);
    }
    out.extend(newest(xml_files(&data_dir.join("config"))));
    if let Some(parent) = data_dir.parent() {
        out.extend(newest(xml_files(&parent.join("config"))));
    }
    out
}

/// §2.6: the domain `<name>` from the first config XML found that has one.
pub fn resolve_vm_name(data_dir: &Path) -> Option<String> {
    vm_name_with_source(data_dir).map(|(n, _)| n)
}

/// [`resolve_vm_name`] and the file it came from.
pub fn vm_name_with_source(data_dir: &Path) -> Option<(String, PathBuf)> {
    vm_config_candidates(data_dir)
        .into_iter()
        .find_map(|p| Some((read_domain_config(&p).ok()?.name?, p)))
}

/// §5.1: the backup root for the lock and catalogue. Name-based: the effective
/// root. Path-aware: walk up from the data dir (archive → owner; a period-named
/// owner → its parent is the VM dir; the VM dir's parent is the state root).
pub fn state_root(data_dir: &Path, path_aware: bool, effective_root: &Path) -> PathBuf {
    if !path_aware {
        return effective_root.to_path_buf();
    }
    let owner = if is_archive(data_dir) {
        data_dir.parent().and_then(Path::parent).unwrap_or(data_dir)
    } else {
        data_dir
    };
    let owner_is_period = owner
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_period_name);
    let vm_dir = if owner_is_period {
        owner.parent().unwrap_or(owner)
    } else {
        owner
    };
    match vm_dir.parent() {
        // `--vm vm/2026-W10` typed in the backup root: the root is the current directory
        Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
        Some(p) => p.to_path_buf(),
        None => effective_root.to_path_buf(),
    }
}

/// GNU `filevercmp` (gnulib 2022), the comparison behind `sort -V`.
pub fn filevercmp(a: &[u8], b: &[u8]) -> Ordering {
    if a.is_empty() || b.is_empty() {
        return a.len().min(1).cmp(&b.len().min(1));
    }
    if a[0] == b'.' {
        if b[0] != b'.' {
            return Ordering::Less;
        }
        for special in [&b"."[..], &b".."[..]] {
            match (a == special, b == special) {
                (true, true) => return Ordering::Equal,
                (true, false) => return Ordering::Less,
                (false, true) => return Ordering::Greater,
                _ => {}
            }
        }
    } else if b[0] == b'.' {
        return Ordering::Greater;
    }
    let ap = file_prefixlen(a);
    let bp = file_prefixlen(b);
    let one_pass = ap == a.len() && bp == b.len();
    let r = verrevcmp(&a[..ap], &b[..bp]);
    if r != 0 || one_pass {
        return r.cmp(&0);
    }
    verrevcmp(a, b).cmp(&0)
}

/// Length of `s` without its file suffix (`(\.[A-Za-z~][A-Za-z0-9~]*)*$`).
fn file_prefixlen(s: &[u8]) -> usize {
    let n = s.len();
    let mut prefixlen = 0;
    let mut i = 0;
    loop {
        if i == n {
            return prefixlen;
        }
        i += 1;
        prefixlen = i;
        while i + 1 < n && s[i] == b'.' && (s[i + 1].is_ascii_alphabetic() || s[i + 1] == b'~') {
            i += 2;
            while i < n && (s[i].is_ascii_alphanumeric() || s[i] == b'~') {
                i += 1;
            }
        }
    }
}

fn order(c: u8) -> i32 {
    if c.is_ascii_digit() {
        0
    } else if c.is_ascii_alphabetic() {
        i32::from(c)
    } else if c == b'~' {
        -1
    } else {
        i32::from(c) + 256
    }
}

fn verrevcmp(s1: &[u8], s2: &[u8]) -> i32 {
    let (mut p1, mut p2) = (0, 0);
    while p1 < s1.len() || p2 < s2.len() {
        let mut first_diff = 0;
        while (p1 < s1.len() && !s1[p1].is_ascii_digit())
            || (p2 < s2.len() && !s2[p2].is_ascii_digit())
        {
            let c1 = if p1 == s1.len() { 0 } else { order(s1[p1]) };
            let c2 = if p2 == s2.len() { 0 } else { order(s2[p2]) };
            if c1 != c2 {
                return c1 - c2;
            }
            p1 += 1;
            p2 += 1;
        }
        while p1 < s1.len() && s1[p1] == b'0' {
            p1 += 1;
        }
        while p2 < s2.len() && s2[p2] == b'0' {
            p2 += 1;
        }
        while p1 < s1.len() && p2 < s2.len() && s1[p1].is_ascii_digit() && s2[p2].is_ascii_digit() {
            if first_diff == 0 {
                first_diff = i32::from(s1[p1]) - i32::from(s2[p2]);
            }
            p1 += 1;
            p2 += 1;
        }
        if p1 < s1.len() && s1[p1].is_ascii_digit() {
            return 1;
        }
        if p2 < s2.len() && s2[p2].is_ascii_digit() {
            return -1;
        }
        if first_diff != 0 {
            return first_diff;
        }
    }
    0
}

/// Scans the data directory `dir` (spec §2): one classification for every command —
/// a directory that cannot be read is an I/O failure (exit 1) naming it; damaged
/// files are problems of the restore points they affect, not errors here.
pub fn scan_set(dir: &Path) -> Result<nbdfmt::BackupSet, AppError> {
    nbdfmt::BackupSet::scan(dir).map_err(|e| AppError::Io {
        context: format!("reading {}", dir.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        sort_version_desc(&mut v);
        v
    }

    #[test]
    fn version_order_is_sort_rv() {
        // §2.5: across policies version order is not chronological, on purpose
        assert_eq!(
            sorted(&["2026-W10", "202603", "20260302"]),
            ["20260302", "202603", "2026-W10"]
        );
        assert_eq!(
            sorted(&["2026-W10", "2026-W11", "2026-W09"]),
            ["2026-W11", "2026-W10", "2026-W09"]
        );
        assert_eq!(
            sorted(&["20260202", "20260204", "20260203"]),
            ["20260204", "20260203", "20260202"]
        );
        assert_eq!(sorted(&["a2", "a10", "a1"]), ["a10", "a2", "a1"]);
        assert_eq!(sorted(&["chain", "2026-W01"]), ["chain", "2026-W01"]);
        assert_eq!(filevercmp(b"x1.tar.gz", b"x10.tar.gz"), Ordering::Less);
        assert_eq!(filevercmp(b"1.0~rc1", b"1.0"), Ordering::Less);
        assert_eq!(filevercmp(b"", b"a"), Ordering::Less);
        assert_eq!(filevercmp(b".", b".."), Ordering::Less);
        assert_eq!(filevercmp(b".x", b"a"), Ordering::Less);
        assert_eq!(filevercmp(b"007", b"7"), Ordering::Equal);
        assert_eq!(sorted(&["7", "007"]), ["7", "007"]);
    }

    #[test]
    fn period_names() {
        for ok in ["20260302", "2026-W09", "202603"] {
            assert!(is_period_name(ok), "{ok}");
        }
        for bad in [
            "2026-W9",
            "chain",
            "2026030",
            "2026-w09",
            "2026-X09",
            "accumulate",
        ] {
            assert!(!is_period_name(bad), "{bad}");
        }
    }

    #[test]
    fn state_roots() {
        let r = Path::new("/ignored");
        assert_eq!(
            state_root(Path::new("/b/vm/2026-W10"), true, r),
            PathBuf::from("/b")
        );
        assert_eq!(
            state_root(
                Path::new("/b/vm/2026-W10/.archives/chain-2026-03-04"),
                true,
                r
            ),
            PathBuf::from("/b")
        );
        assert_eq!(
            state_root(Path::new("/b/app"), true, r),
            PathBuf::from("/b")
        );
        assert_eq!(
            state_root(Path::new("/b/app/.archives/chain-2026-07-03"), true, r),
            PathBuf::from("/b")
        );
        assert_eq!(
            state_root(Path::new("/b/vm/20260302"), false, r),
            PathBuf::from("/ignored")
        );
        // relative paths typed inside the backup root
        assert_eq!(
            state_root(Path::new("vm/2026-W10"), true, r),
            PathBuf::from(".")
        );
        assert_eq!(state_root(Path::new("./vm"), true, r), PathBuf::from("."));
        assert_eq!(state_root(Path::new("b/vm"), true, r), PathBuf::from("b"));
    }

    #[test]
    fn resolution_steps() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path();
        let vm = root.join("vm");
        fs::create_dir_all(vm.join("2026-W10")).expect("mkdir");
        fs::create_dir_all(vm.join("2026-W11")).expect("mkdir");
        fs::create_dir_all(vm.join("config")).expect("mkdir");
        fs::write(vm.join("2026-W10/vda.full.data"), b"x").expect("write");
        fs::write(vm.join("2026-W11/vda.full.data.partial"), b"x").expect("write");
        // statement 60: the empty newer period is skipped
        assert_eq!(
            resolve_data_dir(root, "vm", None).expect("ok").path,
            vm.join("2026-W10")
        );
        assert_eq!(
            resolve_data_dir(root, "vm", Some("2026-W11")),
            Err(ResolveError::NoData(vm.join("2026-W11")))
        );
        assert_eq!(
            resolve_data_dir(root, "vm", Some("19990101")),
            Err(ResolveError::PeriodMissing(vm.join("19990101")))
        );
        assert_eq!(
            resolve_data_dir(root, "nosuch", None),
            Err(ResolveError::VmDirMissing(root.join("nosuch")))
        );
        fs::create_dir_all(root.join("empty")).expect("mkdir");
        assert_eq!(
            resolve_data_dir(root, "empty", None),
            Err(ResolveError::NoPeriods(root.join("empty")))
        );
        // step 1: the root itself holds data
        assert!(
            resolve_data_dir(&vm.join("2026-W10"), "whatever", None)
                .expect("ok")
                .direct
        );
        assert_eq!(period_candidates(&vm), ["2026-W11", "2026-W10"]);
        assert_eq!(vm_dirs(root), ["empty", "vm"]);
    }
}
