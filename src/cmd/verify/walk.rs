//! One data file, verified the way a restore reads it: indexed with
//! [`engine::ChainFile`] (every frame header, the trailer, sizes), then the engine's own
//! restore pass over it into an [`engine::target::null::NullTarget`] — every payload
//! read, LZ4 decoded with its frame checksums, the adler32 compared with the `.chksum`.
//! A one-file plan makes every frame of the file live, so each file is read once and
//! the restore points are judged from the results (`super::point`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use engine::target::null::NullTarget;
use engine::{ApplyOptions, Cancel, ChainFile, DiskPlan};
use nbdfmt::checksum::{stored_checksum, Adler32Reader, ChecksumStatus};
use nbdfmt::{StreamContent, StreamFile, StreamIndex, StreamLevel};

use crate::error::{engine_error, AppError};

/// How the structural walk of a file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Structure {
    /// Every frame, the trailer and every payload read as a restore reads them.
    Ok,
    /// The walk stopped: what and where.
    Damaged {
        /// Byte offset in the file, when the failure has one.
        offset: Option<u64>,
        /// What is wrong (names the offset too).
        reason: String,
    },
}

/// The file's adler32 against its `.chksum`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// Stored and computed agree.
    Ok(u32),
    /// No `.chksum` beside the file.
    NotRecorded,
    /// Stored and computed differ.
    Mismatch {
        /// From `.chksum`.
        stored: u32,
        /// Computed now.
        computed: u32,
    },
    /// The `.chksum` (or, after structural damage, the file) could not be read.
    Error(String),
}

/// The verification of one data file.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// Full path.
    pub path: PathBuf,
    /// File name.
    pub name: String,
    /// Disk target.
    pub disk: String,
    /// Level from the file name.
    pub level: StreamLevel,
    /// True for LZ4 payloads (their frame checksums were verified when no `.chksum`
    /// covers the file).
    pub compressed: bool,
    /// The structural walk.
    pub structure: Structure,
    /// The `.chksum` comparison.
    pub checksum: Checksum,
}

impl FileCheck {
    /// True when a restore reading this file would fail (or restore changed bytes).
    pub fn damaged(&self) -> bool {
        self.reason().is_some()
    }

    /// Why this file cannot be restored from, naming the file: structural damage first,
    /// then a checksum that does not match or cannot be read.
    pub fn reason(&self) -> Option<String> {
        let name = &self.name;
        match (&self.structure, &self.checksum) {
            (Structure::Damaged { reason, .. }, _) => Some(format!("{name}: {reason}")),
            (_, Checksum::Mismatch { stored, computed }) => Some(format!(
                "{name}: checksum mismatch: stored {stored}, computed {computed}"
            )),
            (_, Checksum::Error(e)) => Some(format!("{name}: checksum not verifiable: {e}")),
            _ => None,
        }
    }
}

/// Verifies one data file of a scanned set. `Err` only when cancelled or on an engine
/// bug; damage is reported in the [`FileCheck`].
pub fn check(f: &StreamFile, cancel: &Cancel) -> Result<FileCheck, AppError> {
    let mut fc = FileCheck {
        path: f.path.clone(),
        name: f.file_name(),
        disk: f.disk.clone(),
        level: f.level,
        compressed: f.meta().is_some_and(nbdfmt::StreamMeta::is_compressed),
        structure: Structure::Ok,
        checksum: Checksum::NotRecorded,
    };
    // A malformed .chksum fails the file (a restore refuses it too); the walk still
    // runs, with the LZ4 frame checksums in its place.
    let stored = match stored_checksum(&f.path) {
        Ok(s) => s,
        Err(e) => {
            fc.checksum = Checksum::Error(e.to_string());
            None
        }
    };
    let chain_file = match &f.content {
        // scan-time damage (truncated file, bad meta, not a regular file): as found
        StreamContent::Unreadable(e) => Err(damage(e)),
        StreamContent::RawImage => {
            ChainFile::raw_image(&f.path, &f.disk).map_err(|e| Structure::Damaged {
                offset: None,
                reason: e.to_string(),
            })
        }
        StreamContent::Stream(_) => index(&f.path, stored),
    };
    let outcome = match chain_file {
        Err(s) => Walk::Damaged(s),
        Ok(cf) => walk(cf, &f.disk, cancel)?,
    };
    match outcome {
        Walk::Ok(Some(ChecksumStatus::Ok(c))) => fc.checksum = Checksum::Ok(c),
        Walk::Ok(_) => {}
        Walk::Mismatch { stored, computed } => {
            fc.checksum = Checksum::Mismatch { stored, computed }
        }
        Walk::Damaged(s) => fc.structure = s,
    }
    // The walk stopped before the end of the file, or never hashed it (a raw copy with
    // a .chksum): the adler32 on its own says whether the bytes changed since the
    // backup wrote them.
    let hashed = matches!(fc.checksum, Checksum::Ok(_) | Checksum::Mismatch { .. });
    // never through a symbolic link or into a directory the scan refused to read
    let regular = std::fs::symlink_metadata(&f.path).is_ok_and(|m| m.is_file());
    if let (Some(s), false, true) = (stored, hashed, regular) {
        fc.checksum = adler32_against(&f.path, s, cancel)?;
    }
    Ok(fc)
}

