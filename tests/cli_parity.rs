//! CLI surface and configuration cascade, run against the built binary.
//! Comments cite the spec's acceptance statements (§9).

mod clisupport;

use clisupport::{is_log_line, run, Fixture, Scratch};
use vmrestore::cli::FLAGS;
use vmrestore::error::ExitStatus;

fn version_line() -> String {
    format!(
        "vmrestore {} (vmbackup 0.6.0 compatible)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The directory of the binary under test (first on PATH: nothing shadows it).
fn bin_dir() -> String {
    std::path::Path::new(env!("CARGO_BIN_EXE_vmrestore"))
        .parent()
        .expect("bin dir")
        .display()
        .to_string()
}

// 1: --version / -V print exactly one line, exit 0, no log file. Statement 1 says
// "vmrestore 0.6.0"; issue 21 changed the line to our version plus the vmbackup
// release it replaces: "vmrestore 0.7.0 (vmbackup 0.6.0 compatible)".
#[test]
fn s01_version() {
    for flag in ["--version", "-V"] {
        let s = Scratch::new();
        let path = format!("{}:/usr/bin:/bin", bin_dir());
        let r = s.run_env(&[flag], &[("PATH", path.as_str())]);
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (Some(0), version_line().as_str(), "")
        );
        assert!(s.logs().is_empty());
    }
}

// Issue 21: vmbackup's bash vmrestore earlier on PATH (/usr/local/bin/vmrestore →
// /opt/vmbackup/vmrestore.sh) is named in a WARN; stdout keeps its one line.
#[test]
fn s01_version_names_a_bash_vmrestore_earlier_on_path() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let t = tempfile::tempdir().expect("tmp");
    let (local, opt) = (t.path().join("local-bin"), t.path().join("opt"));
    std::fs::create_dir(&local).expect("mkdir");
    std::fs::create_dir(&opt).expect("mkdir");
    let script = opt.join("vmrestore.sh");
    std::fs::write(&script, "#!/bin/bash\necho 'vmrestore 0.6.0'\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink(&script, local.join("vmrestore")).expect("ln");
    let path = format!("{}:{}:/usr/bin:/bin", local.display(), bin_dir());
    let r = s.run_env(&["--version"], &[("PATH", path.as_str())]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), version_line().as_str())
    );
    let warn = format!(
        "WARN: A plain 'vmrestore' on this PATH runs {} → {}, a shell script (/bin/bash), probably the bash vmrestore of vmbackup, not this binary ({})",
        local.join("vmrestore").display(),
        std::fs::canonicalize(&script).expect("real").display(),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_vmrestore")).expect("real").display(),
    );
    assert!(r.stderr.contains(&warn), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(s.logs().is_empty());
    // after it on PATH: quiet
    let path = format!("{}:{}", bin_dir(), local.display());
    let r = s.run_env(&["--version"], &[("PATH", path.as_str())]);
    assert_eq!(r.stderr, "");
}

// 2: --help / -h print the usage with every flag, exit 0.
#[test]
fn s02_help_lists_every_flag() {
    for flag in ["--help", "-h"] {
        let r = run(&[flag]);
        assert_eq!(r.code, Some(0));
        assert!(r
            .stdout
            .starts_with(&format!("vmrestore v{}", env!("CARGO_PKG_VERSION"))));
        for f in FLAGS {
            assert!(r.stdout.contains(f.long), "{} missing", f.long);
        }
        for needed in [
            "--include-incomplete",
            "--config-instance",
            "--list-restore-points",
            "VMBACKUP_INSTANCE",
            "EXAMPLES",
        ] {
            assert!(r.stdout.contains(needed), "{needed}");
        }
        assert!(r.stdout.contains("no longer wraps virtnbdrestore"));
    }
}

// 3: no arguments → usage on stdout, exit 0.
#[test]
fn s03_no_arguments_prints_usage() {
    let r = run(&[]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("USAGE:"));
}

// 4: unknown option → exit 7, "ERROR: Unknown option: --bogus" in the log-line shape.
#[test]
fn s04_unknown_option() {
    let r = run(&["--bogus"]);
    assert_eq!(r.code, Some(7));
    let line = r.stderr.lines().next().expect("a line");
    assert!(
        line.ends_with("[vmrestore] [parse_args] ERROR: Unknown option: --bogus"),
        "{line}"
    );
    assert!(is_log_line(line));
}

