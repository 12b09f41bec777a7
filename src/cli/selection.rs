//! The values of `--restore-point`, `--disk` and `--nbd-target`: which point, which
//! disks, and which NBD export each goes to.

use crate::error::AppError;

/// `--restore-point` as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePoint {
    /// All checkpoints (default).
    Latest,
    /// `full`: checkpoint 0, passed as an explicit endpoint.
    Full,
    /// Checkpoints 0..=N (u64: any unsigned decimal is valid syntax; a number past
    /// the chain, however large, is refused when resolved, with exit 5).
    Number(u64),
}

impl RestorePoint {
    /// Parses `latest`, `full` or an unsigned decimal (spec §1.2, acceptance 10).
    pub fn parse(v: &str) -> Result<Self, AppError> {
        match v {
            "latest" => Ok(Self::Latest),
            "full" => Ok(Self::Full),
            _ if !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()) => {
                Ok(Self::Number(v.parse().unwrap_or(u64::MAX)))
            }
            _ => Err(AppError::Usage(format!(
                "Invalid restore point: {v} (use latest, full, or number)"
            ))),
        }
    }

    /// True for an explicit `full`/`N` (point-in-time).
    pub fn is_explicit(self) -> bool {
        self != Self::Latest
    }

    /// As typed (log header, catalogue, JSON).
    pub fn label(self) -> String {
        match self {
            Self::Latest => "latest".into(),
            Self::Full => "full".into(),
            Self::Number(n) => n.to_string(),
        }
    }
}

/// `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSelection {
    /// `all`: every disk present at the target checkpoint.
    All,
    /// These devices, in the order given (trimmed, empty items dropped, deduplicated).
    List(Vec<String>),
}

impl DiskSelection {
    /// Parses the `--disk` value; an empty list is a usage error.
    pub fn parse(v: &str) -> Result<Self, AppError> {
        if v.trim() == "all" {
            return Ok(Self::All);
        }
        let mut disks: Vec<String> = Vec::new();
        for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if !disks.iter().any(|x| x == d) {
                disks.push(d.to_owned());
            }
        }
        if disks.is_empty() {
            return Err(AppError::Usage("No disk names specified".into()));
        }
        Ok(Self::List(disks))
    }
}

/// One `--nbd-target` entry: `[dev=]uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTargetSpec {
    /// The disk (`vda`); `None` for a bare URI (the only disk restored).
    pub disk: Option<String>,
    /// `nbd://host[:port]/export` or `nbd+unix:///export?socket=path`.
    pub uri: String,
}

/// Parses `--nbd-target`: comma-separated `[dev=]uri`, at most one bare URI and only
/// alone, no disk twice, plain NBD only (TLS URIs are refused, not downgraded).
pub fn parse_nbd_targets(v: &str) -> Result<Vec<NbdTargetSpec>, AppError> {
    let bad = |m: String| Err(AppError::Usage(format!("--nbd-target {v}: {m}")));
    let mut out: Vec<NbdTargetSpec> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (disk, uri) = match item.split_once('=') {
            Some((d, u)) if !d.contains(':') && !d.contains('/') => {
                (Some(d.trim().to_owned()), u.trim())
            }
            _ => (None, item),
        };
        if uri.starts_with("nbds://") || uri.starts_with("nbds+unix://") {
            return bad(format!("{uri}: NBD over TLS is not supported"));
        }
        if !(uri.starts_with("nbd://") || uri.starts_with("nbd+unix://")) {
            return bad(format!(
                "{uri}: not an NBD URI (nbd://host:port/export or nbd+unix:///export?socket=path)"
            ));
        }
        if disk.as_deref() == Some("") {
            return bad(format!("{item}: empty disk name"));
        }
        if out.iter().any(|o| o.uri == uri) {
            return bad(format!(
                "{uri} named twice: two disks cannot be written into one export"
            ));
        }
        if out.iter().any(|o| o.disk.is_some() && o.disk == disk) {
            return bad(format!("disk {} named twice", disk.unwrap_or_default()));
        }
        out.push(NbdTargetSpec {
            disk,
            uri: uri.to_owned(),
        });
    }
    if out.is_empty() {
        return bad("no URI given".into());
    }
    if out.len() > 1 && out.iter().any(|o| o.disk.is_none()) {
        return bad("with several targets every one needs its disk (vda=nbd://...)".into());
    }
    Ok(out)
}
