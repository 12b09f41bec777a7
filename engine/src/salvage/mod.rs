//! Salvage: a plan for a damaged chain that restores every readable byte, and a
//! [`DamageReport`] saying which guest ranges are missing, stale or unverified.
//!
//! ```text
//!  chain slots ──walk (every frame checked, LZ4 decoded)──▶ good frames ──▶ DiskPlan ──▶ apply (unchanged)
//!  (gaps kept)            │                                                    │
//!                         └── lost frames, unknown tails, bad checksums ──▶ damage ranges
//! ```
//! Each member of the chain is read once here, tolerantly (`walk`): a damaged
//! file ends at its first unreadable frame (or, when that frame's length is still
//! trusted, loses only that frame) instead of failing. The frames that passed make
//! an ordinary [`DiskPlan`], so the write itself is the normal apply (read, zero
//! handling, read-back) over known-good frames; the normal, non-salvage path is
//! untouched. What is used, per kind of damage:
//!
//! | damage | used | map |
//! |---|---|---|
//! | truncated file | frames before the cut | the cut frame's extent exactly; everything after it unknown |
//! | corrupt LZ4 payload | frames before it; after it too when its stored length is trusted | the frame's extent; unknown tail when the pass stopped |
//! | corrupt header | frames before it; in an LZ4 stream also after it | unknown tail; in an LZ4 stream the span between its neighbours |
//! | `.chksum` mismatch | the whole file | every range still taken from it: unverified |
//! | missing incremental | — | the whole disk "possibly stale" except what newer members rewrote |
//! | broken link / unreadable meta | — | as missing |
//! | `.partial` incremental | — (mixing two checkpoints is worse than an older consistent state) | its readable frames: stale; after them unknown |
//! | `.partial` base | its readable frames (there is no older state) | after them: missing |

mod damage;
mod member;
mod walk;

pub use damage::MAX_RANGES;

use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, QcowInfo};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::plan::DiskPlan;
use member::member;

/// What became of one chain file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    /// Read completely, and its `.chksum` (if any) matches.
    Ok,
    /// It ends early.
    Truncated,
    /// A header, payload or its metadata is damaged.
    Corrupt,
    /// Not in the backup directory.
    Missing,
    /// Readable, but its adler32 differs from its `.chksum`.
    ChecksumMismatch,
    /// Only the `.partial` of an interrupted backup is there.
    Partial,
}

impl FileStatus {
    /// The word in the damage map.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Truncated => "truncated",
            Self::Corrupt => "corrupt",
            Self::Missing => "missing",
            Self::ChecksumMismatch => "checksum_mismatch",
            Self::Partial => "partial",
        }
    }
}

/// One chain file in the damage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDamage {
    /// The file (a missing one: where it would be).
    pub path: PathBuf,
    /// Its checkpoint.
    pub checkpoint: u32,
    /// What became of it.
    pub status: FileStatus,
    /// File offset of the (first) damage, when known.
    pub at_offset: Option<u64>,
    /// Why, in words.
    pub reason: Option<String>,
    /// True when (some of) its data is in the restored disk.
    pub used: bool,
}

impl FileDamage {
    /// The file name.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// What a damaged range of the guest disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// The data is lost and no older version exists: zeros were written.
    Missing,
    /// An older version was written (the newer one is lost, or may be).
    Stale,
    /// Written from a file whose checksum does not match.
    Unverified,
}

impl RangeState {
    /// The word in the damage map.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Stale => "stale",
            Self::Unverified => "unverified",
        }
    }
}

/// One damaged range of the guest disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// Guest disk offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// What it holds.
    pub state: RangeState,
    /// Why, in words.
    pub why: String,
    /// The chain file whose damage this is (name).
    pub file: String,
}

