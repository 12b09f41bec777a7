//! `--list` and `--list-restore-points` over the real-chain fixture (goldens in
//! tests/golden/cli/) and small synthetic trees. Comments cite spec §9 statements.

mod clisupport;

use std::fs;
use std::fs::File;
use std::path::{Path, PathBuf};

use clisupport::{
    assert_golden, mask_chain_sizes, mask_list_sizes, prepare_backups, run, tree_hash, Fixture,
    Scratch,
};

const VMS: [&str; 13] = [
    "rc-acc-files",
    "rc-brk-inc",
    "rc-damage",
    "rc-dly-web",
    "rc-long",
    "rc-lz4-plain",
    "rc-mon-db",
    "rc-multi-sql",
    "rc-shrink",
    "rc-tiny-raw",
    "rc-uefi-tpm",
    "rc-v247-chk",
    "rc-wk-app",
];

fn list(root: &str) -> clisupport::Run {
    run(&["--list", "--backup-path", root])
}

fn points(root: &str, vm: &str, extra: &[&str]) -> clisupport::Run {
    let mut args = vec!["--backup-path", root, "--list-restore-points", vm];
    args.extend_from_slice(extra);
    run(&args)
}

fn norm(text: &str, root: &str) -> String {
    text.replace(root, "B")
}

// 30, 31, 32, 35, 36, 38, 41: the whole --list of the fixture, byte for byte (sizes masked,
// see du_sizes_match_gnu_du), with the catalogue's Chains: lines.
#[test]
fn list_golden() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let s = Scratch::new();
    let r = s.run(&["--list", "--backup-path", &fx.root_str()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert!(s.logs().is_empty()); // 41
    assert!(!fx.root.join("_state/locks").exists()); // 41
    let rule = "═".repeat(62);
    assert!(r
        .stdout
        .starts_with(&format!("\nAvailable VMs in: {}\n{rule}\n", fx.root_str()))); // 30
    assert!(r.stdout.ends_with(&format!("\n\n{rule}\n"))); // 30
    assert!(!r.stdout.contains("_state")); // 31
    assert_golden(
        "list.txt",
        &mask_list_sizes(&norm(&r.stdout, &fx.root_str())),
    );
}

// 32 and 51: the size columns equal GNU `du -sh` of the same directories.
#[test]
fn du_sizes_match_gnu_du() {
    let fx = Fixture::shared();
    let du = |p: &Path| -> Option<String> {
        let out = std::process::Command::new("du")
            .arg("-sh")
            .arg(p)
            .output()
            .ok()?;
        String::from_utf8(out.stdout)
            .ok()?
            .split_whitespace()
            .next()
            .map(str::to_owned)
    };
    if du(&fx.root).is_none() {
        eprintln!("du not available; skipping");
        return;
    }
    let r = list(&fx.root_str());
    for vm in VMS {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("  {vm} ")))
            .expect("vm line");
        assert_eq!(line.len(), 62, "{line}"); // 32: "  " + 53 + " " + 6
        assert_eq!(
            line[56..].trim(),
            du(&fx.root.join(vm)).expect("du"),
            "{vm}"
        );
    }
    let r = points(&fx.root_str(), "rc-mon-db", &[]);
    for chain in ["chain-2026-01-26", "chain-2026-01-27"] {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("    {chain} ")))
            .expect("chain line");
        let dir = fx.root.join("rc-mon-db/202601/.archives").join(chain);
        assert_eq!(line[35..41].trim(), du(&dir).expect("du"), "{chain}");
    }
}

