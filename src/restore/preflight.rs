//! Pre-flight checks that run before anything is touched: free space with the 10 %
//! headroom rule, predicted outputs against every live disk of every domain, and
//! path containment (`realpath -m` semantics).

use std::path::{Path, PathBuf};

pub use crate::host::paths::{canonicalize_lenient, is_inside};

use nbdfmt::{BackupSet, SetKind, StreamLevel};

use crate::hypervisor::{DomainState, LiveDisk};

/// Bytes available to us on the filesystem holding `dir` (or its nearest existing
/// ancestor), and that directory. `None` when unknown.
pub fn free_space(dir: &Path) -> Option<(u64, PathBuf)> {
    let mut d = canonicalize_lenient(dir);
    loop {
        if d.is_dir() {
            let s = nix::sys::statvfs::statvfs(&d).ok()?;
            // the field types differ between libc targets (u32 on some)
            #[allow(clippy::useless_conversion)]
            let free = u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()));
            return (free > 0).then_some((free, d));
        }
        if !d.pop() {
            return None;
        }
    }
}

/// Spec §4.3: apparent size of the data files a restore of checkpoint `point` reads.
pub fn backup_bytes(set: &BackupSet, point: Option<u32>) -> (u64, usize) {
    let mut bytes = 0;
    let mut n = 0;
    for f in set.disks.values().flatten() {
        let take = match (set.kind, f.level) {
            (SetKind::Copy, StreamLevel::Copy)
            | (SetKind::Full | SetKind::Incremental, StreamLevel::Full) => true,
            (SetKind::Incremental, StreamLevel::Inc(i)) => point.is_none_or(|p| i <= p),
            _ => false,
        };
        if take {
            bytes += f.size;
            n += 1;
        }
    }
    (bytes, n)
}

/// How a predicted output collides with what exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collision {
    /// Another VM's live disk: never allowed.
    OtherVmDisk {
        /// The file.
        file: PathBuf,
        /// Its VM.
        vm: String,
    },
    /// The source VM's disk while it runs: never allowed.
    RunningVmDisk {
        /// The file.
        file: PathBuf,
        /// The VM.
        vm: String,
    },
    /// The source VM's disk, VM shut off: allowed with `--force` (DR).
    ShutOffVmDisk {
        /// The file.
        file: PathBuf,
        /// The VM.
        vm: String,
    },
    /// A file that is nobody's disk: allowed with `--force`.
    FileExists {
        /// The file.
        file: PathBuf,
    },
    /// Two disks of the restore point would get this same file (their sources
    /// share a basename): never allowed.
    SharedOutput {
        /// The file.
        file: PathBuf,
    },
}

impl Collision {
    /// True when `--force` cannot override it.
    pub fn blocks_even_with_force(&self) -> bool {
        matches!(
            self,
            Self::OtherVmDisk { .. } | Self::RunningVmDisk { .. } | Self::SharedOutput { .. }
        )
    }

    /// The spec's BLOCKED text (§3.6).
    pub fn blocked_message(&self) -> String {
        match self {
            Self::OtherVmDisk { file, vm } => {
                format!("BLOCKED: {} is the live disk of VM '{vm}' — choose a different --restore-path", file.display())
            }
            Self::RunningVmDisk { file, vm } => {
                format!("BLOCKED: {} is the live disk of running VM '{vm}' — shut it off first", file.display())
            }
            Self::ShutOffVmDisk { file, vm } => {
                format!("BLOCKED: {} is the disk of VM '{vm}' — use --force for disaster recovery", file.display())
            }
            Self::FileExists { file } => format!("BLOCKED: File already exists: {} — use --force to overwrite", file.display()),
            Self::SharedOutput { file } => format!(
                "BLOCKED: {} would be written for more than one disk (their source files have the same name) — restore them one by one with --disk and different --restore-path values",
                file.display()
            ),
        }
    }

    /// The WARN text when `--force` allows it.
    pub fn forced_message(&self) -> String {
        match self {
            Self::ShutOffVmDisk { file, vm } => {
                format!("Will overwrite disk of shut-off VM '{vm}': {} (disaster recovery with --force)", file.display())
            }
            Self::FileExists { file } => {
                format!("File exists and will be overwritten: {}", file.display())
            }
            other => other.blocked_message(),
        }
    }
}

