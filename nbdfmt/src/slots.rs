//! A disk's chain as slots, for a salvage restore: like [`BackupSet::chain`], but a
//! gap does not end it. Every checkpoint from the base to the restore point has a
//! slot that holds its data file, or says that the file is missing or that only an
//! interrupted backup's `.partial` is there. Whether a present file is readable and
//! links to the one before is for whoever reads it to judge.

use std::path::Path;

use crate::backupset::{BackupSet, StreamFile};
use crate::meta::StreamMeta;
use crate::sidecar::StreamLevel;

/// What a slot of the chain holds.
#[derive(Debug, Clone, Copy)]
pub enum SlotFile<'a> {
    /// The data file (readable or not).
    Present(&'a StreamFile),
    /// Only the `.partial` leftover of an interrupted backup.
    Partial(&'a Path),
    /// Nothing.
    Missing,
}

/// One checkpoint of a disk's chain.
#[derive(Debug, Clone)]
pub struct ChainSlot<'a> {
    /// The checkpoint (for a differential: the checkpoint it was taken on top of).
    pub checkpoint: u32,
    /// The data file's name (what a missing file would be called).
    pub name: String,
    /// What is there.
    pub file: SlotFile<'a>,
    /// True for the differential applied on top of the last checkpoint.
    pub diff: bool,
}

impl BackupSet {
    /// The slots to apply, in order, to restore `disk` at checkpoint `n`: from the
    /// newest readable base at or before `n` (else checkpoint 0, which may itself be
    /// missing) to `n`, then, with `newest`, the newest differential taken on top of
    /// checkpoint `n` (see [`chain_with_diff`](Self::chain_with_diff)). A data file
    /// wins over a `.partial` of the same checkpoint (the rename that ends a backup
    /// happened).
    pub fn chain_slots(&self, disk: &str, n: u32, newest: bool) -> Vec<ChainSlot<'_>> {
        let base = (0..=n)
            .rev()
            .find(|&i| {
                self.file(disk, i)
                    .is_some_and(|f| i == 0 || f.meta().is_some_and(StreamMeta::is_base))
            })
            .unwrap_or(0);
        let mut slots: Vec<ChainSlot<'_>> = (base..=n)
            .map(|i| {
                let name = self.data_file_name(disk, i);
                let partial = self
                    .partials
                    .iter()
                    .find(|(d, l, _)| d == disk && l.checkpoint() == Some(i));
                let file = match (self.file(disk, i), partial) {
                    (Some(f), _) => SlotFile::Present(f),
                    (None, Some((_, _, p))) => SlotFile::Partial(p),
                    (None, None) => SlotFile::Missing,
                };
                let name = match file {
                    SlotFile::Present(f) => f.file_name(),
                    SlotFile::Partial(p) => p
                        .file_name()
                        .map_or(name, |x| x.to_string_lossy().into_owned()),
                    SlotFile::Missing => name,
                };
                ChainSlot {
                    checkpoint: i,
                    name,
                    file,
                    diff: false,
                }
            })
            .collect();
        if newest {
            let parent = format!("virtnbdbackup.{n}");
            let diff = self
                .disks
                .get(disk)
                .into_iter()
                .flatten()
                .filter(|f| matches!(f.level, StreamLevel::Diff(_)))
                .filter(|f| {
                    f.meta().is_some_and(|m| {
                        m.parent_checkpoint.as_deref() == Some(parent.as_str())
                            && m.disk_name == disk
                    })
                })
                .max_by_key(|f| f.level);
            if let Some(d) = diff {
                slots.push(ChainSlot {
                    checkpoint: n,
                    name: d.file_name(),
                    file: SlotFile::Present(d),
                    diff: true,
                });
            }
        }
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{write_stream, StreamOptions, WriteFrame};

    fn stream(opts: &StreamOptions) -> Vec<u8> {
        write_stream(opts, &[WriteFrame::Data(0, vec![1; 4096])])
    }

    #[test]
    fn gaps_and_partials_keep_their_slots() {
        let dir = tempfile::tempdir().expect("tmp");
        let size = 1 << 20;
        std::fs::write(
            dir.path().join("vda.full.data"),
            stream(&StreamOptions::full("vda", size, 4096)),
        )
        .expect("full");
        std::fs::write(
            dir.path().join("vda.inc.virtnbdbackup.2.data"),
            stream(&StreamOptions::inc("vda", 2, size, 4096)),
        )
        .expect("inc 2");
        std::fs::write(
            dir.path().join("vda.inc.virtnbdbackup.3.data.partial"),
            b"meta",
        )
        .expect("partial");
        let set = BackupSet::scan(dir.path()).expect("scan");
        let slots = set.chain_slots("vda", 3, false);
        let got: Vec<(u32, &str, &str)> = slots
            .iter()
            .map(|s| {
                let what = match s.file {
                    SlotFile::Present(_) => "present",
                    SlotFile::Partial(_) => "partial",
                    SlotFile::Missing => "missing",
                };
                (s.checkpoint, s.name.as_str(), what)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "vda.full.data", "present"),
                (1, "vda.inc.virtnbdbackup.1.data", "missing"),
                (2, "vda.inc.virtnbdbackup.2.data", "present"),
                (3, "vda.inc.virtnbdbackup.3.data.partial", "partial"),
            ]
        );
        // no base at all: the chain still starts at checkpoint 0
        let slots = set.chain_slots("vdb", 1, false);
        assert_eq!(slots.len(), 2);
        assert!(slots.iter().all(|s| matches!(s.file, SlotFile::Missing)));
    }
}
