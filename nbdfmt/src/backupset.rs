//! Backup-set discovery for one data directory: which disks, which files make each
//! disk's chain (ordered by checkpoint metadata, never by mtime), which restore
//! points exist, and which of them are incomplete and why.
//!
//! Only names and meta frames are read here; frame-level validation happens when a
//! chain is indexed for a restore ([`crate::StreamIndex`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{io_at, Error, ErrorKind, Result};
use crate::meta::StreamMeta;
use crate::reader::{looks_like_stream, read_meta};
use crate::sidecar::{
    checkpoint_number, parse_cpt, BackupFile, Ident, StreamLevel, MAX_SIDECAR_LEN,
};
use crate::vmconfig::DomainConfig;

/// How a data file stores the disk.
#[derive(Debug)]
pub enum StreamContent {
    /// A sparse stream; its meta frame parsed.
    Stream(StreamMeta),
    /// A plain raw image (`copy.data` of a raw-format disk).
    RawImage,
    /// The meta frame could not be read.
    Unreadable(Error),
}

/// One `*.data` file.
#[derive(Debug)]
pub struct StreamFile {
    /// Full path.
    pub path: PathBuf,
    /// Disk target from the file name.
    pub disk: String,
    /// Level from the file name.
    pub level: StreamLevel,
    /// File size.
    pub size: u64,
    /// Modification time (for display only; never for ordering).
    pub mtime: Option<SystemTime>,
    /// Whether a `.chksum` exists beside it.
    pub has_chksum: bool,
    /// What is inside.
    pub content: StreamContent,
}

impl StreamFile {
    /// The parsed meta, when the file is a readable stream.
    pub fn meta(&self) -> Option<&StreamMeta> {
        match &self.content {
            StreamContent::Stream(m) => Some(m),
            _ => None,
        }
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// What makes a restore point incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// The data file for this disk and checkpoint does not exist.
    MissingData,
    /// Only a `.partial` leftover exists (interrupted backup).
    Partial,
    /// The `qcow.json` for this qcow2 disk and checkpoint does not exist.
    MissingQcowJson,
    /// The stream's meta frame is unreadable.
    BadStream(String),
    /// The file's metadata contradicts its name, or its parent link is broken.
    BadLink(String),
    /// There is no full or copy backup to start from.
    NoBase,
}

/// One reason a restore point cannot be restored exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The checkpoint it affects first.
    pub checkpoint: u32,
    /// The disk, when the problem is per disk.
    pub disk: Option<String>,
    /// The file concerned (missing or damaged).
    pub file: String,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ProblemKind::MissingData | ProblemKind::MissingQcowJson => {
                write!(f, "missing {}", self.file)
            }
            ProblemKind::Partial => write!(f, "partial {}", self.file),
            ProblemKind::BadStream(e) => write!(f, "unreadable {}: {e}", self.file),
            ProblemKind::BadLink(e) => write!(f, "broken chain at {}: {e}", self.file),
            ProblemKind::NoBase => write!(f, "no full or copy backup ({})", self.file),
        }
    }
}

/// §2.3 type of a directory, from its file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// Has `*.inc.virtnbdbackup.N.data`.
    Incremental,
    /// Has `*.full.data` only.
    Full,
    /// Has `*.copy.data` only.
    Copy,
    /// No data files.
    Unknown,
}

impl SetKind {
    /// Lower-case label used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incremental => "incremental",
            Self::Full => "full",
            Self::Copy => "copy",
            Self::Unknown => "unknown",
        }
    }
}

/// One checkpoint of the directory, as a restore point.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    /// Checkpoint number N (`virtnbdbackup.N`).
    pub checkpoint: u32,
    /// `checkpoints/virtnbdbackup.N.xml`, when present.
    pub checkpoint_xml: Option<PathBuf>,
    /// Disks that have a data file for exactly this checkpoint (display set).
    pub disks: BTreeSet<String>,
    /// Disks a restore of this point must produce: base disks ∩ disks of this
    /// checkpoint's vmconfig (optical drives, floppies and LUNs ignored).
    pub expected: BTreeSet<String>,
    /// Problems found at this checkpoint (empty when complete at this step).
    pub problems: Vec<Problem>,
}

