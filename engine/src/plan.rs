//! Planning: fold a disk's chain (base + incrementals up to the restore point) into
//! one [`ExtentMap`]. Reads frame headers and trailers only; cost grows with the
//! number of frames, memory with the number of extents.

use std::fs::File;
use std::path::{Path, PathBuf};

use nbdfmt::{BackupSet, FrameKind, QcowInfo, StreamContent, StreamFile, StreamIndex};

use crate::error::{Error, Result};
use crate::extent::{ExtentMap, Source};

/// One file of a disk's chain, indexed.
#[derive(Debug)]
pub struct ChainFile {
    /// Path of the `.data` file.
    pub path: PathBuf,
    /// Its frames (headers and trailer only).
    pub index: StreamIndex,
    /// Stored adler32 from `.chksum`, when present.
    pub stored_checksum: Option<u32>,
    /// True for a plain raw image (raw-format disk copy), not a stream.
    pub raw_image: bool,
}

impl ChainFile {
    /// Indexes a stream file (validating its structure) and reads its `.chksum`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| {
            nbdfmt::Error::from(nbdfmt::ErrorKind::Io {
                offset: 0,
                source: e,
            })
            .in_file(path)
        })?;
        let index = StreamIndex::read_file(f).map_err(|e| e.in_file(path))?;
        let stored_checksum = nbdfmt::checksum::stored_checksum(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            index,
            stored_checksum,
            raw_image: false,
        })
    }

    /// A raw image file: one data "frame" covering the whole file.
    pub fn raw_image(path: &Path, disk: &str) -> Result<Self> {
        let size = std::fs::metadata(path)
            .map_err(|e| {
                nbdfmt::Error::from(nbdfmt::ErrorKind::Io {
                    offset: 0,
                    source: e,
                })
                .in_file(path)
            })?
            .len();
        let meta = nbdfmt::StreamMeta {
            virtual_size: size,
            data_size: size,
            date: String::new(),
            disk_name: disk.to_owned(),
            disk_format: "raw".into(),
            checkpoint_name: "copy".into(),
            parent_checkpoint: None,
            incremental: false,
            stream_version: 0,
            compression: nbdfmt::Compression::None,
            raw: serde_json_free_map(),
        };
        let frame = nbdfmt::Frame {
            kind: FrameKind::Data,
            start: 0,
            length: size,
            header_offset: 0,
            payload_offset: 0,
            stored_len: size,
            lz4_frames: Vec::new(),
        };
        Ok(Self {
            path: path.to_path_buf(),
            index: StreamIndex {
                meta,
                frames: vec![frame],
                file_size: size,
            },
            stored_checksum: None,
            raw_image: true,
        })
    }

    /// True when payloads are LZ4.
    pub fn compressed(&self) -> bool {
        self.index.meta.is_compressed()
    }
}

fn serde_json_free_map() -> nbdfmt::meta::JsonMap {
    nbdfmt::meta::JsonMap::new()
}

/// The plan for one disk: its chain and the final extent map.
#[derive(Debug)]
pub struct DiskPlan {
    /// Disk target (`vda`).
    pub disk: String,
    /// Size of the restored disk (from the restore point's stream).
    pub virtual_size: u64,
    /// Chain files in apply order (base first).
    pub files: Vec<ChainFile>,
    /// Final content.
    pub map: ExtentMap,
    /// Image options from the newest `qcow.json` at the restore point, if any.
    pub qcow: Option<QcowInfo>,
}

impl DiskPlan {
    /// Folds already indexed chain files (base first) into the final map.
    pub fn from_chain(disk: &str, files: Vec<ChainFile>, qcow: Option<QcowInfo>) -> Result<Self> {
        let Some(last) = files.last() else {
            return Err(Error::Chain {
                disk: disk.to_owned(),
                message: "no backup files".into(),
            });
        };
        let virtual_size = last.index.meta.virtual_size;
        let mut map = ExtentMap::new();
        for (i, f) in files.iter().enumerate() {
            for (j, fr) in f.index.frames.iter().enumerate() {
                // Frames past the final size (a disk that shrank) are cut off.
                let end = fr.end().min(virtual_size);
                if fr.start >= end {
                    continue;
                }
                let source = match fr.kind {
                    FrameKind::Data => Source::Data {
                        file: u32::try_from(i)
                            .map_err(|_| Error::Unsupported("chain too long".into()))?,
                        frame: u32::try_from(j)
                            .map_err(|_| Error::Unsupported("too many frames".into()))?,
                    },
                    // A zero frame means zero, also when a fallback full lands on older data.
                    _ => Source::Zero,
                };
                map.insert(fr.start, end - fr.start, source);
            }
        }
        Ok(Self {
            disk: disk.to_owned(),
            virtual_size,
            files,
            map,
            qcow,
        })
    }

    /// Plans `disk` from the data files of a chain, in order.
    pub fn from_paths(disk: &str, paths: &[PathBuf], qcow: Option<QcowInfo>) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| ChainFile::open(p))
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
                StreamContent::Stream(_) => ChainFile::open(&f.path),
            })
            .collect::<Result<Vec<_>>>()?;
        let qcow = match set.qcow_json(disk, n) {
            None => None,
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|e| {
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
        self.map.data_bytes()
    }

    /// Bytes of backup files that will be read (all of them when checksums are verified).
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.index.file_size).sum()
    }
}
