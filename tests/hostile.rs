//! Issue "treat every name and path as hostile": names and files from a crafted
//! backup tree or crafted flags never reach outside the restore path or the tree,
//! and errors never quote file content. Every fixture is built by the test from a
//! copy of the real chains.

mod clisupport;

use std::fs;
use std::path::{Path, PathBuf};

use clisupport::{prepare_backups, tree_hash, Run, Scratch};

/// A private copy of the backups, and a directory outside it standing for "the rest
/// of the machine".
struct Tree {
    s: Scratch,
    root: PathBuf,
    outside: PathBuf,
}

impl Tree {
    fn new() -> Self {
        let s = Scratch::new();
        let root = prepare_backups(s.dir.path());
        let outside = s.dir.path().join("outside");
        fs::create_dir_all(outside.join("some/dir")).expect("mkdir");
        fs::write(outside.join("some/dir/own.lock"), "important data\n").expect("w");
        Self { s, root, outside }
    }

    fn run(&self, args: &[&str]) -> Run {
        let root = self.root.display().to_string();
        let mut all = vec![
            "--backup-path",
            root.as_str(),
            "--connect",
            "test:///default",
        ];
        all.extend_from_slice(args);
        let swtpm = self.s.dir.path().join("swtpm").display().to_string();
        self.s
            .run_env(&all, &[("VMRESTORE_SWTPM_ROOT", swtpm.as_str())])
    }

    fn out(&self, rel: &str) -> String {
        self.s.dir.path().join(rel).display().to_string()
    }
}

fn hash_all(p: &Path) -> String {
    tree_hash(p)
}

// 1: a crafted `<name>` in the backup's domain XML is refused (exit 5, naming the
// file); nothing outside the tree is read, removed or created.
#[test]
fn crafted_vm_name_in_vmconfig_is_refused() {
    let t = Tree::new();
    for f in fs::read_dir(t.root.join("rc-acc-files")).expect("ls") {
        let p = f.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if name.starts_with("vmconfig.") {
            let x = fs::read_to_string(&p).expect("xml");
            let crafted = x.replacen(
                "<name>rc-acc-files</name>",
                "<name>x/../../../../outside/some/dir/own</name>",
                1,
            );
            fs::write(&p, crafted).expect("w");
        }
    }
    let before = (hash_all(&t.root), hash_all(&t.outside));
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        &t.out("r"),
    ]);
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot be used as a VM name"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("vmconfig."),
        "names the file: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("important data"), "{}", r.stderr);
    assert_eq!((hash_all(&t.root), hash_all(&t.outside)), before);
    assert!(!Path::new(&t.out("r")).exists());
}

// 2, 3: names from flags that would leave their directory are usage errors (exit 7)
// before anything is read or written.
#[test]
fn escaping_flag_names_are_refused() {
    let t = Tree::new();
    let before = hash_all(&t.root);
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--name",
        "../../backups/rc-acc-files/planted",
        "--restore-path",
        &t.out("r"),
    ]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(r.stderr.contains("--name"), "{}", r.stderr);
    for period in ["../rc-multi-sql/2026-W08", "/etc", ".."] {
        let r = t.run(&[
            "--vm",
            "rc-acc-files",
            "--period",
            period,
            "--skip-config",
            "--restore-path",
            &t.out("r"),
        ]);
        assert_eq!(r.code, Some(7), "{period}: {}", r.stderr);
        assert!(r.stderr.contains("--period"), "{}", r.stderr);
    }
    for disk in ["../x", ".."] {
        let r = t.run(&[
            "--vm",
            "rc-acc-files",
            "--disk",
            disk,
            "--restore-path",
            &t.out("r"),
        ]);
        assert_eq!(r.code, Some(7), "{disk}: {}", r.stderr);
    }
    let r = t.run(&["--vm", "..", "--skip-config", "--restore-path", &t.out("r")]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert_eq!(hash_all(&t.root), before);
    assert!(!Path::new(&t.out("r")).exists());
    assert!(!t.root.join("rc-acc-files/planted.qcow2").exists());
}

