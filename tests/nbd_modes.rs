//! `--nbd-target` and the command-line rules of `--instant-boot` / `--pull` (the
//! instant boot itself needs a real hypervisor: tests/e2e, scenario `instant`).
//!
//! NBD targets are real `qemu-nbd` exports (test-only tool) over raw files that start
//! full of 0xEE, so a hole the restore forgot to zero shows up in the sha256.

mod clisupport;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clisupport::{Fixture, Run, Scratch};
use sha2::{Digest, Sha256};

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "\n!!!!! SKIPPED: `{tool}` is not installed (apt-get install qemu-utils) !!!!!\n"
        );
    }
    ok
}

fn expected(point: &str) -> String {
    clisupport::expected_sha256(
        "rc-lz4-plain",
        "chain",
        &format!("virtnbdbackup.{point}"),
        "vda",
    )
}

fn sha(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).expect("read"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `qemu-nbd` export `vda` of a raw file of `size` bytes of 0xEE.
struct Export {
    child: Child,
    file: PathBuf,
    uri: String,
}

impl Export {
    fn new(dir: &Path, size: usize, read_only: bool) -> Self {
        let file = dir.join("target.raw");
        std::fs::write(&file, vec![0xEE; size]).expect("target");
        let sock = dir.join("nbd.sock");
        let mut c = Command::new("qemu-nbd");
        c.args(["-f", "raw", "-x", "vda", "--persistent"])
            .arg(format!("--socket={}", sock.display()));
        if read_only {
            c.arg("--read-only");
        }
        let child = c
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            file,
            uri: format!("nbd+unix:///vda?socket={}", sock.display()),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs vmrestore on the shared fixture. One run at a time: restores take the VM's
/// lock, and two tests restoring the same VM at once would (rightly) get exit 3.
fn vmr(s: &Scratch, args: &[&str]) -> Run {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fx = Fixture::shared();
    let root = fx.root_str();
    let mut all = vec![
        "--backup-path",
        root.as_str(),
        "--connect",
        "test:///default",
    ];
    all.extend_from_slice(args);
    s.run(&all)
}

#[test]
fn restores_a_compressed_point_into_a_qemu_nbd_export() {
    if !have("qemu-nbd") {
        return;
    }
    let _g = Fixture::shared().guard();
    let s = Scratch::new();
    let ex = Export::new(s.dir.path(), 32 << 20, false);
    for point in ["2", "3"] {
        let r = vmr(
            &s,
            &[
                "--vm",
                "rc-lz4-plain",
                "--restore-point",
                point,
                "--nbd-target",
                &ex.uri,
            ],
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(
            r.stderr.contains("Restore mode: into NBD exports"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("read-back ✓"), "{}", r.stderr);
        assert_eq!(sha(&ex.file), expected(point), "point {point}");
    }
    // the named form and --disk with a bare URI go to the same place
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-lz4-plain",
            "--restore-point",
            "1",
            "--nbd-target",
            &format!("vda={}", ex.uri),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(sha(&ex.file), expected("1"));
}

#[test]
fn refuses_small_and_read_only_exports_before_writing() {
    if !have("qemu-nbd") {
        return;
    }
    let _g = Fixture::shared().guard();
    for (size, ro, msg) in [
        (16 << 20, false, "the disk needs 33554432"),
        (32 << 20, true, "is read-only"),
    ] {
        let s = Scratch::new();
        let ex = Export::new(s.dir.path(), size, ro);
        let before = sha(&ex.file);
        let r = vmr(&s, &["--vm", "rc-lz4-plain", "--nbd-target", &ex.uri]);
        assert_eq!(r.code, Some(4), "{}", r.stderr);
        assert!(r.stderr.contains(msg), "{}", r.stderr);
        assert_eq!(sha(&ex.file), before, "nothing written");
    }
}

#[test]
fn unreachable_export_is_a_storage_error_naming_the_uri() {
    let s = Scratch::new();
    let uri = format!(
        "nbd+unix:///vda?socket={}/none.sock",
        s.dir.path().display()
    );
    let r = vmr(&s, &["--vm", "rc-lz4-plain", "--nbd-target", &uri]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains(&uri), "{}", r.stderr);
}

#[test]
fn several_disks_need_named_targets() {
    let s = Scratch::new();
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-multi-sql",
            "--nbd-target",
            "nbd://127.0.0.1:1/x",
        ],
    );
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(r.stderr.contains("name each target"), "{}", r.stderr);
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-multi-sql",
            "--nbd-target",
            "vdz=nbd://127.0.0.1:1/x",
        ],
    );
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(r.stderr.contains("Disk 'vdz' not found"), "{}", r.stderr);
}

#[test]
fn dry_run_plans_without_connecting() {
    let s = Scratch::new();
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-lz4-plain",
            "--dry-run",
            "--nbd-target",
            "nbd://127.0.0.1:1/vda",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("[DRY RUN] vda:"), "{}", r.stderr);
    assert!(r.stderr.contains("→ nbd://127.0.0.1:1/vda"), "{}", r.stderr);
}

