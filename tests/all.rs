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

/// A VM whose chain has a corrupt frame header exits 6 restored alone; under `--all`
/// its row and the run's exit say the same (it was 5: every planning failure was
/// reported as a refusal).
#[test]
fn a_corrupt_stream_is_the_same_category_alone_and_under_all() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let f = root.join("rc-v247-chk/202603/vda.inc.virtnbdbackup.1.data");
    let mut b = std::fs::read(&f).expect("read");
    let t0 = std::fs::metadata(&f)
        .and_then(|m| m.modified())
        .expect("mtime");
    b[379] ^= 0xff; // the first frame header after the metadata
    std::fs::write(&f, &b).expect("write");
    std::fs::write(
        root.join("rc-v247-chk/202603/vda.inc.virtnbdbackup.1.data.chksum"),
        simd_adler(&b).to_string(),
    )
    .expect("chksum");
    std::fs::File::open(&f)
        .and_then(|h| h.set_times(std::fs::FileTimes::new().set_modified(t0)))
        .expect("times");
    let root_s = root.to_str().expect("utf8");
    let common = [
        "--skip-config",
        "--backup-path",
        root_s,
        "--connect",
        "test:///default",
    ];
    let out = s.dir.path().join("o").display().to_string();
    let alone = s.run(
        &[
            &["--vm", "rc-v247-chk", "--restore-path", &out][..],
            &common,
        ]
        .concat(),
    );
    assert_eq!(alone.code, Some(6), "{}", alone.stderr);
    let all = s.run(
        &[
            &[
                "--all",
                "--only",
                "rc-v247-chk",
                "--restore-path",
                &out,
                "--json",
            ][..],
            &common,
        ]
        .concat(),
    );
    assert_eq!(all.code, Some(6), "{}", all.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&all.stdout[all.stdout.find('{').expect("json")..]).expect("json");
    assert_eq!(doc["vms"][0]["exit_code"], 6, "{doc}");
}

/// adler32 as virtnbdbackup writes it in `.chksum`.
fn simd_adler(b: &[u8]) -> u32 {
    let (mut a, mut s) = (1u32, 0u32);
    for &x in b {
        a = (a + u32::from(x)) % 65521;
        s = (s + a) % 65521;
    }
    (s << 16) | a
}

/// Two VM directories whose configs name one domain (a copy of a backup tree beside
/// the original, its disks renamed): under `--all` the second DR would replace the
/// first's definition. Both are refused, saying why; nothing is written.
#[test]
fn two_backups_that_define_one_domain_are_both_refused() {
    let s = Scratch::new();
    let root = prepare_backups(s.dir.path());
    let twin = root.join("rc-acc-twin");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(root.join("rc-acc-files"))
        .arg(&twin)
        .status()
        .expect("cp");
    assert!(ok.success());
    for e in std::fs::read_dir(&twin).expect("ls").flatten() {
        let p = e.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmconfig."))
        {
            let x = std::fs::read_to_string(&p).expect("xml");
            std::fs::write(&p, x.replace("rc-acc-files-vda", "rc-acc-twin-vda")).expect("w");
        }
    }
    let out = s.dir.path().join("out");
    let r = s.run(&[
        "--all",
        "--only",
        "rc-acc-files,rc-acc-twin",
        "--backup-path",
        root.to_str().expect("utf8"),
        "--restore-path",
        out.to_str().expect("utf8"),
        "--connect",
        "test:///default",
        "--json",
    ]);
    assert_eq!(r.code, Some(5), "{}\n{}", r.stdout, r.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&r.stdout[r.stdout.find('{').expect("json")..]).expect("json");
    let rows = doc["vms"].as_array().expect("vms");
    assert_eq!(rows.len(), 2, "{doc}");
    for row in rows {
        assert_eq!(row["exit_code"], 5, "{row}");
        assert!(
            row["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("the domain 'rc-acc-files' is also defined by")),
            "{row}"
        );
    }
    assert!(
        !out.exists() || walk_files(&out) == 0,
        "a refused VM wrote into {}",
        out.display()
    );
}

fn walk_files(p: &Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
