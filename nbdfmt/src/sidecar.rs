//! Backup file names, parsed exactly (no prefix matching: `sda` never picks up
//! `sdaa.*`), and the small JSON side files (`*.qcow.json`, `*.cpt`).

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

/// Which backup run a side file belongs to (the `<ident>` of the file names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ident {
    /// `virtnbdbackup.N` (full = 0, inc = N).
    Checkpoint(u32),
    /// A differential backup, named by epoch seconds.
    Diff(u64),
    /// A copy backup.
    Copy,
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Checkpoint(n) => write!(f, "virtnbdbackup.{n}"),
            Self::Diff(ts) => write!(f, "{ts}"),
            Self::Copy => f.write_str("copy"),
        }
    }
}

/// Parses `virtnbdbackup.N` into N.
pub fn checkpoint_number(name: &str) -> Option<u32> {
    let n = name.strip_prefix("virtnbdbackup.")?;
    // a name beyond MAX_CHECKPOINTS is no checkpoint of ours: the set keeps a slot per
    // checkpoint up to the latest (`vmconfig.virtnbdbackup.4294967295.xml` asked for
    // 446 GB and aborted)
    parse_decimal::<u32>(n).filter(|&k| k as usize <= MAX_CHECKPOINTS)
}

fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn parse_ident(s: &str) -> Option<Ident> {
    if s == "copy" {
        return Some(Ident::Copy);
    }
    if let Some(n) = checkpoint_number(s) {
        return Some(Ident::Checkpoint(n));
    }
    parse_decimal::<u64>(s).map(Ident::Diff)
}

/// The backup level encoded in a stream file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamLevel {
    /// `<dev>.full.data`: checkpoint 0.
    Full,
    /// `<dev>.copy.data`: a copy (no checkpoint), or a raw image of a raw disk.
    Copy,
    /// `<dev>.inc.virtnbdbackup.N.data`.
    Inc(u32),
    /// `<dev>.diff.<ts>.data`.
    Diff(u64),
}

impl StreamLevel {
    /// The checkpoint number this file belongs to (full/copy 0; diff has none).
    pub fn checkpoint(self) -> Option<u32> {
        match self {
            Self::Full | Self::Copy => Some(0),
            Self::Inc(n) => Some(n),
            Self::Diff(_) => None,
        }
    }
}

/// What a file in a backup directory is, judged from its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupFile {
    /// A data file (sparse stream, or a raw copy), or its `.partial` leftover.
    Stream {
        /// Disk target.
        disk: String,
        /// Level.
        level: StreamLevel,
        /// True for `*.data.partial`.
        partial: bool,
    },
    /// `<data file>.chksum`.
    Checksum {
        /// The data file name it belongs to.
        data_file: String,
    },
    /// `<dev>.<ident>.qcow.json`.
    QcowJson {
        /// Disk target.
        disk: String,
        /// Run.
        ident: Ident,
    },
    /// `vmconfig.<ident>.xml`.
    VmConfig {
        /// Run.
        ident: Ident,
    },
    /// `<domain>.cpt`.
    Cpt,
    /// `<basename>.virtnbdbackup.N` copies of loader/NVRAM/kernel/initrd.
    BootFile {
        /// Original basename (e.g. `vm_VARS.fd`).
        base: String,
        /// Checkpoint.
        checkpoint: u32,
    },
    /// Anything else (logs, autostart, osinfo, vmbackup files).
    Other,
}

