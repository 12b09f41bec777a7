//! Golden tests over real virtnbdbackup output (tests/fixtures of the workspace):
//! every stream parses, every `.chksum` verifies, every chain orders and links, every
//! restore point expands to the recorded disk content, every damaged case is named.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use nbdfmt::checksum::{verify_file, ChecksumStatus};
use nbdfmt::reader::{read_all, StreamIndex};
use nbdfmt::{BackupSet, ErrorKind, ProblemKind, StreamContent};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("fixture dir readable") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn data_files() -> Vec<PathBuf> {
    let mut all = Vec::new();
    walk(&fixtures().join("real-chains/backups"), &mut all);
    all.retain(|p| p.extension().is_some_and(|e| e == "data"));
    all.sort();
    assert!(
        all.len() > 120,
        "fixture tree incomplete: {} data files",
        all.len()
    );
    all
}

const TRUNCATED: &str = "rc-damage/20260513/vda.full.data";
const BITFLIP: &str = "rc-damage/20260515/vda.full.data";

#[test]
fn every_stream_parses_to_its_end() {
    for p in data_files() {
        let f = BufReader::new(File::open(&p).expect("open"));
        let r = StreamIndex::read(f)
            .and_then(|_| read_all(BufReader::new(File::open(&p).expect("open")), |_, _| {}));
        if p.ends_with(TRUNCATED) {
            let e = r.expect_err("truncated full must fail");
            assert!(e.offset().is_some(), "{e}");
            assert!(
                e.offset().unwrap_or(0) <= 59_701,
                "offset inside the file: {e}"
            );
        } else {
            let n = r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let meta = nbdfmt::reader::read_meta(File::open(&p).expect("open")).expect("meta");
            assert_eq!(n, meta.data_size, "{}", p.display());
        }
    }
}

