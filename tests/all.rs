//! `--all`: whole-host restore of the bundled corpus. Every VM whose latest chain is
//! intact is restored byte-exact; the damaged ones are reported with their reason;
//! the exit code is the most severe category; the dry-run plan lists exactly what
//! the real run then restores.

mod clisupport;

use std::path::Path;
use std::process::Command;

use clisupport::{expected_sha256, prepare_backups, Scratch};

#[test]
fn whole_host_restore_of_the_corpus() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let out = s.dir.path().join("out");
    let base = [
        "--all",
        "--skip-config",
        "--backup-path",
        root.to_str().expect("utf8"),
        "--restore-path",
        out.to_str().expect("utf8"),
        "--connect",
        "test:///default",
        "--json",
    ];
    let dry = s.run(&[&base[..], &["--dry-run"]].concat());
    let plan: serde_json::Value =
        serde_json::from_str(&dry.stdout[dry.stdout.find('{').expect("json")..]).expect("dry json");
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    let r = s.run(&base);
    assert_eq!(
        r.code,
        Some(5),
        "the damaged chains make it exit 5\n{}",
        r.stderr
    );
    let doc: serde_json::Value =
        serde_json::from_str(&r.stdout[r.stdout.find('{').expect("json")..]).expect("json");
    let rows = doc["vms"].as_array().expect("vms");
    let ok: Vec<&serde_json::Value> = rows.iter().filter(|v| v["exit_code"] == 0).collect();
    assert!(ok.len() >= 10, "{rows:?}");
    // the plan said exactly which VMs would be restored
    let planned: Vec<&str> = plan["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter(|v| v["exit_code"] == 0)
        .filter_map(|v| v["vm"].as_str())
        .collect();
    let restored: Vec<&str> = ok.iter().filter_map(|v| v["vm"].as_str()).collect();
    assert_eq!(planned, restored);
    for bad in rows.iter().filter(|v| v["exit_code"] != 0) {
        assert!(
            bad["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("INCOMPLETE")),
            "a refused VM says why: {bad}"
        );
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        return;
    }
    for v in ok {
        let vm = v["vm"].as_str().expect("vm");
        let source = Path::new(v["source"].as_str().expect("source"));
        let chain = source
            .strip_prefix(&root)
            .expect("under root")
            .components()
            .skip(1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let chain = if chain.is_empty() {
            "accumulate".to_owned()
        } else {
            chain
        };
        let point = format!("virtnbdbackup.{}", v["checkpoint"].as_str().expect("cp"));
        for d in v["disks"].as_str().expect("disks").split(',') {
            let img = std::fs::read_dir(&out)
                .expect("out")
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.starts_with(vm) && n.contains(&format!("-{d}."))
                })
                .unwrap_or_else(|| panic!("{vm}/{d} not in {}", out.display()));
            assert_eq!(
                clisupport::guest_sha(&img),
                expected_sha256(vm, &chain, &point, d),
                "{vm} {chain} {point} {d}"
            );
        }
    }
}
