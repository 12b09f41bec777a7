//! Restore modes through the built binary (spec §4, acceptance statements 68–142):
//! DR, clone, data-only, disk in place and disk extract against libvirt's
//! in-process test driver, on per-test copies of the real fixture chains.
//!
//! The spec's "mock" convention is read as the equivalent in-process effect: "invokes
//! virtnbdrestore … -N my-vm" = the disks are restored by the engine (content checked
//! with `qemu-img convert -O raw` + sha256 against `expected/`) and the domain is
//! defined as `my-vm`. Each process gets a fresh test-driver state, so domains that
//! must exist before a run come from a node XML written per test
//! (`test:///<abs path>`, `<test:runstate>5</test:runstate>` = shut off).
//!
//! Every run checks that the backup tree (minus `_state/`) is unchanged (statement 150).

mod clisupport;

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clisupport::guest_sha;
use clisupport::{tree_hash, Fixture, Run, Scratch};
use sha2::{Digest, Sha256};

// ───────────────────────────── harness ─────────────────────────────

/// libvirt's test driver keeps NVRAM and swtpm state under the restore path
/// (`<restore path>/test-driver/`), never in the host's /var/lib/libvirt: the
/// restores below go to `out/r`.
const SWTPM: &str = "out/r/test-driver/swtpm";
const NVRAM: &str = "out/r/test-driver/nvram";

/// One test's world: a backup root holding copies of a few fixture VMs and the
/// catalogue, a scratch dir for restore targets, swtpm root, NVRAM dir and TMPDIR.
struct World {
    scratch: Scratch,
    root: PathBuf,
}

/// Copies `src` to `dst` keeping file and directory mtimes.
fn copy_keep_times(src: &Path, dst: &Path) {
    let md = fs::symlink_metadata(src).expect("metadata");
    if md.is_dir() {
        fs::create_dir_all(dst).expect("mkdir");
        for e in fs::read_dir(src).expect("read_dir") {
            let e = e.expect("entry");
            copy_keep_times(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        fs::copy(src, dst).expect("copy");
    }
    set_mtime(dst, md.modified().expect("mtime"));
}

fn set_mtime(p: &Path, t: std::time::SystemTime) {
    let f = File::open(p).expect("open for times");
    f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .expect("set_times");
}

impl World {
    /// A backup root with the catalogue and the named VM dirs of the prepared fixture.
    fn new(vms: &[&str]) -> Self {
        Self::with_catalogue(vms, true)
    }

    fn with_catalogue(vms: &[&str], catalogue: bool) -> Self {
        let fx = Fixture::shared();
        let scratch = Scratch::new();
        let root = scratch.dir.path().join("backups");
        fs::create_dir_all(root.join("_state")).expect("mkdir");
        if catalogue {
            for f in ["vmbackup.db", "vmbackup.db-wal", "vmbackup.db-shm"] {
                let s = fx.root.join("_state").join(f);
                if s.exists() {
                    fs::copy(&s, root.join("_state").join(f)).expect("copy db");
                }
            }
        }
        for vm in vms {
            copy_keep_times(&fx.root.join(vm), &root.join(vm));
        }
        for d in ["out", "swtpm", "nvram", "tmp"] {
            fs::create_dir_all(scratch.dir.path().join(d)).expect("mkdir");
        }
        World { scratch, root }
    }

    /// `<scratch>/<rel>`.
    fn p(&self, rel: &str) -> PathBuf {
        self.scratch.dir.path().join(rel)
    }

    /// `<scratch>/<rel>` as a string.
    fn s(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }

    /// `<backup root>/<rel>`.
    fn b(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The swtpm root of a restore into `out/r` (the test driver's sandbox).
    fn swtpm(&self) -> PathBuf {
        self.p(SWTPM)
    }

    /// Where NVRAM files go in a restore into `out/r` (the test driver's sandbox).
    fn nvram_dir(&self) -> PathBuf {
        self.p(NVRAM)
    }

    /// Points every `<nvram>` of the VM's XMLs into the scratch NVRAM dir (mtimes kept),
    /// so that no test touches /var/lib/libvirt/qemu/nvram.
    fn redirect_nvram(&self, vm: &str) {
        let to = self.nvram_dir().display().to_string();
        let mut all = Vec::new();
        walk(&self.b(vm), &mut all);
        for f in all
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "xml"))
        {
            let text = fs::read_to_string(f).expect("xml");
            if text.contains("/var/lib/libvirt/qemu/nvram") {
                let t = fs::metadata(f).expect("md").modified().expect("mtime");
                fs::write(f, text.replace("/var/lib/libvirt/qemu/nvram", &to)).expect("write");
                set_mtime(f, t);
            }
        }
    }

    /// Runs vmrestore with `--backup-path <root> --connect <uri>` prepended, swtpm and
    /// TMPDIR redirected into the scratch dir; checks the backup tree is unchanged.
    fn run_uri(&self, uri: &str, args: &[&str]) -> Run {
        let before = tree_hash(&self.root);
        let r = self.run_unhashed(uri, args);
        assert_eq!(
            tree_hash(&self.root),
            before,
            "the backup tree was modified by {args:?}\n{}",
            r.stderr
        );
        r
    }

    /// [`World::run_uri`] without the tree check (for trees with huge sparse files).
    fn run_unhashed(&self, uri: &str, args: &[&str]) -> Run {
        let root = self.root.display().to_string();
        let mut all = vec!["--backup-path", root.as_str(), "--connect", uri];
        all.extend_from_slice(args);
        self.scratch.run_env(
            &all,
            &[
                ("VMRESTORE_SWTPM_ROOT", &self.s("swtpm")),
                ("TMPDIR", &self.s("tmp")),
            ],
        )
    }

    /// Runs against an empty `test:///default`.
    fn run(&self, args: &[&str]) -> Run {
        self.run_uri("test:///default", args)
    }

    /// Writes a test-driver node XML with `domains` and `pools`; returns its URI.
    fn node(&self, domains: &[Dom], pools: &[(&str, &Path)]) -> String {
        let mut x = String::from("<node>\n");
        for d in domains {
            x.push_str(&d.xml());
        }
        for (name, path) in pools {
            x.push_str(&format!(
                "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>\n",
                path.display()
            ));
        }
        x.push_str("</node>\n");
        let f = self.p("node.xml");
        fs::write(&f, x).expect("node xml");
        format!("test://{}", f.display())
    }

    /// Rows of `restore_sessions` (empty when the table does not exist).
    fn rows(&self) -> Vec<SessionRow> {
        sessions(&self.root)
    }

    /// Lock files present under `_state/locks`.
    fn lock_files(&self) -> Vec<PathBuf> {
        fs::read_dir(self.b("_state/locks"))
            .map(|r| r.map(|e| e.expect("e").path()).collect())
            .unwrap_or_default()
    }

    /// The names in `dir`, sorted.
    fn ls(&self, rel: &str) -> Vec<String> {
        ls(&self.p(rel))
    }
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    if p.is_dir() && !p.is_symlink() {
        for e in fs::read_dir(p).expect("read_dir") {
            walk(&e.expect("e").path(), out);
        }
    }
}

/// A domain of the test driver's node XML.
struct Dom {
    name: String,
    uuid: Option<String>,
    running: bool,
    disks: Vec<(String, PathBuf)>,
    /// `<driver type>` of every disk, when set.
    driver: Option<String>,
}

impl Dom {
    fn new(name: &str, running: bool, disks: &[(&str, &Path)]) -> Self {
        Dom {
            name: name.to_owned(),
            uuid: None,
            running,
            disks: disks
                .iter()
                .map(|(d, p)| ((*d).to_owned(), p.to_path_buf()))
                .collect(),
            driver: None,
        }
    }

    fn xml(&self) -> String {
        let mut x = String::from(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n",
        );
        x.push_str(&format!("  <name>{}</name>\n", self.name));
        if let Some(u) = &self.uuid {
            x.push_str(&format!("  <uuid>{u}</uuid>\n"));
        }
        x.push_str("  <memory>131072</memory>\n  <os><type>hvm</type></os>\n  <devices>\n");
        for (dev, path) in &self.disks {
            let driver = self
                .driver
                .as_ref()
                .map(|t| format!("<driver name='qemu' type='{t}'/>"))
                .unwrap_or_default();
            x.push_str(&format!(
                "    <disk type='file' device='disk'>{driver}<source file='{}'/><target dev='{dev}'/></disk>\n",
                path.display()
            ));
        }
        x.push_str("  </devices>\n");
        if !self.running {
            x.push_str("  <test:runstate>5</test:runstate>\n");
        }
        x.push_str("</domain>\n");
        x
    }
}

/// The parts of a `restore_sessions` row the tests look at.
#[derive(Debug, Clone)]
#[allow(dead_code)]
struct SessionRow {
    start_time: String,
    vm_name: String,
    restore_mode: String,
    target_name: Option<String>,
    source_path: String,
    period_id: Option<String>,
    restore_point: Option<String>,
    checkpoint: Option<i64>,
    target_path: Option<String>,
    disks: Option<String>,
    forced: i64,
    include_incomplete: i64,
    tpm_result: Option<String>,
    outcome: String,
    exit_code: i64,
    error_message: Option<String>,
}

fn sessions(root: &Path) -> Vec<SessionRow> {
    let db = root.join("_state/vmbackup.db");
    let Ok(c) =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare(
        "SELECT start_time, vm_name, restore_mode, target_name, source_path, period_id, restore_point, checkpoint,
                target_path, disks, forced, include_incomplete, tpm_result, outcome, exit_code, error_message
         FROM restore_sessions ORDER BY id",
    ) else {
        return Vec::new();
    };
    st.query_map([], |r| {
        Ok(SessionRow {
            start_time: r.get(0)?,
            vm_name: r.get(1)?,
            restore_mode: r.get(2)?,
            target_name: r.get(3)?,
            source_path: r.get(4)?,
            period_id: r.get(5)?,
            restore_point: r.get(6)?,
            checkpoint: r.get(7)?,
            target_path: r.get(8)?,
            disks: r.get(9)?,
            forced: r.get(10)?,
            include_incomplete: r.get(11)?,
            tpm_result: r.get(12)?,
            outcome: r.get(13)?,
            exit_code: r.get(14)?,
            error_message: r.get(15)?,
        })
    })
    .expect("query")
    .collect::<rusqlite::Result<Vec<_>>>()
    .expect("rows")
}

fn qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn file_sha(p: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut File::open(p).expect("open"), &mut h).expect("hash");
    format!("{:x}", h.finalize())
}

/// The expected sha256 of `disk` at `point` (`virtnbdbackup.N` or `copy`).
fn expected(vm: &str, chain: &str, point: &str, disk: &str) -> String {
    let p = clisupport::fixture_src().join(format!("expected/{vm}/{chain}/{point}/{disk}.sha256"));
    fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .split_whitespace()
        .next()
        .expect("sha")
        .to_owned()
}

/// Asserts an image holds the expected content (skipped without qemu-img).
fn assert_content(img: &Path, vm: &str, chain: &str, point: &str, disk: &str) {
    assert!(img.is_file(), "{} missing", img.display());
    if qemu_img() {
        assert_eq!(
            guest_sha(img),
            expected(vm, chain, point, disk),
            "{} ≠ {vm}/{chain}/{point}/{disk}",
            img.display()
        );
    }
}

fn has(r: &Run, s: &str) -> bool {
    r.stderr.contains(s)
}

#[track_caller]
fn assert_has(r: &Run, s: &str) {
    assert!(has(r, s), "stderr lacks {s:?}\n{}", r.stderr);
}

#[track_caller]
fn assert_lacks(r: &Run, s: &str) {
    assert!(!has(r, s), "stderr has {s:?}\n{}", r.stderr);
}

#[track_caller]
fn assert_code(r: &Run, code: i32) {
    assert_eq!(r.code, Some(code), "stderr:\n{}", r.stderr);
}

/// The message part of the summary line (last `restore_vm` INFO before the footer).
fn summary(r: &Run) -> String {
    r.stderr
        .lines()
        .filter_map(|l| l.split_once("] INFO: ").map(|(_, m)| m))
        .rfind(|m| {
            m.starts_with("Restore complete:")
                || m.starts_with("Disk restore complete:")
                || m.starts_with("Disk extract complete:")
        })
        .unwrap_or_default()
        .to_owned()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).expect("md").permissions().mode() & 0o777
}

