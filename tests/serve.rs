//! `--serve`: a restore point of a real compressed fixture chain served over NBD by the
//! binary; read by qemu-img (test-only tool) it equals the recorded disk content, and
//! SIGTERM stops the server cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

#[test]
fn serves_a_compressed_restore_point_over_nbd() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: qemu-img not installed");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-chains");
    let tmp = tempfile::tempdir().expect("tmp");
    // a copy: serving takes the VM's lock under <backup root>/_state/locks
    let backups = tmp.path().join("backups");
    copy_dir(
        &root.join("backups/rc-lz4-plain"),
        &backups.join("rc-lz4-plain"),
    );
    let sock = tmp.path().join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrestore"))
        .args(["--vm", "rc-lz4-plain", "--backup-path"])
        .arg(&backups)
        .args(["--restore-point", "2", "--serve"])
        .arg(&sock)
        .env("LOG_DIR", tmp.path().join("logs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("uri line");
    let uri = line.trim().to_owned();
    assert_eq!(uri, format!("nbd+unix:///vda?socket={}", sock.display()));
    let raw = tmp.path().join("vda.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &uri])
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let got: String = Sha256::digest(std::fs::read(&raw).expect("raw"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = std::fs::read_to_string(
        root.join("expected/rc-lz4-plain/chain/virtnbdbackup.2/vda.sha256"),
    )
    .expect("sha");
    assert_eq!(got, want.split_whitespace().next().expect("sha"));
    // the VM is locked while served: a restore of it waits for no one (exit 3)
    let locked = Command::new(env!("CARGO_BIN_EXE_vmrestore"))
        .args(["--vm", "rc-lz4-plain", "--skip-config", "--backup-path"])
        .arg(&backups)
        .arg("--restore-path")
        .arg(tmp.path().join("out"))
        .env("LOG_DIR", tmp.path().join("logs"))
        .output()
        .expect("second run");
    assert_eq!(
        locked.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    // a signal ends serving; the exit status says which (128 + 15)
    assert_eq!(status.code(), Some(143), "{status}");
    assert!(!sock.exists(), "socket removed");
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
        }
    }
}