// 2 (through a symlink behind `..`): `--restore-path <dir>/x/../link/r`, `link` pointing
// into the backup tree and `x` not existing yet, is inside the tree (a `mkdir -p`
// would make `x`, then follow `link`): refused with exit 7, nothing written.
#[test]
fn restore_path_through_a_link_behind_dotdot_is_inside_the_tree() {
    let t = Tree::new();
    let before = hash_all(&t.root);
    let elsewhere = t.s.dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(t.root.join("rc-acc-files"), elsewhere.join("link")).expect("ln");
    let path = elsewhere.join("x/../link/planted").display().to_string();
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        &path,
    ]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(r.stderr.contains("inside backup root"), "{}", r.stderr);
    assert_eq!(hash_all(&t.root), before);
    assert!(!elsewhere.join("x").exists());
}

// 2 (through a symlinked VM directory): the VM dir of the root is a symlink to
// storage elsewhere, and `--restore-path` is inside that real data dir: refused
// (exit 7), nothing written into the backup data.
#[test]
fn restore_path_inside_a_symlinked_vm_dir_is_refused() {
    let t = Tree::new();
    let elsewhere = t.s.dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    fs::rename(t.root.join("rc-acc-files"), elsewhere.join("rc-acc-files")).expect("mv");
    std::os::unix::fs::symlink(elsewhere.join("rc-acc-files"), t.root.join("rc-acc-files"))
        .expect("ln");
    let before = hash_all(&elsewhere);
    let into = elsewhere.join("rc-acc-files").display().to_string();
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        &into,
    ]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(r.stderr.contains("inside the backup data"), "{}", r.stderr);
    assert_eq!(hash_all(&elsewhere), before);
}

// 7: a "stream" that is a hard link to a secret file, and a `.chksum` that is one:
// the errors describe the bytes, never quote them — not on stderr, not in the log.
#[test]
fn errors_never_quote_file_content() {
    let t = Tree::new();
    let secret = t.outside.join("shadow");
    fs::write(
        &secret,
        "root:$6$SECRETSALT$SECRETHASHSECRETHASHSECRETHASH:19000:0:99999:7:::\n",
    )
    .expect("w");
    let data = t.root.join("rc-acc-files/vda.inc.virtnbdbackup.1.data");
    fs::remove_file(&data).expect("rm");
    fs::hard_link(&secret, &data).expect("link");
    let chk = t
        .root
        .join("rc-acc-files/vda.inc.virtnbdbackup.2.data.chksum");
    if chk.exists() {
        fs::remove_file(&chk).expect("rm");
        fs::hard_link(&secret, &chk).expect("link");
    }
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--skip-config",
        "--restore-path",
        &t.out("r"),
    ]);
    assert_ne!(r.code, Some(0), "{}", r.stderr);
    let logs: String =
        t.s.logs()
            .iter()
            .map(|l| fs::read_to_string(l).unwrap_or_default())
            .collect();
    for text in [&r.stderr, &r.stdout, &logs] {
        assert!(!text.contains("SECRET"), "file content leaked:\n{text}");
        assert!(!text.contains("root:$6"), "file content leaked:\n{text}");
    }
    let v = t.run(&["--verify", "rc-acc-files"]);
    assert!(
        !v.stderr.contains("SECRET") && !v.stdout.contains("SECRET"),
        "{}",
        v.stderr
    );
}