fn uid_of(user: &str) -> Option<u32> {
    nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

const UEFI_UUID: &str = "88551b77-adbf-56aa-950b-b773d24f7f3f";

/// The `<uuid>` of a domain XML.
fn uuid_in(xml: &Path) -> String {
    let t = fs::read_to_string(xml).expect("xml");
    let a = t.find("<uuid>").expect("<uuid>") + 6;
    let b = t[a..].find("</uuid>").expect("</uuid>") + a;
    t[a..b].trim().to_owned()
}

/// A throwaway "original disk" with recognisable content.
fn fake_disk(p: &Path, tag: &str) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, format!("original disk {tag}\n")).expect("write disk");
}

/// Index of the first stderr line containing `s` (panics when absent).
#[track_caller]
fn line_of(r: &Run, s: &str) -> usize {
    r.stderr
        .lines()
        .position(|l| l.contains(s))
        .unwrap_or_else(|| panic!("stderr lacks {s:?}\n{}", r.stderr))
}

// ───────────────────────────── DR (68–89) ─────────────────────────────

// 68: DR with the VM defined and no --force exits 5; nothing is restored or undefined.
// 139: that run records outcome 'failed', exit_code 5.
#[test]
fn s068_s139_dr_defined_without_force_exits_5_and_changes_nothing() {
    let w = World::new(&["rc-acc-files"]);
    let live = w.p("vm/rc-acc-files-vda.qcow2");
    fake_disk(&live, "acc");
    let uri = w.node(&[Dom::new("rc-acc-files", false, &[("vda", &live)])], &[]);
    let r = w.run_uri(
        &uri,
        &["--vm", "rc-acc-files", "--restore-path", &w.s("out/r")],
    );
    assert_code(&r, 5);
    assert_has(
        &r,
        "VM 'rc-acc-files' already defined (use --force to override)",
    );
    assert_lacks(&r, "Undefining");
    assert_lacks(&r, "Defining VM");
    assert!(w.ls("out/r").is_empty(), "{:?}", w.ls("out/r"));
    assert_eq!(
        fs::read_to_string(&live).expect("live"),
        "original disk acc\n"
    );
    let rows = w.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].outcome.as_str(),
            rows[0].exit_code,
            rows[0].restore_mode.as_str()
        ),
        ("failed", 5, "dr")
    );
    assert!(w.lock_files().is_empty(), "lock released after exit 5");
}

// 69/81: DR into an empty driver restores every disk and defines the domain with its
// original name and UUID. 82: a VM without TPM material ends with "MACs ✓".
// 138: one restore_sessions row with the run's facts. 135: the lock is gone after.
// 90 (native): no staging or temporary file is left in the restore path.
#[test]
fn s069_s081_s082_s138_dr_into_empty_driver() {
    let w = World::new(&["rc-multi-sql"]);
    let data = w.b("rc-multi-sql/2026-W08");
    let out = w.p("out/r");
    let before = chrono::Utc::now().naive_utc() - chrono::Duration::seconds(2);
    let r = w.run(&["--vm", "rc-multi-sql", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-multi-sql — disk ✓ defined ✓ UUID ✓ MACs ✓"
    );
    let uuid = uuid_in(&data.join("vmconfig.virtnbdbackup.3.xml"));
    assert_has(&r, &format!("UUID preserved: {uuid}"));
    assert_has(&r, "Defining VM from backup config:");
    assert_eq!(
        w.ls("out/r"),
        [
            "rc-multi-sql-sda.qcow2",
            "rc-multi-sql-vda.qcow2",
            "rc-multi-sql-vdb.qcow2"
        ]
    );
    for d in ["sda", "vda", "vdb"] {
        assert_content(
            &out.join(format!("rc-multi-sql-{d}.qcow2")),
            "rc-multi-sql",
            "2026-W08",
            "virtnbdbackup.3",
            d,
        );
    }
    let rows = w.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.vm_name, "rc-multi-sql");
    assert_eq!(row.restore_mode, "dr");
    assert_eq!(row.source_path, data.display().to_string());
    assert_eq!(
        row.target_path.as_deref(),
        Some(out.display().to_string().as_str())
    );
    assert_eq!((row.outcome.as_str(), row.exit_code), ("success", 0));
    assert_eq!(row.period_id.as_deref(), Some("2026-W08"));
    assert_eq!(
        (row.restore_point.as_deref(), row.checkpoint),
        (Some("latest"), Some(3))
    );
    assert_eq!(row.disks.as_deref(), Some("sda, vda, vdb"));
    assert_eq!(row.tpm_result.as_deref(), Some("none"));
    let start = chrono::NaiveDateTime::parse_from_str(&row.start_time, "%Y-%m-%d %H:%M:%S")
        .expect("UTC 'YYYY-MM-DD HH:MM:SS'");
    assert!(
        start >= before && start <= chrono::Utc::now().naive_utc(),
        "start_time {start} is not UTC now"
    );
    assert!(w.lock_files().is_empty());
}

