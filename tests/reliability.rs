//! Reliability of the restore path, through the built binary: damaged backups are
//! refused with their category's exit code and a message naming the file (and byte
//! offset where there is one), hostile input cannot make vmrestore write outside the
//! restore path, and faults (full target, unreadable input, kill -9, SIGINT/SIGTERM)
//! never leave a half-restored disk under its final name nor a `.part` file behind.
//! Every test checks that the backup tree it restored from is unchanged (the lock
//! file and the catalogue are the only things vmrestore may touch there).
//!
//! Data-only restores (`--skip-config`) and disk extract need no libvirt; the runs
//! still pass `--connect test:///default`. Disk in place uses a `test:///<file>.xml`
//! domain whose disks are files of the test.
//!
//! Each test prints `TABLE|<damage class>|<exit code>|<message>` lines (visible with
//! `--nocapture`) for the reliability report.

mod clisupport;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use clisupport::guest_sha;
use clisupport::{fixture_src, tree_hash, Run, Scratch};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------

/// Copies `src` to `dst` (files and directories; symlinks are not in the fixture).
fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir");
    for e in fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).expect("copy");
        }
    }
}

/// Hard-links every file of `src` into `dst` (the generated chains are large and
/// only read).
fn link_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir");
    for e in fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            link_dir(&e.path(), &to);
        } else {
            fs::hard_link(e.path(), &to).expect("link");
        }
    }
}

fn sha_hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha(p: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(
        &mut File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())),
        &mut h,
    )
    .expect("hash");
    sha_hex(h.finalize())
}

/// `tree_hash` (everything outside `_state/`) plus `_state/` minus what the spec lets
/// a restore change: the lock directory and the catalogue (`vmbackup.db*`).
fn backup_hash(root: &Path) -> String {
    fn walk(p: &Path, root: &Path, h: &mut Sha256) {
        let mut v: Vec<PathBuf> = fs::read_dir(p)
            .map(|r| r.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        v.sort();
        for e in v {
            let name = e
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if e.parent() == Some(&root.join("_state"))
                && (name == "locks" || name.starts_with("vmbackup.db"))
            {
                continue;
            }
            let md = fs::symlink_metadata(&e).expect("md");
            h.update(
                e.strip_prefix(root)
                    .expect("inside")
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            h.update(format!("\0{:o}\0{}\0{}\0", md.mode(), md.len(), md.mtime()).as_bytes());
            if md.is_dir() {
                walk(&e, root, h);
            } else if md.is_file() {
                h.update(file_sha(&e).as_bytes());
            }
        }
    }
    let mut h = Sha256::new();
    h.update(tree_hash(root).as_bytes());
    walk(&root.join("_state"), root, &mut h);
    sha_hex(h.finalize())
}

/// Every path under `dir` (relative, symlinks not followed), sorted.
fn entries(dir: &Path) -> Vec<String> {
    fn walk(p: &Path, base: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(p)
            .map(|r| r.map(|e| e.expect("entry").path()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            out.push(e.strip_prefix(base).expect("inside").display().to_string());
            if fs::symlink_metadata(&e).is_ok_and(|m| m.is_dir()) {
                walk(&e, base, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The last `ERROR:` line of a run (what the user reads last), without timestamp.
fn error_line(r: &Run) -> String {
    r.stderr
        .lines()
        .rev()
        .find(|l| l.contains("] ERROR: ") && !l.contains("caused by"))
        .map(|l| l.split("] ERROR: ").nth(1).unwrap_or(l).to_owned())
        .unwrap_or_default()
}

/// Issue 21: a `caused by:` line never repeats text its ERROR line already shows
/// (engine errors carry their cause in the message and as `source()`).
fn assert_no_repeated_cause(r: &Run) {
    let mut last_error = "";
    for l in r.stderr.lines() {
        if let Some((_, cause)) = l.split_once("] ERROR:   caused by: ") {
            assert!(
                !last_error.contains(cause),
                "caused by repeats the message:\n{}",
                r.stderr
            );
        } else if let Some((_, msg)) = l.split_once("] ERROR: ") {
            last_error = msg;
        }
    }
}

/// One row of the report table (stderr of the test).
fn table(class: &str, r: &Run, root: &Path) {
    assert_no_repeated_cause(r);
    let msg = error_line(r).replace(&root.display().to_string(), "<root>");
    eprintln!(
        "TABLE|{class}|{}|{msg}",
        r.code.map_or("signal".into(), |c| c.to_string())
    );
}

/// A copy of some fixture VMs (or generated chains) under `<scratch>/backups`, a
/// restore path `<scratch>/out`, and the backup-tree hash taken before the run.
struct Case {
    s: Scratch,
    root: PathBuf,
    out: PathBuf,
    before: Option<String>,
}

impl Case {
    fn new(vms: &[&str]) -> Self {
        let s = Scratch::new();
        let root = s.dir.path().join("backups");
        // a vmbackup root always has `_state/` (lock and catalogue live there)
        fs::create_dir_all(root.join("_state")).expect("mkdir root");
        for vm in vms {
            copy_dir(&fixture_src().join("backups").join(vm), &root.join(vm));
        }
        let out = s.dir.path().join("out");
        Self {
            s,
            root,
            out,
            before: None,
        }
    }

    /// A path inside the backup copy.
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Freezes the backup tree: `check_tree` compares against this.
    fn freeze(&mut self) {
        self.before = Some(backup_hash(&self.root));
    }

    fn check_tree(&self) {
        let before = self.before.as_ref().expect("freeze() before running");
        assert_eq!(
            &backup_hash(&self.root),
            before,
            "the backup tree under {} was modified",
            self.root.display()
        );
    }

    fn args<'a>(&'a self, vm: &'a str, extra: &[&'a str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--vm".into(),
            vm.into(),
            "--backup-path".into(),
            self.root.display().to_string(),
            "--connect".into(),
            "test:///default".into(),
        ];
        if !extra.contains(&"--disk") {
            a.extend([
                "--skip-config".into(),
                "--restore-path".into(),
                self.out.display().to_string(),
            ]);
        }
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    }

    /// A data-only restore of `vm` into `out` (or, with `--disk`, as given), checking
    /// the tree afterwards.
    fn restore(&mut self, vm: &str, extra: &[&str]) -> Run {
        if self.before.is_none() {
            self.freeze();
        }
        let a = self.args(vm, extra);
        let r = self
            .s
            .run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        self.check_tree();
        r
    }

    fn spawn(&mut self, vm: &str, extra: &[&str]) -> Child {
        if self.before.is_none() {
            self.freeze();
        }
        let a = self.args(vm, extra);
        self.s
            .command(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmrestore")
    }

    fn lock(&self, vm: &str) -> PathBuf {
        self.root.join(format!("_state/locks/vmbackup-{vm}.lock"))
    }

    /// A refused run: the exit code, the message, and nothing under `out`.
    fn refused(
        &mut self,
        class: &str,
        vm: &str,
        extra: &[&str],
        code: i32,
        needles: &[&str],
    ) -> Run {
        let r = self.restore(vm, extra);
        table(class, &r, &self.root);
        assert_eq!(r.code, Some(code), "{class}: exit code\n{}", r.stderr);
        let msg = r.stderr.replace(&self.root.display().to_string(), "");
        for n in needles {
            assert!(msg.contains(n), "{class}: stderr lacks {n:?}\n{}", r.stderr);
        }
        let left = entries(&self.out);
        assert!(
            left.is_empty(),
            "{class}: files left in the restore path: {left:?}"
        );
        assert!(!self.lock(vm).exists(), "{class}: lock not released");
        r
    }
}

fn flip(path: &Path, offset: u64, f: impl FnOnce(u8) -> u8) {
    let mut b = fs::read(path).expect("read");
    let i = usize::try_from(offset).expect("offset");
    b[i] = f(b[i]);
    fs::write(path, b).expect("write");
}

fn put(path: &Path, offset: u64, bytes: &[u8]) {
    let mut b = fs::read(path).expect("read");
    let i = usize::try_from(offset).expect("offset");
    b[i..i + bytes.len()].copy_from_slice(bytes);
    fs::write(path, b).expect("write");
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let b = fs::read(path).expect("read");
    let pos = b
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} not in {}", path.display()));
    let mut out = b[..pos].to_vec();
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&b[pos + from.len()..]);
    fs::write(path, out).expect("write");
}

fn qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn manifest() -> &'static serde_json::Value {
    static M: OnceLock<serde_json::Value> = OnceLock::new();
    M.get_or_init(|| {
        serde_json::from_slice(
            &fs::read(fixture_src().join("expected/manifest.json")).expect("manifest"),
        )
        .expect("json")
    })
}

/// Expected sha256 of `disk` at `point` of the chain in `dir` (`backups/...`).
fn expected_sha(vm: &str, dir: &str, point: &str, disk: &str) -> String {
    let chains = manifest()["vms"][vm]["chains"].as_array().expect("chains");
    let c = chains
        .iter()
        .find(|c| c["dir"] == dir)
        .unwrap_or_else(|| panic!("chain {dir}"));
    let rp = c["restore_points"]
        .as_array()
        .expect("points")
        .iter()
        .find(|p| p["name"] == point)
        .unwrap_or_else(|| panic!("point {point}"));
    rp["disks"][disk]["sha256"]
        .as_str()
        .expect("sha")
        .to_owned()
}

fn check_content(img: &Path, vm: &str, dir: &str, point: &str, disk: &str) {
    if !qemu_img() {
        eprintln!(
            "SKIP content check of {}: qemu-img not installed",
            img.display()
        );
        return;
    }
    assert_eq!(
        guest_sha(img),
        expected_sha(vm, dir, point, disk),
        "{} at {point}",
        img.display()
    );
}

// ---------------------------------------------------------------------------------
// Generated chains (uncompressed streams, laid out like virtnbdbackup + vmbackup)
// ---------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// One checkpoint of a generated disk: data extents `(start, len)`.
struct GenDisk<'a> {
    dev: &'a str,
    size: u64,
    /// Per checkpoint (0 = full): extents written.
    steps: Vec<Vec<(u64, u64)>>,
}

fn header(kind: &str, start: u64, len: u64) -> Vec<u8> {
    format!("{kind} {start:016x} {len:016x}\r\n").into_bytes()
}

/// Deterministic, incompressible-enough payload for `[start, start+len)`.
fn payload(out: &mut impl Write, seed: u64, start: u64, len: u64) {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    let block = BLOCK.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..MIB / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    });
    let mut pos = start;
    while pos < start + len {
        let n = (start + len - pos).min(MIB - pos % MIB);
        let off = usize::try_from(pos % MIB).expect("usize");
        let mut piece = block[off..off + usize::try_from(n).expect("usize")].to_vec();
        // make every MiB and every checkpoint distinct
        let tag = (pos / MIB).wrapping_mul(0x100_0000_01b3) ^ seed;
        for (i, b) in tag.to_le_bytes().iter().enumerate().take(piece.len()) {
            piece[i] ^= b | 1;
        }
        out.write_all(&piece).expect("write payload");
        pos += n;
    }
}

fn domain_xml(vm: &str, disks: &[&GenDisk<'_>], image_dir: &str) -> String {
    let mut d = String::new();
    for g in disks {
        d.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{image_dir}/{vm}-{}.qcow2'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
            g.dev, g.dev
        ));
    }
    format!(
        "<domain type='kvm'>\n  <name>{vm}</name>\n  <uuid>6d1b7f5e-3c0a-4c8e-9a51-b3e4c2d9f0aa</uuid>\n  <memory unit='KiB'>1048576</memory>\n  <vcpu placement='static'>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>\n  </os>\n  <devices>\n{d}  </devices>\n</domain>\n"
    )
}