impl BackupFile {
    /// Classifies a file name (no directory part).
    pub fn parse(name: &str) -> Self {
        if let Some(data) = name.strip_suffix(".chksum") {
            if data.ends_with(".data") {
                return Self::Checksum {
                    data_file: data.to_owned(),
                };
            }
        }
        let (stem, partial) = match name.strip_suffix(".data.partial") {
            Some(s) => (Some(s), true),
            None => (name.strip_suffix(".data"), false),
        };
        if let Some(stem) = stem {
            if let Some((disk, rest)) = stem.split_once('.') {
                let level = match rest {
                    "full" => Some(StreamLevel::Full),
                    "copy" => Some(StreamLevel::Copy),
                    _ => {
                        if let Some(n) = rest.strip_prefix("inc.").and_then(checkpoint_number) {
                            Some(StreamLevel::Inc(n))
                        } else {
                            rest.strip_prefix("diff.")
                                .and_then(parse_decimal::<u64>)
                                .map(StreamLevel::Diff)
                        }
                    }
                };
                if let (Some(level), false) = (level, disk.is_empty()) {
                    return Self::Stream {
                        disk: disk.to_owned(),
                        level,
                        partial,
                    };
                }
            }
        }
        if let Some(stem) = name.strip_suffix(".qcow.json") {
            if let Some((disk, ident)) = stem.split_once('.') {
                if let (Some(ident), false) = (parse_ident(ident), disk.is_empty()) {
                    return Self::QcowJson {
                        disk: disk.to_owned(),
                        ident,
                    };
                }
            }
        }
        if let Some(ident) = name
            .strip_prefix("vmconfig.")
            .and_then(|s| s.strip_suffix(".xml"))
            .and_then(parse_ident)
        {
            return Self::VmConfig { ident };
        }
        if name.ends_with(".cpt") && name.len() > 4 {
            return Self::Cpt;
        }
        if let Some(pos) = name.rfind(".virtnbdbackup.") {
            let base = &name[..pos];
            if let (Some(n), false) = (checkpoint_number(&name[pos + 1..]), base.is_empty()) {
                if !base.starts_with("autostart")
                    && !base.starts_with("osinfo")
                    && !base.starts_with("bitlocker")
                {
                    return Self::BootFile {
                        base: base.to_owned(),
                        checkpoint: n,
                    };
                }
            }
        }
        Self::Other
    }
}

/// Image options from `<dev>.<ident>.qcow.json` (`qemu-img info --output json`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QcowInfo {
    /// `virtual-size`.
    pub virtual_size: Option<u64>,
    /// `format` (`qcow2`).
    pub format: Option<String>,
    /// `cluster-size`.
    pub cluster_size: Option<u64>,
    /// `format-specific.data.compat` (`1.1` or `0.10`).
    pub compat: Option<String>,
    /// `lazy-refcounts`.
    pub lazy_refcounts: bool,
    /// `compression-type` (`zlib` / `zstd`).
    pub compression_type: Option<String>,
    /// `refcount-bits`.
    pub refcount_bits: Option<u64>,
    /// `extended-l2`.
    pub extended_l2: bool,
    /// `data-file` (external data file path).
    pub data_file: Option<String>,
    /// `data-file-raw`.
    pub data_file_raw: bool,
    /// `backing-filename`, if the source had a backing file.
    pub backing_filename: Option<String>,
    /// The image is encrypted (`encrypted: true` or a `format-specific.data.encrypt` object).
    pub encrypted: bool,
}

/// Longest side file we read into memory (a domain XML is ~10 KiB, a `.cpt` of 10,000
/// checkpoints ~300 KiB, a `qcow.json` under 1 KiB).
pub const MAX_SIDECAR_LEN: u64 = 4 * 1024 * 1024;

impl QcowInfo {
    /// Parses the JSON text.
    pub fn parse(json: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::new(ErrorKind::BadSidecar { offset: 0, reason });
        let v: Value = serde_json::from_slice(json).map_err(|e| bad(format!("qcow.json: {e}")))?;
        let Value::Object(top) = &v else {
            return Err(bad("qcow.json is not a JSON object".into()));
        };
        let data = v.pointer("/format-specific/data");
        let get = |k: &str| data.and_then(|d| d.get(k));
        let s = |x: Option<&Value>| x.and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            virtual_size: top.get("virtual-size").and_then(Value::as_u64),
            format: s(top.get("format")),
            cluster_size: top.get("cluster-size").and_then(Value::as_u64),
            compat: s(get("compat")),
            lazy_refcounts: get("lazy-refcounts")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            compression_type: s(get("compression-type")),
            refcount_bits: get("refcount-bits").and_then(Value::as_u64),
            extended_l2: get("extended-l2").and_then(Value::as_bool).unwrap_or(false),
            data_file: s(get("data-file")),
            data_file_raw: get("data-file-raw")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            backing_filename: s(top.get("backing-filename")),
            encrypted: top
                .get("encrypted")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                || get("encrypt").is_some(),
        })
    }
}

/// Most checkpoints a `.cpt` may list: a chain of hourly backups for a year is 8,760.
/// Each listed checkpoint whose file is missing is a chain slot (and, salvaged, a
/// member of the damage map): a crafted list of 300,000 took 1.1 GB.
pub const MAX_CHECKPOINTS: usize = 10_000;