/// The damage found while planning a salvage restore of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamageReport {
    /// Disk target.
    pub disk: String,
    /// The restore point's checkpoint.
    pub checkpoint: u32,
    /// Size of the restored disk.
    pub virtual_size: u64,
    /// Every member of the chain, in order.
    pub files: Vec<FileDamage>,
    /// Damaged guest ranges, in disk order, not overlapping: at most
    /// [`MAX_RANGES`] of each state.
    pub ranges: Vec<DamagedRange>,
    /// Damaged ranges not listed (counted in [`bytes`](Self::bytes)).
    pub ranges_omitted: u64,
    /// Bytes by state (missing, stale, unverified), of every range.
    bytes: [u64; 3],
}

impl DamageReport {
    /// True when every file was read completely and verified as far as it can be:
    /// the salvage plan equals the normal one.
    pub fn is_clean(&self) -> bool {
        self.ranges.is_empty()
            && self.ranges_omitted == 0
            && self.files.iter().all(|f| f.status == FileStatus::Ok)
    }

    /// Bytes of the guest disk in `state` (listed ranges or not).
    pub fn bytes(&self, state: RangeState) -> u64 {
        self.bytes[damage::slot(state)]
    }

    /// Damaged ranges, listed or not.
    pub fn range_count(&self) -> u64 {
        self.ranges.len() as u64 + self.ranges_omitted
    }
}

/// A salvage plan: the readable frames as an ordinary plan, and what is damaged.
#[derive(Debug)]
pub struct Salvage {
    /// What the apply writes.
    pub plan: DiskPlan,
    /// What the restored disk lacks.
    pub damage: DamageReport,
}

/// Plans a salvage restore of `disk` at checkpoint `n` of `set` (with `newest`, a
/// differential on top of `n` too). Reads every member completely (frames, LZ4
/// payloads, checksums). The frames that passed are kept in temporary files in
/// `spill` (the system's temporary directory when `None`): a few bytes per frame on
/// disk, none in memory. Fails only when nothing of the disk is readable, a
/// temporary file cannot be written, or on a cancel — never on damage itself.
pub fn plan_point(
    set: &BackupSet,
    disk: &str,
    n: u32,
    newest: bool,
    spill: Option<&Path>,
    cancel: &Cancel,
) -> Result<Salvage> {
    let slots = set.chain_slots(disk, n, newest);
    let mut files = Vec::new();
    let mut layers = Vec::new();
    let mut report = Vec::new();
    let mut prev: Option<String> = None;
    for (i, slot) in slots.iter().enumerate() {
        cancel.check()?;
        let m = member(set, disk, slot, prev.as_deref(), i == 0, spill, cancel)?;
        prev = m.checkpoint_name.clone();
        report.push(m.file);
        layers.push(m.layer);
        files.extend(m.chain_file);
    }
    if files.is_empty() {
        let what: Vec<String> = report
            .iter()
            .map(|f| format!("{} {}", f.name(), f.status.as_str()))
            .collect();
        return Err(Error::Chain {
            disk: disk.to_owned(),
            message: format!("nothing of this disk can be salvaged ({})", what.join(", ")),
        });
    }
    let qcow = qcow_info(set, disk, n);
    let plan = DiskPlan::from_chain(disk, files, qcow)?;
    let ranges = damage::ranges(&layers, plan.virtual_size)?;
    Ok(Salvage {
        damage: DamageReport {
            disk: disk.to_owned(),
            checkpoint: n,
            virtual_size: plan.virtual_size,
            files: report,
            ranges: ranges.list,
            ranges_omitted: ranges.omitted,
            bytes: ranges.bytes,
        },
        plan,
    })
}

/// The image options at `n`; an unreadable `qcow.json` falls back to qemu's
/// defaults (a salvage does not stop for a side file).
fn qcow_info(set: &BackupSet, disk: &str, n: u32) -> Option<QcowInfo> {
    let p = set.qcow_json(disk, n)?;
    match nbdfmt::small::read_small_file(p, nbdfmt::sidecar::MAX_SIDECAR_LEN)
        .map_err(|e| e.to_string())
        .and_then(|b| QcowInfo::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::warn!(target: "restore_disk", "{}: {e} — using qemu's default image options", p.display());
            None
        }
    }
}

/// Where the damage map of a disk restored to `final_path` goes.
pub fn map_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".damage.json");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests;