/// Everything about one data directory.
#[derive(Debug)]
pub struct BackupSet {
    /// The directory.
    pub dir: PathBuf,
    /// Its type.
    pub kind: SetKind,
    /// Data files per disk, ordered: base (full/copy), incs by N, diffs by time.
    pub disks: BTreeMap<String, Vec<StreamFile>>,
    /// `.partial` leftovers.
    pub partials: Vec<(String, StreamLevel, PathBuf)>,
    /// `qcow.json` files per disk and run.
    pub qcow_json: BTreeMap<(String, Ident), PathBuf>,
    /// `vmconfig.<ident>.xml` files.
    pub vmconfigs: BTreeMap<Ident, PathBuf>,
    /// `checkpoints/virtnbdbackup.N.xml` files.
    pub checkpoint_xmls: BTreeMap<u32, PathBuf>,
    /// Checkpoint names from `<domain>.cpt`, when present and readable.
    pub cpt: Option<Vec<String>>,
    /// Loader/NVRAM copies: (original basename, checkpoint, path).
    pub boot_files: Vec<(String, u32, PathBuf)>,
    /// Restore points 0..=L.
    pub points: Vec<RestorePoint>,
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| io_at(0)(e).in_file(path)
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    crate::small::read_small_file(path, MAX_SIDECAR_LEN).map_err(file_error(path))
}

/// Reads and parses a domain XML file.
pub fn read_domain_config(path: &Path) -> Result<DomainConfig> {
    let bytes = read_small(path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::new(ErrorKind::BadSidecar {
            offset: 0,
            reason: "not UTF-8".into(),
        })
        .in_file(path)
    })?;
    DomainConfig::parse(&text).map_err(|e| e.in_file(path))
}

fn open_stream_file(
    path: PathBuf,
    disk: String,
    level: StreamLevel,
    meta: &fs::Metadata,
) -> StreamFile {
    let content = (|| -> Result<StreamContent> {
        let mut f = File::open(&path).map_err(file_error(&path))?;
        let mut first = [0u8; 5];
        let n = f.read(&mut first).map_err(file_error(&path))?;
        if !looks_like_stream(&first[..n]) && level == StreamLevel::Copy && n == 5 {
            return Ok(StreamContent::RawImage);
        }
        let mut f = f;
        let m = read_meta(&mut f).map_err(|e| e.in_file(&path))?;
        check_tail(&mut f, &m).map_err(|e| e.in_file(&path))?;
        Ok(StreamContent::Stream(m))
    })()
    .unwrap_or_else(StreamContent::Unreadable);
    let has_chksum = crate::checksum::chksum_path(&path).is_file();
    StreamFile {
        disk,
        level,
        size: meta.len(),
        mtime: meta.modified().ok(),
        has_chksum,
        content,
        path,
    }
}

/// A cheap end-of-file check: a complete stream ends with its `stop` header
/// (uncompressed) or its `comp` header (compressed). Catches truncated files at scan
/// time, before any restore reads them.
fn check_tail(f: &mut File, meta: &StreamMeta) -> Result<()> {
    use crate::frame::{FrameHeader, FrameKind, HEADER_LEN};
    use std::io::{Seek, SeekFrom};
    let size = f.seek(SeekFrom::End(0)).map_err(io_at(0))?;
    let at = size.saturating_sub(HEADER_LEN as u64);
    let mut buf = [0u8; HEADER_LEN];
    f.seek(SeekFrom::Start(at)).map_err(io_at(at))?;
    let n = f.read(&mut buf).map_err(io_at(at))?;
    let want = if meta.is_compressed() {
        FrameKind::Comp
    } else {
        FrameKind::Stop
    };
    let truncated = || {
        Error::new(ErrorKind::Truncated {
            offset: at,
            expected: want.as_str(),
        })
    };
    match FrameHeader::parse(&buf[..n], at) {
        Ok(h) if h.kind == want => Ok(()),
        _ => Err(truncated()),
    }
}