/// Writes a vmbackup accumulate-style VM dir `<root>/<vm>/` with one chain.
fn gen_chain(root: &Path, vm: &str, disks: &[GenDisk<'_>]) {
    let dir = root.join(vm);
    fs::create_dir_all(dir.join("checkpoints")).expect("mkdir");
    let points = disks.iter().map(|d| d.steps.len()).max().unwrap_or(0);
    let refs: Vec<&GenDisk<'_>> = disks.iter().collect();
    let xml = domain_xml(vm, &refs, "/var/lib/libvirt/images");
    for n in 0..points {
        for g in disks {
            let Some(ext) = g.steps.get(n) else { continue };
            let name = if n == 0 {
                format!("{}.full.data", g.dev)
            } else {
                format!("{}.inc.virtnbdbackup.{n}.data", g.dev)
            };
            let data: u64 = ext.iter().map(|e| e.1).sum();
            let parent = if n == 0 {
                String::new()
            } else {
                format!("virtnbdbackup.{}", n - 1)
            };
            let meta = format!(
                "{{\n    \"virtualSize\": {},\n    \"dataSize\": {data},\n    \"date\": \"2026-01-01T00:00:00.000001\",\n    \"diskName\": \"{}\",\n    \"diskFormat\": \"qcow2\",\n    \"checkpointName\": \"virtnbdbackup.{n}\",\n    \"compressed\": false,\n    \"compressionMethod\": \"lz4\",\n    \"parentCheckpoint\": \"{parent}\",\n    \"incremental\": {},\n    \"streamVersion\": 2\n}}",
                g.size,
                g.dev,
                n > 0
            );
            let mut w = BufWriter::with_capacity(
                1 << 20,
                File::create(dir.join(&name)).expect("create stream"),
            );
            w.write_all(&header("meta", 0, meta.len() as u64))
                .expect("w");
            w.write_all(meta.as_bytes()).expect("w");
            w.write_all(b"\r\n").expect("w");
            for &(s, l) in ext {
                w.write_all(&header("data", s, l)).expect("w");
                payload(&mut w, n as u64 + 1, s, l);
                w.write_all(b"\r\n").expect("w");
            }
            w.write_all(&header("stop", 0, 0)).expect("w");
            w.flush().expect("flush");
            fs::write(
                dir.join(format!("{}.virtnbdbackup.{n}.qcow.json", g.dev)),
                format!("{{\n    \"virtual-size\": {},\n    \"format\": \"qcow2\",\n    \"cluster-size\": 65536,\n    \"format-specific\": {{\"type\": \"qcow2\", \"data\": {{\"compat\": \"1.1\", \"lazy-refcounts\": false, \"refcount-bits\": 16, \"extended-l2\": false}}}}\n}}", g.size),
            )
            .expect("qcow.json");
        }
        fs::write(dir.join(format!("vmconfig.virtnbdbackup.{n}.xml")), &xml).expect("vmconfig");
        let parent = if n == 0 {
            String::new()
        } else {
            format!(
                "  <parent>\n    <name>virtnbdbackup.{}</name>\n  </parent>\n",
                n - 1
            )
        };
        fs::write(
            dir.join(format!("checkpoints/virtnbdbackup.{n}.xml")),
            format!("<domaincheckpoint>\n  <name>virtnbdbackup.{n}</name>\n{parent}  <creationTime>{}</creationTime>\n</domaincheckpoint>\n", 1_767_225_600 + n * 86_400),
        )
        .expect("checkpoint xml");
    }
    let cpt: Vec<String> = (0..points)
        .map(|n| format!("\"virtnbdbackup.{n}\""))
        .collect();
    fs::write(
        dir.join(format!("{vm}.cpt")),
        format!("[{}]", cpt.join(", ")),
    )
    .expect("cpt");
}

/// A chain large enough that a debug-build restore takes about a second: one disk
/// of 1 GiB, a full with 160 MiB and an incremental with 64 MiB (generated once per
/// test binary, hard-linked into each test's tree).
fn big_chain() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = clisupport::static_tempdir();
        let full: Vec<(u64, u64)> = (0..10).map(|i| (i * 64 * MIB, 16 * MIB)).collect();
        let inc: Vec<(u64, u64)> = (0..8).map(|i| (i * 96 * MIB + 8 * MIB, 8 * MIB)).collect();
        gen_chain(
            d.path(),
            "bigvm",
            &[GenDisk {
                dev: "vda",
                size: 1024 * MIB,
                steps: vec![full, inc],
            }],
        );
        d
    })
    .path()
}

