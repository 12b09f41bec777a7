//! Every restore point of every real fixture chain, restored by the engine into raw
//! files, has the recorded sha256; damaged chains fail naming the file, leaving no
//! file under the final name.

use std::path::{Path, PathBuf};

use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, DiskPlan, StagedPath};
use nbdfmt::BackupSet;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-chains")
}

fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).expect("open");
    std::io::copy(&mut f, &mut h).expect("hash");
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

fn restore(set: &BackupSet, disks: &[String], n: u32, out: &Path) -> engine::Result<Vec<PathBuf>> {
    restore_with(set, disks, n, out, &ApplyOptions::default())
}

fn restore_with(
    set: &BackupSet,
    disks: &[String],
    n: u32,
    out: &Path,
    opts: &ApplyOptions,
) -> engine::Result<Vec<PathBuf>> {
    let plans = disks
        .iter()
        .map(|d| DiskPlan::for_point(set, d, n))
        .collect::<engine::Result<Vec<_>>>()?;
    let staged: Vec<StagedPath> = disks
        .iter()
        .map(|d| StagedPath::new(&out.join(format!("{d}.raw"))))
        .collect();
    let mut targets: Vec<Box<dyn engine::BlockTarget>> = Vec::new();
    for (p, s) in plans.iter().zip(&staged) {
        targets.push(Box::new(RawTarget::create(s.temp_path(), p.virtual_size)?));
    }
    let report = apply(&plans, targets, opts)?;
    assert!(report.disks.iter().all(|d| d.readback_verified));
    staged.into_iter().map(|s| s.commit(false)).collect()
}