// 70: DR --force over a defined, shut-off VM: the overwrite is allowed after the
// collision check, the existing file at the predicted path is replaced, the old
// definition is undefined only after every check passed, and the disk is restored.
#[test]
fn s070_dr_force_over_shut_off_domain() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/rc-acc-files-vda.qcow2");
    fake_disk(&target, "old acc");
    let uri = w.node(&[Dom::new("rc-acc-files", false, &[("vda", &target)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--force",
        ],
    );
    assert_code(&r, 0);
    let warn = format!(
        "Will overwrite disk of shut-off VM 'rc-acc-files': {} (disaster recovery with --force)",
        target.display()
    );
    assert!(line_of(&r, &warn) < line_of(&r, "All safety checks passed"));
    assert!(
        line_of(&r, "All safety checks passed")
            < line_of(&r, "Undefining existing VM: rc-acc-files")
    );
    assert!(
        line_of(&r, "Undefining existing VM: rc-acc-files")
            < line_of(&r, "Defining VM from backup config")
    );
    assert_lacks(&r, "Failed to undefine");
    // the guide's line, once the new image took the old one's place
    assert_has(
        &r,
        &format!(
            "Removed existing file for DR overwrite: {}",
            target.display()
        ),
    );
    assert!(
        line_of(&r, "of data from") < line_of(&r, "Removed existing file for DR overwrite"),
        "said only after the new image was written"
    );
    assert_eq!(
        summary(&r),
        "Restore complete: rc-acc-files — disk ✓ defined ✓ UUID ✓ MACs ✓"
    );
    assert_content(
        &target,
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
    assert_eq!(w.ls("out/r"), ["rc-acc-files-vda.qcow2"]);
    assert_eq!(w.rows()[0].forced, 1);
}

// 72: DR --force with the VM running and its disk at the predicted path: exit 4
// BLOCKED (never overridable), no undefine, the file untouched.
#[test]
fn s072_dr_force_running_vm_disk_at_predicted_path_is_blocked() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/rc-acc-files-vda.qcow2");
    fake_disk(&target, "running");
    let uri = w.node(&[Dom::new("rc-acc-files", true, &[("vda", &target)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--force",
        ],
    );
    assert_code(&r, 4);
    assert_has(
        &r,
        &format!(
            "BLOCKED: {} is the live disk of running VM 'rc-acc-files' — shut it off first",
            target.display()
        ),
    );
    assert_has(&r, "Pre-flight disk safety check failed — see errors above");
    assert_lacks(&r, "Undefining");
    assert_eq!(
        fs::read_to_string(&target).expect("disk"),
        "original disk running\n"
    );
    assert_eq!(w.ls("out/r"), ["rc-acc-files-vda.qcow2"]);
    assert!(w.lock_files().is_empty(), "lock released after exit 4");
}

// 73: DR --force with the VM running and its disks elsewhere: exit 5 (VM running),
// nothing restored, no undefine.
#[test]
fn s073_dr_force_running_vm_disks_elsewhere_exits_5() {
    let w = World::new(&["rc-acc-files"]);
    let live = w.p("vm/rc-acc-files-vda.qcow2");
    fake_disk(&live, "acc");
    let uri = w.node(&[Dom::new("rc-acc-files", true, &[("vda", &live)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--force",
        ],
    );
    assert_code(&r, 5);
    assert_has(&r, "VM 'rc-acc-files' is running — shut it down before a disaster-recovery restore (virsh shutdown rc-acc-files)");
    assert_lacks(&r, "Undefining");
    assert!(w.ls("out/r").is_empty(), "{:?}", w.ls("out/r"));
}

// 74: a file at the predicted path that is nobody's disk blocks DR without --force
// (exit 4, file untouched); with --force it is replaced (70's overwrite half).
#[test]
fn s074_dr_existing_file_needs_force() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/rc-acc-files-vda.qcow2");
    fake_disk(&target, "stray");
    let r = w.run(&["--vm", "rc-acc-files", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 4);
    assert_has(
        &r,
        &format!(
            "BLOCKED: File already exists: {} — use --force to overwrite",
            target.display()
        ),
    );
    assert_has(&r, "Pre-flight disk safety check failed — see errors above");
    assert_eq!(
        fs::read_to_string(&target).expect("disk"),
        "original disk stray\n"
    );

    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &w.s("out/r"),
        "--force",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!("File exists and will be overwritten: {}", target.display()),
    );
    assert_content(
        &target,
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
    assert_eq!(w.ls("out/r"), ["rc-acc-files-vda.qcow2"]);
}

// 75: a predicted output that is another VM's live disk is refused with and without
// --force (DR and data-only alike).
#[test]
fn s075_other_vms_live_disk_is_never_overwritten() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/rc-acc-files-vda.qcow2");
    fake_disk(&target, "other");
    let uri = w.node(&[Dom::new("other-vm", false, &[("vda", &target)])], &[]);
    for extra in [&[][..], &["--force"][..], &["--skip-config", "--force"][..]] {
        let mut args = vec!["--vm", "rc-acc-files", "--restore-path"];
        let out = w.s("out/r");
        args.push(&out);
        args.extend_from_slice(extra);
        let r = w.run_uri(&uri, &args);
        assert_code(&r, 4);
        assert_has(
            &r,
            &format!(
                "BLOCKED: {} is the live disk of VM 'other-vm' — choose a different --restore-path",
                target.display()
            ),
        );
        assert_eq!(
            fs::read_to_string(&target).expect("disk"),
            "original disk other\n"
        );
    }
}

// 77/101 (native): a restore whose data cannot be applied exits 6 "Disk restore
// failed" and leaves nothing in the restore path — a checksum mismatch in DR and
// data-only mode. With --include-incomplete the same damage (and a truncated full) is
// salvaged instead: exit 6 too, but the disk and its damage map are written, the
// summary says PARTIALLY and the catalogue says partial (issue 17 item 8).
#[test]
fn s077_s101_engine_failure_exits_6_and_leaves_nothing() {
    let w = World::new(&["rc-damage"]);
    for (period, extra) in [("20260515", &[][..]), ("20260515", &["--skip-config"][..])] {
        let period_out = format!("{period}{}", extra.len());
        let mut args = vec!["--vm", "rc-damage", "--period", period, "--restore-path"];
        let out = w.s(&format!("out/{period_out}"));
        args.push(&out);
        args.extend_from_slice(extra);
        let r = w.run(&args);
        assert_code(&r, 6);
        assert_has(&r, "Disk restore failed");
        assert!(
            w.ls(&format!("out/{period_out}")).is_empty(),
            "{:?}",
            w.ls(&format!("out/{period_out}"))
        );
        assert_lacks(&r, "Defining VM");
    }
    let rows = w.rows();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.outcome == "failed" && r.exit_code == 6),
        "{rows:?}"
    );
    assert!(w.lock_files().is_empty(), "lock released after exit 6");
    for (period, extra) in [
        ("20260513", &["--include-incomplete"][..]),
        ("20260513", &["--include-incomplete", "--skip-config"][..]),
        ("20260515", &["--include-incomplete", "--skip-config"][..]),
    ] {
        let out = format!("salvage/{period}{}", extra.len());
        let o = w.s(&out);
        let mut args = vec![
            "--vm",
            "rc-damage",
            "--period",
            period,
            "--restore-path",
            &o,
        ];
        args.extend_from_slice(extra);
        let r = w.run(&args);
        assert_code(&r, 6);
        assert_has(&r, "Salvage restore: vda restored PARTIALLY");
        assert_lacks(&r, "Restore complete");
        assert_eq!(
            w.ls(&out),
            ["rc-damage-vda.qcow2", "rc-damage-vda.qcow2.damage.json"]
        );
        let row = w.rows().last().cloned().expect("row");
        assert_eq!((row.outcome.as_str(), row.exit_code), ("partial", 6));
    }
    assert!(w.lock_files().is_empty(), "lock released after exit 6");
}

// 78: --restore-point N restores checkpoint N, `full` checkpoint 0, `latest` all.
#[test]
fn s078_point_in_time_selects_the_checkpoint() {
    let w = World::new(&["rc-acc-files"]);
    for (rp, point, pit) in [
        (
            "2",
            "virtnbdbackup.2",
            Some("Point-in-time: virtnbdbackup.2"),
        ),
        (
            "full",
            "virtnbdbackup.0",
            Some("Point-in-time: virtnbdbackup.0"),
        ),
        ("latest", "virtnbdbackup.4", None),
    ] {
        let out = format!("out/{rp}");
        let r = w.run(&[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s(&out),
            "--restore-point",
            rp,
        ]);
        assert_code(&r, 0);
        match pit {
            Some(l) => assert_has(&r, l),
            None => assert_lacks(&r, "Point-in-time"),
        }
        assert_content(
            &w.p(&format!("{out}/rc-acc-files-vda.qcow2")),
            "rc-acc-files",
            "accumulate",
            point,
            "vda",
        );
    }
    let rows = w.rows();
    assert_eq!(
        rows.iter()
            .map(|r| (r.restore_point.clone().unwrap_or_default(), r.checkpoint))
            .collect::<Vec<_>>(),
        [
            ("2".to_owned(), Some(2)),
            ("full".to_owned(), Some(0)),
            ("latest".to_owned(), Some(4))
        ]
    );
}

// 79: a restore point beyond the latest exits 5 before anything is written (also in
// disk mode).
#[test]
fn s079_restore_point_beyond_latest_exits_5() {
    let w = World::new(&["rc-acc-files"]);
    for extra in [&[][..], &["--disk", "vda"][..]] {
        let out = w.s("out/r");
        let mut args = vec![
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &out,
            "--restore-point",
            "9",
        ];
        args.extend_from_slice(extra);
        let r = w.run(&args);
        assert_code(&r, 5);
        assert_has(
            &r,
            "Restore point 9 does not exist (latest restore point is 4)",
        );
        assert!(!w.p("out/r").exists());
    }
}

// 80: on a copy data dir a point-in-time request is ignored with a WARN (an
// archived copy chain, addressed by path).
#[test]
fn s080_point_in_time_ignored_for_copy_backups() {
    let w = World::new(&["rc-mon-db"]);
    let chain = w
        .b("rc-mon-db/202601/.archives/chain-2026-01-27")
        .display()
        .to_string();
    let r = w.run(&[
        "--vm",
        &chain,
        "--restore-path",
        &w.s("out/r"),
        "--restore-point",
        "2",
        "--skip-config",
    ]);
    assert_code(&r, 0);
    assert_has(&r, "Point-in-time ignored (backup type: copy)");
    assert_lacks(&r, "Point-in-time: virtnbdbackup");
    assert_has(
        &r,
        "Resolved VM name from backup config: chain-2026-01-27 → rc-mon-db",
    );
    assert_content(
        &w.p("out/r/rc-mon-db-vda.qcow2"),
        "rc-mon-db",
        "202601/.archives/chain-2026-01-27",
        "copy",
        "vda",
    );
    // the chain has no vmconfig.copy.xml: DR defines the VM from its config/*.xml (§2.10)
    let r = w.run(&[
        "--vm",
        &chain,
        "--restore-path",
        &w.s("out/dr"),
        "--restore-point",
        "full",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!("Defining VM from backup config: {chain}/config/rc-mon-db_config_"),
    );
    assert_eq!(
        summary(&r),
        "Restore complete: rc-mon-db — disk ✓ defined ✓ UUID ✓ MACs ✓"
    );
    assert_content(
        &w.p("out/dr/rc-mon-db-vda.qcow2"),
        "rc-mon-db",
        "202601/.archives/chain-2026-01-27",
        "copy",
        "vda",
    );
    let rows = w.rows();
    assert_eq!(
        rows.len(),
        2,
        "rows go to the state root derived from the path"
    );
    assert!(
        rows.iter().all(|r| r.source_path == chain
            && r.period_id.as_deref() == Some("chain-2026-01-27")
            && r.checkpoint == Some(0)),
        "{rows:?}"
    );
}

// 83: DR of a UEFI VM whose host NVRAM exists keeps a `.before-restore.<epoch>` copy
// and installs the backup's NVRAM of the target checkpoint (mode 600, libvirt-qemu).
// 82: a TPM VM's summary ends with "TPM ✓". 128: the TPM state lands under the
// BACKUP_METADATA UUID (root 0711; tpm2 0700, tss when that user exists).
#[test]
fn s082_s083_s128_dr_uefi_tpm_vm() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let data = w.b("rc-uefi-tpm/2026-W26");
    let nv = w.nvram_dir().join("rc-uefi-tpm_VARS.fd");
    fs::create_dir_all(w.nvram_dir()).expect("mkdir");
    fs::write(&nv, b"host nvram").expect("host nvram");
    let r = w.run(&["--vm", "rc-uefi-tpm", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-uefi-tpm — disk ✓ defined ✓ UUID ✓ MACs ✓ TPM ✓"
    );
    assert_has(&r, &format!("UUID preserved: {UEFI_UUID}"));
    for d in ["vda", "vdb"] {
        assert_content(
            &w.p(&format!("out/r/rc-uefi-tpm-{d}.qcow2")),
            "rc-uefi-tpm",
            "2026-W26",
            "virtnbdbackup.0",
            d,
        );
    }
    // NVRAM
    let saved: Vec<String> = w
        .ls(NVRAM)
        .into_iter()
        .filter(|n| n.starts_with("rc-uefi-tpm_VARS.fd.before-restore."))
        .collect();
    assert_eq!(saved.len(), 1, "{:?}", w.ls(NVRAM));
    assert!(
        saved[0]
            .rsplit('.')
            .next()
            .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())),
        "{saved:?}"
    );
    assert_eq!(
        fs::read(w.nvram_dir().join(&saved[0])).expect("saved"),
        b"host nvram"
    );
    assert_eq!(
        fs::read(&nv).expect("nvram"),
        fs::read(data.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.0")).expect("backup nvram")
    );
    assert_eq!(mode_of(&nv), 0o600);
    if let Some(uid) = uid_of("libvirt-qemu").filter(|_| nix::unistd::geteuid().is_root()) {
        assert_eq!(fs::metadata(&nv).expect("md").uid(), uid);
    }
    assert_has(
        &r,
        &format!(
            "NVRAM restored: {} → {}",
            data.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.0").display(),
            nv.display()
        ),
    );
    // TPM
    let t = w.swtpm().join(UEFI_UUID);
    assert_eq!(w.ls(SWTPM), [UEFI_UUID]);
    assert_eq!(mode_of(&t), 0o711);
    assert_eq!(mode_of(&t.join("tpm2")), 0o700);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(fs::metadata(&t).expect("md").uid(), 0, "root:root");
    }
    if let Some(uid) = uid_of("tss").filter(|_| nix::unistd::geteuid().is_root()) {
        assert_eq!(fs::metadata(t.join("tpm2")).expect("md").uid(), uid);
        assert_eq!(
            fs::metadata(t.join("tpm2/tpm2-00.permall"))
                .expect("md")
                .uid(),
            uid
        );
    }
    assert_eq!(
        file_sha(&t.join("tpm2/tpm2-00.permall")),
        file_sha(&data.join("tpm-state/tpm2/tpm2-00.permall"))
    );
    assert_eq!(w.rows()[0].tpm_result.as_deref(), Some("restored"));
}

// 84: when the target checkpoint has no NVRAM copy, the highest earlier one is
// installed and the log names it.
#[test]
fn s084_nvram_falls_back_to_an_earlier_checkpoint() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let data = w.b("rc-uefi-tpm/2026-W25");
    fs::remove_file(data.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.1")).expect("rm");
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--period",
        "2026-W25",
        "--restore-path",
        &w.s("out/r"),
        "--skip-tpm",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        "NVRAM for checkpoint 1 not found in backup; using checkpoint 0",
    );
    let nv = w.nvram_dir().join("rc-uefi-tpm_VARS.fd");
    assert_eq!(
        fs::read(&nv).expect("nvram"),
        fs::read(data.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.0")).expect("backup")
    );
}

// 85: without any per-checkpoint NVRAM the host file is kept and a WARN about a
// possible boot failure is logged; exit 0.
#[test]
fn s085_no_nvram_in_backup_keeps_the_host_file() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    fs::remove_file(w.b("rc-uefi-tpm/2026-W26/rc-uefi-tpm_VARS.fd.virtnbdbackup.0")).expect("rm");
    let nv = w.nvram_dir().join("rc-uefi-tpm_VARS.fd");
    fs::create_dir_all(w.nvram_dir()).expect("mkdir");
    fs::write(&nv, b"host nvram").expect("host nvram");
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--restore-path",
        &w.s("out/r"),
        "--skip-tpm",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "No per-checkpoint NVRAM in backup — using live host NVRAM {}",
            nv.display()
        ),
    );
    assert_has(&r, "may fail to boot");
    assert_eq!(fs::read(&nv).expect("nvram"), b"host nvram");
}

// 87: after a DR the pool whose path is the longest prefix of the restore path is
// refreshed, and only that one.
#[test]
fn s087_refreshes_the_longest_prefix_pool_only() {
    let w = World::new(&["rc-acc-files"]);
    let images = w.p("images");
    let sub = w.p("images/sub");
    fs::create_dir_all(&sub).expect("mkdir");
    let uri = w.node(&[], &[("default", &images), ("sub", &sub)]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &sub.display().to_string(),
        ],
    );
    assert_code(&r, 0);
    assert_has(&r, "Refreshed storage pool 'sub'");
    assert_lacks(&r, "storage pool 'default'");
}

