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
    let sock = tmp.path().join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrestore"))
        .args(["--vm", "rc-lz4-plain", "--backup-path"])
        .arg(root.join("backups"))
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed");
}
