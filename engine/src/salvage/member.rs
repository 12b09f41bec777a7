//! One slot of a chain, judged for a salvage: walked, linked to the member before
//! it, and turned into a layer of the damage map and (when its frames are used) a
//! chain file of the plan.

use std::path::Path;

use nbdfmt::{BackupSet, ChainSlot, SlotFile, StreamContent, StreamMeta};

use super::damage::{Claim, Layer};
use super::walk::{self, Checksum, Harm, Walk};
use super::{FileDamage, FileStatus};
use crate::cancel::Cancel;
use crate::chain::ChainFile;
use crate::error::Result;

/// One slot of the chain, judged.
pub(super) struct Member {
    pub file: FileDamage,
    pub layer: Layer,
    pub chain_file: Option<ChainFile>,
    /// The checkpoint the next member must name as its parent (`None`: the expected
    /// name is used).
    pub checkpoint_name: Option<String>,
}

impl Member {
    /// A member none of whose frames is used: the whole disk is unknown from it.
    fn unknown(file: FileDamage, mut layer: Layer, why: String) -> Member {
        layer.marks.push((0, u64::MAX, Claim::Unknown));
        layer.unknown_why = why;
        Member {
            file,
            layer,
            chain_file: None,
            checkpoint_name: None,
        }
    }
}

/// Judges `slot` of `disk`'s chain; `prev` is the checkpoint the member before it
/// made, `first` whether it is the chain's base.
pub(super) fn member(
    set: &BackupSet,
    disk: &str,
    slot: &ChainSlot<'_>,
    prev: Option<&str>,
    first: bool,
    spill: Option<&Path>,
    cancel: &Cancel,
) -> Result<Member> {
    let layer = Layer {
        name: slot.name.clone(),
        checkpoint: slot.checkpoint,
        diff: slot.diff,
        frames: None,
        marks: Vec::new(),
        unknown_why: String::new(),
        suspect: None,
    };
    let mut file = FileDamage {
        path: set.dir.join(&slot.name),
        checkpoint: slot.checkpoint,
        status: FileStatus::Ok,
        at_offset: None,
        reason: None,
        used: false,
    };
    let (path, partial) = match slot.file {
        SlotFile::Missing => {
            file.status = FileStatus::Missing;
            file.reason = Some("not in the backup directory".into());
            return Ok(Member::unknown(file, layer, "is missing".into()));
        }
        SlotFile::Present(f) if matches!(f.content, StreamContent::RawImage) => {
            file.path = f.path.clone();
            return raw_image(&f.path, disk, file, layer);
        }
        SlotFile::Present(f) => (f.path.clone(), false),
        SlotFile::Partial(p) => (p.to_path_buf(), true),
    };
    file.path = path.clone();
    let w = walk::walk(&path, spill, cancel)?;
    describe(&mut file, &w);
    let Some(meta) = w.meta.clone() else {
        if partial {
            file.status = FileStatus::Partial;
        }
        let why = unknown_why(&file);
        return Ok(Member::unknown(file, layer, why));
    };
    if let Err(why) = check_link(&meta, disk, slot, prev) {
        file.status = FileStatus::Corrupt;
        file.at_offset = Some(nbdfmt::HEADER_LEN as u64);
        file.reason = Some(format!("{why}; not used"));
        let why = format!("does not belong here ({why})");
        return Ok(Member::unknown(file, layer, why));
    }
    Ok(walked(file, layer, &path, meta, &w, partial, first))
}

/// A raw image (a `copy` of a raw disk): all of it is used, as it is.
fn raw_image(path: &Path, disk: &str, mut file: FileDamage, mut layer: Layer) -> Result<Member> {
    let cf = ChainFile::raw_image(path, disk)?;
    layer.marks.push((0, cf.file_size, Claim::Used));
    file.used = true;
    Ok(Member {
        file,
        layer,
        chain_file: Some(cf),
        checkpoint_name: Some("copy".into()),
    })
}

/// A stream that was walked and belongs in its slot: its frames, and the marks of
/// what it lost. An interrupted incremental is not used (its frames would mix two
/// checkpoints); an interrupted base is (there is no older state to fall back on).
fn walked(
    mut file: FileDamage,
    mut layer: Layer,
    path: &Path,
    meta: StreamMeta,
    w: &Walk,
    partial: bool,
    first: bool,
) -> Member {
    let used = !partial || first;
    if partial {
        interrupted(&mut file, used);
    }
    let c = if used { Claim::Used } else { Claim::NotUsed };
    layer.frames = Some((w.frames.clone(), c));
    mark_losses(&mut layer, &file, w, partial);
    if used {
        layer.suspect = suspect(&file.name(), w);
    }
    file.used = used && w.frames.count() > 0;
    let checkpoint_name = used.then(|| meta.checkpoint_name.clone());
    let chain_file = used.then(|| {
        ChainFile::from_log(
            path,
            meta,
            w.file_size,
            w.frames.clone(),
            // the apply checks the checksum again only where it held here
            match w.checksum {
                Checksum::Ok(s) if w.faults.is_empty() => Some(s),
                _ => None,
            },
        )
    });
    Member {
        file,
        layer,
        chain_file,
        checkpoint_name,
    }
}