// 89: an incomplete chain refuses `latest` (exit 5), restores the last good point,
// and with --include-incomplete proceeds with the forensic WARN and salvages (the
// missing incremental's possible changes are mapped stale: exit 6, the disk and its
// damage map written). A chain whose newest backup was interrupted (.partial) is
// refused the same way.
#[test]
fn s089_incomplete_chains() {
    let w = World::new(&["rc-brk-inc", "rc-damage"]);
    let r = w.run(&["--vm", "rc-brk-inc", "--restore-path", &w.s("out/a")]);
    assert_code(&r, 5);
    assert_has(&r, "Chain is INCOMPLETE at restore point 2 (missing vda.inc.virtnbdbackup.2.data) — refusing to restore the latest restore point.");
    assert_has(&r, "Restore an earlier good restore point (--restore-point 1) or use --include-incomplete for forensic recovery.");
    assert!(w.ls("out/a").is_empty());

    let r = w.run(&[
        "--vm",
        "rc-brk-inc",
        "--restore-path",
        &w.s("out/b"),
        "--restore-point",
        "1",
    ]);
    assert_code(&r, 0);
    assert_content(
        &w.p("out/b/rc-brk-inc-vda.qcow2"),
        "rc-brk-inc",
        "202603",
        "virtnbdbackup.1",
        "vda",
    );

    let r = w.run(&[
        "--vm",
        "rc-brk-inc",
        "--restore-path",
        &w.s("out/c"),
        "--restore-point",
        "3",
    ]);
    assert_code(&r, 5);
    assert_has(&r, "— refusing to restore restore point 3.");

    let r = w.run(&[
        "--vm",
        "rc-brk-inc",
        "--restore-path",
        &w.s("out/d"),
        "--include-incomplete",
    ]);
    assert_has(&r, "Restoring from an INCOMPLETE chain (--include-incomplete): restored data may be inconsistent");
    assert_code(&r, 6);
    assert_has(&r, "Salvage restore: vda restored PARTIALLY");
    assert_eq!(
        w.ls("out/d"),
        ["rc-brk-inc-vda.qcow2", "rc-brk-inc-vda.qcow2.damage.json"]
    );
    assert_eq!(w.rows().last().map(|r| r.include_incomplete), Some(1));
    assert_eq!(
        w.rows().last().map(|r| r.outcome.clone()).as_deref(),
        Some("partial")
    );

    let r = w.run(&[
        "--vm",
        "rc-damage",
        "--period",
        "20260516",
        "--restore-path",
        &w.s("out/e"),
        "--skip-config",
    ]);
    assert_code(&r, 5);
    assert_has(
        &r,
        "Chain is INCOMPLETE at restore point 2 (partial vda.inc.virtnbdbackup.2.data.partial)",
    );
    let r = w.run(&[
        "--vm",
        "rc-damage",
        "--period",
        "20260516",
        "--restore-path",
        &w.s("out/e"),
        "--skip-config",
        "--restore-point",
        "1",
    ]);
    assert_code(&r, 0);
    assert_content(
        &w.p("out/e/rc-damage-vda.qcow2"),
        "rc-damage",
        "20260516",
        "virtnbdbackup.1",
        "vda",
    );
}

// ───────────────────────────── clone (90–99) ─────────────────────────────

// 90 (native: no staging dir; nothing but the final image is left), 91: a single-disk
// VM is cloned to `<clone>.<ext>`; the clone gets a new UUID.
#[test]
fn s090_s091_clone_of_a_single_disk_vm() {
    let w = World::new(&["rc-acc-files"]);
    let orig = uuid_in(&w.b("rc-acc-files/vmconfig.virtnbdbackup.4.xml"));
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &w.s("out/r"),
        "--name",
        "test-clone",
    ]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-acc-files — disk ✓ defined ✓ new identity ✓"
    );
    assert_eq!(w.ls("out/r"), ["test-clone.qcow2"]);
    assert_content(
        &w.p("out/r/test-clone.qcow2"),
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("Defined 'test-clone' with new UUID: "))
        .expect("define line");
    let new = line.rsplit(' ').next().expect("uuid");
    assert_ne!(new, orig);
    assert_eq!(new.len(), 36, "{new}");
    let row = &w.rows()[0];
    assert_eq!(
        (
            row.restore_mode.as_str(),
            row.target_name.as_deref(),
            row.vm_name.as_str()
        ),
        ("clone", Some("test-clone"), "rc-acc-files")
    );
}

// 91: a multi-disk VM is cloned to `<clone>-<dev>.<ext>` per disk.
#[test]
fn s091_clone_of_a_multi_disk_vm() {
    let w = World::new(&["rc-multi-sql"]);
    let r = w.run(&[
        "--vm",
        "rc-multi-sql",
        "--restore-path",
        &w.s("out/r"),
        "--name",
        "test-clone",
    ]);
    assert_code(&r, 0);
    assert_eq!(
        w.ls("out/r"),
        [
            "test-clone-sda.qcow2",
            "test-clone-vda.qcow2",
            "test-clone-vdb.qcow2"
        ]
    );
    for d in ["sda", "vda", "vdb"] {
        assert_content(
            &w.p(&format!("out/r/test-clone-{d}.qcow2")),
            "rc-multi-sql",
            "2026-W08",
            "virtnbdbackup.3",
            d,
        );
    }
}

// 92: the clone's NVRAM is `<nvram dir>/<clone>_VARS.fd` (the backup's copy of the
// target checkpoint, mode 600, libvirt-qemu); the source's NVRAM is not touched.
// 96: the TPM state goes under the clone's new UUID, never the backup's.
// 98: the summary of a TPM VM's clone ends with "TPM ✓".
#[test]
fn s092_s096_s098_clone_of_a_uefi_tpm_vm() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let data = w.b("rc-uefi-tpm/2026-W25");
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--period",
        "2026-W25",
        "--restore-path",
        &w.s("out/r"),
        "--name",
        "test-clone",
    ]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-uefi-tpm — disk ✓ defined ✓ new identity ✓ TPM ✓"
    );
    assert_eq!(
        w.ls("out/r"),
        [
            "test-clone-vda.qcow2",
            "test-clone-vdb.qcow2",
            "test-driver"
        ]
    );
    for d in ["vda", "vdb"] {
        assert_content(
            &w.p(&format!("out/r/test-clone-{d}.qcow2")),
            "rc-uefi-tpm",
            "2026-W25",
            "virtnbdbackup.1",
            d,
        );
    }
    assert_eq!(w.ls(NVRAM), ["test-clone_VARS.fd"]);
    let nv = w.nvram_dir().join("test-clone_VARS.fd");
    assert_eq!(
        fs::read(&nv).expect("nvram"),
        fs::read(data.join("rc-uefi-tpm_VARS.fd.virtnbdbackup.1")).expect("backup")
    );
    assert_eq!(mode_of(&nv), 0o600);
    if let Some(uid) = uid_of("libvirt-qemu").filter(|_| nix::unistd::geteuid().is_root()) {
        assert_eq!(fs::metadata(&nv).expect("md").uid(), uid);
    }
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("Defined 'test-clone' with new UUID: "))
        .expect("define line");
    let new = line.rsplit(' ').next().expect("uuid").to_owned();
    assert_ne!(new, UEFI_UUID);
    assert_eq!(w.ls(SWTPM), std::slice::from_ref(&new));
    assert!(w.swtpm().join(&new).join("tpm2/tpm2-00.permall").is_file());
    assert_eq!(w.rows()[0].tpm_result.as_deref(), Some("restored"));
}

// 93: a clone name that is already defined, without --force: exit 5, nothing written.
#[test]
fn s093_clone_name_already_defined() {
    let w = World::new(&["rc-acc-files"]);
    let live = w.p("vm/test-clone.qcow2");
    fake_disk(&live, "clone");
    let uri = w.node(&[Dom::new("test-clone", false, &[("vda", &live)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--name",
            "test-clone",
        ],
    );
    assert_code(&r, 5);
    assert_has(
        &r,
        "VM 'test-clone' already defined (use --force to override)",
    );
    assert!(w.ls("out/r").is_empty());
    // with --force the existing clone-name VM is replaced (its disks were elsewhere)
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--name",
            "test-clone",
            "--force",
        ],
    );
    assert_code(&r, 0);
    assert!(
        line_of(&r, "All safety checks passed") < line_of(&r, "Undefining existing VM: test-clone")
    );
    assert_eq!(w.ls("out/r"), ["test-clone.qcow2"]);
    assert_eq!(
        fs::read_to_string(&live).expect("old clone disk"),
        "original disk clone\n"
    );
}

// 94: cloning while the source VM is defined and running needs no --force and never
// touches the source.
#[test]
fn s094_clone_while_the_source_runs() {
    let w = World::new(&["rc-acc-files"]);
    let live = w.p("vm/rc-acc-files-vda.qcow2");
    fake_disk(&live, "src");
    let uri = w.node(&[Dom::new("rc-acc-files", true, &[("vda", &live)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--name",
            "test-clone",
        ],
    );
    assert_code(&r, 0);
    assert_lacks(&r, "Undefining");
    assert_eq!(
        fs::read_to_string(&live).expect("live"),
        "original disk src\n"
    );
    assert_eq!(w.ls("out/r"), ["test-clone.qcow2"]);
}

// 95: `--name other-vm --force` where other-vm's live disk is the predicted output:
// exit 4 BLOCKED and other-vm is not undefined; without --force: exit 5 (the
// existence check comes first).
#[test]
fn s095_clone_onto_another_vms_live_disk() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/other-vm.qcow2");
    fake_disk(&target, "other");
    let uri = w.node(&[Dom::new("other-vm", false, &[("vda", &target)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--name",
            "other-vm",
            "--force",
        ],
    );
    assert_code(&r, 4);
    assert_has(
        &r,
        &format!(
            "BLOCKED: {} is the live disk of VM 'other-vm' — choose a different --restore-path",
            target.display()
        ),
    );
    assert_lacks(&r, "Undefining");
    assert_eq!(
        fs::read_to_string(&target).expect("disk"),
        "original disk other\n"
    );
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--name",
            "other-vm",
        ],
    );
    assert_code(&r, 5);
    assert_has(
        &r,
        "VM 'other-vm' already defined (use --force to override)",
    );
}

// 97: when the clone cannot be defined the run exits 6 with "virsh define failed:"
// and the NVRAM copied for it is removed. (The backup's domain XML gets a memory unit
// libvirt refuses; a '/' in the name, used before, is now refused earlier as a name
// that would leave its directory.)
#[test]
fn s097_clone_define_failure_exits_6_and_removes_the_nvram_copy() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let mut xmls = Vec::new();
    walk(&w.b("rc-uefi-tpm"), &mut xmls);
    for f in xmls.iter().filter(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
    }) {
        let t = fs::metadata(f).expect("md").modified().expect("mtime");
        let x = fs::read_to_string(f).expect("xml");
        fs::write(f, x.replace("<memory unit='KiB'>", "<memory unit='bogus'>")).expect("w");
        set_mtime(f, t);
    }
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--restore-path",
        &w.s("out/r"),
        "--name",
        "c97",
        "--skip-tpm",
    ]);
    assert_code(&r, 6);
    assert_has(&r, "virsh define failed:");
    assert!(
        !w.nvram_dir().join("c97_VARS.fd").exists(),
        "{:?}",
        ls(&w.nvram_dir())
    );
}

// 99: a dry-run clone announces the definition, writes nothing, exits 0.
#[test]
fn s099_dry_run_clone() {
    let w = World::new(&["rc-multi-sql"]);
    let r = w.run(&[
        "--vm",
        "rc-multi-sql",
        "--restore-path",
        &w.s("out/r"),
        "--name",
        "test-clone",
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        "[DRY RUN] Would define 'test-clone' with new UUID and MACs",
    );
    assert_has(&r, "[DRY RUN] vda: would read 4 file(s)");
    assert_has(
        &r,
        &format!("of data to {}", w.p("out/r/test-clone-vda.qcow2").display()),
    );
    assert_eq!(
        summary(&r),
        "Restore complete: rc-multi-sql [DRY RUN — no changes made]"
    );
    assert!(!w.p("out/r").exists());
    assert!(w.rows().is_empty() && w.lock_files().is_empty());
}

// ───────────────────────────── data-only (100–102) ─────────────────────────────

// 100: --skip-config restores the disks under their original names, defines nothing,
// touches neither swtpm nor NVRAM. 102: --name is ignored with a WARN.
#[test]
fn s100_s102_data_only() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    for (out, extra) in [("out/a", &[][..]), ("out/b", &["--name", "c"][..])] {
        let o = w.s(out);
        let mut args = vec!["--vm", "rc-uefi-tpm", "--restore-path", &o, "--skip-config"];
        args.extend_from_slice(extra);
        let r = w.run(&args);
        assert_code(&r, 0);
        assert_eq!(
            summary(&r),
            "Restore complete: rc-uefi-tpm — disk ✓ data-only"
        );
        assert_has(
            &r,
            "Restore mode: data-only (--skip-config — disk restore without VM definition)",
        );
        assert_has(&r, "Skipping TPM restore (--skip-config implies data-only)");
        assert_lacks(&r, "Defin");
        assert_lacks(&r, "NVRAM");
        assert_eq!(
            w.ls(out),
            ["rc-uefi-tpm-vda.qcow2", "rc-uefi-tpm-vdb.qcow2"]
        );
        for d in ["vda", "vdb"] {
            assert_content(
                &w.p(&format!("{out}/rc-uefi-tpm-{d}.qcow2")),
                "rc-uefi-tpm",
                "2026-W26",
                "virtnbdbackup.0",
                d,
            );
        }
        if !extra.is_empty() {
            assert_has(
                &r,
                "--name is ignored with --skip-config (data-only restore defines no VM)",
            );
        }
    }
    assert!(w.ls(SWTPM).is_empty() && w.ls(NVRAM).is_empty());
    let rows = w.rows();
    assert!(
        rows.iter()
            .all(|r| r.restore_mode == "data-only" && r.target_name.is_none()),
        "{rows:?}"
    );
}