// A side file that is a FIFO (the open would wait for a writer forever, with the
// VM's lock held) or a device (`/dev/zero` never ends) is refused at once, naming
// the file; so is a TLS certificate that is one.
#[test]
fn side_files_that_are_fifos_or_devices_are_refused_at_once() {
    let t = Tree::new();
    let vm = t.root.join("rc-v247-chk/202603");
    let chk = vm.join("vda.inc.virtnbdbackup.1.data.chksum");
    fs::remove_file(&chk).expect("rm");
    let st = std::process::Command::new("mkfifo")
        .arg(&chk)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    let run = || {
        let start = std::time::Instant::now();
        let r = t.run(&[
            "--vm",
            "rc-v247-chk",
            "--skip-config",
            "--restore-path",
            &t.out("r"),
        ]);
        assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
        assert_ne!(r.code, Some(0), "{}", r.stderr);
        r
    };
    let r = run();
    assert!(
        r.stderr.contains("vda.inc.virtnbdbackup.1.data.chksum")
            && r.stderr.contains("a FIFO, not a regular file"),
        "{}",
        r.stderr
    );
    // a qcow.json that is /dev/zero is not a side file at all: the chain is
    // incomplete (exit 5), found at once
    fs::remove_file(&chk).expect("rm fifo");
    let q = vm.join("vda.virtnbdbackup.0.qcow.json");
    fs::remove_file(&q).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &q).expect("ln");
    let r = run();
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(
        r.stderr.contains("vda.virtnbdbackup.0.qcow.json"),
        "{}",
        r.stderr
    );
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--serve",
        &t.out("s.sock"),
        "--serve-tls-cert",
        "/dev/zero",
        "--serve-tls-key",
        "/dev/zero",
        "--dry-run",
    ]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(
        r.stderr.contains("/dev/zero") && r.stderr.contains("not a regular file"),
        "{}",
        r.stderr
    );
}

// A restore point whose domain XML names none of the backed-up disks (here: `vda`
// renamed to a crafted `../../x`) restores nothing: that is exit 5 with the way to
// get the data, not "Restore complete … disk ✓" over an empty directory.
#[test]
fn a_restore_that_would_write_no_disk_is_not_a_success() {
    let t = Tree::new();
    edit_xmls(
        &t.root.join("rc-v247-chk/202603"),
        "vmconfig.",
        "dev='vda'",
        "dev='../../x'",
    );
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["--vm", "rc-v247-chk", "--skip-config", "--restore-path"];
        let out = t.out("r");
        args.push(&out);
        args.extend_from_slice(extra);
        let r = t.run(&args);
        // a dry run says the real run would abort (and exits 0, as every dry run)
        let want = if extra.is_empty() { 5 } else { 0 };
        assert_eq!(r.code, Some(want), "{extra:?}: {}", r.stderr);
        assert!(r.stderr.contains("Nothing to restore"), "{}", r.stderr);
        assert!(!r.stderr.contains("Restore complete"), "{}", r.stderr);
        if !extra.is_empty() {
            assert!(r.stderr.contains("would abort"), "{}", r.stderr);
        }
    }
    assert!(!Path::new(&t.out("r")).exists());
}

// 8: a name or path that is not UTF-8 is refused (exit 7) — never converted lossily
// into a directory nobody named; a VM directory with such a name is named in a WARN.
#[test]
fn non_utf8_arguments_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let t = Tree::new();
    let bad = std::ffi::OsStr::from_bytes(b"n\xffu");
    let out =
        t.s.command(&[
            "--backup-path",
            &t.root.display().to_string(),
            "--vm",
            "rc-acc-files",
        ])
        .arg("--restore-path")
        .arg(t.s.dir.path().join(bad))
        .arg("--skip-config")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not valid UTF-8") && err.contains("n\\xffu"),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(t.s.dir.path())
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with('n'))
            })
            .count(),
        0,
        "no directory was created"
    );
    fs::create_dir_all(t.root.join(std::ffi::OsStr::from_bytes(b"vm\xfe"))).expect("mkdir");
    let r =
        t.s.run(&["--backup-path", &t.root.display().to_string(), "--list"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("is not UTF-8"), "{}", r.stderr);
}