/// An interrupted backup's status and reason, saying whether its frames are used.
fn interrupted(file: &mut FileDamage, used: bool) {
    file.status = FileStatus::Partial;
    file.reason = Some(format!(
        "interrupted backup{}; {}",
        file.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        if used {
            "its readable frames are used (there is no older data)"
        } else {
            "its data is not used (it would mix two checkpoints)"
        }
    ));
}

/// Lost frames and unknown spans, in disk order (the walk found each in order), then
/// the unknown tail where the walk stopped.
fn mark_losses(layer: &mut Layer, file: &FileDamage, w: &Walk, partial: bool) {
    for l in &w.lost {
        layer
            .marks
            .push((l.start, l.len, Claim::Lost(l.why.clone())));
    }
    for &(s, e) in &w.unknown {
        layer.marks.push((s, e.saturating_sub(s), Claim::Unknown));
        layer.unknown_why = unknown_why(file);
    }
    layer.marks.sort_by_key(|m| m.0);
    if let Some(from) = w.unknown_from {
        layer.marks.push((from, u64::MAX - from, Claim::Unknown));
        layer.unknown_why = match (partial, w.faults.first()) {
            (true, Some(f)) => {
                format!("is an interrupted backup, readable up to byte {}", f.offset)
            }
            _ => unknown_why(file),
        };
    }
}

/// Status, offset and reason of a walked file.
fn describe(file: &mut FileDamage, w: &Walk) {
    let mismatch = match &w.checksum {
        Checksum::Mismatch { stored, computed } => Some(format!(
            "adler32 {computed} differs from the .chksum {stored}"
        )),
        _ => None,
    };
    if let Some(first) = w.faults.first() {
        file.status = match first.harm {
            Harm::Truncated => FileStatus::Truncated,
            Harm::Corrupt => FileStatus::Corrupt,
        };
        file.at_offset = Some(first.offset);
        let mut reason = first.reason.clone();
        if w.faults.len() > 1 {
            reason.push_str(&format!("; {} more damaged place(s)", w.faults.len() - 1));
        }
        if mismatch.is_some() {
            reason.push_str("; its .chksum does not match either");
        }
        file.reason = Some(reason);
    } else if let Some(m) = mismatch {
        file.status = FileStatus::ChecksumMismatch;
        file.reason = Some(format!("{m}: any byte of the file may be wrong"));
    } else if let Checksum::Unusable(e) = &w.checksum {
        file.reason = Some(format!("not verified: {e}"));
    }
}

/// Why the rest of a file is unknown ("is truncated at byte N: ...").
fn unknown_why(file: &FileDamage) -> String {
    let at = file
        .at_offset
        .map(|o| format!(" at byte {o}"))
        .unwrap_or_default();
    let reason = file
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!("is {}{at}{reason}", file.status.as_str().replace('_', " "))
}

/// Why the frames used from a file are unverified, if they are.
fn suspect(name: &str, w: &Walk) -> Option<String> {
    match (&w.checksum, &w.suspect) {
        (Checksum::Mismatch { stored, computed }, _) => Some(format!(
            "taken from {name}, whose adler32 ({computed}) does not match its .chksum ({stored}): any of its bytes may be wrong"
        )),
        (_, Some(why)) => Some(format!("taken from {name}, whose headers disagree: {why}")),
        _ => None,
    }
}

/// The member's metadata against its name and the member before it.
fn check_link(
    meta: &StreamMeta,
    disk: &str,
    slot: &ChainSlot<'_>,
    prev: Option<&str>,
) -> std::result::Result<(), String> {
    if meta.disk_name != disk {
        return Err(format!("its meta names disk {:?}", meta.disk_name));
    }
    let k = slot.checkpoint;
    if !slot.diff
        && k > 0
        && !meta.is_base()
        && meta.checkpoint_name != format!("virtnbdbackup.{k}")
    {
        return Err(format!(
            "its meta names checkpoint {:?}, expected virtnbdbackup.{k}",
            meta.checkpoint_name
        ));
    }
    if meta.is_base() {
        return Ok(());
    }
    if k == 0 && !slot.diff {
        return Err("a full/copy file holds an incremental stream".into());
    }
    let expected = match (prev, slot.diff) {
        (Some(p), _) => p.to_owned(),
        (None, true) => format!("virtnbdbackup.{k}"),
        (None, false) => format!("virtnbdbackup.{}", k - 1),
    };
    let parent = meta.parent_checkpoint.as_deref().unwrap_or("");
    if parent != expected {
        return Err(format!(
            "broken chain: its parent checkpoint is {parent:?}, expected {expected:?}"
        ));
    }
    Ok(())
}