/// Parses a `<domain>.cpt` file: a JSON array of checkpoint names.
pub fn parse_cpt(json: &[u8]) -> Result<Vec<String>> {
    let bad = |reason: String| Error::new(ErrorKind::BadSidecar { offset: 0, reason });
    let v: Value = serde_json::from_slice(json).map_err(|e| bad(format!(".cpt: {e}")))?;
    let Value::Array(items) = v else {
        return Err(bad(".cpt is not a JSON array".into()));
    };
    if items.len() > MAX_CHECKPOINTS {
        return Err(bad(format!(
            ".cpt lists {} checkpoints, more than {MAX_CHECKPOINTS}",
            items.len()
        )));
    }
    items
        .into_iter()
        .map(|x| match x {
            Value::String(s) => Ok(s),
            other => Err(bad(format!(".cpt entry {other} is not a string"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_exact() {
        assert_eq!(
            BackupFile::parse("vda.inc.virtnbdbackup.12.data"),
            BackupFile::Stream {
                disk: "vda".into(),
                level: StreamLevel::Inc(12),
                partial: false
            }
        );
        assert_eq!(
            BackupFile::parse("sdaa.full.data.partial"),
            BackupFile::Stream {
                disk: "sdaa".into(),
                level: StreamLevel::Full,
                partial: true
            }
        );
        assert_eq!(
            BackupFile::parse("vdb.diff.1795665952.data"),
            BackupFile::Stream {
                disk: "vdb".into(),
                level: StreamLevel::Diff(1_795_665_952),
                partial: false
            }
        );
        assert_eq!(
            BackupFile::parse("vda.full.data.chksum"),
            BackupFile::Checksum {
                data_file: "vda.full.data".into()
            }
        );
        for other in [
            "vda.inc.virtnbdbackup.01.data",
            "vda.inc.data",
            ".full.data",
            "vda.bogus.data",
            "backup.full.11262026052002.log",
        ] {
            assert_eq!(BackupFile::parse(other), BackupFile::Other, "{other}");
        }
    }

    #[test]
    fn side_file_names() {
        assert_eq!(
            BackupFile::parse("vda.virtnbdbackup.3.qcow.json"),
            BackupFile::QcowJson {
                disk: "vda".into(),
                ident: Ident::Checkpoint(3)
            }
        );
        assert_eq!(
            BackupFile::parse("vda.copy.qcow.json"),
            BackupFile::QcowJson {
                disk: "vda".into(),
                ident: Ident::Copy
            }
        );
        assert_eq!(
            BackupFile::parse("vmconfig.virtnbdbackup.0.xml"),
            BackupFile::VmConfig {
                ident: Ident::Checkpoint(0)
            }
        );
        assert_eq!(
            BackupFile::parse("vmconfig.copy.xml"),
            BackupFile::VmConfig { ident: Ident::Copy }
        );
        assert_eq!(
            BackupFile::parse("vmconfig.1795665952.xml"),
            BackupFile::VmConfig {
                ident: Ident::Diff(1_795_665_952)
            }
        );
        assert_eq!(
            BackupFile::parse("rc-uefi-tpm_VARS.fd.virtnbdbackup.1"),
            BackupFile::BootFile {
                base: "rc-uefi-tpm_VARS.fd".into(),
                checkpoint: 1
            }
        );
        assert_eq!(BackupFile::parse("rc-acc-files.cpt"), BackupFile::Cpt);
        assert_eq!(
            BackupFile::parse("autostart.virtnbdbackup.1"),
            BackupFile::Other
        );
    }

    #[test]
    fn qcow_json_fields() {
        let j = br#"{"virtual-size": 41943040, "filename": "x", "cluster-size": 131072, "format": "qcow2",
          "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zstd",
          "lazy-refcounts": true, "refcount-bits": 16, "corrupt": false, "extended-l2": false}}}"#;
        let q = QcowInfo::parse(j).expect("valid");
        assert_eq!(q.cluster_size, Some(131_072));
        assert_eq!(q.compression_type.as_deref(), Some("zstd"));
        assert!(q.lazy_refcounts && !q.extended_l2);
        assert!(QcowInfo::parse(b"[1]").is_err());
        assert_eq!(
            parse_cpt(br#"["virtnbdbackup.0", "virtnbdbackup.1"]"#)
                .expect("ok")
                .len(),
            2
        );
        assert!(parse_cpt(b"[1]").is_err());
        assert_eq!(checkpoint_number("virtnbdbackup.10000"), Some(10_000));
        assert_eq!(checkpoint_number("virtnbdbackup.10001"), None);
        assert_eq!(
            BackupFile::parse("vmconfig.virtnbdbackup.4294967295.xml"),
            BackupFile::Other
        );
        let many = format!("[{}]", vec!["\"x\""; MAX_CHECKPOINTS + 1].join(","));
        assert!(parse_cpt(many.as_bytes()).is_err());
    }
}