// 9: --serve listens on loopback or a Unix socket unless --serve-public says
// otherwise, and then WARNs that the disks are readable without authentication.
#[test]
fn serving_beyond_loopback_needs_an_opt_in() {
    let t = Tree::new();
    let r = t.run(&["--vm", "rc-lz4-plain", "--serve", "0.0.0.0:0"]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(r.stderr.contains("--serve-public"), "{}", r.stderr);
    let r = t.run(&[
        "--vm",
        "rc-lz4-plain",
        "--serve",
        "0.0.0.0:0",
        "--serve-public",
        "--dry-run",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("WITHOUT authentication"), "{}", r.stderr);
    let r = t.run(&[
        "--vm",
        "rc-lz4-plain",
        "--serve-public",
        "--skip-config",
        "--restore-path",
        &t.out("r"),
    ]);
    assert_eq!(r.code, Some(7), "{}", r.stderr);
}

// 10: a hypervisor on another host is never given a domain whose disks, NVRAM and
// TPM state this host wrote (exit 7 before anything is read).
#[test]
fn remote_hypervisor_gets_no_local_definition() {
    let t = Tree::new();
    let root = t.root.display().to_string();
    for mode in [
        vec!["--restore-path", "/nonexistent/r"],
        vec!["--name", "c", "--restore-path", "/nonexistent/r"],
        vec!["--disk", "vda"],
    ] {
        let mut args = vec![
            "--backup-path",
            root.as_str(),
            "--connect",
            "qemu+ssh://root@kvm9.invalid/system",
            "--vm",
            "rc-acc-files",
        ];
        args.extend(mode.iter().copied());
        let r = t.s.run(&args);
        assert_eq!(r.code, Some(7), "{mode:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("run vmrestore on kvm9.invalid"),
            "{}",
            r.stderr
        );
    }
    assert!(!Path::new("/nonexistent/r").exists());
}

// 10 (the test driver): `test:///` is local but starts no guest; a clone or DR
// against it keeps NVRAM and swtpm state under the restore path, and the host's
// NVRAM file of the same name (here: the path the backup's XML names) and the swtpm
// root are left alone.
#[test]
fn test_driver_keeps_nvram_and_tpm_state_in_the_restore_path() {
    let t = Tree::new();
    let host_nvram = t.outside.join("nvram");
    fs::create_dir_all(&host_nvram).expect("mkdir");
    for f in ["rc-uefi-tpm_VARS.fd", "c2_VARS.fd"] {
        fs::write(host_nvram.join(f), "a real VM's NVRAM").expect("w");
    }
    point_nvram_at(&t.root.join("rc-uefi-tpm"), &host_nvram);
    let outside = hash_all(&t.outside);
    let tree = hash_all(&t.root);
    let clone = t.run(&[
        "--vm",
        "rc-uefi-tpm",
        "--name",
        "c2",
        "--restore-path",
        &t.out("r"),
    ]);
    assert_eq!(clone.code, Some(0), "{}", clone.stderr);
    let dr = t.run(&["--vm", "rc-uefi-tpm", "--restore-path", &t.out("dr")]);
    assert_eq!(dr.code, Some(0), "{}", dr.stderr);
    assert_eq!(
        hash_all(&t.outside),
        outside,
        "a host file outside the restore path changed"
    );
    assert_eq!(hash_all(&t.root), tree, "the backup tree changed");
    assert!(
        !t.s.dir.path().join("swtpm").exists(),
        "VMRESTORE_SWTPM_ROOT was written"
    );
    let sandbox = |rel: &str| t.s.dir.path().join(rel).join("test-driver");
    assert!(sandbox("r").join("nvram/c2_VARS.fd").is_file());
    assert!(sandbox("dr").join("nvram/rc-uefi-tpm_VARS.fd").is_file());
    for run in ["r", "dr"] {
        let tpm = fs::read_dir(sandbox(run).join("swtpm")).map_or(0, Iterator::count);
        assert_eq!(tpm, 1, "{run}: one swtpm state dir under the restore path");
    }
    assert!(
        clone
            .stderr
            .contains(&sandbox("r").join("nvram/c2_VARS.fd").display().to_string()),
        "{}",
        clone.stderr
    );
}

// 10 (the test driver, symlinked sandbox): `<restore path>/test-driver` planted as a
// symlink is refused (exit 4); nothing lands where it points.
#[test]
fn a_symlinked_test_driver_sandbox_is_refused() {
    let t = Tree::new();
    let victim = t.s.dir.path().join("victim");
    fs::create_dir_all(&victim).expect("mkdir");
    fs::create_dir_all(t.s.dir.path().join("r")).expect("mkdir");
    std::os::unix::fs::symlink(&victim, t.s.dir.path().join("r/test-driver")).expect("ln");
    let r = t.run(&["--vm", "rc-uefi-tpm", "--restore-path", &t.out("r")]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains("is a symbolic link"), "{}", r.stderr);
    assert_eq!(fs::read_dir(&victim).map_or(0, Iterator::count), 0);
}

/// Points every `<nvram>` of a VM dir's XMLs at `dir`.
fn point_nvram_at(vm_dir: &Path, dir: &Path) {
    edit_xmls(
        vm_dir,
        "",
        "/var/lib/libvirt/qemu/nvram",
        &dir.display().to_string(),
    );
}

/// Replaces `from` by `to` in every `<prefix>*.xml` below `dir`, mtimes kept
/// (restore points are ordered by them).
fn edit_xmls(dir: &Path, prefix: &str, from: &str, to: &str) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
        {
            let name = e
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if e.is_dir() {
                stack.push(e);
            } else if name.starts_with(prefix) && name.ends_with(".xml") {
                let text = fs::read_to_string(&e).expect("xml");
                if text.contains(from) {
                    let t = fs::metadata(&e).and_then(|m| m.modified()).expect("mtime");
                    fs::write(&e, text.replace(from, to)).expect("w");
                    let f = fs::File::open(&e).expect("open");
                    f.set_times(fs::FileTimes::new().set_modified(t))
                        .expect("times");
                }
            }
        }
    }
}