// 5: --flag=value is not accepted (documented decision, see src/cli.rs).
#[test]
fn s05_equals_form_is_unknown() {
    let r = run(&["--vm=my-vm", "--restore-path", "/r"]);
    assert_eq!(r.code, Some(7));
    assert!(r.stderr.contains("Unknown option: --vm=my-vm"));
}

// 6: removed/never-existing flags are unknown options.
#[test]
fn s06_removed_flags() {
    for f in [
        "--yes",
        "-y",
        "--verbose",
        "--quiet",
        "--debug",
        "--status",
        "--host-config",
        "--host-target",
        "--log-level",
    ] {
        let r = run(&[f]);
        assert_eq!(r.code, Some(7), "{f}");
        assert!(r.stderr.contains(&format!("Unknown option: {f}")), "{f}");
    }
}

// 7: --help acts when parsed: after an unknown option → 7, before it → 0.
#[test]
fn s07_help_position() {
    assert_eq!(run(&["--bogus", "--help"]).code, Some(7));
    let r = run(&["--help", "--bogus"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("USAGE:"));
}

// 8: --vm without a value, or empty → 7 with the flag's message.
#[test]
fn s08_missing_vm_value() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    for args in [
        vec!["--backup-path", &fx.root_str(), "--vm"],
        vec!["--backup-path", &fx.root_str(), "--vm", ""],
    ] {
        let r = run(&args.iter().map(|s| s.as_ref()).collect::<Vec<&str>>());
        assert_eq!(r.code, Some(7));
        assert!(
            r.stderr.contains("--vm requires a VM name or path"),
            "{}",
            r.stderr
        );
    }
    // every value-taking flag has its own message
    for (flag, msg) in [
        ("--restore-path", "--restore-path requires a path"),
        ("--name", "--name requires a name"),
        (
            "--disk",
            "--disk requires a device name (e.g. vdb, vda,vdb, or all)",
        ),
        ("--backup-path", "--backup-path requires a path"),
        (
            "--config-instance",
            "--config-instance requires an instance name",
        ),
        ("--verify", "--verify requires a VM name"),
        ("--dump", "--dump requires a VM name"),
    ] {
        let r = run(&[flag]);
        assert_eq!(r.code, Some(7), "{flag}");
        assert!(r.stderr.contains(msg), "{flag}: {}", r.stderr);
    }
}

// 9: --disk with --name → 7.
#[test]
fn s09_disk_and_name() {
    let fx = Fixture::shared();
    let r = run(&[
        "--backup-path",
        &fx.root_str(),
        "--vm",
        "my-vm",
        "--disk",
        "vda",
        "--name",
        "c",
    ]);
    assert_eq!(r.code, Some(7));
    assert!(r.stderr.contains("--disk and --name cannot be combined (disk restore replaces disk files, it does not create a VM)"));
}

// 10: invalid --restore-point values → 7 before anything else happens.
#[test]
fn s10_invalid_restore_point() {
    let fx = Fixture::shared();
    for v in ["foo", "-1", "3abc"] {
        let s = Scratch::new();
        let r = s.run(&[
            "--backup-path",
            &fx.root_str(),
            "--vm",
            "rc-acc-files",
            "--restore-path",
            "/nonexistent/r",
            "--restore-point",
            v,
        ]);
        assert_eq!(r.code, Some(7), "{v}");
        assert!(
            r.stderr.contains(&format!(
                "Invalid restore point: {v} (use latest, full, or number)"
            )),
            "{}",
            r.stderr
        );
        assert!(s.logs().is_empty());
    }
}

// 11: restore without --restore-path and without --disk → 7.
#[test]
fn s11_restore_needs_a_path() {
    let fx = Fixture::shared();
    let r = run(&["--backup-path", &fx.root_str(), "--vm", "my-vm"]);
    assert_eq!(r.code, Some(7));
    assert!(r.stderr.contains(
        "--restore-path is required for restore (unless --disk is used for in-place replacement)"
    ));
}

