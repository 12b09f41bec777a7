//! `--serve`: a restore point of a real compressed fixture chain served over NBD by the
//! binary; read by qemu-img (test-only tool) it equals the recorded disk content, and
//! SIGTERM stops the server cleanly. With `--serve-tls-cert`/`--serve-tls-key` the
//! same over TLS (qemu-img with a throwaway CA), and the flags' usage errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-chains")
}

fn sha256_hex(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).expect("read"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A CA (`ca-cert.pem`, what qemu's `tls-creds-x509` reads) and a server
/// certificate it signed for localhost/127.0.0.1 (`server-cert.pem`,
/// `server-key.pem`) in `dir`.
fn make_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.distinguished_name
        .push(DnType::CommonName, "vmrestore test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let mut p = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &ca).expect("cert");
    std::fs::create_dir_all(dir).expect("pki dir");
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("ca");
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).expect("key");
}

/// The binary on the fixture backups (read only: dry runs and usage errors).
fn vmrestore(logs: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmrestore"))
        .arg("--backup-path")
        .arg(fixtures().join("backups"))
        .args(args)
        .env("LOG_DIR", logs)
        .output()
        .expect("vmrestore")
}

fn check_usage(out: &Output, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    for s in says {
        assert!(err.contains(s), "{s:?} not in:\n{err}");
    }
}

#[test]
fn tls_flags_come_as_a_pair_with_serve_and_bad_files_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let logs = tmp.path().join("logs");
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let cert = pki.join("server-cert.pem").display().to_string();
    let key = pki.join("server-key.pem").display().to_string();
    let sock = tmp.path().join("s.sock").display().to_string();
    let serve = ["--vm", "rc-lz4-plain", "--serve", sock.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        serve.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |a: Vec<String>| vmrestore(&logs, &a.iter().map(String::as_str).collect::<Vec<_>>());

    let o = run(with(&["--serve-tls-cert", &cert]));
    check_usage(&o, &["--serve-tls-cert requires --serve-tls-key"]);
    let o = run(with(&["--serve-tls-key", &key]));
    check_usage(&o, &["--serve-tls-key requires --serve-tls-cert"]);
    let out = tmp.path().join("out").display().to_string();
    let o = vmrestore(
        &logs,
        &[
            "--vm",
            "rc-lz4-plain",
            "--skip-config",
            "--restore-path",
            &out,
            "--serve-tls-cert",
            &cert,
            "--serve-tls-key",
            &key,
        ],
    );
    check_usage(
        &o,
        &["--serve-tls-cert and --serve-tls-key require --serve"],
    );
    assert!(!Path::new(&out).exists(), "nothing restored");

    // Files are read while planning: a dry run fails on them too, naming the file.
    let missing = tmp.path().join("missing.pem").display().to_string();
    let o = run(with(&[
        "--serve-tls-cert",
        &missing,
        "--serve-tls-key",
        &key,
        "--dry-run",
    ]));
    check_usage(&o, &["--serve-tls-cert", "cannot read", &missing]);
    let o = run(with(&[
        "--serve-tls-cert",
        &cert,
        "--serve-tls-key",
        &cert,
        "--dry-run",
    ]));
    check_usage(&o, &["--serve-tls-key", &cert, "no private key"]);
    let other = tmp.path().join("other");
    make_pki(&other);
    let other_key = other.join("server-key.pem").display().to_string();
    let o = run(with(&[
        "--serve-tls-cert",
        &cert,
        "--serve-tls-key",
        &other_key,
        "--dry-run",
    ]));
    check_usage(&o, &[&other_key, &cert]);
    assert!(!Path::new(&sock).exists(), "nothing listened");

    // A good pair: the dry run says TLS; on a public address the WARN says what TLS
    // does and does not do.
    let o = vmrestore(
        &logs,
        &[
            "--vm",
            "rc-lz4-plain",
            "--serve",
            "0.0.0.0:0",
            "--serve-public",
            "--dry-run",
            "--serve-tls-cert",
            &cert,
            "--serve-tls-key",
            &key,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let all = format!("{}{err}", String::from_utf8_lossy(&o.stdout));
    assert!(all.contains("over NBD with TLS"), "{all}");
    assert!(
        err.contains("encrypted, but WITHOUT client authentication"),
        "{err}"
    );
}

#[test]
fn serves_over_tls_to_qemu_img() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: qemu-img not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    // a copy: serving takes the VM's lock under <backup root>/_state/locks
    let backups = tmp.path().join("backups");
    copy_dir(
        &fixtures().join("backups/rc-lz4-plain"),
        &backups.join("rc-lz4-plain"),
    );
    let sock = tmp.path().join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrestore"))
        .args(["--vm", "rc-lz4-plain", "--backup-path"])
        .arg(&backups)
        .args(["--restore-point", "2", "--serve"])
        .arg(&sock)
        .arg("--serve-tls-cert")
        .arg(pki.join("server-cert.pem"))
        .arg("--serve-tls-key")
        .arg(pki.join("server-key.pem"))
        .env("LOG_DIR", tmp.path().join("logs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("uri line");
    assert_eq!(
        line.trim(),
        format!("nbds+unix:///vda?socket={}", sock.display())
    );
    let raw = tmp.path().join("vda.raw");
    let o = Command::new("timeout")
        .args(["60", "qemu-img", "convert", "--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            pki.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=vda,tls-creds=tls0,tls-hostname=localhost",
            sock.display()
        ))
        .args(["-O", "raw"])
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read_to_string(
        fixtures().join("expected/rc-lz4-plain/chain/virtnbdbackup.2/vda.sha256"),
    )
    .expect("sha");
    assert_eq!(
        sha256_hex(&raw),
        want.split_whitespace().next().expect("sha")
    );
    // a plaintext client gets nothing
    let plain = Command::new("timeout")
        .args(["60", "qemu-img", "info"])
        .arg(format!("nbd+unix:///vda?socket={}", sock.display()))
        .output()
        .expect("qemu-img");
    assert!(!plain.status.success(), "plaintext refused");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    assert_eq!(child.wait().expect("wait").code(), Some(143));
}