/// Checks each predicted final path (spec §4.2 table). `source_vm` is the resolved
/// source VM name (also for clones); `state_of` gives a domain's state.
pub fn collisions(
    finals: &[PathBuf],
    live: &[LiveDisk],
    source_vm: &str,
    state_of: &dyn Fn(&str) -> Option<DomainState>,
) -> Vec<Collision> {
    let live: Vec<(PathBuf, &LiveDisk)> = live
        .iter()
        .map(|l| (canonicalize_lenient(&l.path), l))
        .collect();
    let mut out = Vec::new();
    let canon: Vec<PathBuf> = finals.iter().map(|f| canonicalize_lenient(f)).collect();
    for (i, f) in finals.iter().enumerate() {
        let c = canonicalize_lenient(f);
        if canon[..i].contains(&c) {
            continue;
        }
        if canon[i + 1..].contains(&c) {
            out.push(Collision::SharedOutput { file: f.clone() });
        }
        if let Some((_, l)) = live.iter().find(|(p, _)| *p == c) {
            let file = f.clone();
            let vm = l.domain.clone();
            out.push(if l.domain != source_vm {
                Collision::OtherVmDisk { file, vm }
            } else if state_of(&l.domain).is_some_and(DomainState::is_active) {
                Collision::RunningVmDisk { file, vm }
            } else {
                Collision::ShutOffVmDisk { file, vm }
            });
        } else if std::fs::symlink_metadata(f).is_ok() {
            out.push(Collision::FileExists { file: f.clone() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_is_component_wise_and_follows_symlinks() {
        let d = tempfile::tempdir().expect("tmp");
        let bk = d.path().join("bk");
        std::fs::create_dir_all(&bk).expect("mkdir");
        assert!(is_inside(&bk.join("restore/x"), &bk));
        assert!(is_inside(&bk, &bk));
        assert!(is_inside(&bk.join("a/../b"), &bk));
        assert!(!is_inside(&d.path().join("bk2"), &bk));
        assert!(!is_inside(&bk.join(".."), &bk));
        std::os::unix::fs::symlink(&bk, d.path().join("link")).expect("symlink");
        assert!(is_inside(&d.path().join("link/restore"), &bk));
    }

    #[test]
    fn collision_table() {
        let d = tempfile::tempdir().expect("tmp");
        let existing = d.path().join("exists.qcow2");
        std::fs::write(&existing, b"x").expect("w");
        let live = vec![
            LiveDisk {
                domain: "other".into(),
                target: "vda".into(),
                path: d.path().join("other.qcow2"),
                device: "disk".into(),
            },
            LiveDisk {
                domain: "vm".into(),
                target: "vda".into(),
                path: d.path().join("vm.qcow2"),
                device: "disk".into(),
            },
        ];
        let finals = vec![
            d.path().join("other.qcow2"),
            d.path().join("vm.qcow2"),
            existing.clone(),
            d.path().join("new.qcow2"),
        ];
        let running = |_: &str| Some(DomainState::Running);
        let off = |_: &str| Some(DomainState::ShutOff);
        let c = collisions(&finals, &live, "vm", &running);
        assert!(matches!(&c[0], Collision::OtherVmDisk { vm, .. } if vm == "other"));
        assert!(matches!(&c[1], Collision::RunningVmDisk { .. }));
        assert!(matches!(&c[2], Collision::FileExists { .. }));
        assert_eq!(c.len(), 3);
        let c = collisions(&finals, &live, "vm", &off);
        assert!(matches!(&c[1], Collision::ShutOffVmDisk { .. }) && !c[1].blocks_even_with_force());
        let twice = vec![d.path().join("new.qcow2"), d.path().join("x/../new.qcow2")];
        let c = collisions(&twice, &live, "vm", &off);
        assert!(
            matches!(&c[..], [Collision::SharedOutput { .. }]) && c[0].blocks_even_with_force(),
            "{c:?}"
        );
        assert!(free_space(d.path()).is_some_and(|(f, _)| f > 0));
    }
}
