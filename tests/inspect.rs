//! `--verify` and `--dump` (logged modes) over the real-chain fixture, data-dir
//! resolution as seen through them, and the run log. Comments cite spec §9.

mod clisupport;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use clisupport::{assert_golden, is_log_line, normalize_log, prepare_backups, Fixture, Scratch};

fn only_log(s: &Scratch) -> PathBuf {
    let logs = s.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    logs[0].clone()
}

// 145 (native): verify of a 2.47 chain with .chksum files passes, per-file lines, exit 0.
// 143, 144: log file <label>-YYYYMMDD-HHMMSS.log, 0600, invocation block, footer, Duration line last.
#[test]
fn verify_passes_golden() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    let r = s.run(&["--backup-path", &fx.root_str(), "--verify", "rc-v247-chk"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "");
    for line in r.stderr.lines() {
        assert!(is_log_line(line), "{line}");
    }
    let log = only_log(&s);
    let name = log
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("rc-v247-chk-")
            && name.ends_with(".log")
            && name.len() == "rc-v247-chk-".len() + 19,
        "{name}"
    );
    assert_eq!(
        fs::metadata(&log).expect("log").permissions().mode() & 0o777,
        0o600
    );
    let last = r.stderr.lines().last().expect("last");
    assert!(
        last.contains(&format!(
            "INFO: Duration: 0m 0s — exit 0 — log: {}",
            log.display()
        )) || last.contains("— exit 0 — log:"),
        "{last}"
    );
    assert!(r.stderr.contains(
        "INFO: Verification passed: every restore point is restorable (0..3); 4 checksums verified"
    ));
    assert!(!r.stderr.contains("checksums are valid"));
    assert_golden(
        "verify-rc-v247-chk.txt",
        &normalize_log(&r.stderr, &fx.root_str(), Some(&log)),
    );
    let text = fs::read_to_string(&log).expect("read log");
    let rule = "═".repeat(60);
    assert!(text.starts_with(&format!(
        "{rule}\nvmrestore v{} — ",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains(&format!(
        "Invocation:   vmrestore --backup-path {} --verify rc-v247-chk\n",
        fx.root_str()
    )));
    assert!(text.contains("Mode:         verify\n"));
    assert!(text.contains(&format!("Log File:     {}\n", log.display())));
    assert!(text.contains("Verification passed"));
    assert!(
        text.ends_with(&format!("Exit Status:  0\n{rule}\n")),
        "{text}"
    );
}

// 145 (native): the bit-flipped full of rc-damage/20260515 fails verification: exit 6,
// and no restore point of the chain is restorable (every one reads the full).
#[test]
fn verify_detects_bitflip_golden() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    let r = s.run(&[
        "--backup-path",
        &fx.root_str(),
        "--verify",
        "rc-damage",
        "--period",
        "20260515",
    ]);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("ERROR: Structure OK, checksum MISMATCH: vda.full.data"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(
        "ERROR: Verification FAILED: restore points 0..2 are not restorable: vda.full.data: checksum mismatch: stored 3186549397, computed 3296125597; no restore point is restorable"
    ));
    let log = only_log(&s);
    assert_golden(
        "verify-rc-damage-20260515.txt",
        &normalize_log(&r.stderr, &fx.root_str(), Some(&log)),
    );
    let text = fs::read_to_string(&log).expect("log");
    assert!(text.contains("Verification FAILED"));
    assert!(text.contains("Exit Status:  6\n"));
    assert!(!text.contains("vmrestore completed"));
}