// ───────────────────────────── disk mode (103–120) ─────────────────────────────

/// A defined rc-multi-sql whose three disks are throwaway files under `<scratch>/vm`.
fn multi_sql_domain(w: &World, running: bool) -> (String, Vec<PathBuf>) {
    let paths: Vec<PathBuf> = ["vda", "vdb", "sda"]
        .iter()
        .map(|d| w.p(&format!("vm/rc-multi-sql-{d}.qcow2")))
        .collect();
    for (p, d) in paths.iter().zip(["vda", "vdb", "sda"]) {
        fake_disk(p, d);
    }
    let disks: Vec<(&str, &Path)> = ["vda", "vdb", "sda"]
        .iter()
        .copied()
        .zip(paths.iter().map(PathBuf::as_path))
        .collect();
    (
        w.node(&[Dom::new("rc-multi-sql", running, &disks)], &[]),
        paths,
    )
}

fn pre_restore(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pre-restore", p.display()))
}

// 103: in-place disk restore of a VM that is not defined: exit 5.
#[test]
fn s103_disk_in_place_needs_a_defined_vm() {
    let w = World::new(&["rc-acc-files"]);
    let r = w.run(&["--vm", "rc-acc-files", "--disk", "vda"]);
    assert_code(&r, 5);
    assert_has(&r, "VM 'rc-acc-files' is not defined in libvirt — cannot determine original disk paths. Use --restore-path to extract disks to a specific location instead.");
    let row = &w.rows()[0];
    assert_eq!(
        (
            row.restore_mode.as_str(),
            row.outcome.as_str(),
            row.exit_code
        ),
        ("disk", "failed", 5)
    );
}

// 104: in-place disk restore with the VM running: exit 5, disks untouched.
#[test]
fn s104_disk_in_place_refuses_a_running_vm() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, true);
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda"]);
    assert_code(&r, 5);
    assert_has(&r, "VM 'rc-multi-sql' is running — shut it down first (virsh shutdown rc-multi-sql). Replacing disks under a running VM will cause corruption.");
    assert_eq!(
        fs::read_to_string(&paths[0]).expect("disk"),
        "original disk vda\n"
    );
    assert!(!pre_restore(&paths[0]).exists());
}

// §4.8 step 3 (§3.6 messages): a disk the VM does not have → exit 5; an original path
// that does not exist → exit 4; every disk is checked before any is touched.
#[test]
fn in_place_checks_every_disk_before_touching_any() {
    let w = World::new(&["rc-multi-sql"]);
    let vda = w.p("vm/rc-multi-sql-vda.qcow2");
    let vdb = w.p("vm/rc-multi-sql-vdb.qcow2");
    fake_disk(&vda, "vda");
    let uri = w.node(
        &[Dom::new(
            "rc-multi-sql",
            false,
            &[("vda", &vda), ("vdb", &vdb)],
        )],
        &[],
    );
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda,sda"]);
    assert_code(&r, 5);
    assert_has(
        &r,
        "Disk 'sda' not found in VM 'rc-multi-sql' configuration. Available disks: vda, vdb",
    );
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda,vdb"]);
    assert_code(&r, 4);
    assert_has(&r, &format!("Original disk path does not exist: {} — Use --restore-path to extract disks to a specific location instead.", vdb.display()));
    fake_disk(&vdb, "vdb");
    fs::write(pre_restore(&vdb), "older").expect("pre-restore");
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda,vdb"]);
    assert_code(&r, 4);
    assert_has(&r, "Pre-restore file already exists: ");
    assert_eq!(
        fs::read_to_string(&vda).expect("vda"),
        "original disk vda\n",
        "vda untouched"
    );
    assert_eq!(
        w.ls("vm"),
        [
            "rc-multi-sql-vda.qcow2",
            "rc-multi-sql-vdb.qcow2",
            "rc-multi-sql-vdb.qcow2.pre-restore"
        ]
    );
    assert!(w.lock_files().is_empty());
}

// 105: an existing `.pre-restore` refuses the run (exit 4) unless --no-pre-restore,
// which deletes the original instead of keeping it (the old .pre-restore is left alone).
#[test]
fn s105_existing_pre_restore() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, false);
    let vda = &paths[0];
    fs::write(pre_restore(vda), "older").expect("pre-restore");
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda"]);
    assert_code(&r, 4);
    assert_has(&r, &format!("Pre-restore file already exists: {}.pre-restore — delete it first or use --no-pre-restore", vda.display()));
    assert_eq!(
        fs::read_to_string(vda).expect("disk"),
        "original disk vda\n"
    );

    let r = w.run_uri(
        &uri,
        &["--vm", "rc-multi-sql", "--disk", "vda", "--no-pre-restore"],
    );
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "Removed existing disk (--no-pre-restore): {}",
            vda.display()
        ),
    );
    assert_lacks(&r, "Backed up existing");
    assert_lacks(&r, "ACTION REQUIRED");
    assert_content(vda, "rc-multi-sql", "2026-W08", "virtnbdbackup.3", "vda");
    assert_eq!(
        fs::read_to_string(pre_restore(vda)).expect("old pre-restore"),
        "older"
    );
    assert_eq!(
        w.ls("vm"),
        [
            "rc-multi-sql-sda.qcow2",
            "rc-multi-sql-vda.qcow2",
            "rc-multi-sql-vda.qcow2.pre-restore",
            "rc-multi-sql-vdb.qcow2"
        ]
    );
}

// 106: a disk that is not in the backup: exit 5 naming the available disks.
#[test]
fn s106_unknown_disk() {
    let w = World::new(&["rc-acc-files"]);
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--disk",
        "vdz",
        "--restore-path",
        &w.s("out/x"),
    ]);
    assert_code(&r, 5);
    assert_has(&r, "Disk 'vdz' not found in backup. Available disks: vda");
    assert!(!w.p("out/x").exists());
}

// 107: a disk removed mid-chain is refused at `latest` with the three-line hint.
#[test]
fn s107_disk_absent_at_the_latest_point() {
    let w = World::new(&["rc-shrink"]);
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--disk",
        "sda",
        "--restore-path",
        &w.s("out/x"),
    ]);
    assert_code(&r, 5);
    assert_has(
        &r,
        "Disk 'sda' is not available at the latest restore point (checkpoint 4).",
    );
    assert_has(&r, "It was last backed up at checkpoint 2.");
    assert_has(
        &r,
        "Use --restore-point 2 to restore sda from that checkpoint.",
    );
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--disk",
        "sda",
        "--restore-path",
        &w.s("out/x"),
        "--restore-point",
        "3",
    ]);
    assert_code(&r, 5);
    assert_has(
        &r,
        "Disk 'sda' is not available at restore point 3 (disks: vda, vdb).",
    );
    assert!(!w.p("out/x").exists());
}

// 108 (native: no PIT staging dir exists at all): `--disk sda --restore-point 2` warns
// that the disk configuration changed (3 vs 2 disks), restores sda at checkpoint 2
// and leaves nothing in TMPDIR.
#[test]
fn s108_disk_restore_at_a_point_with_more_disks() {
    let w = World::new(&["rc-shrink"]);
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--disk",
        "sda",
        "--restore-path",
        &w.s("out/x"),
        "--restore-point",
        "2",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        "Disk configuration changed between checkpoint 2 and the latest checkpoint (4).",
    );
    assert_has(&r, "  Checkpoint 2: sda, vda, vdb (3 disks)");
    assert_has(&r, "  Latest (CP 4): vda, vdb (2 disks)");
    assert_has(&r, "  Restoring with checkpoint 2 disk configuration.");
    assert_eq!(w.ls("out/x"), ["rc-shrink-sda.qcow2"]);
    assert_content(
        &w.p("out/x/rc-shrink-sda.qcow2"),
        "rc-shrink",
        "202606",
        "virtnbdbackup.2",
        "sda",
    );
    assert!(w.ls("tmp").is_empty(), "{:?}", w.ls("tmp"));
    assert_eq!(
        summary(&r),
        format!("Disk extract complete: rc-shrink/sda → {}", w.s("out/x"))
    );
}

// 109: disks are replaced one by one in the requested order. 110: each restored disk
// is libvirt-qemu owned (when that user exists), mode 600, verified, and no
// vmconfig.xml is left beside it. 114: the checkpoint-invalidation banner is printed
// once with "yes" as the default. 115: the `.pre-restore` notice lists both files
// and a Total line.
#[test]
fn s109_s110_s114_s115_two_disks_in_place() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, false);
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vdb,vda"]);
    assert_code(&r, 0);
    assert!(line_of(&r, "── Restoring vdb [1/2] ──") < line_of(&r, "── Restoring vda [2/2] ──"));
    assert!(
        line_of(
            &r,
            &format!("Backed up existing: {}", pre_restore(&paths[1]).display())
        ) < line_of(&r, "── Restoring vda [2/2] ──")
    );
    assert_has(&r, "VM 'rc-multi-sql' is shut off ✓");
    for (p, d) in paths.iter().zip(["vda", "vdb"]) {
        assert_content(p, "rc-multi-sql", "2026-W08", "virtnbdbackup.3", d);
        assert_eq!(
            fs::read_to_string(pre_restore(p)).expect("pre-restore"),
            format!("original disk {d}\n")
        );
        assert_eq!(mode_of(p), 0o600);
        if let Some(uid) = uid_of("libvirt-qemu").filter(|_| nix::unistd::geteuid().is_root()) {
            assert_eq!(fs::metadata(p).expect("md").uid(), uid);
        }
        assert_has(&r, &format!("  {d}: ownership ✓ integrity ✓"));
    }
    assert_eq!(
        fs::read_to_string(&paths[2]).expect("sda"),
        "original disk sda\n",
        "sda untouched"
    );
    assert_eq!(
        w.ls("vm"),
        [
            "rc-multi-sql-sda.qcow2",
            "rc-multi-sql-vda.qcow2",
            "rc-multi-sql-vda.qcow2.pre-restore",
            "rc-multi-sql-vdb.qcow2",
            "rc-multi-sql-vdb.qcow2.pre-restore"
        ]
    );
    assert_eq!(
        r.stderr
            .matches("CHECKPOINT CHAIN INVALIDATED for 'rc-multi-sql'")
            .count(),
        1
    );
    assert_has(
        &r,
        "ENABLE_AUTO_RECOVERY_ON_CHECKPOINT_CORRUPTION=\"yes\" (the default)",
    );
    assert_has(
        &r,
        "virsh checkpoint-delete rc-multi-sql $cp --metadata; done",
    );
    assert_has(
        &r,
        "ACTION REQUIRED: Remove .pre-restore file(s) once VM is confirmed working",
    );
    for p in &paths[..2] {
        assert_has(&r, &format!("  rm {}  (", pre_restore(p).display()));
    }
    assert_has(&r, "  Total: ");
    assert_eq!(
        summary(&r),
        "Disk restore complete: rc-multi-sql/vdb, vda — all ✓"
    );
    let row = &w.rows()[0];
    assert_eq!(
        (
            row.restore_mode.as_str(),
            row.outcome.as_str(),
            row.disks.as_deref()
        ),
        ("disk", "success", Some("vdb, vda"))
    );
    assert_eq!(
        row.target_path.as_deref(),
        Some(format!("{}, {}", paths[1].display(), paths[0].display()).as_str())
    );
}