fn big_case() -> Case {
    let mut c = Case::new(&[]);
    link_dir(&big_chain().join("bigvm"), &c.root.join("bigvm"));
    c.freeze();
    c
}

/// Waits until a `.part` file whose name contains `what` under `dir` holds at least
/// `min` bytes (the engine is writing), then stops the child with SIGSTOP so that
/// what follows happens at that point of the restore, whatever the machine's speed.
/// False when the child exited first.
fn pause_at(dir: &Path, child: &mut Child, what: &str, min: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let grown = entries(dir)
            .iter()
            .filter(|e| e.ends_with(".part") && e.contains(what))
            .any(|e| fs::metadata(dir.join(e)).is_ok_and(|m| m.len() >= min));
        if grown {
            let _ = nix::sys::signal::kill(pid_of(child), nix::sys::signal::Signal::SIGSTOP);
            return child.try_wait().expect("try_wait").is_none();
        }
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn resume(child: &Child) {
    nix::sys::signal::kill(pid_of(child), nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
}

/// A pseudo-random point of a restore writing ~200 MiB: 1..150 MiB.
fn random_point() -> u64 {
    let ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .subsec_nanos();
    (1 + u64::from(ns) % 149) * MIB
}

fn pid_of(c: &Child) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"))
}

fn stderr_of(c: Child) -> (Option<i32>, String) {
    let o = c.wait_with_output().expect("wait");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------------
// 1. Damage classes
// ---------------------------------------------------------------------------------

#[test]
fn truncated_stream_is_refused() {
    // an incremental cut at 60 %: found when the directory is scanned (exit 5)
    let mut c = Case::new(&["rc-acc-files"]);
    let f = c.p("rc-acc-files/vda.inc.virtnbdbackup.2.data");
    let len = fs::metadata(&f).expect("md").len();
    File::options()
        .write(true)
        .open(&f)
        .expect("open")
        .set_len(len * 6 / 10)
        .expect("truncate");
    c.refused(
        "truncated stream (inc 2 cut at 60 %)",
        "rc-acc-files",
        &[],
        5,
        &[
            "vda.inc.virtnbdbackup.2.data",
            "truncated stream",
            "at byte",
        ],
    );
    // the real truncated full of rc-damage/20260513; with --include-incomplete it is
    // salvaged (exit 6, naming file and offset, the disk and its damage map written:
    // tests/salvage.rs checks the content)
    let mut c = Case::new(&["rc-damage"]);
    c.refused(
        "truncated stream (real, 20260513)",
        "rc-damage",
        &["--period", "20260513"],
        5,
        &["vda.full.data", "at byte 59661"],
    );
    salvaged(
        &mut c,
        "truncated stream + --include-incomplete",
        &["--period", "20260513", "--include-incomplete"],
        &["vda.full.data TRUNCATED at byte 1711"],
    );
}

/// A salvage restore (`--include-incomplete`) of rc-damage: exit 6, the messages,
/// the disk and its damage map in the restore path, the lock released.
fn salvaged(c: &mut Case, class: &str, extra: &[&str], needles: &[&str]) {
    let r = c.restore("rc-damage", extra);
    table(class, &r, &c.root);
    assert_eq!(r.code, Some(6), "{class}: exit code\n{}", r.stderr);
    for n in needles
        .iter()
        .chain(&["Salvage restore: vda restored PARTIALLY"])
    {
        assert!(
            r.stderr.contains(n),
            "{class}: stderr lacks {n:?}\n{}",
            r.stderr
        );
    }
    assert_eq!(
        entries(&c.out),
        ["rc-damage-vda.qcow2", "rc-damage-vda.qcow2.damage.json"],
        "{class}"
    );
    assert!(!c.lock("rc-damage").exists(), "{class}: lock not released");
    fs::remove_dir_all(&c.out).expect("rm out");
}

#[test]
fn payload_bit_flip_is_caught_by_chksum() {
    // the real flipped bit of rc-damage/20260515
    let mut c = Case::new(&["rc-damage"]);
    c.refused(
        "payload bit flip (real, 20260515, .chksum)",
        "rc-damage",
        &["--period", "20260515"],
        6,
        &["/rc-damage/20260515/vda.full.data", "checksum mismatch"],
    );
    // one bit in rc-v247-chk's inc 1 payload (data header at 379, payload at 419)
    let mut c = Case::new(&["rc-v247-chk"]);
    flip(
        &c.p("rc-v247-chk/202603/vda.inc.virtnbdbackup.1.data"),
        419 + 1000,
        |b| b ^ 0x10,
    );
    c.refused(
        "payload bit flip (rc-v247-chk inc 1, .chksum)",
        "rc-v247-chk",
        &[],
        6,
        &[
            "/rc-v247-chk/202603/vda.inc.virtnbdbackup.1.data",
            "checksum mismatch",
        ],
    );
}

#[test]
fn frame_header_bit_flip_is_refused() {
    // rc-v247-chk full: `data 0000000000100000 ...` at byte 406; one bit of the
    // first start digit ('0' → '1') sends the frame past the disk
    let mut c = Case::new(&["rc-v247-chk"]);
    flip(&c.p("rc-v247-chk/202603/vda.full.data"), 406 + 5, |b| {
        b ^ 0x01
    });
    c.refused(
        "frame header bit flip (start)",
        "rc-v247-chk",
        &[],
        6,
        &["vda.full.data", "at byte 406"],
    );
    // the kind: `data` → `deta` (inc 1, header at 379)
    let mut c = Case::new(&["rc-v247-chk"]);
    flip(
        &c.p("rc-v247-chk/202603/vda.inc.virtnbdbackup.1.data"),
        379 + 1,
        |b| b ^ 0x01,
    );
    c.refused(
        "frame header bit flip (kind)",
        "rc-v247-chk",
        &[],
        6,
        &[
            "vda.inc.virtnbdbackup.1.data",
            "unknown frame kind",
            "at byte 379",
        ],
    );
    // a compressed stream (rc-acc-files inc 1, data header at 374): the CR LF
    let mut c = Case::new(&["rc-acc-files"]);
    flip(
        &c.p("rc-acc-files/vda.inc.virtnbdbackup.1.data"),
        374 + 38,
        |b| b ^ 0x01,
    );
    c.refused(
        "frame header bit flip (CR, lz4 stream)",
        "rc-acc-files",
        &[],
        6,
        &[
            "vda.inc.virtnbdbackup.1.data",
            "invalid frame header at byte 374",
        ],
    );
}

#[test]
fn missing_incremental_is_refused() {
    let mut c = Case::new(&["rc-acc-files"]);
    fs::remove_file(c.p("rc-acc-files/vda.inc.virtnbdbackup.2.data")).expect("rm");
    c.refused(
        "missing incremental",
        "rc-acc-files",
        &[],
        5,
        &[
            "INCOMPLETE at restore point 2",
            "missing vda.inc.virtnbdbackup.2.data",
        ],
    );
    // the point before the gap still restores, exactly
    let r = c.restore("rc-acc-files", &["--restore-point", "1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check_content(
        &c.out.join("rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "backups/rc-acc-files",
        "virtnbdbackup.1",
        "vda",
    );
}

#[test]
fn wrong_parent_checkpoint_is_refused() {
    // same length, nothing else fixed up (lz4 payloads and trailer untouched)
    let mut c = Case::new(&["rc-acc-files"]);
    replace_in(
        &c.p("rc-acc-files/vda.inc.virtnbdbackup.3.data"),
        "\"parentCheckpoint\": \"virtnbdbackup.2\"",
        "\"parentCheckpoint\": \"virtnbdbackup.7\"",
    );
    c.refused(
        "wrong parent checkpoint",
        "rc-acc-files",
        &[],
        5,
        &[
            "INCOMPLETE at restore point 3",
            "vda.inc.virtnbdbackup.3.data",
            "\"virtnbdbackup.7\"",
        ],
    );
    // salvaged: the file that does not link is not used (as if missing)
    let r = c.restore("rc-acc-files", &["--include-incomplete"]);
    table(
        "wrong parent checkpoint + --include-incomplete",
        &r,
        &c.root,
    );
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert!(
        r.stderr.contains("vda.inc.virtnbdbackup.3.data CORRUPT at byte 40: broken chain: its parent checkpoint is \"virtnbdbackup.7\""),
        "{}",
        r.stderr
    );
    assert!(c.out.join("rc-acc-files-vda.qcow2.damage.json").exists());
}

#[test]
fn disk_name_in_meta_cannot_escape() {
    // `"diskName": "vda"` → `"../"` (same length): the meta contradicts the file name
    let mut c = Case::new(&["rc-acc-files"]);
    replace_in(
        &c.p("rc-acc-files/vda.inc.virtnbdbackup.1.data"),
        "\"diskName\": \"vda\"",
        "\"diskName\": \"../\"",
    );
    c.refused(
        "diskName \"../\" in meta",
        "rc-acc-files",
        &[],
        5,
        &["vda.inc.virtnbdbackup.1.data", "diskName"],
    );
    assert!(!c.s.dir.path().join("x").exists());
}

#[test]
fn shuffled_mtimes_restore_correctly() {
    let mut c = Case::new(&["rc-acc-files"]);
    let dir = c.p("rc-acc-files");
    // newest file first: the full gets the newest mtime, inc 4 the oldest, and the
    // side files are shuffled the same way
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("e").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let t = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_900_000_000 - (i as u64 * 7919 % 97) * 3600);
        File::options()
            .write(true)
            .open(f)
            .expect("open")
            .set_modified(t)
            .expect("mtime");
    }
    let full = fs::metadata(dir.join("vda.full.data"))
        .expect("md")
        .modified()
        .expect("t");
    let inc4 = fs::metadata(dir.join("vda.inc.virtnbdbackup.4.data"))
        .expect("md")
        .modified()
        .expect("t");
    assert_ne!(full, inc4);
    let r = c.restore("rc-acc-files", &[]);
    table("shuffled mtimes (latest)", &r, &c.root);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check_content(
        &c.out.join("rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "backups/rc-acc-files",
        "virtnbdbackup.4",
        "vda",
    );
    fs::remove_dir_all(&c.out).expect("rm out");
    let r = c.restore("rc-acc-files", &["--restore-point", "2"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check_content(
        &c.out.join("rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "backups/rc-acc-files",
        "virtnbdbackup.2",
        "vda",
    );
}

#[test]
fn missing_qcow_json_is_refused_then_degraded_on_request() {
    // rc-damage/20260511: the newest qcow.json was deleted (data intact)
    let mut c = Case::new(&["rc-damage"]);
    c.refused(
        "missing qcow.json",
        "rc-damage",
        &["--period", "20260511"],
        5,
        &["missing vda.virtnbdbackup.2.qcow.json"],
    );
    let r = c.restore(
        "rc-damage",
        &["--period", "20260511", "--include-incomplete"],
    );
    table("missing qcow.json + --include-incomplete", &r, &c.root);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // the image options come from the newest earlier qcow.json; the data is exact
    check_content(
        &c.out.join("rc-damage-vda.qcow2"),
        "rc-damage",
        "backups/rc-damage/20260511",
        "virtnbdbackup.2",
        "vda",
    );
}

#[test]
fn partial_leftover_is_refused() {
    // rc-damage/20260516: the third backup was killed, its `.partial` left behind
    let mut c = Case::new(&["rc-damage"]);
    c.refused(
        ".partial leftover",
        "rc-damage",
        &["--period", "20260516"],
        5,
        &[
            "INCOMPLETE at restore point 2",
            "vda.inc.virtnbdbackup.2.data.partial",
        ],
    );
    salvaged(
        &mut c,
        ".partial leftover + --include-incomplete",
        &["--period", "20260516", "--include-incomplete"],
        &["vda.inc.virtnbdbackup.2.data.partial PARTIAL"],
    );
    let r = c.restore(
        "rc-damage",
        &["--period", "20260516", "--restore-point", "1"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check_content(
        &c.out.join("rc-damage-vda.qcow2"),
        "rc-damage",
        "backups/rc-damage/20260516",
        "virtnbdbackup.1",
        "vda",
    );
}

#[test]
fn hostile_qcow_json_is_refused_naming_it() {
    for (class, from, to, needle) in [
        (
            "qcow.json cluster-size 2^40",
            "\"cluster-size\": 65536",
            "\"cluster-size\": 1099511627776",
            "cluster size 1099511627776",
        ),
        (
            "qcow.json refcount-bits 128",
            "\"refcount-bits\": 16",
            "\"refcount-bits\": 128",
            "refcount width 128",
        ),
        (
            "qcow.json not JSON",
            "{",
            "{{",
            "invalid side file at byte 0",
        ),
    ] {
        let mut c = Case::new(&["rc-acc-files"]);
        replace_in(&c.p("rc-acc-files/vda.virtnbdbackup.4.qcow.json"), from, to);
        c.refused(
            class,
            "rc-acc-files",
            &[],
            6,
            &["/rc-acc-files/vda.virtnbdbackup.4.qcow.json", needle],
        );
    }
}

/// Rewrites the trailer JSON of a compressed stream (and the comp header's length).
fn set_trailer(path: &Path, json: &str) {
    let b = fs::read(path).expect("read");
    let comp = &b[b.len() - 40..];
    assert_eq!(&comp[..4], b"comp");
    let tlen =
        usize::from_str_radix(std::str::from_utf8(&comp[22..38]).expect("hex"), 16).expect("len");
    let start = b.len() - 40 - 2 - tlen;
    let mut out = b[..start].to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&header("comp", 0, json.len() as u64));
    fs::write(path, out).expect("write");
}

#[test]
fn bogus_trailer_is_refused() {
    // rc-acc-files inc 1: one data frame, trailer `[298]` at byte 754
    for (class, json, needles) in [
        (
            "bogus trailer (not JSON)",
            "[2x8]",
            vec!["invalid compression trailer at byte 754"],
        ),
        (
            "bogus trailer (size too big)",
            "[99999999]",
            vec!["truncated payload at byte 414"],
        ),
        (
            "bogus trailer (size off by one)",
            "[299]",
            vec!["missing CR LF after payload at byte 713"],
        ),
        (
            "bogus trailer (entry count)",
            "[100, 198]",
            vec!["vda.inc.virtnbdbackup.1.data"],
        ),
        (
            "bogus trailer (negative)",
            "[-298]",
            vec!["invalid compression trailer"],
        ),
    ] {
        let mut c = Case::new(&["rc-acc-files"]);
        set_trailer(&c.p("rc-acc-files/vda.inc.virtnbdbackup.1.data"), json);
        let mut n = needles.clone();
        n.push("vda.inc.virtnbdbackup.1.data");
        c.refused(class, "rc-acc-files", &[], 6, &n);
    }
}

#[test]
fn absurd_lengths_are_refused() {
    let two60 = format!("{:016x}", 1u64 << 60);
    // data header of rc-v247-chk's full (byte 406) claiming 2^60 bytes
    let mut c = Case::new(&["rc-v247-chk"]);
    put(
        &c.p("rc-v247-chk/202603/vda.full.data"),
        406 + 22,
        two60.as_bytes(),
    );
    c.refused(
        "absurd length (data 2^60, raw stream)",
        "rc-v247-chk",
        &[],
        6,
        &["vda.full.data", "at byte 406"],
    );
    // the same in an lz4 stream (rc-acc-files inc 1, header at 374)
    let mut c = Case::new(&["rc-acc-files"]);
    put(
        &c.p("rc-acc-files/vda.inc.virtnbdbackup.1.data"),
        374 + 22,
        two60.as_bytes(),
    );
    c.refused(
        "absurd length (data 2^60, lz4 stream)",
        "rc-acc-files",
        &[],
        6,
        &["vda.inc.virtnbdbackup.1.data", "at byte 374"],
    );
    // a zero frame of 2^60 (rc-v247-chk full, zero header at 366)
    let mut c = Case::new(&["rc-v247-chk"]);
    put(
        &c.p("rc-v247-chk/202603/vda.full.data"),
        366 + 22,
        two60.as_bytes(),
    );
    c.refused(
        "absurd length (zero 2^60)",
        "rc-v247-chk",
        &[],
        6,
        &["vda.full.data", "at byte 366"],
    );
    // a meta header claiming 2^60 bytes of JSON: unreadable at scan time
    let mut c = Case::new(&["rc-v247-chk"]);
    put(
        &c.p("rc-v247-chk/202603/vda.inc.virtnbdbackup.2.data"),
        22,
        two60.as_bytes(),
    );
    c.refused(
        "absurd length (meta 2^60)",
        "rc-v247-chk",
        &[],
        5,
        &["vda.inc.virtnbdbackup.2.data", "1152921504606846976"],
    );
    // a virtual size of 2^60 in the meta (JSON re-framed): the target cannot be created
    let mut c = Case::new(&["rc-v247-chk"]);
    let f = c.p("rc-v247-chk/202603/vda.full.data");
    let b = fs::read(&f).expect("read");
    let l = usize::from_str_radix(std::str::from_utf8(&b[22..38]).expect("hex"), 16).expect("len");
    let json = std::str::from_utf8(&b[40..40 + l]).expect("utf8").replace(
        "\"virtualSize\": 33554432",
        &format!("\"virtualSize\": {}", 1u64 << 60),
    );
    let mut nb = header("meta", 0, json.len() as u64);
    nb.extend_from_slice(json.as_bytes());
    nb.extend_from_slice(&b[40 + l..]);
    fs::write(&f, nb).expect("write");
    fs::remove_file(c.p("rc-v247-chk/202603/vda.full.data.chksum")).expect("rm chksum");
    c.refused(
        "absurd length (virtualSize 2^60)",
        "rc-v247-chk",
        &["--restore-point", "0"],
        6,
        &["vda: cannot create a 1152921504606846976-byte image (virtualSize in /rc-v247-chk/202603/vda.full.data)"],
    );
}

#[test]
fn source_paths_cannot_escape_the_restore_path() {
    let orig = "/var/lib/libvirt/images/rc-acc-files-vda.qcow2";
    let passwd = file_sha(Path::new("/etc/passwd"));
    for (source, expect) in [
        ("/etc/passwd", "passwd"),
        ("../../x", "x"),
        ("/var/lib/..", "vda.qcow2"),
        ("..", "vda.qcow2"),
        ("/", "vda.qcow2"),
        ("a/b/../../../../../tmp/evil.qcow2", "evil.qcow2"),
    ] {
        let mut c = Case::new(&["rc-acc-files"]);
        let dir = c.p("rc-acc-files");
        for e in fs::read_dir(&dir).expect("ls") {
            let p = e.expect("e").path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
            {
                let x = fs::read_to_string(&p).expect("xml").replace(orig, source);
                fs::write(&p, x).expect("write");
            }
        }
        // out sits two levels down so that `../../x` would land inside the scratch dir
        c.out = c.s.dir.path().join("a/b/out");
        let r = c.restore("rc-acc-files", &[]);
        table(&format!("<source file='{source}'>"), &r, &c.root);
        assert_eq!(r.code, Some(0), "{source}: {}", r.stderr);
        assert_eq!(entries(&c.out), vec![expect.to_owned()], "{source}");
        let scratch = entries(c.s.dir.path());
        assert!(
            scratch.iter().all(|e| e == "a"
                || e == "a/b"
                || e.starts_with("a/b/out")
                || e.starts_with("backups")
                || e.starts_with("logs")),
            "{source}: written outside the restore path: {scratch:?}"
        );
        // the same through disk extract
        let ex = c.s.dir.path().join("a/b/extract");
        let r = c.restore(
            "rc-acc-files",
            &["--disk", "vda", "--restore-path", &ex.display().to_string()],
        );
        assert_eq!(r.code, Some(0), "{source} extract: {}", r.stderr);
        assert_eq!(entries(&ex), vec![expect.to_owned()], "{source} extract");
    }
    assert_eq!(file_sha(Path::new("/etc/passwd")), passwd);
    assert!(!Path::new("/tmp/evil.qcow2").exists());
}

#[test]
fn two_disks_with_one_file_name_are_refused_before_writing() {
    // vda and vdb came from /pool1/disk.qcow2 and /pool2/disk.qcow2: one output name
    let mut c = Case::new(&["rc-multi-sql"]);
    let dir = c.p("rc-multi-sql/2026-W08");
    for e in fs::read_dir(&dir).expect("ls") {
        let p = e.expect("e").path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
        {
            let x = fs::read_to_string(&p)
                .expect("xml")
                .replace(
                    "/var/lib/libvirt/images/rc-multi-sql-vda.qcow2",
                    "/pool1/disk.qcow2",
                )
                .replace(
                    "/var/lib/libvirt/images/rc-multi-sql-vdb.qcow2",
                    "/pool2/disk.qcow2",
                );
            fs::write(&p, x).expect("write");
        }
    }
    for extra in [
        &[][..],
        &["--force"][..],
        &[
            "--disk",
            "all",
            "--restore-path",
            &c.out.display().to_string(),
        ][..],
    ] {
        let extra: Vec<&str> = extra.to_vec();
        c.refused(
            "two disks, one output file name",
            "rc-multi-sql",
            &extra,
            4,
            &[
                "BLOCKED: ",
                "/out/disk.qcow2 would be written for more than one disk",
            ],
        );
    }
    // one at a time works
    let r = c.restore(
        "rc-multi-sql",
        &[
            "--disk",
            "vdb",
            "--restore-path",
            &c.out.display().to_string(),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check_content(
        &c.out.join("disk.qcow2"),
        "rc-multi-sql",
        "backups/rc-multi-sql/2026-W08",
        "virtnbdbackup.3",
        "vdb",
    );
}

#[test]
fn symlinks_in_the_restore_path_are_never_written_through() {
    let mut c = Case::new(&["rc-acc-files"]);
    fs::create_dir_all(&c.out).expect("mkdir");
    let victim = c.s.dir.path().join("victim");
    fs::write(&victim, b"precious").expect("victim");
    let name = c.out.join("rc-acc-files-vda.qcow2");
    symlink(&victim, &name).expect("symlink");
    // without --force: refused before anything is written (exit 4)
    let r = c.restore("rc-acc-files", &[]);
    table("symlink at output name (no --force)", &r, &c.root);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("BLOCKED: File already exists"),
        "{}",
        r.stderr
    );
    assert_eq!(entries(&c.out), vec!["rc-acc-files-vda.qcow2"]);
    assert!(fs::symlink_metadata(&name)
        .expect("md")
        .file_type()
        .is_symlink());
    // a dangling symlink too: its target is never created
    let ghost = c.s.dir.path().join("ghost");
    fs::remove_file(&name).expect("rm");
    symlink(&ghost, &name).expect("symlink");
    let r = c.restore("rc-acc-files", &[]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(!ghost.exists(), "wrote through a dangling symlink");
    // with --force the link itself is replaced; its target is untouched
    fs::remove_file(&name).expect("rm");
    symlink(&victim, &name).expect("symlink");
    let r = c.restore("rc-acc-files", &["--force"]);
    table("symlink at output name (--force)", &r, &c.root);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
    assert!(fs::symlink_metadata(&name).expect("md").is_file());
    check_content(
        &name,
        "rc-acc-files",
        "backups/rc-acc-files",
        "virtnbdbackup.4",
        "vda",
    );
    // a restore path that is a symlink into the backup tree is inside the root (7)
    let sneaky = c.s.dir.path().join("sneaky");
    symlink(c.p("rc-acc-files"), &sneaky).expect("symlink");
    let mut a = c.args("rc-acc-files", &[]);
    let i = a.iter().position(|x| x == "--restore-path").expect("arg");
    a[i + 1] = sneaky.display().to_string();
    let r = c.s.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    table("restore path symlinked into the backup tree", &r, &c.root);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    c.check_tree();
}

#[test]
fn hostile_vmbackup_conf_is_a_config_error() {
    let s = Scratch::new();
    let sentinel = s.dir.path().join("pwned");
    let sp = sentinel.display().to_string();
    let restore = [
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        "/nonexistent/out",
        "--connect",
        "test:///default",
    ];
    for (class, text, line) in [
        (
            "vmbackup.conf $(...)",
            format!("# vmbackup\nLOG_LEVEL=info\nBACKUP_PATH=$(touch {sp})\n"),
            3,
        ),
        (
            "vmbackup.conf backticks",
            format!("BACKUP_PATH=\"`touch {sp}`\"\n"),
            1,
        ),
        (
            "vmbackup.conf ${VAR}",
            "BACKUP_PATH=/srv\nBACKUP_PATH=${HOME}/x\n".to_owned(),
            2,
        ),
        (
            "vmbackup.conf huge line",
            format!("# ok\nBACKUP_PATH=/{}\n", "a".repeat(200_000)),
            2,
        ),
        (
            "vmbackup.conf huge comment",
            format!("#{}\nBACKUP_PATH=/srv\n", "b".repeat(100_000)),
            1,
        ),
    ] {
        let f = s.write_config("default", &text);
        let r = s.run(&restore);
        table(class, &r, s.dir.path());
        assert_eq!(r.code, Some(2), "{class}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("{}:{line}:", f.display())),
            "{class}: no file:line\n{}",
            r.stderr
        );
        assert!(
            r.stderr.len() < 4096,
            "{class}: the offending line is echoed back ({} bytes)",
            r.stderr.len()
        );
        assert!(!sentinel.exists(), "{class}: the config was executed");
        assert!(
            s.logs().is_empty(),
            "{class}: a config error creates no log file"
        );
    }
    // a value that only looks like more commands is a literal path (never run)
    s.write_config(
        "default",
        &format!("BACKUP_PATH=/nonexistent/bk; touch {sp}\n"),
    );
    let r = s.run(&restore);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("Backup path not found: /nonexistent/bk"),
        "{}",
        r.stderr
    );
    assert!(!sentinel.exists());
}

#[test]
fn corrupt_catalogue_is_one_warning() {
    let mut c = Case::new(&["rc-acc-files"]);
    fs::create_dir_all(c.p("_state")).expect("mkdir");
    let garbage: Vec<u8> = b"SQLite format 3\0"
        .iter()
        .copied()
        .chain((0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8))
        .collect();
    fs::write(c.p("_state/vmbackup.db"), &garbage).expect("garbage");
    let r = c.restore("rc-acc-files", &[]);
    table("garbage _state/vmbackup.db", &r, &c.root);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let warns: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("] WARN: "))
        .collect();
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(warns[0].contains("Catalogue unavailable"), "{}", warns[0]);
    assert_eq!(
        fs::read(c.p("_state/vmbackup.db")).expect("db"),
        garbage,
        "the catalogue file was modified"
    );
    let state = entries(&c.p("_state"));
    assert_eq!(
        state,
        vec!["locks", "vmbackup.db"],
        "no -wal/-shm/-journal next to a broken catalogue"
    );
    check_content(
        &c.out.join("rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "backups/rc-acc-files",
        "virtnbdbackup.4",
        "vda",
    );
    // a directory in place of the catalogue
    fs::remove_file(c.p("_state/vmbackup.db")).expect("rm");
    fs::create_dir(c.p("_state/vmbackup.db")).expect("mkdir");
    c.freeze();
    let r = c.restore("rc-acc-files", &["--force"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("Catalogue unavailable").count(),
        1,
        "{}",
        r.stderr
    );
}

// ---------------------------------------------------------------------------------
// 2. Faults
// ---------------------------------------------------------------------------------

/// Unmounts (and removes the mount point) when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_target_filesystem_is_a_storage_error() {
    if !is_root() {
        eprintln!("SKIP full_target_filesystem_is_a_storage_error: needs root for a loop mount");
        return;
    }
    let mut c = Case::new(&[]);
    let img = c.s.dir.path().join("fs.img");
    let mnt = c.s.dir.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mkdir");
    File::create(&img)
        .expect("img")
        .set_len(8 * MIB)
        .expect("truncate");
    // -m 0: no root reserve, so the free space we measure is all root can write
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&img)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP full_target_filesystem_is_a_storage_error: mkfs.ext4 or loop mount failed (no loop devices in this container?)");
        return;
    }
    let _m = Mount(mnt.clone());
    let st = nix::sys::statvfs::statvfs(&mnt).expect("statvfs");
    #[allow(clippy::useless_conversion)] // not u64 on every platform
    let free = u64::from(st.blocks_available()) * u64::from(st.fragment_size());
    // stream data just under the free space: the pre-flight (backup bytes ≤ free)
    // passes, the qcow2 image (data + metadata clusters) cannot fit
    let data = (free - 128 * 1024) / (64 * 1024) * (64 * 1024);
    gen_chain(
        &c.root,
        "fullvm",
        &[GenDisk {
            dev: "vda",
            size: 64 * MIB,
            steps: vec![vec![(0, data / 2), (32 * MIB, data - data / 2)]],
        }],
    );
    c.out = mnt.join("restore");
    let r = c.restore("fullvm", &[]);
    table("target filesystem full (ENOSPC mid-restore)", &r, &c.root);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert!(
        r.stderr.contains(".fullvm-vda.qcow2.vmrestore-"),
        "names the file being written\n{}",
        r.stderr
    );
    assert_eq!(
        entries(&c.out),
        Vec::<String>::new(),
        "final name or .part left on the full filesystem"
    );
    assert!(!c.lock("fullvm").exists(), "lock not released");
}

#[test]
fn unreadable_data_files_are_clear_errors() {
    // root ignores permissions: a directory and a dangling symlink in place of a file
    let mut c = Case::new(&["rc-acc-files"]);
    let f = c.p("rc-acc-files/vda.inc.virtnbdbackup.2.data");
    fs::remove_file(&f).expect("rm");
    fs::create_dir(&f).expect("mkdir");
    c.refused(
        "data file replaced by a directory",
        "rc-acc-files",
        &[],
        5,
        &[
            "unreadable vda.inc.virtnbdbackup.2.data",
            "a directory, not a regular file",
        ],
    );
    let mut c = Case::new(&["rc-acc-files"]);
    let f = c.p("rc-acc-files/vda.inc.virtnbdbackup.3.data");
    fs::remove_file(&f).expect("rm");
    symlink(c.s.dir.path().join("nowhere"), &f).expect("symlink");
    c.refused(
        "data file replaced by a dangling symlink",
        "rc-acc-files",
        &[],
        5,
        &[
            "unreadable vda.inc.virtnbdbackup.3.data",
            "a symbolic link, not a regular file",
        ],
    );
    // a symlink to a good copy of the file is not followed either
    let mut c = Case::new(&["rc-acc-files"]);
    let f = c.p("rc-acc-files/vda.inc.virtnbdbackup.3.data");
    let elsewhere = c.s.dir.path().join("inc3.data");
    fs::rename(&f, &elsewhere).expect("mv");
    symlink(&elsewhere, &f).expect("symlink");
    c.refused(
        "data file is a symlink to the real file",
        "rc-acc-files",
        &[],
        5,
        &["unreadable vda.inc.virtnbdbackup.3.data", "a symbolic link"],
    );
    // a file that shrinks while it is being read (the disk under the backup failed)
    let mut c = Case::new(&[]);
    copy_dir(&big_chain().join("bigvm"), &c.root.join("bigvm"));
    c.freeze();
    let mut child = c.spawn("bigvm", &[]);
    assert!(
        pause_at(&c.out, &mut child, "bigvm-vda", 8 * MIB),
        "the restore was not caught writing"
    );
    for f in ["bigvm/vda.full.data", "bigvm/vda.inc.virtnbdbackup.1.data"] {
        File::options()
            .write(true)
            .open(c.p(f))
            .expect("open")
            .set_len(4096)
            .expect("truncate");
    }
    c.freeze();
    resume(&child);
    let (code, err) = stderr_of(child);
    let r = Run {
        code,
        stdout: String::new(),
        stderr: err,
    };
    table("data file truncated while being read", &r, &c.root);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert!(
        r.stderr.contains("/bigvm/vda.") && r.stderr.contains("truncated payload at byte"),
        "{}",
        r.stderr
    );
    c.check_tree();
    assert_eq!(
        entries(&c.out),
        Vec::<String>::new(),
        "files left in the restore path"
    );
    assert!(!c.lock("bigvm").exists(), "lock not released");
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        let mut c = Case::new(&["rc-acc-files"]);
        let f = c.p("rc-acc-files/vda.inc.virtnbdbackup.1.data");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).expect("chmod");
        c.refused(
            "data file mode 000",
            "rc-acc-files",
            &[],
            5,
            &["vda.inc.virtnbdbackup.1.data"],
        );
    }
}

#[test]
fn kill_9_leaves_no_final_file_and_the_rerun_recovers() {
    let mut c = big_case();
    let mut child = c.spawn("bigvm", &[]);
    let at = random_point();
    assert!(
        pause_at(&c.out, &mut child, "bigvm-vda", at),
        "the restore was not caught writing ({} MiB)",
        at / MIB
    );
    nix::sys::signal::kill(pid_of(&child), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    let (code, _) = stderr_of(child);
    assert_eq!(code, None, "killed at {} MiB", at / MIB);
    c.check_tree(); // the dead run's lock may stay: the hash leaves locks/ out
    let left = entries(&c.out);
    assert!(
        !left.contains(&"bigvm-vda.qcow2".to_owned()),
        "a killed restore left its final name: {left:?}"
    );
    assert!(left.iter().all(|e| e.ends_with(".part")), "{left:?}");
    assert!(c.lock("bigvm").exists(), "the dead run's lock is there");
    // the rerun: stale lock recovered with a WARN, not blocked by the dead `.part`
    let t = Instant::now();
    let r = c.restore("bigvm", &[]);
    eprintln!(
        "full restore of bigvm (with tree checks): {:.2}s",
        t.elapsed().as_secs_f64()
    );
    table("kill -9 mid-restore, then rerun", &r, &c.root);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("Stale lock detected for VM: bigvm"),
        "{}",
        r.stderr
    );
    assert!(!c.lock("bigvm").exists());
    assert!(
        r.stderr
            .contains("Removed leftover temporary file of an interrupted restore"),
        "{}",
        r.stderr
    );
    let left = entries(&c.out);
    assert_eq!(
        left,
        vec!["bigvm-vda.qcow2"],
        "the dead run's .part is cleaned up"
    );
    if qemu_img() {
        let st = Command::new("qemu-img")
            .arg("check")
            .arg(c.out.join("bigvm-vda.qcow2"))
            .output()
            .expect("qemu-img");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stdout)
        );
    }
}

#[test]
fn a_live_restore_keeps_its_lock_and_its_part_file() {
    let mut c = big_case();
    let mut first = c.spawn("bigvm", &[]);
    assert!(
        pause_at(&c.out, &mut first, "bigvm-vda", MIB),
        "the restore was not caught writing"
    );
    let part: Vec<String> = entries(&c.out);
    let r = c.restore("bigvm", &["--force"]);
    table("second restore while one runs (lock held)", &r, &c.root);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "is locked by another backup or restore (PID {})",
            first.id()
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("vmbackup-bigvm.lock"), "{}", r.stderr);
    let now = entries(&c.out);
    assert!(
        part.iter().all(|p| now.contains(p)),
        "the live run's .part was touched: {part:?} → {now:?}"
    );
    resume(&first);
    let (code, err) = stderr_of(first);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("Removed leftover"), "{err}");
    assert_eq!(entries(&c.out), vec!["bigvm-vda.qcow2"]);
    assert!(!c.lock("bigvm").exists());
    c.check_tree();
}

