//! Planning: a disk's chain (base + incrementals up to the restore point), validated
//! and counted. Reads frame headers and trailers only, and keeps none of them: the
//! final content is the k-way merge of the files ([`crate::merge`]), walked again by
//! the apply, so memory grows with the number of files, never with frames or extents.

use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, QcowInfo, StreamContent, StreamFile};

use crate::chain::{ChainFile, Frames};
use crate::error::{Error, Result};
use crate::extent::ExtentMap;
use crate::merge::{self, MergeStats};

/// A stream file of a chain of `files` files: walked on its own when it is the only
/// one (its counts are the plan's), else validated by the plan's merge.
fn open_member(path: &Path, files: usize) -> Result<ChainFile> {
    if files == 1 {
        ChainFile::open(path)
    } else {
        ChainFile::open_stream(path)
    }
}

/// The plan for one disk: its chain, validated, and what its final content holds.
#[derive(Debug)]
pub struct DiskPlan {
    /// Disk target (`vda`).
    pub disk: String,
    /// Size of the restored disk (from the restore point's stream).
    pub virtual_size: u64,
    /// Chain files in apply order (base first).
    pub files: Vec<ChainFile>,
    /// The final content, counted (the content itself is the merge of `files`).
    pub stats: MergeStats,
    /// Live data bytes each file of `files` gives the final content (0: superseded
    /// everywhere; the apply only verifies its checksum).
    pub file_live: Vec<u64>,
    /// Image options from the newest `qcow.json` at the restore point, if any.
    pub qcow: Option<QcowInfo>,
}

impl DiskPlan {
    /// Plans `disk` from validated chain files (base first): counts the final content
    /// with one merge over their frame headers.
    pub fn from_chain(disk: &str, files: Vec<ChainFile>, qcow: Option<QcowInfo>) -> Result<Self> {
        let Some(last) = files.last() else {
            return Err(Error::Chain {
                disk: disk.to_owned(),
                message: "no backup files".into(),
            });
        };
        let virtual_size = last.meta.virtual_size;
        u32::try_from(files.len()).map_err(|_| Error::Unsupported("chain too long".into()))?;
        let (stats, file_live) = match &files[..] {
            [ChainFile {
                frames: Frames::File { alone: Some(alone) },
                ..
            }] => (*alone, vec![alone.data_bytes]),
            _ => merge::stats(&files, virtual_size)?,
        };
        Ok(Self {
            disk: disk.to_owned(),
            virtual_size,
            files,
            stats,
            file_live,
            qcow,
        })
    }

    /// Plans `disk` from the data files of a chain, in order.
    pub fn from_paths(disk: &str, paths: &[PathBuf], qcow: Option<QcowInfo>) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| open_member(p, paths.len()))
            .collect::<Result<Vec<_>>>()?;
        Self::from_chain(disk, files, qcow)
    }

    /// Plans `disk` at checkpoint `n` of a scanned backup set.
    pub fn for_point(set: &BackupSet, disk: &str, n: u32) -> Result<Self> {
        Self::for_point_with(set, disk, n, false)
    }

    /// Plans `disk` at checkpoint `n`; with `newest`, a differential taken after
    /// checkpoint `n` is applied too (the "latest" state of a chain ending in a diff).
    pub fn for_point_with(set: &BackupSet, disk: &str, n: u32, newest: bool) -> Result<Self> {
        let chain = if newest {
            set.chain_with_diff(disk, n)
        } else {
            set.chain(disk, n)
        };
        let chain = chain.map_err(|p| Error::Chain {
            disk: disk.to_owned(),
            message: p.to_string(),
        })?;
        let files = chain
            .iter()
            .map(|f: &&StreamFile| match &f.content {
                StreamContent::RawImage => ChainFile::raw_image(&f.path, disk),
                StreamContent::Unreadable(e) => Err(Error::Chain {
                    disk: disk.to_owned(),
                    message: e.to_string(),
                }),
                StreamContent::Stream(_) => open_member(&f.path, chain.len()),
            })
            .collect::<Result<Vec<_>>>()?;
        let qcow = match set.qcow_json(disk, n) {
            None => None,
            Some(p) => {
                let bytes = nbdfmt::small::read_small_file(p, nbdfmt::sidecar::MAX_SIDECAR_LEN)
                    .map_err(|e| {
                        nbdfmt::Error::from(nbdfmt::ErrorKind::Io {
                            offset: 0,
                            source: e,
                        })
                        .in_file(p)
                    })?;
                Some(QcowInfo::parse(&bytes).map_err(|e| e.in_file(p))?)
            }
        };
        Self::from_chain(disk, files, qcow)
    }

    /// Live data bytes (what will be written).
    pub fn data_bytes(&self) -> u64 {
        self.stats.data_bytes
    }

    /// Bytes of backup files that will be read (all of them when checksums are verified).
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.file_size).sum()
    }

    /// The final content as an in-memory [`ExtentMap`] (one more pass over the frame
    /// headers; memory per extent): for random access and tests, never for a restore.
    pub fn extent_map(&self) -> Result<ExtentMap> {
        merge::extent_map(&self.files, self.virtual_size)
    }
}
