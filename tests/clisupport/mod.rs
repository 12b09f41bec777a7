//! Shared helpers for the CLI integration tests: a writable copy of the real-chain
//! fixture with deterministic mtimes, a tree-hash guard that fails a test when the
//! backup tree changed, a runner for the built binary, and golden files.
//!
//! Goldens live in `tests/golden/cli/`; regenerate with `UPDATE_GOLDEN=1 cargo test`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// The fixture in the repository (read only; never pointed at by a test run).
pub fn fixture_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-chains")
}

/// The sha256 the fixture records for `disk` at a restore point
/// (`expected/<vm>/<chain>/<point>/<disk>.sha256`).
pub fn expected_sha256(vm: &str, chain: &str, point: &str, disk: &str) -> String {
    let p = fixture_src().join(format!("expected/{vm}/{chain}/{point}/{disk}.sha256"));
    fs::read_to_string(p)
        .expect("sha file")
        .split_whitespace()
        .next()
        .expect("sha")
        .to_owned()
}

/// mtime given to every file the manifest says nothing about.
pub const BASE_TIME: &str = "2026-01-01T00:00:00";

fn parse_sim_time(s: &str) -> SystemTime {
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").expect("sim_time format");
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(t.and_utc().timestamp()).expect("after 1970"))
}

fn set_mtime(p: &Path, t: SystemTime) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap_or_else(|e| panic!("set_times {}: {e}", p.display()));
}

fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir");
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755)).expect("chmod");
    for e in fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().expect("type").is_dir() {
            copy_tree(&s, &d);
        } else {
            fs::copy(&s, &d).expect("copy");
            fs::set_permissions(&d, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
}

fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    out.push(root.to_path_buf());
    if root.is_dir() && !root.is_symlink() {
        let mut entries: Vec<PathBuf> = fs::read_dir(root)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, out);
        }
    }
}

/// Prepares `<dir>/backups` from the fixture: copy, recreate `empty_dirs`, and set
/// mtimes from the manifest's `sim_time` (each point's `files_written`; each chain
/// dir gets its newest point's time; everything else [`BASE_TIME`]).
pub fn prepare_backups(dir: &Path) -> PathBuf {
    let src = fixture_src();
    let root = dir.join("backups");
    copy_tree(&src.join("backups"), &root);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("expected/manifest.json")).expect("manifest"))
            .expect("manifest json");
    let rel = |p: &str| root.join(p.strip_prefix("backups/").unwrap_or(p));
    for d in manifest["empty_dirs"].as_array().expect("empty_dirs") {
        fs::create_dir_all(rel(d.as_str().expect("str"))).expect("mkdir empty dir");
    }
    let mut all = Vec::new();
    walk(&root, &mut all);
    let base = parse_sim_time(BASE_TIME);
    for p in all.iter().filter(|p| !p.is_dir()) {
        set_mtime(p, base);
    }
    let mut dir_times: BTreeMap<PathBuf, SystemTime> = BTreeMap::new();
    for vm in manifest["vms"].as_object().expect("vms").values() {
        for chain in vm["chains"].as_array().expect("chains") {
            let chain_dir = rel(chain["dir"].as_str().expect("dir"));
            for rp in chain["restore_points"].as_array().expect("points") {
                let t = parse_sim_time(rp["sim_time"].as_str().expect("sim_time"));
                for file in rp["files_written"].as_object().expect("files").keys() {
                    let p = chain_dir.join(file);
                    if p.is_file() {
                        set_mtime(&p, t);
                    }
                }
                let e = dir_times.entry(chain_dir.clone()).or_insert(t);
                *e = (*e).max(t);
            }
        }
    }
    // directories last: nothing is created inside them afterwards
    for p in all.iter().filter(|p| p.is_dir()) {
        set_mtime(p, dir_times.get(p).copied().unwrap_or(base));
    }
    root
}