#[test]
fn every_chksum_verifies_except_the_bitflip() {
    let mut checked = 0;
    for p in data_files() {
        if !nbdfmt::checksum::chksum_path(&p).exists() {
            continue;
        }
        checked += 1;
        let r = verify_file(&p);
        if p.ends_with(BITFLIP) {
            let e = r.expect_err("bit flip must be caught");
            assert!(
                matches!(e.kind(), ErrorKind::ChecksumMismatch { .. }),
                "{e}"
            );
            assert_eq!(e.path(), Some(p.as_path()));
        } else {
            assert!(
                matches!(r, Ok(ChecksumStatus::Ok(_))),
                "{}: {r:?}",
                p.display()
            );
        }
    }
    assert!(checked > 40, "only {checked} checksums");
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn expand(files: &[&nbdfmt::StreamFile], size: u64) -> nbdfmt::Result<Vec<u8>> {
    let mut disk = vec![0u8; size as usize];
    for f in files {
        if let StreamContent::RawImage = f.content {
            let raw = std::fs::read(&f.path).expect("raw image");
            disk[..raw.len()].copy_from_slice(&raw);
            continue;
        }
        let r = BufReader::new(File::open(&f.path).expect("open"));
        read_all(r, |at, b| {
            disk[at as usize..at as usize + b.len()].copy_from_slice(b)
        })
        .map_err(|e| e.in_file(&f.path))?;
    }
    Ok(disk)
}

#[test]
fn format_examples_expand_as_documented() {
    let dir = fixtures().join("format-examples");
    // adler32 and expanded SHA-256 prefixes from format-spec §10
    let cases = [
        (
            "ex1-compressed-empty-inc.vdb.inc.virtnbdbackup.1.data",
            3_642_127_745u32,
            "80a37211",
        ),
        (
            "ex2-compressed-inc-64k.vda.inc.virtnbdbackup.1.data",
            3_504_047_947,
            "26906e25",
        ),
        (
            "ex3-compressed-full-with-zero-frames.vdb.full.data",
            2_287_514_776,
            "e4297b07",
        ),
        (
            "ex4-compressed-full-chunked-34MiB.vda.full.data",
            1_791_815_226,
            "509ffa74",
        ),
        (
            "ex5-uncompressed-inc.vdb.inc.virtnbdbackup.1.data",
            2_098_953_568,
            "d2cc8cf0",
        ),
        (
            "ex6-uncompressed-empty-diff.vdb.diff.1795665952.data",
            3_074_256_552,
            "80a37211",
        ),
    ];
    for (name, adler, sha) in cases {
        let p = dir.join(name);
        let sum = nbdfmt::checksum::adler32_of(File::open(&p).expect("open")).expect("read");
        assert_eq!(sum, adler, "{name}");
        let idx = StreamIndex::read(File::open(&p).expect("open")).expect(name);
        let mut disk = vec![0u8; idx.meta.virtual_size as usize];
        read_all(File::open(&p).expect("open"), |at, b| {
            disk[at as usize..at as usize + b.len()].copy_from_slice(b)
        })
        .expect(name);
        assert!(sha256(&disk).starts_with(sha), "{name}");
    }
    let ex6 = StreamIndex::read(File::open(dir.join(cases[5].0)).expect("open")).expect("ex6");
    assert_eq!(
        ex6.meta.checkpoint_name, "virtnbdbackup.2",
        "a diff carries the next checkpoint's name"
    );
    let ex4 = StreamIndex::read(File::open(dir.join(cases[3].0)).expect("open")).expect("ex4");
    assert_eq!(
        ex4.data_frames().nth(2).map(|f| f.lz4_frames.clone()),
        Some(vec![140_312, 8792])
    );
}

/// Each restore point of every chain in the manifest: ok points expand to the
/// recorded sha256; error points are refused somewhere (problem, stream error or
/// checksum mismatch), never silently different.
#[test]
fn every_restore_point_matches_the_manifest() {
    let root = fixtures().join("real-chains");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(root.join("expected/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let mut ok_points = 0;
    let mut refused = 0;
    for (vm, v) in manifest["vms"].as_object().expect("vms") {
        for chain in v["chains"].as_array().expect("chains") {
            let dir = root.join(chain["dir"].as_str().expect("dir"));
            let set = BackupSet::scan(&dir).unwrap_or_else(|e| panic!("{vm}: {e}"));
            for rp in chain["restore_points"].as_array().expect("points") {
                let name = rp["name"].as_str().expect("name");
                let expect = rp["expect"].as_str().unwrap_or("");
                if rp.get("interrupted").and_then(Value::as_bool) == Some(true) {
                    let n = nbdfmt::sidecar::checkpoint_number(name)
                        .expect("interrupted point is a checkpoint");
                    let p = set.point(n).expect("interrupted point is listed");
                    assert!(
                        p.problems.iter().any(|x| x.kind == ProblemKind::Partial),
                        "{vm} {name}: {:?}",
                        p.problems
                    );
                    refused += 1;
                    continue;
                }
                let n = if name == "copy" {
                    0
                } else {
                    nbdfmt::sidecar::checkpoint_number(name).expect("point name")
                };
                let disks = rp["disks"].as_object().cloned().unwrap_or_default();
                let mut outcome: Result<(), String> = Ok(());
                if let Some(p) = set
                    .points
                    .iter()
                    .take(n as usize + 1)
                    .find(|p| !p.problems.is_empty())
                {
                    let only_sidecar = p
                        .problems
                        .iter()
                        .all(|x| x.kind == ProblemKind::MissingQcowJson);
                    if !only_sidecar {
                        outcome = Err(format!("incomplete: {}", p.problems[0]));
                    }
                }
                let expected_disks = &set.point(n).expect("point").expected;
                assert_eq!(
                    expected_disks.iter().cloned().collect::<Vec<_>>(),
                    disks
                        .keys()
                        .cloned()
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>(),
                    "{vm} {name}: disk set"
                );
                for (disk, want) in &disks {
                    if outcome.is_err() {
                        break;
                    }
                    let files = match set.chain(disk, n) {
                        Ok(f) => f,
                        Err(p) => {
                            outcome = Err(p.to_string());
                            break;
                        }
                    };
                    for f in &files {
                        if let Err(e) = verify_file(&f.path) {
                            outcome = Err(e.to_string());
                        }
                    }
                    if outcome.is_err() {
                        break;
                    }
                    match expand(&files, want["size"].as_u64().expect("size")) {
                        Ok(img) => {
                            let got = sha256(&img);
                            if got != want["sha256"].as_str().expect("sha") {
                                outcome = Err(format!("{disk}: content differs"));
                            }
                        }
                        Err(e) => outcome = Err(e.to_string()),
                    }
                }
                match (expect, &outcome) {
                    ("ok" | "degraded", Ok(())) => ok_points += 1,
                    ("error", Err(_)) => refused += 1,
                    _ => panic!(
                        "{vm} {} {name}: expected {expect}, got {outcome:?}",
                        chain["key"]
                    ),
                }
            }
        }
    }
    assert!(ok_points > 100, "{ok_points} ok points");
    assert!(refused >= 10, "{refused} refused points");
}

#[test]
fn damaged_sets_name_the_problem() {
    let b = fixtures().join("real-chains/backups/rc-damage");
    let s = BackupSet::scan(&b.join("20260512")).expect("scan");
    let p = s.broken_at().expect("broken");
    assert_eq!(p.checkpoint, 3);
    assert_eq!(
        p.problems[0].to_string(),
        "missing vda.inc.virtnbdbackup.3.data"
    );
    let s = BackupSet::scan(&b.join("20260516")).expect("scan");
    assert_eq!(
        s.broken_at().map(|p| p.problems[0].to_string()),
        Some("partial vda.inc.virtnbdbackup.2.data.partial".into())
    );
    let s = BackupSet::scan(&b.join("20260513")).expect("scan");
    let p = s
        .broken_at()
        .expect("a truncated full is found at scan time");
    assert_eq!(p.checkpoint, 0);
    assert!(
        p.problems[0].to_string().contains("truncated"),
        "{}",
        p.problems[0]
    );
    let s = BackupSet::scan(&b.join("20260511")).expect("scan");
    assert_eq!(
        s.broken_at().map(|p| p.problems[0].to_string()),
        Some("missing vda.virtnbdbackup.2.qcow.json".into())
    );
    let s =
        BackupSet::scan(&fixtures().join("real-chains/backups/rc-shrink/202606")).expect("scan");
    let sets: Vec<Vec<String>> = s
        .points
        .iter()
        .map(|p| p.expected.iter().cloned().collect())
        .collect();
    assert_eq!(sets[2], vec!["sda", "vda", "vdb"]);
    assert_eq!(sets[3], vec!["vda", "vdb"]);
    assert!(
        s.broken_at().is_none(),
        "a removed disk is not a missing one"
    );
}

/// A file whose name is not UTF-8 beside a chain is no backup file: it never becomes
/// a disk (a lossy `vd\u{FFFD}` would name an output file nobody named); the chain is
/// read as before.
#[test]
fn a_name_that_is_not_utf8_is_no_disk() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tmp");
    let opts = nbdfmt::writer::StreamOptions::full("vda", 1 << 20, 0);
    let frames = [nbdfmt::writer::WriteFrame::Data(0, vec![7u8; 4096])];
    let stream = nbdfmt::writer::write_stream(&opts, &frames);
    std::fs::write(dir.path().join("vda.full.data"), &stream).expect("write");
    let odd = std::ffi::OsStr::from_bytes(b"vd\xff.full.data");
    std::fs::write(dir.path().join(odd), &stream).expect("write");
    let set = BackupSet::scan(dir.path()).expect("scan");
    assert_eq!(set.disks.keys().collect::<Vec<_>>(), ["vda"]);
    assert!(
        set.points[0].problems.is_empty(),
        "{:?}",
        set.points[0].problems
    );
}