impl BackupSet {
    /// Scans a data directory. Fails only when the directory cannot be read; damaged
    /// files become [`Problem`]s of the restore points they affect.
    pub fn scan(dir: &Path) -> Result<Self> {
        let mut set = Self {
            dir: dir.to_path_buf(),
            kind: SetKind::Unknown,
            disks: BTreeMap::new(),
            partials: Vec::new(),
            qcow_json: BTreeMap::new(),
            vmconfigs: BTreeMap::new(),
            checkpoint_xmls: BTreeMap::new(),
            cpt: None,
            boot_files: Vec::new(),
            points: Vec::new(),
        };
        let mut cpt_files = Vec::new();
        for entry in fs::read_dir(dir).map_err(file_error(dir))? {
            let entry = entry.map_err(file_error(dir))?;
            let path = entry.path();
            // symlink_metadata: a planted symlink is not a backup file
            let md = fs::symlink_metadata(&path).map_err(file_error(&path))?;
            // virtnbdbackup's names are made of libvirt disk targets: one that is not
            // UTF-8 is no backup file (and is never turned into a disk name lossily)
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if md.is_dir() && name == "checkpoints" {
                set.scan_checkpoints(&path)?;
            } else if !md.is_file() {
                set.not_regular(&name, path, &md);
            } else if BackupFile::parse(&name) == BackupFile::Cpt {
                cpt_files.push(path);
            } else {
                set.add_file(&name, path, &md);
            }
        }
        if let [one] = cpt_files.as_slice() {
            set.cpt = read_small(one).ok().and_then(|b| parse_cpt(&b).ok());
        }
        set.order();
        set.evaluate();
        Ok(set)
    }