#[test]
fn every_fixture_point_restores_exactly() {
    let root = fixtures();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(root.join("expected/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut ok, mut refused) = (0, 0);
    for (vm, v) in manifest["vms"].as_object().expect("vms") {
        for chain in v["chains"].as_array().expect("chains") {
            let set =
                BackupSet::scan(&root.join(chain["dir"].as_str().expect("dir"))).expect("scan");
            for rp in chain["restore_points"].as_array().expect("points") {
                if rp.get("interrupted").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                let name = rp["name"].as_str().expect("name");
                let n = if name == "copy" {
                    0
                } else {
                    nbdfmt::sidecar::checkpoint_number(name).expect("n")
                };
                let want = rp["disks"].as_object().cloned().unwrap_or_default();
                let disks: Vec<String> = set
                    .point(n)
                    .expect("point")
                    .expected
                    .iter()
                    .cloned()
                    .collect();
                let out = tmp.path().join(format!(
                    "{vm}-{}-{name}",
                    chain["key"].as_str().unwrap_or("x").replace('/', "_")
                ));
                std::fs::create_dir_all(&out).expect("mkdir");
                // Every other point through the threaded pipeline (the fixtures are small
                // enough to be restored inline by default).
                let opts = ApplyOptions {
                    inline_max_bytes: if (ok + refused) % 2 == 0 {
                        0
                    } else {
                        engine::apply::INLINE_MAX_BYTES
                    },
                    ..ApplyOptions::default()
                };
                let r = restore_with(&set, &disks, n, &out, &opts);
                match (rp["expect"].as_str(), r) {
                    (Some("ok" | "degraded"), Ok(files)) => {
                        for (d, f) in disks.iter().zip(files) {
                            assert_eq!(
                                sha256_file(&f),
                                want[d]["sha256"].as_str().expect("sha"),
                                "{vm} {name} {d}"
                            );
                        }
                        ok += 1;
                    }
                    (Some("error"), Err(e)) => {
                        refused += 1;
                        // nothing under a final name
                        for d in &disks {
                            assert!(!out.join(format!("{d}.raw")).exists(), "{vm} {name}: {e}");
                        }
                        assert_eq!(
                            std::fs::read_dir(&out).expect("ls").count(),
                            0,
                            "temp files left: {e}"
                        );
                    }
                    (exp, r) => panic!("{vm} {name}: expected {exp:?}, got {:?}", r.map(|_| ())),
                }
            }
        }
    }
    assert!(ok > 100 && refused >= 8, "ok {ok}, refused {refused}");
}

#[test]
fn bitflip_is_caught_by_the_checksum_with_the_file_named() {
    let set = BackupSet::scan(&fixtures().join("backups/rc-damage/20260515")).expect("scan");
    let tmp = tempfile::tempdir().expect("tmp");
    let e = restore(&set, &["vda".into()], 0, tmp.path()).expect_err("must fail");
    assert_eq!(e.kind(), engine::ErrorKind::CorruptBackup);
    let msg = e.to_string();
    assert!(
        msg.contains("vda.full.data") && msg.contains("checksum mismatch"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0);
}

#[test]
fn truncated_full_fails_with_file_and_offset() {
    let set = BackupSet::scan(&fixtures().join("backups/rc-damage/20260513")).expect("scan");
    let tmp = tempfile::tempdir().expect("tmp");
    let e = restore(&set, &["vda".into()], 0, tmp.path()).expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("vda.full.data") && msg.contains("byte"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0);
}

/// A differential taken after the last incremental is part of "latest", and only the
/// newest differential counts; a restore of checkpoint N ignores it.
#[test]
fn trailing_differential_is_applied_for_latest_only() {
    use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
    let dir = tempfile::tempdir().expect("tmp");
    let size = 1u64 << 20;
    let w = |name: &str, o: StreamOptions, frames: Vec<WriteFrame>| {
        std::fs::write(dir.path().join(name), write_stream(&o, &frames)).expect("write")
    };
    w(
        "vda.full.data",
        StreamOptions::full("vda", size, 0),
        vec![
            WriteFrame::Data(0, vec![1; 4096]),
            WriteFrame::Zero(4096, size - 4096),
        ],
    );
    w(
        "vda.inc.virtnbdbackup.1.data",
        StreamOptions::inc("vda", 1, size, 0),
        vec![WriteFrame::Data(8192, vec![2; 4096])],
    );
    let mut d1 = StreamOptions::inc("vda", 2, size, 0);
    d1.parent_checkpoint = Some("virtnbdbackup.1".into());
    w(
        "vda.diff.1700000000.data",
        d1.clone(),
        vec![WriteFrame::Data(16384, vec![3; 4096])],
    );
    w(
        "vda.diff.1700000100.data",
        d1,
        vec![
            WriteFrame::Data(16384, vec![4; 4096]),
            WriteFrame::Data(65536, vec![5; 4096]),
        ],
    );
    let set = BackupSet::scan(dir.path()).expect("scan");
    let latest = DiskPlan::for_point_with(&set, "vda", 1, true).expect("plan");
    assert_eq!(latest.files.len(), 3);
    assert!(latest.files[2].path.ends_with("vda.diff.1700000100.data"));
    assert_eq!(latest.data_bytes(), 4 * 4096);
    let point1 = DiskPlan::for_point(&set, "vda", 1).expect("plan");
    assert_eq!(point1.files.len(), 2);
    assert_eq!(point1.data_bytes(), 2 * 4096);
}

/// Uncompressed files are read piece by piece with `pread`; with `.chksum` present, the
/// bytes between the live pieces still go through adler32: a flipped byte in data the
/// incremental superseded fails the restore (and is harmless without the check), and a
/// file cut short inside a live piece is reported with the file and the byte offset.
#[test]
fn plain_scan_hashes_superseded_bytes_and_reports_truncation() {
    use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
    let size = 4u64 << 20;
    let make = |dir: &Path| {
        let full = write_stream(
            &StreamOptions::full("vda", size, 0),
            &[
                WriteFrame::Data(0, vec![1; 2 << 20]),
                WriteFrame::Zero(2 << 20, size - (2 << 20)),
            ],
        );
        let inc = write_stream(
            &StreamOptions::inc("vda", 1, size, 0),
            &[WriteFrame::Data(0, vec![2; 1 << 20])],
        );
        for (name, bytes) in [
            ("vda.full.data", &full),
            ("vda.inc.virtnbdbackup.1.data", &inc),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes).expect("write");
            let sum = nbdfmt::checksum::adler32_of(&bytes[..]).expect("adler");
            std::fs::write(nbdfmt::checksum::chksum_path(&p), sum.to_string()).expect("chksum");
        }
        full
    };
    let flip = |p: &Path, at: usize| {
        let mut b = std::fs::read(p).expect("read");
        b[at] ^= 0x40;
        std::fs::write(p, b).expect("write");
    };

    // Intact: point 1 = 1 MiB of 2s, then 1 MiB of 1s.
    let dir = tempfile::tempdir().expect("tmp");
    let full = make(dir.path());
    let set = BackupSet::scan(dir.path()).expect("scan");
    let out = tempfile::tempdir().expect("tmp");
    let files = restore(&set, &["vda".into()], 1, out.path()).expect("restore");
    let got = std::fs::read(&files[0]).expect("read");
    assert!(got[..1 << 20].iter().all(|&b| b == 2));
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 1));
    assert!(got[2 << 20..].iter().all(|&b| b == 0));

    // The full's first MiB is superseded by the incremental.
    let payload = full
        .windows(4)
        .position(|w| w == [1, 1, 1, 1])
        .expect("payload");
    {
        let at = payload + 4096;
        let dir = tempfile::tempdir().expect("tmp");
        make(dir.path());
        flip(&dir.path().join("vda.full.data"), at);
        let set = BackupSet::scan(dir.path()).expect("scan");
        let out = tempfile::tempdir().expect("tmp");
        let e = restore(&set, &["vda".into()], 1, out.path()).expect_err("must fail");
        let msg = e.to_string();
        assert!(
            msg.contains("vda.full.data") && msg.contains("checksum mismatch"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(out.path()).expect("ls").count(), 0);
        // Without checksum verification the superseded byte does not matter.
        let plan = DiskPlan::for_point(&set, "vda", 1).expect("plan");
        let s = StagedPath::new(&out.path().join("nv.raw"));
        let t = RawTarget::create(s.temp_path(), plan.virtual_size).expect("target");
        let opts = ApplyOptions {
            verify_checksums: false,
            ..ApplyOptions::default()
        };
        apply(&[plan], vec![Box::new(t)], &opts).expect("superseded damage is harmless");
    }

    // Cut inside the live second MiB of the full: the error names the file and offset.
    let dir = tempfile::tempdir().expect("tmp");
    make(dir.path());
    let p = dir.path().join("vda.full.data");
    let cut = (payload + (3 << 19)) as u64;
    let set = BackupSet::scan(dir.path()).expect("scan");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(cut)
        .expect("truncate");
    let out = tempfile::tempdir().expect("tmp");
    let e = restore(&set, &["vda".into()], 1, out.path()).expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("vda.full.data") && msg.contains("byte"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(out.path()).expect("ls").count(), 0);
}