// 35, 36: spot checks of the detail lines (multi-disk tag, accumulate, archives).
#[test]
fn list_detail_lines() {
    let fx = Fixture::shared();
    let r = list(&fx.root_str());
    let block = |vm: &str| -> Vec<String> {
        let lines: Vec<&str> = r.stdout.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("  {vm} ")))
            .expect("vm");
        lines[i + 1..]
            .iter()
            .take_while(|l| l.starts_with("    "))
            .map(|l| (*l).to_owned())
            .collect()
    };
    assert_eq!(
        block("rc-multi-sql")[0],
        "    incremental · 4 points [sda, vda, vdb]"
    ); // 35
    assert_eq!(
        block("rc-shrink")[0],
        "    incremental · 5 points [vda, vdb]"
    ); // 35: disk set at the latest checkpoint
    assert_eq!(block("rc-v247-chk")[0], "    incremental · 4 points"); // 35: single disk, no tag
    let long = block("rc-long"); // 36
    assert_eq!(long[0], "    incremental · 40 points · 1 archive");
    assert!(!long.iter().any(|l| l.contains("Periods:")));
    assert_eq!(
        block("rc-wk-app")[0],
        "    incremental · 4 points · 1 archive"
    ); // 34: singular archive
    assert_eq!(
        block("rc-uefi-tpm")[0],
        "    full · 3 points [vda, vdb] [TPM]"
    );
    assert_eq!(block("rc-mon-db")[1], "    Periods: 202602 202601");
    assert_eq!(
        block("rc-wk-app")[2],
        "    Chains: 1 active, 0 broken, last backup 2026-02-10T01:00:00Z"
    ); // 38
}

fn touch(p: &Path) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, b"").expect("write");
}

// 31, 33, 34, 37, 40: synthetic trees.
#[test]
fn list_synthetic_trees() {
    let s = Scratch::new();
    let root = s.dir.path().join("bk");
    fs::create_dir_all(&root).expect("mkdir");
    // 40: empty root → header, closing rule, WARN, exit 0
    let r = list(&root.display().to_string());
    assert_eq!(r.code, Some(0));
    let rule = "═".repeat(62);
    assert_eq!(
        r.stdout,
        format!("\nAvailable VMs in: {}\n{rule}\n\n{rule}\n", root.display())
    );
    assert!(
        r.stderr.contains(&format!(
            "[list_vms] WARN: No backups found in {}",
            root.display()
        )),
        "{}",
        r.stderr
    );

    // 33: weekly VM, 3 checkpoints, empty newer period, 2 archives, TPM marker
    let w10 = root.join("my-vm/2026-W10");
    for f in [
        "vda.full.data",
        "vda.inc.virtnbdbackup.1.data",
        "vda.inc.virtnbdbackup.2.data",
        ".tpm-backup-marker",
    ] {
        touch(&w10.join(f));
    }
    for n in 0..3 {
        touch(&w10.join(format!("checkpoints/virtnbdbackup.{n}.xml")));
    }
    touch(&w10.join(".archives/chain-2026-03-04/vda.full.data"));
    touch(&w10.join(".archives/chain-2026-03-05/vda.copy.data"));
    fs::create_dir_all(root.join("my-vm/2026-W11")).expect("mkdir");
    // 31: hidden dirs and _state are never listed
    fs::create_dir_all(root.join(".snap/x")).expect("mkdir");
    fs::create_dir_all(root.join("_state")).expect("mkdir");
    // 34: one point, no archives
    touch(&root.join("one/20260301/vda.copy.data"));
    // 37: three daily full/copy periods without checkpoints/ → 3 points
    for (p, f) in [
        ("20260302", "vda.full.data"),
        ("20260303", "vda.copy.data"),
        ("20260304", "vda.full.data"),
    ] {
        touch(&root.join("web").join(p).join(f));
    }
    // a non-accumulate dir without periods is skipped
    fs::create_dir_all(root.join("empty-vm")).expect("mkdir");
    let r = list(&root.display().to_string());
    assert_eq!(r.code, Some(0));
    assert_eq!(r.stderr, "");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let vm_lines: Vec<&str> = lines
        .iter()
        .filter(|l| l.len() == 62 && l.starts_with("  ") && !l.starts_with("   "))
        .copied()
        .collect();
    let names: Vec<&str> = vm_lines
        .iter()
        .map(|l| l.split_whitespace().next().expect("name"))
        .collect();
    assert_eq!(names, ["my-vm", "one", "web"]);
    let after = |vm: &str, k: usize| {
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("  {vm} ")))
            .expect("vm");
        lines[i + k]
    };
    assert_eq!(
        after("my-vm", 1),
        "    incremental · 3 points · 2 archives [TPM]"
    ); // 33
    assert_eq!(after("my-vm", 2), "    Periods: 2026-W11 2026-W10"); // 33
    assert_eq!(after("one", 1), "    copy · 1 point"); // 34
    assert_eq!(after("web", 1), "    full · 3 points"); // 37
    assert_eq!(after("web", 2), "    Periods: 20260304 20260303 20260302");
}