/// A hash of every path, type, mode, size, mtime and content under `root`,
/// excluding `root/_state`.
pub fn tree_hash(root: &Path) -> String {
    let mut all = Vec::new();
    walk(root, &mut all);
    let state = root.join("_state");
    let mut h = Sha256::new();
    for p in all.iter().filter(|p| !p.starts_with(&state)) {
        let md = fs::symlink_metadata(p).expect("metadata");
        let rel = p.strip_prefix(root).expect("inside");
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(
            format!(
                "\0{:o}\0{}\0{}\0{}\0",
                md.mode(),
                md.len(),
                md.mtime(),
                md.mtime_nsec()
            )
            .as_bytes(),
        );
        if md.is_file() {
            let mut f = File::open(p).expect("open");
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        } else if md.file_type().is_symlink() {
            h.update(
                fs::read_link(p)
                    .expect("readlink")
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        }
    }
    format!("{:x}", h.finalize())
}

/// A temporary directory for a `static` (which is never dropped): removed when the
/// test process exits. Left behind by every test binary (~30-50 MB each, and a 225 MB
/// generated chain), such copies filled a CI machine's disk.
pub fn static_tempdir() -> tempfile::TempDir {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_at_exit() {
        let dirs = DIRS.lock().map(|d| d.clone()).unwrap_or_default();
        for d in dirs {
            let _ = fs::remove_dir_all(d);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dirs = DIRS.lock().expect("lock");
    if dirs.is_empty() {
        // SAFETY: registers a plain function without arguments, run once at exit.
        unsafe { libc::atexit(remove_at_exit) };
    }
    dirs.push(dir.path().to_path_buf());
    dir
}

/// The shared, prepared fixture of one test binary.
#[derive(Debug)]
pub struct Fixture {
    _dir: tempfile::TempDir,
    /// BACKUP_ROOT (`<tmp>/backups`).
    pub root: PathBuf,
    baseline: String,
}

impl Fixture {
    /// Prepared once per test binary; tests must only read it. A static is never
    /// dropped, so the copy (~30-50 MB) is removed when the test process exits: left
    /// behind by every test binary it filled a CI machine's disk.
    pub fn shared() -> &'static Fixture {
        static FX: OnceLock<Fixture> = OnceLock::new();
        FX.get_or_init(|| {
            let dir = static_tempdir();
            let root = prepare_backups(dir.path());
            let baseline = tree_hash(&root);
            Fixture {
                _dir: dir,
                root,
                baseline,
            }
        })
    }

    /// A guard that fails the test if the tree (minus `_state/`) changed by the time
    /// it is dropped (spec statement 150, for the read-only modes).
    pub fn guard(&'static self) -> TreeGuard {
        TreeGuard { fx: self }
    }

    /// `<root>/<rel>` as a string.
    pub fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// The root as a string.
    pub fn root_str(&self) -> String {
        self.root.display().to_string()
    }
}

/// See [`Fixture::guard`].
#[derive(Debug)]
pub struct TreeGuard {
    fx: &'static Fixture,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                tree_hash(&self.fx.root),
                self.fx.baseline,
                "the backup tree under {} was modified",
                self.fx.root.display()
            );
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

/// A scratch environment for one run: its own LOG_DIR and config root.
#[derive(Debug)]
pub struct Scratch {
    /// Temporary directory.
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// New scratch dirs (`logs/` is not created: vmrestore creates it when needed).
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `LOG_DIR` of the runs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// `VMRESTORE_CONFIG_ROOT` of the runs.
    pub fn config_root(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Writes `<config root>/<instance>/vmbackup.conf`.
    pub fn write_config(&self, instance: &str, text: &str) -> PathBuf {
        let d = self.config_root().join(instance);
        fs::create_dir_all(&d).expect("mkdir");
        let f = d.join("vmbackup.conf");
        fs::write(&f, text).expect("write conf");
        f
    }

    /// Files in LOG_DIR.
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.log_dir())
            .map(|r| r.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The command with a clean, deterministic environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmrestore"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TZ", "UTC")
            .env("LOG_DIR", self.log_dir())
            .env("VMRESTORE_CONFIG_ROOT", self.config_root())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }

    /// Runs vmrestore with `args`.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// Runs vmrestore with `args` and extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run vmrestore");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs vmrestore in a fresh scratch environment.
pub fn run(args: &[&str]) -> Run {
    Scratch::new().run(args)
}

/// Strips the `[YYYY-MM-DD HH:MM:SS] ` prefix of log lines, replaces `root` with
/// `B`, the log path with `<LOG>` and the duration with `<d>`.
pub fn normalize_log(text: &str, root: &str, log: Option<&Path>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut l = line.to_owned();
        if l.len() > 22 && l.starts_with('[') && l.as_bytes()[20] == b']' {
            l = l[22..].to_owned();
        }
        if let Some(p) = log {
            l = l.replace(&p.display().to_string(), "<LOG>");
        }
        if let Some(i) = l.find("Duration: ") {
            if let Some(j) = l[i..].find(" — ") {
                l = format!("{}Duration: <d>{}", &l[..i], &l[i + j..]);
            }
        }
        out.push_str(&l.replace(root, "B"));
        out.push('\n');
    }
    out
}

/// True when `line` is in the spec §7.3 shape.
pub fn is_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    let ts_ok = b.len() > 22
        && b[0] == b'['
        && b[20] == b']'
        && chrono::NaiveDateTime::parse_from_str(&line[1..20], "%Y-%m-%d %H:%M:%S").is_ok();
    ts_ok
        && line[22..].starts_with("[vmrestore] [")
        && ["] INFO: ", "] WARN: ", "] ERROR: "]
            .iter()
            .any(|l| line.contains(l))
}