// A VM directory whose name holds an escape sequence and a newline: every log line
// shows them escaped (no terminal control, no forged second line), in a listing and
// in a restore of that VM.
#[test]
fn control_characters_in_vm_names_never_reach_a_log_line_raw() {
    let t = Tree::new();
    let evil = "ev\u{1b}[31mil\n[2026-01-01 00:00:00] [vmrestore] [main] ERROR: forged";
    let src = t.root.join("rc-acc-files");
    let dst = t.root.join(evil);
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("cp");
    assert!(ok.success());
    let out = t.out("r");
    for args in [
        vec!["--list"],
        vec![
            "--vm",
            evil,
            "--restore-path",
            out.as_str(),
            "--skip-config",
            "--dry-run",
        ],
        vec![
            "--vm",
            evil,
            "--restore-path",
            out.as_str(),
            "--skip-config",
        ],
    ] {
        let r = t.run(&args);
        for text in [&r.stdout, &r.stderr] {
            assert!(!text.contains('\u{1b}'), "{args:?}: raw ESC in\n{text}");
            assert!(
                !text.lines().any(|l| l.starts_with("[2026-01-01 00:00:00]")),
                "{args:?}: a forged line in\n{text}"
            );
        }
    }
}

// A side file named for checkpoint 4294967295, or a `.cpt` listing 20,000
// checkpoints: the set keeps a slot per checkpoint up to the latest, so such names
// are not checkpoints (the first one aborted the run asking for 446 GB).
#[test]
fn absurd_checkpoint_numbers_do_not_size_the_chain() {
    let t = Tree::new();
    let vm = t.root.join("rc-acc-files");
    fs::copy(
        vm.join("vmconfig.virtnbdbackup.4.xml"),
        vm.join("vmconfig.virtnbdbackup.4294967295.xml"),
    )
    .expect("copy");
    let list: Vec<String> = (0..20_000)
        .map(|i| format!("\"virtnbdbackup.{i}\""))
        .collect();
    fs::write(vm.join("rc-acc-files.cpt"), format!("[{}]", list.join(","))).expect("cpt");
    let out = t.out("r");
    let r = t.run(&[
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &out,
        "--skip-config",
        "--dry-run",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!r.stderr.contains("memory allocation"), "{}", r.stderr);
    let r = t.run(&["--vm", "rc-acc-files", "--list-restore-points"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!r.stdout.contains("4294967295"), "{}", r.stdout);
}