#[test]
fn sigint_and_sigterm_stop_a_restore_cleanly() {
    for (sig, want) in [
        (nix::sys::signal::Signal::SIGINT, 130),
        (nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let mut c = big_case();
        let mut child = c.spawn("bigvm", &[]);
        let at = random_point();
        assert!(
            pause_at(&c.out, &mut child, "bigvm-vda", at),
            "the restore was not caught writing ({} MiB)",
            at / MIB
        );
        nix::sys::signal::kill(pid_of(&child), sig).expect("signal");
        resume(&child);
        let (code, err) = stderr_of(child);
        let r = Run {
            code,
            stdout: String::new(),
            stderr: err.clone(),
        };
        table(&format!("{sig:?} during a restore"), &r, &c.root);
        assert_eq!(code, Some(want), "{err}");
        assert!(err.contains("Interrupted by signal"), "{err}");
        c.check_tree();
        assert!(!c.lock("bigvm").exists(), "{sig:?}: lock not released");
        assert_eq!(
            entries(&c.out),
            Vec::<String>::new(),
            "{sig:?}: files left in the restore path"
        );
        let log = c.s.logs();
        let text = fs::read_to_string(&log[0]).expect("log");
        assert!(text.contains(&format!("Exit Status:  {want}\n")), "{text}");
    }
}

/// A `test:///` node file with one shut-off domain whose disks are `paths`.
fn test_node(file: &Path, vm: &str, disks: &[(&str, &Path)]) -> String {
    let mut d = String::new();
    for (dev, p) in disks {
        d.push_str(&format!(
            "      <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        <source file='{}'/>\n        <target dev='{dev}' bus='virtio'/>\n      </disk>\n",
            p.display()
        ));
    }
    let xml = format!(
        "<node>\n  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n    <name>{vm}</name>\n    <uuid>6d1b7f5e-3c0a-4c8e-9a51-b3e4c2d9f0bb</uuid>\n    <memory>1048576</memory>\n    <vcpu>1</vcpu>\n    <os><type>hvm</type></os>\n    <devices>\n{d}    </devices>\n    <test:runstate>5</test:runstate>\n  </domain>\n</node>\n"
    );
    fs::write(file, xml).expect("node xml");
    format!("test://{}", file.display())
}

/// The two-disk VM of the disk-in-place tests: its chain, its disk files (with
/// "original" content) and a `test:///` URI defining it shut off.
fn two_disk_vm() -> (Case, PathBuf, String) {
    let mut c = Case::new(&[]);
    gen_chain(
        &c.root,
        "twovm",
        &[
            GenDisk {
                dev: "vda",
                size: 16 * MIB,
                steps: vec![vec![(0, MIB)]],
            },
            GenDisk {
                dev: "vdb",
                size: 1024 * MIB,
                steps: vec![(0..12).map(|i| (i * 64 * MIB, 16 * MIB)).collect()],
            },
        ],
    );
    let images = c.s.dir.path().join("images");
    fs::create_dir_all(&images).expect("mkdir");
    let (vda, vdb) = (
        images.join("twovm-vda.qcow2"),
        images.join("twovm-vdb.qcow2"),
    );
    fs::write(&vda, b"original vda").expect("vda");
    fs::write(&vdb, b"original vdb").expect("vdb");
    let uri = test_node(
        &c.s.dir.path().join("node.xml"),
        "twovm",
        &[("vda", &vda), ("vdb", &vdb)],
    );
    c.freeze();
    (c, images, uri)
}

fn in_place(c: &Case, uri: &str, disks: &str) -> Command {
    let mut a = c.args("twovm", &["--disk", disks]);
    let i = a.iter().position(|x| x == "test:///default").expect("uri");
    a[i] = uri.to_owned();
    let mut cmd =
        c.s.command(&a.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

#[test]
fn sigint_during_disk_in_place_keeps_the_pre_restore_copy() {
    // two disks: vda (small) is swapped in first, the signal arrives while vdb (big)
    // is being written
    let (c, images, uri) = two_disk_vm();
    let (vda, vdb) = (
        images.join("twovm-vda.qcow2"),
        images.join("twovm-vdb.qcow2"),
    );
    let mut child = in_place(&c, &uri, "vda,vdb").spawn().expect("spawn");
    if !pause_at(&images, &mut child, "vdb", random_point()) {
        let (code, err) = stderr_of(child);
        panic!("vdb was not caught writing (exit {code:?})\n{err}");
    }
    nix::sys::signal::kill(pid_of(&child), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    resume(&child);
    let (code, err) = stderr_of(child);
    table(
        "SIGINT during disk in place (2nd disk)",
        &Run {
            code,
            stdout: String::new(),
            stderr: err.clone(),
        },
        &c.root,
    );
    assert_eq!(code, Some(130), "{err}");
    c.check_tree();
    assert!(!c.lock("twovm").exists(), "lock not released");
    // vda was replaced and keeps its rollback copy; vdb is untouched
    assert_eq!(
        fs::read(images.join("twovm-vda.qcow2.pre-restore")).expect("vda.pre-restore"),
        b"original vda"
    );
    assert_ne!(fs::read(&vda).expect("vda"), b"original vda");
    assert_eq!(fs::read(&vdb).expect("vdb"), b"original vdb");
    assert_eq!(
        entries(&images),
        vec![
            "twovm-vda.qcow2",
            "twovm-vda.qcow2.pre-restore",
            "twovm-vdb.qcow2"
        ],
        "nothing else (no .part, no .new, no vdb.pre-restore)"
    );
}

#[test]
fn kill_9_during_disk_in_place_then_rerun_for_the_other_disk() {
    let (c, images, uri) = two_disk_vm();
    let (vda, vdb) = (
        images.join("twovm-vda.qcow2"),
        images.join("twovm-vdb.qcow2"),
    );
    let mut child = in_place(&c, &uri, "vda,vdb").spawn().expect("spawn");
    if !pause_at(&images, &mut child, "vdb", random_point()) {
        let (code, err) = stderr_of(child);
        panic!("vdb was not caught writing (exit {code:?})\n{err}");
    }
    nix::sys::signal::kill(pid_of(&child), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    let (code, _) = stderr_of(child);
    assert_eq!(code, None);
    c.check_tree();
    // vda done (with its rollback copy), vdb untouched, the dead run's temporary file there
    assert_eq!(
        fs::read(images.join("twovm-vda.qcow2.pre-restore")).expect("pre"),
        b"original vda"
    );
    assert_eq!(fs::read(&vdb).expect("vdb"), b"original vdb");
    let left = entries(&images);
    assert!(
        left.iter()
            .any(|e| e.contains("vdb") && e.ends_with(".part")),
        "{left:?}"
    );
    // the whole request again is refused: vda's .pre-restore must not be overwritten
    let o = in_place(&c, &uri, "vda,vdb").output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    table(
        "disk in place rerun after kill -9 (vda.pre-restore exists)",
        &Run {
            code: o.status.code(),
            stdout: String::new(),
            stderr: err.to_string(),
        },
        &c.root,
    );
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("Pre-restore file already exists"), "{err}");
    assert!(err.contains("Stale lock detected for VM: twovm"), "{err}");
    assert_eq!(
        fs::read(images.join("twovm-vda.qcow2.pre-restore")).expect("pre"),
        b"original vda"
    );
    // vdb alone: the dead run's temporary file is removed
    let o = in_place(&c, &uri, "vdb").output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("Removed leftover temporary file of an interrupted restore"),
        "{err}"
    );
    c.check_tree();
    assert_eq!(
        entries(&images),
        vec![
            "twovm-vda.qcow2",
            "twovm-vda.qcow2.pre-restore",
            "twovm-vdb.qcow2",
            "twovm-vdb.qcow2.pre-restore"
        ]
    );
    assert_eq!(
        fs::read(images.join("twovm-vdb.qcow2.pre-restore")).expect("pre"),
        b"original vdb"
    );
    assert_ne!(fs::read(&vda).expect("vda"), b"original vda");
    assert!(!c.lock("twovm").exists());
}
