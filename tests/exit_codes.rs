//! One test per row of the exit-code table (spec §8, STYLE §2) that is reachable
//! without a restore. Rows 3 (lock) and 8 (dependency) only exist in restore modes.

mod clisupport;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use clisupport::{Fixture, Scratch};
use vmrestore::error::ExitStatus;

fn code(args: &[&str]) -> Option<i32> {
    Scratch::new().run(args).code
}

#[test]
fn row_0_ok() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    assert_eq!(
        code(&["--list", "--backup-path", &fx.root_str()]),
        Some(ExitStatus::Ok.code().into())
    );
    assert_eq!(code(&["--version"]), Some(0));
}

// Exit 1: an unexpected I/O failure. Without a restore it needs an unreadable
// directory, which permissions cannot produce for root; as root this row is
// only reachable through the restore flow (covered by its own tests).
#[test]
fn row_1_general() {
    if nix::unistd::geteuid().is_root() {
        eprintln!("running as root: no unreadable directory possible; row 1 not reachable without a restore");
        return;
    }
    let s = Scratch::new();
    let root = clisupport::prepare_backups(s.dir.path());
    let cp = root.join("rc-acc-files/checkpoints");
    fs::set_permissions(&cp, fs::Permissions::from_mode(0o000)).expect("chmod");
    let r = s.run(&[
        "--dump",
        "rc-acc-files",
        "--backup-path",
        &root.display().to_string(),
    ]);
    fs::set_permissions(&cp, fs::Permissions::from_mode(0o755)).expect("chmod back");
    assert_eq!(
        r.code,
        Some(ExitStatus::General.code().into()),
        "{}",
        r.stderr
    );
}

#[test]
fn row_2_config() {
    assert_eq!(code(&["--list"]), Some(ExitStatus::Config.code().into()));
    assert_eq!(code(&["--list", "--config-instance", "nope"]), Some(2));
}

#[test]
fn row_4_storage() {
    assert_eq!(
        code(&["--list", "--backup-path", "/does/not/exist"]),
        Some(ExitStatus::Storage.code().into())
    );
    assert_eq!(
        code(&["--verify", "x", "--backup-path", "/does/not/exist"]),
        Some(4)
    );
}

#[test]
fn row_5_vm() {
    let fx = Fixture::shared();
    assert_eq!(
        code(&[
            "--list-restore-points",
            "nosuch",
            "--backup-path",
            &fx.root_str()
        ]),
        Some(ExitStatus::Vm.code().into())
    );
    assert_eq!(
        code(&["--dump", "nosuch", "--backup-path", &fx.root_str()]),
        Some(5)
    );
}

#[test]
fn row_6_engine() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = Scratch::new().run(&[
        "--verify",
        "rc-damage",
        "--period",
        "20260515",
        "--backup-path",
        &fx.root_str(),
    ]);
    assert_eq!(r.code, Some(ExitStatus::Engine.code().into()));
}

#[test]
fn row_7_usage() {
    assert_eq!(code(&["--bogus"]), Some(ExitStatus::Usage.code().into()));
    assert_eq!(code(&["--vm"]), Some(7));
}

// Rows 130 and 143: SIGINT / SIGTERM during a long verify (a sparse 64 GiB file that is
// no stream: it fails its structural walk at once, then its adler32 is computed against
// the .chksum to tell whether it changed; tests/verify.rs stops the restore pass itself).
#[test]
fn row_130_143_signals() {
    for (sig, status) in [
        (nix::sys::signal::Signal::SIGINT, ExitStatus::Signal(2)),
        (nix::sys::signal::Signal::SIGTERM, ExitStatus::Signal(15)),
    ] {
        let s = Scratch::new();
        let dir = s.dir.path().join("bk/big/20260101");
        fs::create_dir_all(&dir).expect("mkdir");
        let f = fs::File::create(dir.join("vda.full.data")).expect("create");
        f.set_len(64 << 30).expect("sparse 64 GiB");
        fs::write(dir.join("vda.full.data.chksum"), "1").expect("chksum");
        let child = s
            .command(&[
                "--backup-path",
                &s.dir.path().join("bk").display().to_string(),
                "--verify",
                "big",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(700));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("kill");
        let out = child.wait_with_output().expect("wait");
        let want = i32::from(status.code());
        assert_eq!(
            out.status.code(),
            Some(want),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logs = s.logs();
        let text = fs::read_to_string(&logs[0]).expect("log");
        assert!(text.contains(&format!("Exit Status:  {want}\n")), "{text}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Interrupted by signal"));
    }
}