// 111: a failure on the second of three disks keeps the first restored (with its
// .pre-restore), leaves the failed disk's original in place, skips the third, exit 6.
// 142: the row says disk / failed / 6 and lists every requested device.
#[test]
fn s111_s142_partial_disk_failure() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, false);
    // a damaged frame header (`data` → `deta`) in the middle of vdb's inc 3: the
    // chain looks complete (its end is intact) until vdb's turn comes
    let bad = w.b("rc-multi-sql/2026-W08/vdb.inc.virtnbdbackup.3.data");
    let mut b = fs::read(&bad).expect("read");
    b[378 + 1] ^= 0x01;
    fs::write(&bad, b).expect("write");
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", "vda,vdb,sda"]);
    assert_code(&r, 6);
    assert_has(&r, "Partial restore: vda succeeded, vdb FAILED");
    assert_has(&r, "Skipped: sda");
    assert_has(&r, "Disk restore failed for vdb");
    assert_content(
        &paths[0],
        "rc-multi-sql",
        "2026-W08",
        "virtnbdbackup.3",
        "vda",
    );
    assert_eq!(
        fs::read_to_string(pre_restore(&paths[0])).expect("vda kept"),
        "original disk vda\n"
    );
    assert_eq!(
        fs::read_to_string(&paths[1]).expect("vdb"),
        "original disk vdb\n"
    );
    assert_eq!(
        fs::read_to_string(&paths[2]).expect("sda"),
        "original disk sda\n"
    );
    assert_eq!(
        w.ls("vm"),
        [
            "rc-multi-sql-sda.qcow2",
            "rc-multi-sql-vda.qcow2",
            "rc-multi-sql-vda.qcow2.pre-restore",
            "rc-multi-sql-vdb.qcow2"
        ]
    );
    let row = &w.rows()[0];
    assert_eq!(
        (
            row.restore_mode.as_str(),
            row.outcome.as_str(),
            row.exit_code
        ),
        ("disk", "failed", 6)
    );
    assert_eq!(row.disks.as_deref(), Some("vda, vdb, sda"));
    assert!(
        row.error_message
            .as_deref()
            .is_some_and(|m| m.starts_with("Partial restore: vda succeeded, vdb FAILED")),
        "{row:?}"
    );
    assert!(w.lock_files().is_empty());
}

// 113: in place, restore data plus the .pre-restore copies larger than the free space
// → exit 4 before any file is renamed. 124: a dry-run with insufficient space exits 4
// too (DR and in place). The "backup" is a sparse 8 TiB full; completeness is
// overridden so that the space check is reached.
#[test]
fn s113_s124_insufficient_space() {
    let w = World::new(&[]);
    let data = w.b("big/20260101/vda.full.data");
    fs::create_dir_all(data.parent().expect("dir")).expect("mkdir");
    let f = File::create(&data).expect("create");
    if f.set_len(8 << 40).is_err() {
        eprintln!("filesystem refuses an 8 TiB sparse file: statements 113/124 not checked");
        return;
    }
    let free = nix::sys::statvfs::statvfs(w.scratch.dir.path())
        .map(|s| s.blocks_available() * s.fragment_size());
    if free.is_ok_and(|f| f >= 8 << 40) {
        eprintln!("more than 8 TiB free: statements 113/124 not checked");
        return;
    }
    let live = w.p("vm/big-vda.qcow2");
    fake_disk(&live, "big");
    let uri = w.node(&[Dom::new("big", false, &[("vda", &live)])], &[]);
    for extra in [&[][..], &["--dry-run"][..]] {
        let r = w.run_unhashed(
            &uri,
            &[
                &["--vm", "big", "--disk", "vda", "--include-incomplete"][..],
                extra,
            ]
            .concat(),
        );
        assert_code(&r, 4);
        // 8 TiB of data + the 18-byte original, rounded up like numfmt
        assert_has(
            &r,
            "Insufficient space: need 8.1TiB (restore + .pre-restore) but only ",
        );
        assert_eq!(
            fs::read_to_string(&live).expect("disk"),
            "original disk big\n"
        );
        assert!(!pre_restore(&live).exists());
        let out = w.s("out/r");
        let r = w.run_unhashed(
            &uri,
            &[
                &[
                    "--vm",
                    "big",
                    "--restore-path",
                    &out,
                    "--skip-config",
                    "--include-incomplete",
                ][..],
                extra,
            ]
            .concat(),
        );
        assert_code(&r, 4);
        assert_has(&r, "Insufficient space: restore needs 8.0TiB but only ");
        assert!(w.ls("out/r").is_empty());
    }
}

// 116: extract works with the VM running (and undefined), keeps no .pre-restore,
// does not chown, prints no invalidation banner.
#[test]
fn s116_extract_with_the_vm_running_or_undefined() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, true);
    for (u, out) in [(uri.as_str(), "out/x"), ("test:///default", "out/y")] {
        let r = w.run_uri(
            u,
            &[
                "--vm",
                "rc-multi-sql",
                "--disk",
                "vdb",
                "--restore-path",
                &w.s(out),
            ],
        );
        assert_code(&r, 0);
        assert_eq!(
            summary(&r),
            format!("Disk extract complete: rc-multi-sql/vdb → {}", w.s(out))
        );
        assert_has(&r, &format!("Extract mode: writing to {}", w.s(out)));
        assert_lacks(&r, "CHECKPOINT CHAIN INVALIDATED");
        assert_lacks(&r, ".pre-restore");
        assert_eq!(w.ls(out), ["rc-multi-sql-vdb.qcow2"]);
        let f = w.p(&format!("{out}/rc-multi-sql-vdb.qcow2"));
        assert_content(&f, "rc-multi-sql", "2026-W08", "virtnbdbackup.3", "vdb");
        assert_eq!(
            fs::metadata(&f).expect("md").uid(),
            nix::unistd::geteuid().as_raw(),
            "not chowned"
        );
    }
    assert_eq!(
        fs::read_to_string(&paths[1]).expect("vdb"),
        "original disk vdb\n"
    );
    assert!(w
        .rows()
        .iter()
        .all(|r| r.restore_mode == "disk-extract" && r.outcome == "success"));
}

// 117: `--disk all` = the disks present at the target checkpoint, sorted.
#[test]
fn s117_disk_all_means_the_disks_at_the_target_point() {
    let w = World::new(&["rc-shrink"]);
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--disk",
        "all",
        "--restore-path",
        &w.s("out/l"),
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        // an extract says so (0.7 said "replacing" here, which it does not do)
        "Disk restore mode: extracting 'vda, vdb' (available: sda, vda, vdb)",
    );
    assert_eq!(
        w.ls("out/l"),
        ["rc-shrink-vda.qcow2", "rc-shrink-vdb.qcow2"]
    );
    for d in ["vda", "vdb"] {
        assert_content(
            &w.p(&format!("out/l/rc-shrink-{d}.qcow2")),
            "rc-shrink",
            "202606",
            "virtnbdbackup.4",
            d,
        );
    }
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--disk",
        "all",
        "--restore-path",
        &w.s("out/p"),
        "--restore-point",
        "2",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        "Disk restore mode: extracting 'sda, vda, vdb' (available: sda, vda, vdb)",
    );
    assert_eq!(
        summary(&r),
        format!(
            "Disk extract complete: rc-shrink/sda, vda, vdb → {}",
            w.s("out/p")
        )
    );
    for d in ["sda", "vda", "vdb"] {
        assert_content(
            &w.p(&format!("out/p/rc-shrink-{d}.qcow2")),
            "rc-shrink",
            "202606",
            "virtnbdbackup.2",
            d,
        );
    }
}

// 118: items of --disk are trimmed and empty ones dropped; nothing left → exit 7.
#[test]
fn s118_disk_list_is_trimmed() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, _) = multi_sql_domain(&w, false);
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", " vda , ,vdb "]);
    assert_code(&r, 0);
    assert!(line_of(&r, "── Restoring vda [1/2] ──") < line_of(&r, "── Restoring vdb [2/2] ──"));
    assert_eq!(
        summary(&r),
        "Disk restore complete: rc-multi-sql/vda, vdb — all ✓"
    );
    let r = w.run_uri(&uri, &["--vm", "rc-multi-sql", "--disk", ","]);
    assert_code(&r, 7);
    assert_has(&r, "No disk names specified");
}

// 119: disk mode never defines/undefines, never writes TPM state or NVRAM (a UEFI+TPM
// VM restored in place and extracted).
#[test]
fn s119_disk_mode_leaves_identity_alone() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let nv = w.nvram_dir().join("rc-uefi-tpm_VARS.fd");
    fs::create_dir_all(w.nvram_dir()).expect("mkdir");
    fs::write(&nv, b"host nvram").expect("nvram");
    let disks: Vec<PathBuf> = ["vda", "vdb"]
        .iter()
        .map(|d| w.p(&format!("vm/rc-uefi-tpm-{d}.qcow2")))
        .collect();
    for (p, d) in disks.iter().zip(["vda", "vdb"]) {
        fake_disk(p, d);
    }
    let mut dom = Dom::new(
        "rc-uefi-tpm",
        false,
        &[("vda", &disks[0]), ("vdb", &disks[1])],
    );
    dom.uuid = Some(UEFI_UUID.into());
    let uri = w.node(&[dom], &[]);
    for extra in [&[][..], &["--restore-path", "EXTRACT"][..]] {
        let ex = w.s("out/x");
        let mut args = vec!["--vm", "rc-uefi-tpm", "--disk", "all"];
        args.extend(
            extra
                .iter()
                .map(|a| if *a == "EXTRACT" { ex.as_str() } else { a }),
        );
        let r = w.run_uri(&uri, &args);
        assert_code(&r, 0);
        for s in ["Defin", "Undefin", "NVRAM", "TPM"] {
            assert_lacks(&r, s);
        }
    }
    assert!(w.ls(SWTPM).is_empty());
    assert_eq!(w.ls(NVRAM), ["rc-uefi-tpm_VARS.fd"]);
    assert_eq!(fs::read(&nv).expect("nvram"), b"host nvram");
    assert_content(
        &disks[0],
        "rc-uefi-tpm",
        "2026-W26",
        "virtnbdbackup.0",
        "vda",
    );
}

// 120: a dry-run in-place restore announces the rename, leaves the disk untouched,
// exits 0 (and takes no lock, writes no row).
#[test]
fn s120_dry_run_in_place() {
    let w = World::new(&["rc-multi-sql"]);
    let (uri, paths) = multi_sql_domain(&w, false);
    let r = w.run_uri(
        &uri,
        &["--vm", "rc-multi-sql", "--disk", "vda", "--dry-run"],
    );
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "[DRY RUN] Would rename: {} → {}",
            paths[0].display(),
            pre_restore(&paths[0]).display()
        ),
    );
    assert_has(
        &r,
        &format!("[DRY RUN] Would restore to: {}", paths[0].display()),
    );
    assert_eq!(
        summary(&r),
        "Disk restore complete: rc-multi-sql/vda [DRY RUN — no changes made]"
    );
    assert_eq!(
        fs::read_to_string(&paths[0]).expect("disk"),
        "original disk vda\n"
    );
    assert_eq!(w.ls("vm").len(), 3);
    assert!(w.rows().is_empty() && w.lock_files().is_empty());
}

// ───────────────────────────── dry-run (121–127) ─────────────────────────────

// 121: a dry-run DR previews and creates nothing. 125: no lock, no staging, no row.
#[test]
fn s121_s125_dry_run_dr_changes_nothing() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-uefi-tpm [DRY RUN — no changes made]"
    );
    assert_has(&r, "[DRY RUN] Would restore NVRAM: ");
    assert_has(&r, "[DRY RUN] Would restore TPM: ");
    assert!(!w.p("out/r").exists());
    assert!(w.ls(SWTPM).is_empty() && w.ls(NVRAM).is_empty() && w.ls("tmp").is_empty());
    assert!(w.lock_files().is_empty() && !w.b("_state/locks").exists());
    assert!(w.rows().is_empty());
}

