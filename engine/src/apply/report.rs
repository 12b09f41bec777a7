//! What [`apply`](super::apply()) reports: a [`DiskReport`] per disk, in an
//! [`ApplyReport`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nbdfmt::checksum::ChecksumStatus;

use crate::plan::DiskPlan;

/// What happened to one disk.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    /// Disk target.
    pub disk: String,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Data bytes that were all zero and left unallocated on a fresh target.
    pub bytes_zero_skipped: u64,
    /// Bytes explicitly zeroed (holes on targets that did not start zeroed).
    pub bytes_zeroed: u64,
    /// Bytes of backup files read.
    pub bytes_read: u64,
    /// Per chain file: the checksum outcome (`None`: no `.chksum`, or not verified).
    pub checksums: Vec<(PathBuf, Option<ChecksumStatus>)>,
    /// True when the content was read back and matched.
    pub readback_verified: bool,
    /// Wall time for this disk.
    pub duration: Duration,
}

/// What happened to all disks.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Per disk, in plan order.
    pub disks: Vec<DiskReport>,
    /// Total wall time.
    pub duration: Duration,
}

/// Per chain file: its checksum outcome and the bytes read for it.
pub(super) type FileStatuses = BTreeMap<PathBuf, (Option<ChecksumStatus>, u64)>;

/// Per chain file of each disk: its checksum outcome and the bytes read for it.
pub(super) fn attach_checksums(
    plans: &[DiskPlan],
    reports: &mut [DiskReport],
    statuses: &FileStatuses,
) {
    for (plan, rep) in plans.iter().zip(reports.iter_mut()) {
        for f in &plan.files {
            let (s, read) = statuses.get(&f.path).cloned().unwrap_or((None, 0));
            rep.checksums.push((f.path.clone(), s));
            rep.bytes_read += read;
        }
    }
}