// Files without .chksum (virtnbdbackup 1.9.15) are structurally verified, said so, and
// not failed; an orphan .chksum (data file deleted) is warned about, and the incomplete
// chain it belongs to fails verification (exit 6): restore points 3..4 will not restore.
#[test]
fn verify_without_checksums_and_with_gaps() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = Scratch::new().run(&["--backup-path", &fx.root_str(), "--verify", "rc-acc-files"]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stderr.contains(
            "INFO: Structure OK, no checksum recorded: vda.full.data (LZ4 frame checksums verified)"
        ),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("INFO: Verification passed: every restore point is restorable (0..4), structure verified; no checksums recorded — only the LZ4 frame checksums guard the payloads"), "{}", r.stderr);
    let r = Scratch::new().run(&[
        "--backup-path",
        &fx.root_str(),
        "--verify",
        "rc-damage",
        "--period",
        "20260512",
    ]);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert!(r
        .stderr
        .contains("WARN: Checksum file without data file: vda.inc.virtnbdbackup.3.data.chksum"));
    assert!(r.stderr.contains(
        "ERROR: Verification FAILED: restore points 3..4 are not restorable: missing vda.inc.virtnbdbackup.3.data; restore points 0..2 are restorable"
    ));
}

// 146, 66: --dump prints the meta objects as json.dumps(indent=4), disk then checkpoint order.
#[test]
fn dump_golden() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    let r = s.run(&[
        "--backup-path",
        &fx.root_str(),
        "--dump",
        "rc-v247-chk",
        "--period",
        "202603",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(&format!(
        "Running dump on: {}",
        fx.path("rc-v247-chk/202603")
    )));
    assert_golden("dump-rc-v247-chk.txt", &r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let names: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["checkpointName"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "virtnbdbackup.0",
            "virtnbdbackup.1",
            "virtnbdbackup.2",
            "virtnbdbackup.3"
        ]
    );
    // the output is also in the run log
    let text = fs::read_to_string(only_log(&s)).expect("log");
    assert!(text.contains(&r.stdout));
    // 66: accumulate VM without --period uses the VM dir
    let r = Scratch::new().run(&["--backup-path", &fx.root_str(), "--dump", "rc-acc-files"]);
    assert_eq!(r.code, Some(0));
    assert!(r
        .stderr
        .contains(&format!("Running dump on: {}\n", fx.path("rc-acc-files"))));
    // several disks: ordered by disk, then checkpoint (never by mtime)
    let r = Scratch::new().run(&["--backup-path", &fx.root_str(), "--dump", "rc-multi-sql"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let keys: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                m["diskName"].as_str().expect("d"),
                m["checkpointName"].as_str().expect("c")
            )
        })
        .collect();
    assert_eq!(keys[0], "sda:virtnbdbackup.0");
    assert_eq!(keys[4], "vda:virtnbdbackup.0");
    assert_eq!(keys[11], "vdb:virtnbdbackup.3");
}