// 122: a dry-run DR of a defined VM without --force only warns; exit 0.
#[test]
fn s122_dry_run_defined_vm_without_force() {
    let w = World::new(&["rc-acc-files"]);
    let live = w.p("vm/rc-acc-files-vda.qcow2");
    fake_disk(&live, "acc");
    let uri = w.node(&[Dom::new("rc-acc-files", false, &[("vda", &live)])], &[]);
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--dry-run",
        ],
    );
    assert_code(&r, 0);
    assert_has(
        &r,
        "[DRY RUN] VM 'rc-acc-files' exists (would need --force)",
    );
    let r = w.run_uri(
        &uri,
        &[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &w.s("out/r"),
            "--dry-run",
            "--force",
        ],
    );
    assert_code(&r, 0);
    assert_has(&r, "[DRY RUN] Would undefine existing VM: rc-acc-files");
    assert!(!w.p("out/r").exists());
}

// 123: a dry-run with a collision logs the BLOCKED line and "Would abort"; exit 0.
#[test]
fn s123_dry_run_collision() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/r/rc-acc-files-vda.qcow2");
    fake_disk(&target, "stray");
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "[DRY RUN] BLOCKED: File already exists: {} — use --force to overwrite",
            target.display()
        ),
    );
    assert_has(&r, "[DRY RUN] Would abort due to safety checks above");
    assert_eq!(
        fs::read_to_string(&target).expect("disk"),
        "original disk stray\n"
    );
}

// 123 for disk extract (§4.9 [INFER]: the §4.2 collision rules apply): an existing file
// blocks without --force (exit 4), is a [DRY RUN] warning in dry-run (exit 0), and is
// replaced with a WARN under --force; another VM's live disk is never overwritten.
#[test]
fn s123_extract_collision_rules() {
    let w = World::new(&["rc-acc-files"]);
    let target = w.p("out/x/rc-acc-files-vda.qcow2");
    fake_disk(&target, "stray");
    let out = w.s("out/x");
    let base = [
        "--vm",
        "rc-acc-files",
        "--disk",
        "vda",
        "--restore-path",
        out.as_str(),
    ];
    let r = w.run(&base);
    assert_code(&r, 4);
    assert_has(
        &r,
        &format!(
            "BLOCKED: File already exists: {} — use --force to overwrite",
            target.display()
        ),
    );
    let r = w.run(&[&base[..], &["--dry-run"]].concat());
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "[DRY RUN] BLOCKED: File already exists: {}",
            target.display()
        ),
    );
    assert_has(&r, "[DRY RUN] Would abort due to safety checks above");
    assert_eq!(
        fs::read_to_string(&target).expect("disk"),
        "original disk stray\n"
    );
    let r = w.run(&[&base[..], &["--force"]].concat());
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!("File exists and will be overwritten: {}", target.display()),
    );
    assert_content(
        &target,
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
    let uri = w.node(&[Dom::new("other-vm", true, &[("vda", &target)])], &[]);
    let r = w.run_uri(&uri, &[&base[..], &["--force"]].concat());
    assert_code(&r, 4);
    assert_has(
        &r,
        &format!(
            "BLOCKED: {} is the live disk of VM 'other-vm' — choose a different --restore-path",
            target.display()
        ),
    );
}

// 126 (native: restoring an earlier disk set needs no staging dir): a dry-run data-only
// restore of a point with a removed disk warns about the disk set, predicts all three
// disks and creates nothing in TMPDIR.
#[test]
fn s126_dry_run_point_in_time_with_a_removed_disk() {
    let w = World::new(&["rc-shrink"]);
    let r = w.run(&[
        "--vm",
        "rc-shrink",
        "--skip-config",
        "--restore-point",
        "2",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        "Disk configuration changed between checkpoint 2 and the latest checkpoint (4).",
    );
    assert_has(&r, "[DRY RUN] sda: would read 3 file(s) (sda.full.data, sda.inc.virtnbdbackup.1.data, sda.inc.virtnbdbackup.2.data)");
    assert_has(
        &r,
        &format!("of data to {}", w.p("out/r/rc-shrink-sda.qcow2").display()),
    );
    assert!(w.ls("tmp").is_empty() && !w.p("out/r").exists());
}

// 127: a dry-run from an incomplete chain still exits 5.
#[test]
fn s127_dry_run_incomplete_chain_exits_5() {
    let w = World::new(&["rc-brk-inc", "rc-damage"]);
    let r = w.run(&[
        "--vm",
        "rc-brk-inc",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 5);
    assert_has(&r, "Chain is INCOMPLETE at restore point 2");
    let r = w.run(&[
        "--vm",
        "rc-damage",
        "--period",
        "20260516",
        "--disk",
        "vda",
        "--dry-run",
    ]);
    assert_code(&r, 5);
    assert!(w.rows().is_empty());
}

// ───────────────────────────── TPM (128–132) ─────────────────────────────

// 129: an existing, non-empty swtpm dir of the UUID is moved to
// `<uuid>.pre-restore-<epoch>` before the copy.
#[test]
fn s129_existing_tpm_state_is_kept_aside() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    fs::create_dir_all(w.swtpm().join(UEFI_UUID).join("tpm2")).expect("mkdir");
    fs::write(w.swtpm().join(UEFI_UUID).join("tpm2/old-state"), b"old").expect("old");
    let r = w.run(&["--vm", "rc-uefi-tpm", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    let names = w.ls(SWTPM);
    assert_eq!(names.len(), 2, "{names:?}");
    let aside = names
        .iter()
        .find(|n| n.starts_with(&format!("{UEFI_UUID}.pre-restore-")))
        .expect("aside dir");
    assert!(
        aside
            .rsplit('-')
            .next()
            .is_some_and(|e| e.bytes().all(|b| b.is_ascii_digit())),
        "{aside}"
    );
    assert_eq!(
        fs::read(w.swtpm().join(aside).join("tpm2/old-state")).expect("kept"),
        b"old"
    );
    assert_has(
        &r,
        &format!(
            "Backing up existing TPM to {}",
            w.swtpm().join(aside).display()
        ),
    );
    assert!(!w.swtpm().join(UEFI_UUID).join("tpm2/old-state").exists());
    assert!(w
        .swtpm()
        .join(UEFI_UUID)
        .join("tpm2/tpm2-00.permall")
        .is_file());
}

// 130: a marker without tpm-state/ is a TPM failure: WARN, exit 0, "TPM ✗", and the
// catalogue says partial / failed.
#[test]
fn s130_marker_without_state() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let data = w.b("rc-uefi-tpm/2026-W26");
    fs::remove_dir_all(data.join("tpm-state")).expect("rm tpm-state");
    let r = w.run(&["--vm", "rc-uefi-tpm", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!("Marker present but no tpm-state/ in {}", data.display()),
    );
    assert_eq!(summary(&r), "Restore complete: rc-uefi-tpm — disk ✓ defined ✓ UUID ✓ MACs ✓ TPM ✗ (manual unlock required)");
    assert!(w.ls(SWTPM).is_empty());
    let row = &w.rows()[0];
    assert_eq!(
        (
            row.outcome.as_str(),
            row.exit_code,
            row.tpm_result.as_deref()
        ),
        ("partial", 0, Some("failed"))
    );
}

// 131: --skip-tpm leaves swtpm alone and the summary has no TPM token.
#[test]
fn s131_skip_tpm() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    let r = w.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--restore-path",
        &w.s("out/r"),
        "--skip-tpm",
    ]);
    assert_code(&r, 0);
    assert_eq!(
        summary(&r),
        "Restore complete: rc-uefi-tpm — disk ✓ defined ✓ UUID ✓ MACs ✓"
    );
    assert!(w.ls(SWTPM).is_empty());
    assert_eq!(w.rows()[0].tpm_result.as_deref(), Some("skipped"));
}