// 12: no mode → 7, and no log file.
#[test]
fn s12_no_mode() {
    let fx = Fixture::shared();
    let s = Scratch::new();
    let r = s.run(&["--backup-path", &fx.root_str()]);
    assert_eq!(r.code, Some(7));
    assert!(r.stderr.contains("No mode specified (try --help)"));
    assert!(s.logs().is_empty());
}

// 13 and 14: --list-restore-points without a VM (also when the next token is a flag) → 7.
#[test]
fn s13_s14_points_need_a_vm() {
    let fx = Fixture::shared();
    for extra in [&[][..], &["--period", "2026-W10"][..]] {
        let mut args = vec![
            "--backup-path".to_owned(),
            fx.root_str(),
            "--list-restore-points".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let r = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(r.code, Some(7));
        assert!(
            r.stderr
                .contains("VM name required for --list-restore-points"),
            "{}",
            r.stderr
        );
    }
}

// 15: the last mode flag wins.
#[test]
fn s15_last_mode_wins() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = run(&["--vm", "my-vm", "--list", "--backup-path", &fx.root_str()]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("Available VMs in:"));
}

// 16: no --backup-path and no default config → 2 with the message naming the file.
#[test]
fn s16_no_default_config() {
    let s = Scratch::new();
    let r = s.run(&["--list"]);
    assert_eq!(r.code, Some(2));
    let file = s.config_root().join("default/vmbackup.conf");
    assert!(
        r.stderr.contains(&format!(
            "[resolve_backup_path] ERROR: Cannot resolve backup path. Use --backup-path or install vmbackup with a configured BACKUP_PATH in {}",
            file.display()
        )),
        "{}",
        r.stderr
    );
}

// 17 and 18: a named instance that does not exist → 2 (flag or environment).
#[test]
fn s17_s18_missing_instance() {
    let s = Scratch::new();
    let msg = format!(
        "Config instance 'nope' not found: {}",
        s.config_root().join("nope/vmbackup.conf").display()
    );
    let r = s.run(&["--list", "--config-instance", "nope"]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains(&msg), "{}", r.stderr);
    let r = s.run_env(&["--list"], &[("VMBACKUP_INSTANCE", "nope")]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains(&msg));
    // an empty VMBACKUP_INSTANCE counts as unset → default
    let r = s.run_env(&["--list"], &[("VMBACKUP_INSTANCE", "")]);
    assert!(r.stderr.contains("Cannot resolve backup path"));
}

// 19: --config-instance beats VMBACKUP_INSTANCE.
#[test]
fn s19_flag_beats_environment() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    s.write_config("test", "BACKUP_PATH=/nonexistent/test\n");
    s.write_config("prod", &format!("BACKUP_PATH=\"{}\"\n", fx.root_str()));
    let r = s.run_env(
        &["--list", "--config-instance", "prod"],
        &[("VMBACKUP_INSTANCE", "test")],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r
        .stdout
        .contains(&format!("Available VMs in: {}", fx.root_str())));
}

// 20: a CLI backup path bypasses config files entirely.
#[test]
fn s20_cli_path_bypasses_config() {
    let fx = Fixture::shared();
    let r = run(&[
        "--list",
        "--backup-path",
        &fx.root_str(),
        "--config-instance",
        "nope",
    ]);
    assert_eq!(r.code, Some(0));
}

// 21, 22, 23: BACKUP_PATH parsing (quotes and trailing slash, comments, last wins).
#[test]
fn s21_s22_s23_config_values() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    s.write_config("default", &format!("BACKUP_PATH=\"{}/\"\n", fx.root_str()));
    let r = s.run(&["--list"]);
    assert_eq!(r.code, Some(0));
    assert!(r
        .stdout
        .contains(&format!("Available VMs in: {}\n", fx.root_str())));

    s.write_config("default", "#BACKUP_PATH=/x\n");
    assert_eq!(s.run(&["--list"]).code, Some(2));

    s.write_config(
        "default",
        &format!("BACKUP_PATH=/a\nBACKUP_PATH={}\n", fx.root_str()),
    );
    let r = s.run(&["--list"]);
    assert_eq!(r.code, Some(0));
    assert!(r
        .stdout
        .contains(&format!("Available VMs in: {}\n", fx.root_str())));
}

