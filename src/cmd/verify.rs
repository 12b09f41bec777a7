//! `--verify` (spec §4.16, natively): the adler32 of every data file of the chosen
//! data dir against its `.chksum`, as `virtnbdrestore -o verify` did. Never writes.
//!
//! A file without `.chksum` (virtnbdbackup 1.9.x, raw copies) is reported as
//! "no checksum recorded" and is not a failure. Any mismatch, unreadable file or
//! malformed `.chksum` fails the run with exit 6. Checksums are computed with
//! `nbdfmt::checksum` (same semantics as `verify_file`), in 1 MiB reads so that a
//! SIGINT/SIGTERM stops a long verify between reads.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use engine::Cancel;
use nbdfmt::checksum::{chksum_path, stored_checksum, Adler32Reader};
use nbdfmt::{BackupFile, BackupSet, StreamFile};
use serde_json::{json, Value};

use crate::error::AppError;
use crate::ui::log;
use crate::ui::write_stdout;

/// Result for one data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    /// Stored and computed agree.
    Ok(u32),
    /// No `.chksum` beside the file.
    NotRecorded(u32),
    /// Stored and computed differ.
    Mismatch {
        /// From `.chksum`.
        stored: u32,
        /// Computed now.
        computed: u32,
    },
    /// The file or its `.chksum` could not be read or parsed.
    Error(String),
}

impl FileCheck {
    /// True for a failed check.
    pub fn failed(&self) -> bool {
        matches!(self, Self::Mismatch { .. } | Self::Error(_))
    }
}

/// Checks one data file; `Err` only when cancelled.
pub fn check_file(path: &Path, cancel: &Cancel) -> Result<FileCheck, AppError> {
    let stored = match stored_checksum(path) {
        Ok(s) => s,
        Err(e) => return Ok(FileCheck::Error(e.to_string())),
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Ok(FileCheck::Error(format!("{}: {e}", path.display()))),
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
            Err(e) => return Ok(FileCheck::Error(format!("{}: {e}", path.display()))),
        }
    }
    let computed = r.checksum();
    Ok(match stored {
        None => FileCheck::NotRecorded(computed),
        Some(s) if s == computed => FileCheck::Ok(s),
        Some(stored) => FileCheck::Mismatch { stored, computed },
    })
}

/// Verifies every data file of `data_dir`. Logs one line per file; on success
/// logs `Verification passed: backup checksums are valid`.
pub fn run(data_dir: &Path, json_out: bool, cancel: &Cancel) -> Result<(), AppError> {
    let set = crate::host::tree::scan_set(data_dir)?;
    let mut results = Vec::new();
    for f in set.disks.values().flatten() {
        let name = f.file_name();
        let check = check_file(&f.path, cancel)?;
        log_check(&name, &check);
        results.push((f, check));
    }
    for orphan in orphan_checksums(data_dir, &set) {
        tracing::warn!(target: "verify", "Checksum file without data file: {orphan}");
    }
    if let Some(p) = set.broken_at() {
        let reason = p
            .problems
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        tracing::warn!(target: "verify", "Chain is INCOMPLETE at restore point {} ({reason})", p.checkpoint);
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, c)| c.failed())
        .map(|(f, _)| f.path.display().to_string())
        .collect();
    if json_out {
        let text = format!(
            "{}\n",
            serde_json::to_string_pretty(&json_doc(data_dir, &results, failed.is_empty()))
                .unwrap_or_default()
        );
        write_stdout(&text);
        log::append_raw(&text);
    }
    match failed.as_slice() {
        [] => {
            tracing::info!(target: "verify", "Verification passed: backup checksums are valid");
            Ok(())
        }
        [one] => Err(AppError::engine(format!(
            "Verification FAILED: backup checksums do not match: {one}"
        ))),
        [first, rest @ ..] => Err(AppError::engine(format!(
            "Verification FAILED: backup checksums do not match: {first} (and {} more)",
            rest.len()
        ))),
    }
}

/// One log line per checked file.
fn log_check(name: &str, check: &FileCheck) {
    match check {
        FileCheck::Ok(c) => {
            tracing::info!(target: "verify", "Checksum OK: {name} (adler32 {c})")
        }
        FileCheck::NotRecorded(c) => {
            tracing::info!(target: "verify", "No checksum recorded: {name} (adler32 {c})")
        }
        FileCheck::Mismatch { stored, computed } => {
            tracing::error!(target: "verify", "Checksum MISMATCH: {name} (stored {stored}, computed {computed})");
        }
        FileCheck::Error(e) => tracing::error!(target: "verify", "Cannot verify {name}: {e}"),
    }
}

/// The `vmrestore.verify/1` document (docs/json-output.md).
fn json_doc(data_dir: &Path, results: &[(&StreamFile, FileCheck)], passed: bool) -> Value {
    let files: Vec<Value> = results
        .iter()
        .map(|(f, c)| {
            let (status, stored, computed, error) = match c {
                FileCheck::Ok(v) => ("ok", Some(*v), Some(*v), None),
                FileCheck::NotRecorded(v) => ("not_recorded", None, Some(*v), None),
                FileCheck::Mismatch { stored, computed } => {
                    ("mismatch", Some(*stored), Some(*computed), None)
                }
                FileCheck::Error(e) => ("error", None, None, Some(e.clone())),
            };
            json!({
                "file": f.file_name(),
                "disk": f.disk,
                "checkpoint": f.level.checkpoint(),
                "status": status,
                "stored": stored,
                "computed": computed,
                "error": error,
            })
        })
        .collect();
    json!({
        "schema": "vmrestore.verify/1",
        "data_dir": data_dir.display().to_string(),
        "passed": passed,
        "files": files,
    })
}

/// `.chksum` files whose data file is not in the set (deleted or renamed data).
fn orphan_checksums(dir: &Path, set: &BackupSet) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let known: std::collections::HashSet<_> = set
        .disks
        .values()
        .flatten()
        .map(|f| chksum_path(&f.path))
        .collect();
    let mut v: Vec<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let is_chksum = matches!(BackupFile::parse(&name), BackupFile::Checksum { .. });
            (is_chksum && !known.contains(&e.path())).then_some(name)
        })
        .collect();
    v.sort();
    v
}