// 132: without BACKUP_METADATA.txt the UUID of the defined domain is used.
#[test]
fn s132_tpm_uuid_from_the_domain_without_metadata() {
    let w = World::new(&["rc-uefi-tpm"]);
    w.redirect_nvram("rc-uefi-tpm");
    fs::remove_file(w.b("rc-uefi-tpm/2026-W26/tpm-state/BACKUP_METADATA.txt")).expect("rm");
    let r = w.run(&["--vm", "rc-uefi-tpm", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!("Restoring TPM for rc-uefi-tpm (UUID: {UEFI_UUID})"),
    );
    assert_eq!(w.ls(SWTPM), [UEFI_UUID]);
    assert!(summary(&r).ends_with("TPM ✓"), "{}", summary(&r));
}

// ───────────────────────────── locking (133–137) ─────────────────────────────

/// A live process whose cmdline contains "vmbackup" (killed on drop).
struct FakeBackup(std::process::Child);

impl FakeBackup {
    fn start() -> Self {
        let c = FakeBackup(
            Command::new("bash")
                .args(["-c", "exec -a vmbackup-test sleep 30"])
                .spawn()
                .expect("spawn"),
        );
        for _ in 0..200 {
            if fs::read(format!("/proc/{}/cmdline", c.pid()))
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("vmbackup"))
            {
                return c;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the fake vmbackup process never showed its name"); // `c` is killed and reaped on drop
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for FakeBackup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_lock(w: &World, vm: &str, content: &str) -> PathBuf {
    let p = w.b(&format!("_state/locks/vmbackup-{vm}.lock"));
    fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
    fs::write(&p, content).expect("lock");
    p
}

// 133: a live vmbackup holding the VM's lock makes DR and disk restores exit 3 naming
// the PID and the lock file; nothing is restored; the lock is left as it was. A
// dry-run only warns.
#[test]
fn s133_live_lock_exits_3() {
    let w = World::new(&["rc-acc-files"]);
    let holder = FakeBackup::start();
    let lock = write_lock(&w, "rc-acc-files", &format!("{}\n", holder.pid()));
    let msg = format!(
        "VM 'rc-acc-files' is locked by another backup or restore (PID {}): {}",
        holder.pid(),
        lock.display()
    );
    for args in [
        vec!["--vm", "rc-acc-files", "--restore-path", "OUT"],
        vec![
            "--vm",
            "rc-acc-files",
            "--disk",
            "vda",
            "--restore-path",
            "OUT",
        ],
        vec!["--vm", "rc-acc-files", "--disk", "vda"],
    ] {
        let out = w.s("out/r");
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| if a == "OUT" { out.as_str() } else { a })
            .collect();
        let r = w.run(&args);
        assert_code(&r, 3);
        assert_has(&r, &msg);
        assert!(!w.p("out/r").exists());
        assert_eq!(
            fs::read_to_string(&lock).expect("lock"),
            format!("{}\n", holder.pid())
        );
    }
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_has(&r, &format!("[DRY RUN] VM 'rc-acc-files' is currently locked by PID {} — a real restore would exit 3", holder.pid()));
    let rows = w.rows();
    assert_eq!(rows.len(), 3, "one row per real run, none for the dry-run");
    assert!(
        rows.iter()
            .all(|r| r.exit_code == 3 && r.outcome == "failed"),
        "{rows:?}"
    );
}

// 134: a lock holding a dead PID (or a live process that is no backup) is stale: WARN,
// the run proceeds, and the lock file is gone afterwards.
#[test]
fn s134_stale_lock_is_replaced() {
    let w = World::new(&["rc-acc-files"]);
    let mut dead = Command::new("true").spawn().expect("spawn");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let mut other = Command::new("sleep").arg("30").spawn().expect("spawn");
    for (i, pid) in [dead_pid, other.id()].into_iter().enumerate() {
        let lock = write_lock(&w, "rc-acc-files", &format!("{pid}\n"));
        let out = w.s(&format!("out/{i}"));
        let r = w.run(&[
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &out,
            "--skip-config",
        ]);
        assert_code(&r, 0);
        assert_has(
            &r,
            &format!("Stale lock detected for VM: rc-acc-files (PID: {pid}"),
        );
        assert!(!lock.exists(), "lock left behind");
    }
    let _ = other.kill();
    let _ = other.wait();
}

// 135: during a real restore the lock holds the vmrestore PID and a newline; it is
// removed after the run. (The node XML is a FIFO: libvirt blocks reading it, which
// is after the lock was taken.) Failing runs (4/5/6) releasing the lock are checked
// in s068, s072, s077 and s111.
#[test]
fn s135_lock_is_held_during_the_run() {
    let w = World::new(&["rc-acc-files"]);
    let fifo = w.p("node-fifo.xml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let root = w.root.display().to_string();
    let uri = format!("test://{}", fifo.display());
    let out = w.s("out/r");
    let mut c = w.scratch.command(&[
        "--backup-path",
        &root,
        "--connect",
        &uri,
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &out,
    ]);
    c.env("VMRESTORE_SWTPM_ROOT", w.s("swtpm"))
        .env("TMPDIR", w.s("tmp"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let pid = child.id();
    let lock = w.b("_state/locks/vmbackup-rc-acc-files.lock");
    let mut seen = None;
    for _ in 0..500 {
        if let Ok(t) = fs::read_to_string(&lock) {
            if t.ends_with('\n') {
                seen = Some(t);
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // release the child whatever happened (non-blocking open: only while it reads)
    loop {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(mut f) => {
                f.write_all(b"<node>\n</node>\n").expect("feed the fifo");
                break;
            }
            Err(_) if child.try_wait().expect("try_wait").is_none() => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(_) => break,
        }
    }
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(seen, Some(format!("{pid}\n")), "{stderr}");
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(!lock.exists(), "lock released after success");
    assert_content(
        &w.p("out/r/rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
}

// 136: --list, --list-restore-points, --verify, --dump and --dry-run never create the
// lock file. 141: none of them adds a restore_sessions row.
#[test]
fn s136_s141_read_only_modes_take_no_lock_and_write_no_row() {
    let w = World::new(&["rc-acc-files"]);
    for args in [
        vec!["--list"],
        vec!["--list-restore-points", "rc-acc-files"],
        vec!["--verify", "rc-acc-files"],
        vec!["--dump", "rc-acc-files"],
        vec!["--vm", "rc-acc-files", "--restore-path", "OUT", "--dry-run"],
        vec![
            "--vm",
            "rc-acc-files",
            "--restore-path",
            "OUT",
            "--name",
            "c",
            "--dry-run",
        ],
        vec![
            "--vm",
            "rc-acc-files",
            "--restore-path",
            "OUT",
            "--skip-config",
            "--dry-run",
        ],
        vec![
            "--vm",
            "rc-acc-files",
            "--disk",
            "vda",
            "--restore-path",
            "OUT",
            "--dry-run",
        ],
    ] {
        let out = w.s("out/r");
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| if a == "OUT" { out.as_str() } else { a })
            .collect();
        let r = w.run(&args);
        assert_code(&r, 0);
        assert!(
            !w.b("_state/locks").exists(),
            "{args:?} created the lock dir"
        );
    }
    assert!(w.rows().is_empty(), "{:?}", w.rows());
    assert!(!w.p("out/r").exists());
}

// 137: an unusable lock directory is a WARN; an extract still completes.
#[test]
fn s137_unwritable_lock_dir_still_extracts() {
    let w = World::new(&["rc-acc-files"]);
    fs::write(w.b("_state/locks"), b"not a directory").expect("block the lock dir");
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--disk",
        "vda",
        "--restore-path",
        &w.s("out/x"),
    ]);
    assert_code(&r, 0);
    assert_has(&r, "Cannot create lock ");
    assert_has(&r, "— continuing without lock");
    assert_content(
        &w.p("out/x/rc-acc-files-vda.qcow2"),
        "rc-acc-files",
        "accumulate",
        "virtnbdbackup.4",
        "vda",
    );
}

// ───────────────────────────── catalogue (138–142) ─────────────────────────────
// 138: s069; 139: s068; 141: s136; 142: s111.

// 140: without vmbackup.db a restore logs exactly one catalogue WARN, keeps its exit
// code, and does not create the database.
#[test]
fn s140_no_catalogue() {
    let w = World::with_catalogue(&["rc-acc-files"], false);
    let r = w.run(&["--vm", "rc-acc-files", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 0);
    assert_eq!(
        r.stderr.matches("Catalogue unavailable").count(),
        1,
        "{}",
        r.stderr
    );
    let r = w.run(&["--vm", "rc-acc-files", "--restore-path", &w.s("out/r")]);
    assert_code(&r, 4);
    assert_eq!(
        r.stderr.matches("Catalogue unavailable").count(),
        1,
        "{}",
        r.stderr
    );
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &w.s("out/r"),
        "--restore-point",
        "7",
    ]);
    assert_code(&r, 5);
    assert_eq!(
        r.stderr.matches("Catalogue unavailable").count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(ls(&w.b("_state")), ["locks"]);
}

// ─────────────────── the plan a dry run prints is what a real run does ───────────────────

/// `--dry-run --json` prints the plan's effects; the same command without
/// `--dry-run` reports the effects it had. They must be equal, for every mode.
fn assert_plan_is_executed(w: &World, uri: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let dry: Vec<&str> = [args, &["--dry-run", "--json"]].concat();
    let d = w.run_uri(uri, &dry);
    assert_code(&d, 0);
    let plan: serde_json::Value = serde_json::from_str(&d.stdout).expect("dry-run JSON");
    let printed = plan["plan"]["effects"]
        .as_array()
        .cloned()
        .expect("plan effects");
    assert!(!printed.is_empty(), "{}", d.stdout);
    assert_eq!(
        plan["plan"]["refusals"],
        serde_json::json!([]),
        "{}",
        d.stdout
    );
    // every action has human dry-run lines too
    assert!(d.stderr.contains("[DRY RUN] "), "{}", d.stderr);
    let real: Vec<&str> = [args, &["--json"]].concat();
    let r = w.run_uri(uri, &real);
    assert_code(&r, 0);
    let done: serde_json::Value = serde_json::from_str(&r.stdout).expect("run JSON");
    assert_eq!(
        done["effects"].as_array().cloned().expect("effects"),
        printed,
        "executed ≠ planned for {args:?}\n{}",
        r.stderr
    );
    printed
}

#[test]
fn dry_run_plan_equals_executed_actions_in_every_mode() {
    let w = World::new(&["rc-uefi-tpm", "rc-multi-sql"]);
    w.redirect_nvram("rc-uefi-tpm");
    let dr = assert_plan_is_executed(
        &w,
        "test:///default",
        &["--vm", "rc-uefi-tpm", "--restore-path", &w.s("out/dr")],
    );
    let verbs: Vec<&str> = dr.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(
        verbs,
        [
            "create-dir",
            "write",
            "write",
            "save-nvram",
            "define",
            "install-nvram",
            "refresh-pool",
            "restore-tpm"
        ]
    );
    assert_plan_is_executed(
        &w,
        "test:///default",
        &[
            "--vm",
            "rc-uefi-tpm",
            "--name",
            "c1",
            "--restore-path",
            &w.s("out/clone"),
        ],
    );
    assert_plan_is_executed(
        &w,
        "test:///default",
        &[
            "--vm",
            "rc-multi-sql",
            "--skip-config",
            "--restore-path",
            &w.s("out/data"),
        ],
    );
    assert_plan_is_executed(
        &w,
        "test:///default",
        &[
            "--vm",
            "rc-multi-sql",
            "--disk",
            "vdb",
            "--restore-path",
            &w.s("out/x"),
        ],
    );
    let (uri, paths) = multi_sql_domain(&w, false);
    let inplace = assert_plan_is_executed(&w, &uri, &["--vm", "rc-multi-sql", "--disk", "vda,sda"]);
    assert_eq!(inplace[0]["action"], "replace");
    assert_eq!(inplace[0]["object"], paths[0].display().to_string());
}

// A hostile or broken catalogue never holds a finished restore: a trigger that runs an
// endless recursive query on every insert costs one WARN; the restore exits with its
// own code within seconds and the lock is released.
#[test]
fn hanging_catalogue_trigger_costs_one_warn() {
    let w = World::new(&["rc-acc-files"]);
    let db = w.b("_state/vmbackup.db");
    let conn = rusqlite::Connection::open(&db).expect("db");
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS restore_sessions (id INTEGER PRIMARY KEY, start_time TEXT NOT NULL,
           vm_name TEXT NOT NULL, restore_mode TEXT NOT NULL, source_path TEXT NOT NULL,
           outcome TEXT NOT NULL, exit_code INTEGER NOT NULL);
         CREATE TRIGGER hang BEFORE INSERT ON restore_sessions BEGIN
           SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c);
         END;",
    )
    .expect("trigger");
    drop(conn);
    let started = std::time::Instant::now();
    let r = w.run(&[
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        &w.s("out/c"),
    ]);
    let took = started.elapsed();
    assert_code(&r, 0);
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
    assert_eq!(
        r.stderr.matches("Catalogue unavailable").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(
        w.lock_files()
            .iter()
            .all(|l| !l.display().to_string().contains("rc-acc-files")),
        "{:?}",
        w.lock_files()
    );
}

// In place: a file that another running domain also uses is refused (exit 4), in a
// dry run too; replacing it would pull it from under that VM.
#[test]
fn in_place_refuses_a_disk_another_running_vm_uses() {
    let w = World::new(&["rc-acc-files"]);
    let disk = w.p("vm/shared.qcow2");
    fake_disk(&disk, "shared");
    let uri = w.node(
        &[
            Dom::new("rc-acc-files", false, &[("vda", &disk)]),
            Dom::new("other-vm", true, &[("vdb", &disk)]),
        ],
        &[],
    );
    for extra in [&[][..], &["--dry-run"][..]] {
        let r = w.run_uri(
            &uri,
            &[&["--vm", "rc-acc-files", "--disk", "vda"][..], extra].concat(),
        );
        assert_has(&r, "is in use by running VM(s) other-vm");
        if extra.is_empty() {
            assert_code(&r, 4);
        }
    }
    assert_eq!(
        fs::read_to_string(&disk).expect("disk"),
        "original disk shared\n"
    );
    assert!(!pre_restore(&disk).exists());
}

// In place: the image keeps the format its domain declares (<driver type>), not the
// one its file name suggests.
#[test]
fn in_place_keeps_the_domain_disk_format() {
    let w = World::new(&["rc-acc-files"]);
    let disk = w.p("vm/disk.img");
    fake_disk(&disk, "img");
    let mut dom = Dom::new("rc-acc-files", false, &[("vda", &disk)]);
    dom.driver = Some("qcow2".into());
    let uri = w.node(&[dom], &[]);
    let r = w.run_uri(&uri, &["--vm", "rc-acc-files", "--disk", "vda"]);
    assert_code(&r, 0);
    let magic = fs::read(&disk).expect("disk");
    assert_eq!(&magic[..4], b"QFI\xfb", "a qcow2 image under a .img name");
}

// A clone's predicted outputs name the backup's own file name, not the clone's.
#[test]
fn clone_prediction_names_the_original_file() {
    let w = World::new(&["rc-multi-sql"]);
    let r = w.run(&[
        "--vm",
        "rc-multi-sql",
        "--name",
        "x",
        "--restore-path",
        &w.s("out/r"),
        "--dry-run",
    ]);
    assert_code(&r, 0);
    assert_has(
        &r,
        &format!(
            "Predicted final: {} (original file name: rc-multi-sql-vda.qcow2)",
            w.p("out/r/x-vda.qcow2").display()
        ),
    );
}

// A DR dry run on a host without libvirt plans what it can and says what it could not
// check (exit 0, the spec's dry-run rule); the real run stops with exit 8.
#[test]
fn dr_dry_run_without_libvirt_plans_what_it_can() {
    let w = World::new(&["rc-acc-files"]);
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let args = ["--vm", "rc-acc-files", "--restore-path", &w.s("out/r")];
    let r = w.run_uri(uri, &[&args[..], &["--dry-run"]].concat());
    assert_code(&r, 0);
    assert_has(&r, "a real run would exit 8");
    assert_has(&r, "[DRY RUN] ");
    let r = w.run_uri(uri, &args);
    assert_code(&r, 8);
}
