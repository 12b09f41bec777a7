//! The side files and file names of a backup directory: `*.qcow.json`, `*.cpt`,
//! `vmconfig.*.xml`, `checkpoints/*.xml`, `.chksum` texts and `BackupFile::parse`.
//! Every parser sees every input. No panics; a parsed file name spells the input again;
//! an accepted `.chksum` was decimal text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdfmt::checksum::parse_chksum;
use nbdfmt::sidecar::{checkpoint_number, parse_cpt};
use nbdfmt::{BackupFile, CheckpointConfig, DomainConfig, QcowInfo, StreamLevel};

/// The name a parsed `BackupFile` was read from, rebuilt from its parts.
fn spell(f: &BackupFile) -> Option<String> {
    Some(match f {
        BackupFile::Stream {
            disk,
            level,
            partial,
        } => {
            let level = match level {
                StreamLevel::Full => "full".to_owned(),
                StreamLevel::Copy => "copy".to_owned(),
                StreamLevel::Inc(n) => format!("inc.virtnbdbackup.{n}"),
                StreamLevel::Diff(ts) => format!("diff.{ts}"),
            };
            format!(
                "{disk}.{level}.data{}",
                if *partial { ".partial" } else { "" }
            )
        }
        BackupFile::Checksum { data_file } => format!("{data_file}.chksum"),
        BackupFile::QcowJson { disk, ident } => format!("{disk}.{ident}.qcow.json"),
        BackupFile::VmConfig { ident } => format!("vmconfig.{ident}.xml"),
        BackupFile::BootFile { base, checkpoint } => format!("{base}.virtnbdbackup.{checkpoint}"),
        BackupFile::Cpt | BackupFile::Other => return None,
    })
}

fn check_name(name: &str) {
    let f = BackupFile::parse(name);
    match &f {
        BackupFile::Stream { disk, .. } | BackupFile::QcowJson { disk, .. } => {
            assert!(!disk.is_empty() && !disk.contains('.'), "{name:?} -> {f:?}");
        }
        BackupFile::Checksum { data_file } => assert!(data_file.ends_with(".data"), "{name:?}"),
        BackupFile::BootFile { base, .. } => assert!(!base.is_empty(), "{name:?}"),
        BackupFile::Cpt => assert!(name.len() > 4 && name.ends_with(".cpt"), "{name:?}"),
        BackupFile::VmConfig { .. } | BackupFile::Other => {}
    }
    if let Some(again) = spell(&f) {
        assert_eq!(again, name, "{f:?}");
    }
    if let Some(n) = checkpoint_number(name) {
        assert_eq!(format!("virtnbdbackup.{n}"), name);
    }
}

fn check_chksum(data: &[u8]) {
    if let Ok(v) = parse_chksum(data) {
        let t = data.strip_suffix(b"\n").unwrap_or(data);
        let t = t.strip_suffix(b"\r").unwrap_or(t);
        assert!(
            !t.is_empty() && t.len() <= 10 && t.iter().all(u8::is_ascii_digit),
            "{data:?} -> {v}"
        );
        let text = std::str::from_utf8(t).expect("digits are UTF-8");
        assert_eq!(
            text.parse::<u64>().ok(),
            Some(u64::from(v)),
            "{text:?} -> {v}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = QcowInfo::parse(data);
    if let Ok(names) = parse_cpt(data) {
        for n in &names {
            let _ = checkpoint_number(n);
        }
    }
    check_chksum(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = DomainConfig::parse(text) {
            for t in d.disk_targets() {
                assert!(d.disk(t).is_some());
            }
        }
        let _ = CheckpointConfig::parse(text);
        check_name(text);
    } else {
        check_name(&String::from_utf8_lossy(data));
    }
});