/// Masks `du` sizes (filesystem dependent) at byte columns `[from, to)` of lines
/// selected by `pick`; sizes are checked against `du` separately.
pub fn mask_sizes(text: &str, pick: impl Fn(&str) -> Option<(usize, usize)>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        match pick(line) {
            Some((from, to))
                if line.len() >= to && line.is_char_boundary(from) && line.is_char_boundary(to) =>
            {
                out.push_str(&line[..from]);
                out.push_str(&format!("{:>w$}", "@size", w = to - from));
                out.push_str(&line[to..]);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `--list` VM header lines: `"  %-53s %6s"`.
pub fn mask_list_sizes(text: &str) -> String {
    mask_sizes(text, |l| {
        (l.len() == 62 && l.starts_with("  ") && !l.starts_with("   ")).then_some((56, 62))
    })
}

/// `--list-restore-points` chain lines: `"    %-30s %6s  ..."`.
pub fn mask_chain_sizes(text: &str) -> String {
    mask_sizes(text, |l| {
        (l.starts_with("    chain-") && l.len() > 41).then_some((35, 41))
    })
}

/// Compares `actual` with `tests/golden/cli/<name>`; `UPDATE_GOLDEN=1` rewrites it.
pub fn assert_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/cli")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir golden");
        fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "golden {} differs at line {} (UPDATE_GOLDEN=1 to accept)\n--- expected\n{}\n--- actual\n{}",
            path.display(),
            first + 1,
            expected.lines().nth(first).unwrap_or("<end>"),
            actual.lines().nth(first).unwrap_or("<end>")
        );
    }
}

/// sha256 of the guest content of a disk image (converted to raw by qemu-img, a
/// test-only tool).
pub fn guest_sha(img: &Path) -> String {
    use sha2::{Digest, Sha256};
    let raw = img.with_file_name(format!(
        "{}.raw-check",
        img.file_name().expect("name").to_string_lossy()
    ));
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert {}", img.display());
    let mut h = Sha256::new();
    std::io::copy(&mut fs::File::open(&raw).expect("raw"), &mut h).expect("hash");
    fs::remove_file(&raw).expect("rm");
    format!("{:x}", h.finalize())
}