// vmbackup.conf is data: a value that needs a shell is a config error naming file and line.
#[test]
fn config_values_needing_a_shell_are_refused() {
    let s = Scratch::new();
    let f = s.write_config(
        "default",
        "# vmbackup\nBACKUP_PATH=\"$(cat /etc/backup-root)\"\n",
    );
    let r = s.run(&["--list"]);
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr
            .contains(&format!("{}:2: BACKUP_PATH needs a shell", f.display())),
        "{}",
        r.stderr
    );
    s.write_config("default", &format!("X={}\n", "y".repeat(70_000)));
    let r = s.run(&["--list"]);
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains(":1: line longer than 65536 bytes"),
        "{}",
        r.stderr
    );
}

// 24: a backup root that does not exist → 4.
#[test]
fn s24_missing_backup_root() {
    let r = run(&["--list", "--backup-path", "/does/not/exist"]);
    assert_eq!(r.code, Some(4));
    assert!(r.stderr.contains("Backup path not found: /does/not/exist"));
}

// 25, 26: a restore path inside (or equal to) the backup root → 7, no log, no lock, nothing run.
#[test]
fn s25_s26_restore_path_inside_root() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    for rp in [
        fx.path("restore"),
        fx.root_str(),
        format!("{}/", fx.root_str()),
        fx.path("rc-acc-files/../x"),
    ] {
        let s = Scratch::new();
        let r = s.run(&[
            "--backup-path",
            &fx.root_str(),
            "--vm",
            "rc-acc-files",
            "--restore-path",
            &rp,
        ]);
        assert_eq!(r.code, Some(7), "{rp}");
        assert!(r.stderr.contains("inside backup root"), "{}", r.stderr);
        assert!(s.logs().is_empty());
        assert!(!fx.root.join("_state/locks").exists());
    }
}

// 27: a symlink that resolves into the backup root → 7.
#[test]
fn s27_symlink_into_root() {
    let fx = Fixture::shared();
    let s = Scratch::new();
    let link = s.dir.path().join("link");
    std::os::unix::fs::symlink(&fx.root, &link).expect("symlink");
    let target = link.join("sub").display().to_string();
    let r = s.run(&[
        "--backup-path",
        &fx.root_str(),
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &target,
    ]);
    assert_eq!(r.code, Some(7));
    assert!(r.stderr.contains("inside backup root"));
}

// 28: containment is component-wise: <root>2 is not inside <root>.
#[test]
fn s28_sibling_is_not_inside() {
    let fx = Fixture::shared();
    let sibling = format!("{}2", fx.root_str());
    // --restore-path is checked whenever present, so --list shows the check passed
    let r = run(&[
        "--list",
        "--backup-path",
        &fx.root_str(),
        "--restore-path",
        &sibling,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

// 29: inside another configured instance's BACKUP_PATH → 7, even with --backup-path elsewhere.
#[test]
fn s29_other_instance_root() {
    let fx = Fixture::shared();
    let s = Scratch::new();
    let other = s.dir.path().join("other-root");
    std::fs::create_dir_all(&other).expect("mkdir");
    s.write_config("offsite", &format!("BACKUP_PATH={}\n", other.display()));
    let rp = other.join("restore").display().to_string();
    let r = s.run(&[
        "--backup-path",
        &fx.root_str(),
        "--vm",
        "rc-acc-files",
        "--restore-path",
        &rp,
    ]);
    assert_eq!(r.code, Some(7));
    assert!(
        r.stderr
            .contains(&format!("inside backup root {}", other.display())),
        "{}",
        r.stderr
    );
}

// The exit-code table of --help matches ExitStatus.
#[test]
fn help_exit_codes_match_exit_status() {
    let r = run(&["--help"]);
    let names = [
        "ok",
        "general",
        "config",
        "lock",
        "storage",
        "VM/backup",
        "engine/verify",
        "usage",
        "dependency",
        "SIGINT",
        "SIGTERM",
    ];
    for (status, name) in ExitStatus::TABLE.iter().zip(names) {
        assert!(
            r.stdout.contains(&format!("{} {name}", status.code())),
            "{} {name}",
            status.code()
        );
    }
}