// 38, 39: catalogue line from a DB, silently omitted when the DB is corrupt or absent.
#[test]
fn list_catalogue_lines() {
    let s = Scratch::new();
    let root = s.dir.path().join("bk");
    touch(&root.join("my-vm/2026-W10/vda.full.data"));
    let state = root.join("_state");
    fs::create_dir_all(&state).expect("mkdir");
    let db = state.join("vmbackup.db");
    {
        let c = rusqlite::Connection::open(&db).expect("db");
        c.execute_batch(
            "CREATE TABLE chain_health (id INTEGER PRIMARY KEY, vm_name TEXT NOT NULL, period_id TEXT NOT NULL,
               chain_location TEXT NOT NULL, chain_status TEXT NOT NULL DEFAULT 'active', last_backup TEXT);
             INSERT INTO chain_health (vm_name, period_id, chain_location, chain_status, last_backup) VALUES
               ('my-vm','2026-W10','x','active','2026-03-08 22:00:01'), ('my-vm','2026-W09','x','active','2026-03-01 22:00:01'),
               ('my-vm','2026-W08','x','broken','2026-02-22 22:00:01');",
        )
        .expect("sql");
    }
    let r = list(&root.display().to_string());
    assert!(
        r.stdout
            .contains("\n    Chains: 2 active, 1 broken, last backup 2026-03-08T22:00:01Z\n"),
        "{}",
        r.stdout
    ); // 38
    fs::write(
        &db,
        b"garbage garbage garbage garbage garbage garbage garbage garbage garbage garbage",
    )
    .expect("corrupt");
    let r = list(&root.display().to_string());
    assert_eq!((r.code, r.stderr.as_str()), (Some(0), "")); // 39
    assert!(!r.stdout.contains("Chains:"));
    fs::remove_file(&db).expect("rm");
    let r = list(&root.display().to_string());
    assert!(!r.stdout.contains("Chains:"));
    assert!(!db.exists(), "vmrestore must never create the catalogue");
}

// 42-53, 56, 57, 59: --list-restore-points of every fixture VM, byte for byte.
#[test]
fn points_goldens() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    for vm in VMS {
        let s = Scratch::new();
        let r = s.run(&["--backup-path", &fx.root_str(), "--list-restore-points", vm]);
        assert_eq!(r.code, Some(0), "{vm}: {}", r.stderr);
        assert_eq!(r.stderr, "", "{vm}"); // 59
        assert!(s.logs().is_empty(), "{vm}"); // 59
        assert!(!r.stdout.contains("  Disks:"), "{vm}"); // 49
        assert_golden(
            &format!("points-{vm}.txt"),
            &mask_chain_sizes(&norm(&r.stdout, &fx.root_str())),
        );
    }
}

// 52: pointing at an archived chain: label = chain name, section "(archive)", no archive block.
#[test]
fn points_of_an_archive_path() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let r = run(&[
        "--list-restore-points",
        &fx.path("rc-wk-app/2026-W06/.archives/chain-2026-02-04"),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r
        .stdout
        .starts_with("\nRestore Points: chain-2026-02-04\n\n  ── (archive) ──\n"));
    assert!(!r.stdout.contains("Archived Chains:"));
    assert_golden(
        "points-rc-wk-app-archive.txt",
        &norm(&r.stdout, &fx.root_str()),
    );
    // the copy chain without vmconfig.copy.xml
    let r = run(&[
        "--list-restore-points",
        &fx.path("rc-mon-db/202601/.archives/chain-2026-01-27"),
    ]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout
            .contains("  0               2026-11-26 05:19:26  COPY (offline)  vda\n"),
        "{}",
        r.stdout
    ); // 46
}

