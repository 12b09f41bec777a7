//! One file of a disk's chain ([`ChainFile`]): its stream validated, where its frames
//! are ([`Frames`]), and what it restores to on its own ([`MergeStats`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use nbdfmt::{Frame, FrameKind, StreamIndex, StreamMeta};

use crate::error::{Error, Result};
use crate::framelog::FrameLog;

/// What a merge of a disk's chain gives, counted without keeping it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes that come from data frames.
    pub data_bytes: u64,
    /// Runs of the final disk from one frame each (data or zero), adjacent runs of the
    /// same frame counted once.
    pub extents: u64,
}

/// Where a chain file's frames are.
#[derive(Debug, Clone)]
pub enum Frames {
    /// In memory: a raw image's one frame (or a test's frames).
    Memory(Vec<Frame>),
    /// In a [`FrameLog`] on disk: the frames a tolerant walk kept (salvage) of a
    /// file that may hold millions, read back one at a time.
    Log(FrameLog),
    /// In the file, walked (one frame at a time, every header validated) by the plan
    /// and again by the apply.
    File {
        /// What the file alone restores to (over its own virtual size), when a walk of
        /// its own counted it ([`ChainFile::open`]): a one-file plan then needs no merge
        /// pass. `None` ([`ChainFile::open_stream`]): the plan's merge validates it.
        alone: Option<MergeStats>,
    },
}

/// One file of a disk's chain, validated.
#[derive(Debug, Clone)]
pub struct ChainFile {
    /// Path of the `.data` file.
    pub path: PathBuf,
    /// The stream metadata.
    pub meta: StreamMeta,
    /// File size.
    pub file_size: u64,
    /// Its frames.
    pub frames: Frames,
    /// Stored adler32 from `.chksum`, when present.
    pub stored_checksum: Option<u32>,
    /// True for a plain raw image (raw-format disk copy), not a stream.
    pub raw_image: bool,
}

fn open_error(path: &Path, e: std::io::Error) -> nbdfmt::Error {
    nbdfmt::Error::from(nbdfmt::ErrorKind::Io {
        offset: 0,
        source: e,
    })
    .in_file(path)
}

impl ChainFile {
    /// Validates a stream file (every frame header and the trailer, nothing kept) and
    /// reads its `.chksum`.
    pub fn open(path: &Path) -> Result<Self> {
        let stored_checksum = nbdfmt::checksum::stored_checksum(path)?;
        Ok(Self::walk(path, stored_checksum)?)
    }

    /// Opens a stream file (meta frame and trailer validated) and reads its `.chksum`,
    /// leaving its frame headers to the plan that merges it with the rest of its chain
    /// ([`DiskPlan::from_chain`](crate::plan::DiskPlan::from_chain) walks and validates every one): one walk, not two.
    pub fn open_stream(path: &Path) -> Result<Self> {
        let stored_checksum = nbdfmt::checksum::stored_checksum(path)?;
        let f = File::open(path).map_err(|e| open_error(path, e))?;
        let r = nbdfmt::StreamReader::open(nbdfmt::PreadBuf::new(f, 4096))
            .map_err(|e| e.in_file(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            meta: r.meta().clone(),
            file_size: r.file_size(),
            frames: Frames::File { alone: None },
            stored_checksum,
            raw_image: false,
        })
    }

    /// Validates a stream file whose stored checksum is known: every frame header and
    /// the trailer, read once; nothing per frame is kept.
    pub fn walk(path: &Path, stored_checksum: Option<u32>) -> nbdfmt::Result<Self> {
        let f = File::open(path).map_err(|e| open_error(path, e))?;
        let mut r =
            nbdfmt::StreamReader::open(nbdfmt::PreadBuf::new(f, nbdfmt::reader::INDEX_READAHEAD))
                .map_err(|e| e.in_file(path))?;
        let size = r.meta().virtual_size;
        let mut alone = MergeStats::default();
        // End of the last zero frame (adjacent zero frames are one extent).
        let mut zero_end = None;
        while let Some(fr) = r.next_frame().map_err(|e| e.in_file(path))? {
            let end = fr.end().min(size);
            if fr.start >= end {
                continue;
            }
            if fr.kind == FrameKind::Data {
                alone.data_bytes += end - fr.start;
                alone.extents += 1;
                zero_end = None;
            } else {
                if zero_end != Some(fr.start) {
                    alone.extents += 1;
                }
                zero_end = Some(end);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            meta: r.meta().clone(),
            file_size: r.file_size(),
            frames: Frames::File { alone: Some(alone) },
            stored_checksum,
            raw_image: false,
        })
    }

    /// A stream file whose frames are already in memory (validated by whoever read them).
    pub fn from_index(path: &Path, index: StreamIndex, stored_checksum: Option<u32>) -> Self {
        Self {
            path: path.to_path_buf(),
            meta: index.meta,
            file_size: index.file_size,
            frames: Frames::Memory(index.frames),
            stored_checksum,
            raw_image: false,
        }
    }

    /// A stream file whose frames a tolerant walk kept in `log` (validated by it).
    pub fn from_log(
        path: &Path,
        meta: StreamMeta,
        file_size: u64,
        log: FrameLog,
        stored_checksum: Option<u32>,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            meta,
            file_size,
            frames: Frames::Log(log),
            stored_checksum,
            raw_image: false,
        }
    }

    /// A raw image file: one data "frame" covering the whole file.
    pub fn raw_image(path: &Path, disk: &str) -> Result<Self> {
        let size = std::fs::metadata(path)
            .map_err(|e| open_error(path, e))?
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
            meta,
            file_size: size,
            frames: Frames::Memory(vec![frame]),
            stored_checksum: None,
            raw_image: true,
        })
    }

    /// True when payloads are LZ4.
    pub fn compressed(&self) -> bool {
        self.meta.is_compressed()
    }

    /// Opens the file for reading.
    pub fn open_file(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| Error::Backup(open_error(&self.path, e)))
    }

    /// Every frame, in memory (read from the file again when it is not there): memory
    /// per frame, for random access ([`crate::nbd`]) and tests.
    pub fn load_frames(&self) -> Result<Vec<Frame>> {
        match &self.frames {
            Frames::Memory(v) => Ok(v.clone()),
            Frames::Log(log) => log.load(),
            Frames::File { .. } => {
                let index =
                    StreamIndex::read_file(self.open_file()?).map_err(|e| e.in_file(&self.path))?;
                Ok(index.frames)
            }
        }
    }
}

fn serde_json_free_map() -> nbdfmt::meta::JsonMap {
    nbdfmt::meta::JsonMap::new()
}