#[test]
fn usage_errors_of_the_new_flags() {
    let s = Scratch::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--vm", "v", "--nbd-target", "http://x/y"],
            "not an NBD URI",
        ),
        (
            &["--vm", "v", "--nbd-target", "nbds://h/x"],
            "TLS is not supported",
        ),
        (
            &["--vm", "v", "--nbd-target", "nbd://h/a,nbd://h/b"],
            "every one needs its disk",
        ),
        (
            &["--vm", "v", "--nbd-target", "vda=nbd://h/a,vda=nbd://h/b"],
            "disk vda named twice",
        ),
        (
            &[
                "--vm",
                "v",
                "--nbd-target",
                "nbd://h/a",
                "--restore-path",
                "/tmp/x",
            ],
            "--restore-path cannot be used",
        ),
        (
            &["--vm", "v", "--pull", "--restore-path", "/tmp/x"],
            "--pull requires --instant-boot",
        ),
        (
            &[
                "--vm",
                "v",
                "--instant-boot",
                "--disk",
                "vda",
                "--restore-path",
                "/tmp/x",
            ],
            "--disk cannot be used",
        ),
        (
            &[
                "--vm",
                "v",
                "--instant-boot",
                "--skip-config",
                "--restore-path",
                "/tmp/x",
            ],
            "--skip-config cannot be used",
        ),
        (
            &["--vm", "v", "--instant-boot", "--serve", "/tmp/s"],
            "cannot be combined",
        ),
        (
            &["--vm", "v", "--instant-boot"],
            "--restore-path is required",
        ),
    ];
    for (args, msg) in cases {
        let r = vmr(&s, args);
        assert_eq!(r.code, Some(7), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(msg), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn instant_boot_dry_run_creates_nothing() {
    let _g = Fixture::shared().guard();
    let s = Scratch::new();
    let dir = s.dir.path().join("ib");
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-multi-sql",
            "--instant-boot",
            "--dry-run",
            "--restore-path",
            dir.to_str().expect("utf8"),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("[DRY RUN] Would start transient VM 'rc-multi-sql-instant'"),
        "{}",
        r.stderr
    );
    for d in ["vda", "vdb", "sda"] {
        assert!(
            r.stderr.contains(&format!(
                "Would serve {d} over NBD on 127.0.0.1 and create overlay {}/rc-multi-sql-instant-{d}.qcow2",
                dir.display()
            )),
            "{}",
            r.stderr
        );
    }
    assert!(!dir.exists());
}

#[test]
fn instant_boot_refuses_an_existing_overlay_name() {
    let _g = Fixture::shared().guard();
    let s = Scratch::new();
    let dir = s.dir.path().join("ib");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("mine.qcow2"), b"precious").expect("write");
    let r = vmr(
        &s,
        &[
            "--vm",
            "rc-lz4-plain",
            "--instant-boot",
            "--name",
            "mine",
            "--restore-path",
            dir.to_str().expect("utf8"),
        ],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(dir.join("mine.qcow2")).expect("read"),
        b"precious"
    );
}