    /// A directory entry that is no regular file is never followed or read; but a
    /// data file's name on a directory or symlink is reported as unreadable, not as a
    /// missing file.
    fn not_regular(&mut self, name: &str, path: PathBuf, md: &fs::Metadata) {
        let BackupFile::Stream {
            disk,
            level,
            partial: false,
        } = BackupFile::parse(name)
        else {
            return;
        };
        let what = if md.is_dir() {
            "a directory"
        } else if md.file_type().is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        );
        let content = StreamContent::Unreadable(io_at(0)(e).in_file(&path));
        let f = StreamFile {
            disk: disk.clone(),
            level,
            size: 0,
            mtime: None,
            has_chksum: false,
            content,
            path,
        };
        self.disks.entry(disk).or_default().push(f);
    }

    /// A regular file of the backup directory, by what its name says it is.
    fn add_file(&mut self, name: &str, path: PathBuf, md: &fs::Metadata) {
        match BackupFile::parse(name) {
            BackupFile::Stream {
                disk,
                level,
                partial: true,
            } => self.partials.push((disk, level, path)),
            BackupFile::Stream {
                disk,
                level,
                partial: false,
            } => {
                let f = open_stream_file(path, disk.clone(), level, md);
                self.disks.entry(disk).or_default().push(f);
            }
            BackupFile::QcowJson { disk, ident } => {
                self.qcow_json.insert((disk, ident), path);
            }
            BackupFile::VmConfig { ident } => {
                self.vmconfigs.insert(ident, path);
            }
            BackupFile::BootFile { base, checkpoint } => {
                self.boot_files.push((base, checkpoint, path))
            }
            BackupFile::Cpt | BackupFile::Checksum { .. } | BackupFile::Other => {}
        }
    }

    /// Each disk's files in chain order (base, incrementals by number, differentials
    /// by time), and the kind of set they make.
    fn order(&mut self) {
        for files in self.disks.values_mut() {
            files.sort_by_key(|f| match f.level {
                StreamLevel::Full | StreamLevel::Copy => (0u8, 0u64),
                StreamLevel::Inc(n) => (1, u64::from(n)),
                StreamLevel::Diff(ts) => (2, ts),
            });
        }
        self.boot_files.sort();
        let levels = || self.disks.values().flatten().map(|f| f.level);
        self.kind = if levels().any(|l| matches!(l, StreamLevel::Inc(_))) {
            SetKind::Incremental
        } else if levels().any(|l| l == StreamLevel::Full) {
            SetKind::Full
        } else if levels().any(|l| l == StreamLevel::Copy) {
            SetKind::Copy
        } else {
            SetKind::Unknown
        };
    }

    fn scan_checkpoints(&mut self, dir: &Path) -> Result<()> {
        for entry in fs::read_dir(dir).map_err(file_error(dir))? {
            let entry = entry.map_err(file_error(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".xml").and_then(checkpoint_number) {
                if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    self.checkpoint_xmls.insert(n, entry.path());
                }
            }
        }
        Ok(())
    }

    /// The data file of `disk` for checkpoint `n` (n = 0: full or copy).
    pub fn file(&self, disk: &str, n: u32) -> Option<&StreamFile> {
        // files are sorted base, incrementals by N, then diffs (no checkpoint): a binary
        // search, since a chain walks every point (a linear scan made `--verify` of a
        // 2,000-point chain cubic: 5.4 s)
        let files = self.disks.get(disk)?;
        let at = files.partition_point(|f| f.level.checkpoint().is_some_and(|c| c < n));
        files.get(at).filter(|f| f.level.checkpoint() == Some(n))
    }

    /// Disks with a base (full or copy) file.
    pub fn base_disks(&self) -> BTreeSet<String> {
        self.disks
            .iter()
            .filter(|(_, files)| {
                files
                    .iter()
                    .any(|f| matches!(f.level, StreamLevel::Full | StreamLevel::Copy))
            })
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// The highest checkpoint known from any source (L), if any.
    pub fn latest(&self) -> Option<u32> {
        self.points.last().map(|p| p.checkpoint)
    }

    /// The restore point N.
    pub fn point(&self, n: u32) -> Option<&RestorePoint> {
        self.points.get(n as usize)
    }

    /// The smallest checkpoint that is incomplete: points at or above it are not
    /// restorable exactly.
    pub fn broken_at(&self) -> Option<&RestorePoint> {
        self.points.iter().find(|p| !p.problems.is_empty())
    }

    /// The vmconfig of checkpoint `n` (copy sets: `vmconfig.copy.xml`).
    pub fn vmconfig(&self, n: u32) -> Option<&Path> {
        let ident = if self.kind == SetKind::Copy {
            Ident::Copy
        } else {
            Ident::Checkpoint(n)
        };
        self.vmconfigs.get(&ident).map(PathBuf::as_path)
    }

    /// The newest `qcow.json` of `disk` at or before checkpoint `n`.
    pub fn qcow_json(&self, disk: &str, n: u32) -> Option<&Path> {
        if let Some(p) = self.qcow_json.get(&(disk.to_owned(), Ident::Copy)) {
            if self.kind == SetKind::Copy {
                return Some(p);
            }
        }
        (0..=n)
            .rev()
            .find_map(|i| self.qcow_json.get(&(disk.to_owned(), Ident::Checkpoint(i))))
            .map(PathBuf::as_path)
    }

    fn qcow_json_exists(&self, disk: &str, n: u32) -> bool {
        let ident = if self.kind == SetKind::Copy {
            Ident::Copy
        } else {
            Ident::Checkpoint(n)
        };
        self.qcow_json.contains_key(&(disk.to_owned(), ident))
    }

    pub(crate) fn data_file_name(&self, disk: &str, n: u32) -> String {
        match (n, self.kind) {
            (0, SetKind::Copy) => format!("{disk}.copy.data"),
            (0, _) => format!("{disk}.full.data"),
            (n, _) => format!("{disk}.inc.virtnbdbackup.{n}.data"),
        }
    }

    /// The files to apply, in order, to restore `disk` at checkpoint `n`: the newest
    /// base at or before `n`, then every incremental after it up to `n`, each one's
    /// parent checked against the one before.
    pub fn chain(&self, disk: &str, n: u32) -> std::result::Result<Vec<&StreamFile>, Problem> {
        let problem = |checkpoint: u32, file: String, kind: ProblemKind| Problem {
            checkpoint,
            disk: Some(disk.to_owned()),
            file,
            kind,
        };
        let mut base = None;
        for i in (0..=n).rev() {
            if let Some(f) = self.file(disk, i) {
                if i == 0 || f.meta().is_some_and(StreamMeta::is_base) {
                    base = Some(i);
                    break;
                }
            }
        }
        let Some(base) = base else {
            return Err(problem(
                0,
                self.data_file_name(disk, 0),
                ProblemKind::NoBase,
            ));
        };
        let mut out: Vec<&StreamFile> = Vec::new();
        for i in base..=n {
            let name = self.data_file_name(disk, i);
            let Some(f) = self.file(disk, i) else {
                let partial = self
                    .partials
                    .iter()
                    .any(|(d, l, _)| d == disk && l.checkpoint() == Some(i));
                return Err(if partial {
                    problem(i, format!("{name}.partial"), ProblemKind::Partial)
                } else {
                    problem(i, name, ProblemKind::MissingData)
                });
            };
            if let Err(kind) = check_member(f, i, out.last().copied()) {
                return Err(problem(i, f.file_name(), kind));
            }
            out.push(f);
        }
        Ok(out)
    }

    /// The chain for the newest state of `disk` at checkpoint `n`: [`chain`](Self::chain)
    /// plus the newest differential taken on top of checkpoint `n`, if any (a
    /// differential holds every change since its parent checkpoint, so only the newest
    /// one counts).
    pub fn chain_with_diff(
        &self,
        disk: &str,
        n: u32,
    ) -> std::result::Result<Vec<&StreamFile>, Problem> {
        let mut chain = self.chain(disk, n)?;
        let Some(parent) = chain
            .last()
            .and_then(|f| f.meta())
            .map(|m| m.checkpoint_name.clone())
        else {
            return Ok(chain);
        };
        let newest_diff = self
            .disks
            .get(disk)
            .into_iter()
            .flatten()
            .filter(|f| matches!(f.level, StreamLevel::Diff(_)))
            .filter(|f| {
                f.meta().is_some_and(|m| {
                    m.parent_checkpoint.as_deref() == Some(parent.as_str()) && m.disk_name == disk
                })
            })
            .max_by_key(|f| f.level);
        if let Some(d) = newest_diff {
            chain.push(d);
        }
        Ok(chain)
    }

    /// §2.8: per checkpoint, which disks are expected and whether their files are there.
    fn evaluate(&mut self) {
        let Some(latest) = self.latest_checkpoint() else {
            return;
        };
        let base = self.base_disks();
        let mut seen = Layout {
            expected: base.clone(),
            driver: BTreeMap::new(),
            had_sidecar: BTreeSet::new(),
        };
        let mut points = Vec::with_capacity(latest as usize + 1);
        for n in 0..=latest {
            if let Some(cfg) = self.vmconfig(n).and_then(|p| read_domain_config(p).ok()) {
                seen.driver = cfg
                    .disks
                    .iter()
                    .filter(|d| d.is_disk())
                    .map(|d| (d.target.clone(), d.driver_type.clone()))
                    .collect();
                seen.expected = base
                    .iter()
                    .filter(|d| seen.driver.contains_key(*d))
                    .cloned()
                    .collect();
            }
            let mut problems = Vec::new();
            if base.is_empty() {
                problems.push(Problem {
                    checkpoint: n,
                    disk: None,
                    file: "*.full.data".into(),
                    kind: ProblemKind::NoBase,
                });
            }
            for d in &seen.expected.clone() {
                problems.extend(self.data_problem(d, n));
                problems.extend(self.qcow_problem(d, n, &mut seen));
            }
            let disks = self
                .disks
                .keys()
                .filter(|d| self.file(d, n).is_some())
                .cloned()
                .collect();
            points.push(RestorePoint {
                checkpoint: n,
                checkpoint_xml: self.checkpoint_xmls.get(&n).cloned(),
                disks,
                expected: seen.expected.clone(),
                problems,
            });
        }
        self.points = points;
    }

    /// The newest checkpoint anything in the directory speaks of (data files,
    /// interrupted ones, checkpoint XMLs, vmconfigs, the `.cpt` list), if any.
    fn latest_checkpoint(&self) -> Option<u32> {
        let mut universe: BTreeSet<u32> = self.checkpoint_xmls.keys().copied().collect();
        if !self.base_disks().is_empty() {
            universe.insert(0);
        }
        for files in self.disks.values() {
            universe.extend(files.iter().filter_map(|f| match f.level {
                StreamLevel::Inc(n) => Some(n),
                _ => None,
            }));
        }
        universe.extend(self.partials.iter().filter_map(|(_, l, _)| l.checkpoint()));
        universe.extend(self.vmconfigs.keys().filter_map(|i| match i {
            Ident::Checkpoint(n) => Some(*n),
            _ => None,
        }));
        if let Some(cpt) = &self.cpt {
            universe.extend(cpt.iter().filter_map(|c| checkpoint_number(c)));
        }
        universe.last().copied()
    }

    /// What is wrong with disk `d`'s data file at point `n`: interrupted, missing, or
    /// not the member of the chain it should be.
    fn data_problem(&self, d: &str, n: u32) -> Option<Problem> {
        let partial = self
            .partials
            .iter()
            .find(|(pd, l, _)| pd == d && l.checkpoint() == Some(n));
        let (file, kind) = match (self.file(d, n), partial) {
            (_, Some((_, _, p))) => (
                p.file_name()
                    .map(|x| x.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                ProblemKind::Partial,
            ),
            (None, None) => (self.data_file_name(d, n), ProblemKind::MissingData),
            (Some(f), None) => {
                let prev = if f.meta().is_some_and(StreamMeta::is_base) {
                    None
                } else {
                    n.checked_sub(1).and_then(|p| self.file(d, p))
                };
                (f.file_name(), check_member(f, n, prev).err()?)
            }
        };
        Some(Problem {
            checkpoint: n,
            disk: Some(d.to_owned()),
            file,
            kind,
        })
    }

    /// A qcow2 disk's stream needs its `qcow.json` (the image options) at point `n`;
    /// a disk whose driver no vmconfig names is qcow2 once a `qcow.json` was seen.
    fn qcow_problem(&self, d: &str, n: u32, seen: &mut Layout) -> Option<Problem> {
        let qcow2 = match seen.driver.get(d).cloned().flatten() {
            Some(t) => t == "qcow2",
            None => seen.had_sidecar.contains(d),
        };
        let raw_image = self
            .file(d, n)
            .is_some_and(|f| matches!(f.content, StreamContent::RawImage));
        if self.qcow_json_exists(d, n) {
            seen.had_sidecar.insert(d.to_owned());
            return None;
        }
        (qcow2 && !raw_image).then(|| Problem {
            checkpoint: n,
            disk: Some(d.to_owned()),
            file: match self.kind {
                SetKind::Copy => format!("{d}.copy.qcow.json"),
                _ => format!("{d}.virtnbdbackup.{n}.qcow.json"),
            },
            kind: ProblemKind::MissingQcowJson,
        })
    }
}

/// The disks and drivers known at a point, carried from one point to the next.
struct Layout {
    /// Disks the point should have (the base's disks its vmconfig lists).
    expected: BTreeSet<String>,
    /// Target → driver type, from the newest vmconfig so far.
    driver: BTreeMap<String, Option<String>>,
    /// Disks a `qcow.json` was seen for.
    had_sidecar: BTreeSet<String>,
}

/// Checks one member of a chain against its name and its predecessor.
fn check_member(
    f: &StreamFile,
    n: u32,
    prev: Option<&StreamFile>,
) -> std::result::Result<(), ProblemKind> {
    let meta = match &f.content {
        StreamContent::Stream(m) => m,
        StreamContent::RawImage => return Ok(()),
        StreamContent::Unreadable(e) => return Err(ProblemKind::BadStream(e.kind().to_string())),
    };
    if meta.disk_name != f.disk {
        return Err(ProblemKind::BadLink(format!(
            "meta diskName is {:?}",
            meta.disk_name
        )));
    }
    let expected_name = format!("virtnbdbackup.{n}");
    match f.level {
        StreamLevel::Inc(_) if meta.checkpoint_name != expected_name => {
            return Err(ProblemKind::BadLink(format!(
                "meta checkpointName is {:?}, expected {expected_name:?}",
                meta.checkpoint_name
            )));
        }
        StreamLevel::Full | StreamLevel::Copy if meta.incremental => {
            return Err(ProblemKind::BadLink(
                "a full/copy file holds an incremental stream".into(),
            ));
        }
        _ => {}
    }
    if meta.is_base() {
        return Ok(());
    }
    let Some(prev) = prev else {
        return Err(ProblemKind::BadLink(
            "no base precedes this incremental".into(),
        ));
    };
    let Some(pm) = prev.meta() else {
        return Err(ProblemKind::BadLink(format!(
            "previous member {} is unreadable",
            prev.file_name()
        )));
    };
    let parent = meta.parent_checkpoint.as_deref().unwrap_or("");
    if parent != pm.checkpoint_name {
        return Err(ProblemKind::BadLink(format!(
            "parent checkpoint is {parent:?}, but the previous backup {} is {:?}",
            prev.file_name(),
            pm.checkpoint_name
        )));
    }
    Ok(())
}

/// Turns a chain problem into a typed error naming the file and (for link problems)
/// the meta offset.
pub fn problem_error(set: &BackupSet, p: &Problem) -> Error {
    let path = set.dir.join(&p.file);
    let kind = match &p.kind {
        ProblemKind::NoBase => ErrorKind::NoBase,
        ProblemKind::BadLink(reason) => ErrorKind::NameMismatch {
            offset: crate::frame::HEADER_LEN as u64,
            reason: reason.clone(),
        },
        ProblemKind::BadStream(reason) => ErrorKind::BadSidecar {
            offset: 0,
            reason: reason.clone(),
        },
        ProblemKind::MissingData | ProblemKind::Partial | ProblemKind::MissingQcowJson => {
            ErrorKind::Io {
                offset: 0,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, p.to_string()),
            }
        }
    };
    Error::new(kind).in_file(&path)
}