// Path-aware --dump of an archived copy chain, and --json.
#[test]
fn dump_archive_path_and_json() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let chain = fx.path("rc-mon-db/202601/.archives/chain-2026-01-27");
    let r = Scratch::new().run(&["--dump", &chain, "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["schema"], "vmrestore.dump/1");
    assert_eq!(v["files"][0]["file"], "vda.copy.data");
    assert_eq!(v["files"][0]["disk"], "vda");
    assert_eq!(v["files"][0]["meta"]["incremental"], false);
    assert_eq!(v["skipped"], serde_json::json!([]));
    let r = Scratch::new().run(&["--verify", &fx.path("rc-v247-chk/202603"), "--json"]);
    assert_eq!(r.code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(
        (v["schema"].as_str(), v["passed"].as_bool()),
        (Some("vmrestore.verify/2"), Some(true))
    );
    assert_eq!(v["files"].as_array().expect("files").len(), 4);
    assert_eq!(v["files"][0]["status"], "ok");
    assert_eq!(v["restore_points"].as_array().expect("points").len(), 4);
}

// 60, 61 (through --verify): period resolution skips empty newer periods; an explicit period is used.
#[test]
fn s60_s61_data_dir_resolution() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    fs::create_dir_all(root.join("rc-wk-app/2026-W08")).expect("mkdir empty newer period");
    let rs = root.display().to_string();
    let r = Scratch::new().run(&["--backup-path", &rs, "--verify", "rc-wk-app"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r
        .stderr
        .contains(&format!("Running verify on: {rs}/rc-wk-app/2026-W07\n")));
    let r = Scratch::new().run(&[
        "--backup-path",
        &rs,
        "--dump",
        "rc-dly-web",
        "--period",
        "20260202",
    ]);
    assert_eq!(r.code, Some(0));
    assert!(r
        .stderr
        .contains(&format!("Running dump on: {rs}/rc-dly-web/20260202\n")));
}

// 62: unknown VM dir → 5.
#[test]
fn s62_vm_directory_not_found() {
    let fx = Fixture::shared();
    let r = Scratch::new().run(&["--backup-path", &fx.root_str(), "--verify", "nosuch"]);
    assert_eq!(r.code, Some(5));
    assert!(r
        .stderr
        .contains(&format!("VM directory not found: {}", fx.path("nosuch"))));
}

// 63: missing period → ERROR Period not found, then Cannot resolve data directory, exit 5.
#[test]
fn s63_period_not_found() {
    let fx = Fixture::shared();
    let r = Scratch::new().run(&[
        "--backup-path",
        &fx.root_str(),
        "--dump",
        "rc-wk-app",
        "--period",
        "19990101",
    ]);
    assert_eq!(r.code, Some(5));
    let p = r
        .stderr
        .find(&format!(
            "ERROR: Period not found: {}",
            fx.path("rc-wk-app/19990101")
        ))
        .expect("period line");
    let c = r
        .stderr
        .find("ERROR: Cannot resolve data directory for rc-wk-app")
        .expect("resolve line");
    assert!(p < c);
}

// 64: a path-valued name works without --backup-path and without any config file.
#[test]
fn s64_path_aware_without_config() {
    let fx = Fixture::shared();
    let r = Scratch::new().run(&["--verify", &fx.path("rc-acc-files")]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r
        .stderr
        .contains(&format!("Running verify on: {}\n", fx.path("rc-acc-files"))));
}

// 65 (resolution part): the VM name of an archived chain comes from its vmconfig.
#[test]
fn s65_name_from_backup_config() {
    let fx = Fixture::shared();
    let chain = fx
        .root
        .join("rc-wk-app/2026-W06/.archives/chain-2026-02-04");
    assert_eq!(
        vmrestore::host::tree::resolve_vm_name(&chain).as_deref(),
        Some("rc-wk-app")
    );
    // copy chain without vmconfig.copy.xml: its config/ dir has the domain
    let copy = fx.root.join("rc-mon-db/202601/.archives/chain-2026-01-27");
    assert_eq!(
        vmrestore::host::tree::resolve_vm_name(&copy).as_deref(),
        Some("rc-mon-db")
    );
    assert_eq!(
        vmrestore::host::tree::state_root(&chain, true, std::path::Path::new("/x")),
        fx.root
    );
}

// 67 (log part): the log file is named after the CLI label.
#[test]
fn s67_log_named_after_label() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    fs::rename(root.join("rc-acc-files"), root.join("my_vm")).expect("rename");
    let r = s.run(&[
        "--backup-path",
        &root.display().to_string(),
        "--verify",
        "my_vm",
    ]);
    assert_eq!(r.code, Some(0));
    let log = only_log(&s);
    assert!(log
        .file_name()
        .expect("name")
        .to_string_lossy()
        .starts_with("my_vm-"));
}

// 141: --list, --verify and --dump add no restore_sessions row (the catalogue is untouched).
#[test]
fn s141_no_catalogue_rows() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let db = root.join("_state/vmbackup.db");
    let before = fs::read(&db).expect("db");
    let rs = root.display().to_string();
    for args in [
        vec!["--list"],
        vec!["--verify", "rc-acc-files"],
        vec!["--dump", "rc-acc-files"],
        vec!["--list-restore-points", "rc-long"],
    ] {
        let mut a = vec!["--backup-path", &rs];
        a.extend(args);
        assert_eq!(s.run(&a).code, Some(0));
    }
    assert_eq!(fs::read(&db).expect("db"), before);
    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("db");
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'restore_sessions'",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(n, 0);
    assert!(!root.join("_state/locks").exists()); // 136 for these modes
}