/// How the restore pass over one file ended.
enum Walk {
    Ok(Option<ChecksumStatus>),
    Mismatch { stored: u32, computed: u32 },
    Damaged(Structure),
}

fn damage(e: &nbdfmt::Error) -> Structure {
    Structure::Damaged {
        offset: e.offset(),
        reason: e.kind().to_string(),
    }
}

/// [`ChainFile::open`] with the stored checksum already read: every frame header and
/// the trailer, validated.
fn index(path: &Path, stored: Option<u32>) -> Result<ChainFile, Structure> {
    let f = File::open(path).map_err(|e| Structure::Damaged {
        offset: Some(0),
        reason: format!("cannot open: {e}"),
    })?;
    let index = StreamIndex::read_file(f).map_err(|e| damage(&e))?;
    Ok(ChainFile {
        path: path.to_path_buf(),
        index,
        stored_checksum: stored,
        raw_image: false,
    })
}

/// The restore pass over one indexed file into a null target.
fn walk(cf: ChainFile, disk: &str, cancel: &Cancel) -> Result<Walk, AppError> {
    let name = cf.path.display().to_string();
    let plan = match DiskPlan::from_chain(disk, vec![cf], None) {
        Ok(p) => p,
        Err(e) => return walk_error(e, &name),
    };
    let target = NullTarget::new(plan.virtual_size);
    let opts = ApplyOptions {
        verify_checksums: true,
        verify_readback: false,
        cancel: cancel.clone(),
        ..ApplyOptions::default()
    };
    match engine::apply(std::slice::from_ref(&plan), vec![Box::new(target)], &opts) {
        Ok(report) => Ok(Walk::Ok(
            report
                .disks
                .iter()
                .flat_map(|d| &d.checksums)
                .find_map(|(_, s)| *s),
        )),
        Err(e) => match cancel.signal() {
            // a signal can surface as a failed read or a closed channel first
            Some(sig) => Err(AppError::Interrupted(sig)),
            None => walk_error(e, &name),
        },
    }
}

/// Sorts an engine failure: damage of the file, or a reason to stop verifying
/// (a signal, an engine bug).
fn walk_error(e: engine::Error, name: &str) -> Result<Walk, AppError> {
    match e {
        engine::Error::Backup(fe) => Ok(match fe.kind() {
            nbdfmt::ErrorKind::ChecksumMismatch { stored, computed } => Walk::Mismatch {
                stored: *stored,
                computed: *computed,
            },
            _ => Walk::Damaged(damage(&fe)),
        }),
        engine::Error::Chain { message, .. } => Ok(Walk::Damaged(Structure::Damaged {
            offset: None,
            reason: message,
        })),
        other => Err(engine_error(other, &format!("verifying {name}"))),
    }
}

/// The adler32 of the whole file against `stored`, in 1 MiB reads so that a
/// SIGINT/SIGTERM stops it between reads.
fn adler32_against(path: &Path, stored: u32, cancel: &Cancel) -> Result<Checksum, AppError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Ok(Checksum::Error(format!("{}: {e}", path.display()))),
    };
    let mut r = Adler32Reader::new(f);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if let Some(sig) = cancel.signal() {
            return Err(AppError::Interrupted(sig));
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Ok(Checksum::Error(format!("{}: {e}", path.display()))),
        }
    }
    let computed = r.checksum();
    Ok(if computed == stored {
        Checksum::Ok(stored)
    } else {
        Checksum::Mismatch { stored, computed }
    })
}