// 43, 44, 45, 46, 47, 48, 50, 53, 56: targeted checks on the goldens' content.
#[test]
fn points_rows() {
    let fx = Fixture::shared();
    let root = fx.root_str();
    let rule = format!("  {}", "─".repeat(70));
    // 44, 45: row format; the date is the checkpoint's <creationTime> (the real backup
    // time, TZ=UTC), not a file time (issue: dates survive copies that drop mtimes)
    let r = points(&root, "rc-wk-app", &[]);
    assert!(r
        .stdout
        .contains("  0               2026-11-26 05:18:57  FULL (base)     vda\n"));
    // 43: periods newest first in version order
    let w07 = r.stdout.find("── 2026-W07 ──").expect("W07");
    let w06 = r.stdout.find("── 2026-W06 ──").expect("W06");
    assert!(w07 < w06);
    // 48: table header, rules, total + empty line
    assert!(r.stdout.contains(&format!(
        "  Restore Point   Date                 Type            Disk(s)\n{rule}\n"
    )));
    assert!(r.stdout.contains(&format!("{rule}\n  Total: 2\n\n")));
    // 47: numeric order 0..39
    let r = points(&root, "rc-long", &[]);
    let numbers: Vec<u32> = r
        .stdout
        .split("── (accumulate) ──")
        .nth(1)
        .expect("section")
        .split("Archived Chains:")
        .next()
        .expect("table")
        .lines()
        .filter_map(|l| {
            l.strip_prefix("  ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    assert!(r
        .stdout
        .contains("  Archived Chains:\n    chain-2026-07-03")); // 53
                                                                // 46: full-only period
    let r = points(&root, "rc-dly-web", &["--period", "20260204"]);
    assert!(r.stdout.contains("  Type: full\n"));
    assert!(
        r.stdout
            .contains("  0               2026-11-26 05:19:13  FULL (only)     vda\n"),
        "{}",
        r.stdout
    );
    // 50, 57: sda stops after checkpoint 2; the CD-ROM never makes the chain incomplete
    let r = points(&root, "rc-shrink", &[]);
    assert!(r
        .stdout
        .contains("  2               2026-11-26 06:05:12  Incremental     sda, vda, vdb\n"));
    assert!(r
        .stdout
        .contains("  3               2026-11-26 06:05:17  Incremental     vda, vdb\n"));
    assert!(!r.stdout.contains("INCOMPLETE"));
    // 56: a missing incremental marks rows from that point on, plus the explanation line
    let r = points(&root, "rc-brk-inc", &[]);
    assert!(r.stdout.contains("  Type: incremental  ⚠ INCOMPLETE\n"));
    assert!(r
        .stdout
        .contains("  1               2026-11-26 05:20:23  Incremental     vda\n"));
    assert!(
        r.stdout
            .contains("  2               2026-11-26 05:20:25  Incremental       ⚠ INCOMPLETE\n"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(
        "  ⚠ INCOMPLETE: missing vda.inc.virtnbdbackup.2.data — latest is not restorable (use --restore-point 1 or --include-incomplete)\n"
    ));
    // interrupted backup: the .partial is the reason
    let r = points(&root, "rc-damage", &["--period", "20260516"]);
    assert!(
        r.stdout
            .contains("partial vda.inc.virtnbdbackup.2.data.partial"),
        "{}",
        r.stdout
    );
}

// 54, 55: missing period / VM → plain stderr line, exit 5.
#[test]
fn points_not_found() {
    let fx = Fixture::shared();
    let root = fx.root_str();
    let r = points(&root, "rc-wk-app", &["--period", "2026-W09"]);
    assert_eq!(r.code, Some(5));
    assert_eq!(
        r.stderr,
        format!("Period not found: {root}/rc-wk-app/2026-W09\n")
    );
    let r = points(&root, "nosuch", &[]);
    assert_eq!(r.code, Some(5));
    assert_eq!(r.stderr, format!("VM not found: {root}/nosuch\n"));
}

// 56 (exact case), 58: synthetic damage on a private copy of the fixture.
#[test]
fn points_synthetic_completeness() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let rs = root.display().to_string();
    // 56: vmconfig 3 lists vdb but vdb.inc.virtnbdbackup.3.data is gone
    fs::remove_file(root.join("rc-multi-sql/2026-W08/vdb.inc.virtnbdbackup.3.data")).expect("rm");
    let r = points(&rs, "rc-multi-sql", &[]);
    assert!(
        r.stdout
            .contains("  2               2026-11-26 05:19:55  Incremental     sda, vda, vdb\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "  3               2026-11-26 05:19:57  Incremental     sda, vda  ⚠ INCOMPLETE\n"
        ),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("  ⚠ INCOMPLETE: missing vdb.inc.virtnbdbackup.3.data — latest is not restorable (use --restore-point 2"));
    // 58: a disk without a full backup (excluded from backup) never marks anything
    let cfg = root.join("rc-acc-files/vmconfig.virtnbdbackup.4.xml");
    let xml = fs::read_to_string(&cfg).expect("xml");
    let extra = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/x/excluded.qcow2'/><target dev='vdz' bus='virtio'/></disk>";
    fs::write(
        &cfg,
        xml.replacen("<devices>", &format!("<devices>{extra}"), 1),
    )
    .expect("write");
    let r = points(&rs, "rc-acc-files", &[]);
    assert_eq!(r.code, Some(0));
    assert!(!r.stdout.contains("INCOMPLETE"), "{}", r.stdout);
}

// The fixture hash helper notices a change (guards the guard).
#[test]
fn tree_hash_detects_changes() {
    let s = Scratch::new();
    let d = s.dir.path().join("t");
    touch(&d.join("a/b"));
    fs::create_dir_all(d.join("_state")).expect("mkdir");
    let h = tree_hash(&d);
    fs::write(d.join("_state/x"), b"1").expect("write");
    assert_eq!(tree_hash(&d), h, "_state is excluded");
    fs::write(d.join("a/b"), b"1").expect("write");
    assert_ne!(tree_hash(&d), h);
}

// --json for the listings parses and carries the documented keys.
#[test]
fn json_listings() {
    let fx = Fixture::shared();
    let r = run(&["--list", "--json", "--backup-path", &fx.root_str()]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["schema"], "vmrestore.list/1");
    let shrink = v["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|x| x["name"] == "rc-shrink")
        .expect("rc-shrink");
    assert_eq!(shrink["restore_points"], 5);
    assert_eq!(shrink["disks"], serde_json::json!(["vda", "vdb"]));
    assert_eq!(shrink["catalogue"]["last_backup"], "2026-06-30T21:10:00Z");
    let r = run(&[
        "--list-restore-points",
        "rc-brk-inc",
        "--json",
        "--backup-path",
        &fx.root_str(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["schema"], "vmrestore.restore-points/1");
    let sec = &v["sections"][0];
    assert_eq!(sec["incomplete"]["broken_at"], 2);
    assert_eq!(sec["restore_points"][3]["incomplete"], true);
    assert_eq!(sec["restore_points"][0]["date"], "2026-11-26 05:20:22");
    assert_eq!(sec["restore_points"][0]["date_source"], "checkpoint");
}

// 41, 59: the listings create no file at all, not even SQLite's -wal/-shm beside the
// catalogue (the fixture's WAL side files are removed first).
#[test]
fn listings_create_no_files() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    for f in ["vmbackup.db-wal", "vmbackup.db-shm"] {
        fs::remove_file(root.join("_state").join(f)).expect("rm side file");
    }
    let files = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = (files(&root.join("_state")), tree_hash(&root));
    let rs = root.display().to_string();
    assert!(list(&rs).stdout.contains("Chains:"));
    assert_eq!(points(&rs, "rc-long", &[]).code, Some(0));
    assert_eq!((files(&root.join("_state")), tree_hash(&root)), before);
    assert!(s.logs().is_empty());
}

// Restore-point dates are backup times from the backup's own metadata: a copy of the
// tree that did not keep file times (rsync without -t, a git checkout) shows the same
// dates; a point with no recorded time shows a file time, marked with `*`.
#[test]
fn point_dates_survive_a_copy_without_mtimes() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let rs = root.display().to_string();
    let before = points(&rs, "rc-acc-files", &[]).stdout;
    let now = std::time::SystemTime::now();
    let mut all = Vec::new();
    walk_files(&root.join("rc-acc-files"), &mut all);
    for f in &all {
        File::open(f)
            .and_then(|h| h.set_times(fs::FileTimes::new().set_modified(now)))
            .expect("touch");
    }
    let after = points(&rs, "rc-acc-files", &[]).stdout;
    assert_eq!(before, after, "dates moved with the file times");
    assert!(!after.contains('*'), "{after}");
    // a point whose checkpoint XML is gone keeps its place, dated from its stream
    fs::remove_file(root.join("rc-acc-files/checkpoints/virtnbdbackup.4.xml")).expect("rm");
    let r = points(&rs, "rc-acc-files", &[]);
    assert!(r.stdout.contains("  Total: 5\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains(
            "  ⚠ Restore point 4: checkpoints/virtnbdbackup.4.xml missing (its data is present)"
        ),
        "{}",
        r.stdout
    );
}

fn walk_files(p: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(p).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            walk_files(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}
