//! `--dump` (spec §4.16, natively): the meta object of every data file of the
//! chosen data dir, unchanged (key order kept), as the JSON array
//! `virtnbdrestore -o dump` printed (`json.dumps(entries, indent=4)`). Files are
//! ordered by disk, then checkpoint — never by mtime. Never writes.
//!
//! A raw image (`copy.data` of a raw disk) has no metadata and an unreadable file
//! has none we can trust: both are skipped with an ERROR line. Raw images are
//! expected and do not fail the run; unreadable metadata does (exit 6).

use std::path::Path;

use nbdfmt::StreamContent;
use serde_json::{json, Value};

use crate::error::AppError;
use crate::ui::format;
use crate::ui::log;
use crate::ui::write_stdout;

/// The dump of one data dir.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    /// `(file name, meta object)` in disk, checkpoint order.
    pub entries: Vec<(String, String, Option<u32>, Value)>,
    /// `(file name, reason, is_failure)`.
    pub skipped: Vec<(String, String, bool)>,
}

/// Collects the meta objects of `data_dir`.
pub fn collect(data_dir: &Path) -> Result<Dump, AppError> {
    let set = crate::host::tree::scan_set(data_dir)?;
    let mut dump = Dump {
        entries: Vec::new(),
        skipped: Vec::new(),
    };
    for f in set.disks.values().flatten() {
        let name = f.file_name();
        match &f.content {
            StreamContent::Stream(m) => dump.entries.push((
                name,
                f.disk.clone(),
                f.level.checkpoint(),
                Value::Object(m.raw.clone()),
            )),
            StreamContent::RawImage => {
                dump.skipped
                    .push((name, "raw image, no stream metadata".into(), false))
            }
            StreamContent::Unreadable(e) => dump.skipped.push((name, e.to_string(), true)),
        }
    }
    Ok(dump)
}

/// Runs `--dump` on a resolved data dir: JSON on stdout (and in the run log).
pub fn run(data_dir: &Path, json_out: bool) -> Result<(), AppError> {
    let dump = collect(data_dir)?;
    for (name, _, _, _) in &dump.entries {
        tracing::info!(target: "dump", "{name}");
    }
    for (name, reason, _) in &dump.skipped {
        tracing::error!(target: "dump", "Skipping {name}: {reason}");
    }
    let text = if json_out {
        let files: Vec<Value> = dump
            .entries
            .iter()
            .map(|(file, disk, cp, meta)| json!({ "file": file, "disk": disk, "checkpoint": cp, "meta": meta }))
            .collect();
        let skipped: Vec<Value> = dump
            .skipped
            .iter()
            .map(|(file, reason, _)| json!({ "file": file, "reason": reason }))
            .collect();
        let doc = json!({
            "schema": "vmrestore.dump/1",
            "data_dir": data_dir.display().to_string(),
            "files": files,
            "skipped": skipped,
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    } else {
        format::python_json(&Value::Array(
            dump.entries.iter().map(|(_, _, _, m)| m.clone()).collect(),
        ))
    };
    let text = format!("{text}\n");
    write_stdout(&text);
    log::append_raw(&text);
    let bad = dump
        .skipped
        .iter()
        .filter(|(_, _, failure)| *failure)
        .count();
    if bad > 0 {
        return Err(AppError::engine(format!(
            "Dump failed: {bad} data file(s) with unreadable metadata in {}",
            data_dir.display()
        )));
    }
    Ok(())
}
