//! `--verify` = "this restore point will restore" (issue 17, item 1): every chain of the
//! real-chain corpus is judged as `expected/manifest.json` says, per restore point;
//! damage made in scratch copies (an LZ4 payload byte, a 2^63 frame length, swapped
//! incrementals, `.chksum` files removed) fails with exit 6 naming file and offset, or
//! passes with words that say what was not proven; SIGINT stops the restore pass.

mod clisupport;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clisupport::{fixture_src, prepare_backups, Fixture, Run, Scratch};
use serde_json::Value;

fn manifest() -> Value {
    serde_json::from_slice(
        &fs::read(fixture_src().join("expected/manifest.json")).expect("manifest"),
    )
    .expect("manifest json")
}

/// `--verify <dir> --json` (path-aware, no config needed), with its document.
fn verify_json(dir: &Path) -> (Run, Value) {
    let r = Scratch::new().run(&["--verify", &dir.display().to_string(), "--json"]);
    let v = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", r.stdout, r.stderr));
    (r, v)
}

/// The final `Verification …` line of a run.
fn verdict(r: &Run) -> String {
    r.stderr
        .lines()
        .rfind(|l| l.contains("Verification "))
        .unwrap_or_else(|| panic!("no verdict in\n{}", r.stderr))
        .to_owned()
}

/// The files the manifest names as a chain's damage: the damaged file, the missing
/// files, the `.partial` an interrupted backup left.
fn damage_files(chain: &Value) -> Vec<String> {
    let mut v: Vec<String> = chain["damage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["file"].as_str().map(str::to_owned))
        .collect();
    for p in chain["restore_points"].as_array().expect("points") {
        v.extend(
            p["missing_files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned)),
        );
        if let Some(files) = p["files_written"].as_object() {
            v.extend(files.keys().filter(|f| f.ends_with(".partial")).cloned());
        }
    }
    v
}

/// A scratch copy of one fixture chain dir (relative to `backups/`).
fn scratch_chain(s: &Scratch, rel: &str) -> PathBuf {
    let root = prepare_backups(s.dir.path());
    root.join(rel)
}

fn flip(path: &Path, at: u64, mask: u8) {
    let mut b = fs::read(path).expect("read");
    b[usize::try_from(at).expect("small")] ^= mask;
    fs::write(path, b).expect("write");
}

fn first_data_frame(path: &Path) -> nbdfmt::Frame {
    let index = nbdfmt::StreamIndex::read_file(fs::File::open(path).expect("open")).expect("index");
    let first = index.data_frames().next().expect("a data frame").clone();
    first
}

// Every chain of the corpus, every restore point: `ok` is restorable, `error` is not,
// `degraded` (only a qcow.json missing) is refused as the restore refuses it without
// --include-incomplete, with a WARN that its data verified. Exit 0 exactly when every
// point is `ok`; a failure names one of the damaged files, a pass never claims
// checksums it did not verify.
#[test]
fn every_chain_of_the_corpus_is_judged_as_the_manifest_says() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let m = manifest();
    let mut chains = 0;
    for (vm, v) in m["vms"].as_object().expect("vms") {
        for chain in v["chains"].as_array().expect("chains") {
            let rel = chain["dir"].as_str().expect("dir");
            let dir = fx
                .root
                .join(rel.strip_prefix("backups/").expect("under backups"));
            let want: Vec<&str> = chain["restore_points"]
                .as_array()
                .expect("points")
                .iter()
                .map(|p| p["expect"].as_str().expect("expect"))
                .collect();
            let (r, doc) = verify_json(&dir);
            let what = format!("{vm} {rel}: {}", r.stderr);
            let got = doc["restore_points"].as_array().expect("restore_points");
            assert_eq!(got.len(), want.len(), "{what}");
            for (p, w) in got.iter().zip(&want) {
                assert_eq!(p["restorable"].as_bool(), Some(*w == "ok"), "{p} {what}");
                assert_eq!(p["reason"].is_null(), *w == "ok", "{p} {what}");
            }
            let all_ok = want.iter().all(|w| *w == "ok");
            assert_eq!(doc["schema"], "vmrestore.verify/2");
            assert_eq!(doc["passed"].as_bool(), Some(all_ok), "{what}");
            assert_eq!(r.code, Some(if all_ok { 0 } else { 6 }), "{what}");
            let line = verdict(&r);
            assert!(!line.contains("checksums are valid"), "{line}");
            if all_ok {
                assert!(
                    line.contains("INFO: Verification passed: every restore point is restorable"),
                    "{line}"
                );
                let files = doc["files"].as_array().expect("files");
                let recorded = files.iter().filter(|f| f["checksum"] == "ok").count();
                if recorded == files.len() {
                    assert!(
                        line.ends_with(&format!("; {recorded} checksums verified"))
                            || line.ends_with("; 1 checksum verified"),
                        "{line}"
                    );
                } else if recorded == 0 {
                    assert!(
                        line.contains(", structure verified; no checksums recorded — "),
                        "{line}"
                    );
                } else {
                    assert!(
                        line.contains(&format!(" of {} files ", files.len())),
                        "{line}"
                    );
                }
            } else {
                assert!(
                    line.contains("ERROR: Verification FAILED: restore point"),
                    "{line}"
                );
                let named = damage_files(chain);
                assert!(
                    named.iter().any(|f| line.contains(f.as_str())),
                    "{line} names none of {named:?}"
                );
                let first_bad = got
                    .iter()
                    .find(|p| p["restorable"] == false)
                    .expect("a bad point");
                let reason = first_bad["reason"].as_str().expect("reason");
                assert!(
                    named.iter().any(|f| reason.contains(f.as_str())),
                    "{reason}"
                );
                let good: Vec<u64> = got
                    .iter()
                    .filter(|p| p["restorable"] == true)
                    .map(|p| p["restore_point"].as_u64().expect("n"))
                    .collect();
                if good.is_empty() {
                    assert!(line.ends_with("; no restore point is restorable"), "{line}");
                } else {
                    assert!(
                        line.contains(" restorable") && line.contains(&format!("{}", good[0])),
                        "{line}"
                    );
                }
            }
            if want.contains(&"degraded") {
                assert!(
                    r.stderr.contains("only side files: the data verified, and --include-incomplete restores them"),
                    "{what}"
                );
            }
            chains += 1;
        }
    }
    assert!(chains >= 20, "{chains} chains");
}

// The damaged periods of rc-damage, by name: the exact verdicts an admin reads.
#[test]
fn rc_damage_periods_fail_with_exit_6_naming_file_and_offset() {
    let fx = Fixture::shared();
    let _g = fx.guard();
    let run = |period: &str| {
        Scratch::new().run(&[
            "--backup-path",
            &fx.root_str(),
            "--verify",
            "rc-damage",
            "--period",
            period,
        ])
    };
    for (period, want) in [
        ("20260511", "ERROR: Verification FAILED: restore point 2 is not restorable: missing vda.virtnbdbackup.2.qcow.json; restore points 0..1 are restorable"),
        ("20260512", "ERROR: Verification FAILED: restore points 3..4 are not restorable: missing vda.inc.virtnbdbackup.3.data; restore points 0..2 are restorable"),
        ("20260513", "ERROR: Verification FAILED: restore points 0..1 are not restorable: unreadable vda.full.data: truncated stream: the last 40 bytes (at byte 59661) are not the final comp header; no restore point is restorable"),
        ("20260515", "ERROR: Verification FAILED: restore points 0..2 are not restorable: vda.full.data: checksum mismatch: stored 3186549397, computed 3296125597; no restore point is restorable"),
        ("20260516", "ERROR: Verification FAILED: restore point 2 is not restorable: partial vda.inc.virtnbdbackup.2.data.partial; restore points 0..1 are restorable"),
    ] {
        let r = run(period);
        assert_eq!(r.code, Some(6), "{period}: {}", r.stderr);
        assert!(verdict(&r).ends_with(want), "{period}: {}", verdict(&r));
    }
    let r = run("20260513");
    assert!(r.stderr.contains("ERROR: Structure DAMAGED: vda.full.data: truncated stream: the last 40 bytes (at byte 59661) are not the final comp header (no checksum recorded)"), "{}", r.stderr);
    let r = run("20260512");
    assert!(r
        .stderr
        .contains("WARN: Checksum file without data file: vda.inc.virtnbdbackup.3.data.chksum"));
    // the healthy period: a 1.9.15 full without .chksum, 2.47 incrementals with one
    let r = run("20260514");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(verdict(&r).ends_with("INFO: Verification passed: every restore point is restorable (0..2), structure verified; 2 checksums verified, 1 of 3 files has no recorded checksum — only LZ4 frame checksums guard its payloads"), "{}", verdict(&r));
}

// No .chksum anywhere (a 2.47 chain with them deleted): passes on structure, and says
// plainly that bit rot in the (uncompressed) payloads cannot be detected.
#[test]
fn a_chain_without_any_chksum_passes_saying_what_is_not_verified() {
    let s = Scratch::new();
    let dir = scratch_chain(&s, "rc-v247-chk/202603");
    let mut removed = 0;
    for e in fs::read_dir(&dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "chksum") {
            fs::remove_file(p).expect("rm");
            removed += 1;
        }
    }
    assert_eq!(removed, 4);
    let (r, doc) = verify_json(&dir);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(verdict(&r).ends_with("INFO: Verification passed: every restore point is restorable (0..3), structure verified; no checksums recorded — payload bit rot cannot be detected"), "{}", verdict(&r));
    assert!(!r.stderr.contains("checksums are valid"));
    assert!(!r.stderr.contains("checksum OK"));
    assert!(r.stderr.contains(
        "INFO: Structure OK, no checksum recorded: vda.full.data (payload bytes not verifiable)"
    ));
    for f in doc["files"].as_array().expect("files") {
        assert_eq!(
            (
                f["structure"].as_str(),
                f["checksum"].as_str(),
                f["status"].as_str()
            ),
            (Some("ok"), Some("not_recorded"), Some("not_recorded")),
            "{f}"
        );
        assert!(f["stored"].is_null() && f["computed"].is_null(), "{f}");
    }
    for p in doc["restore_points"].as_array().expect("points") {
        assert_eq!(p["restorable"], true, "{p}");
        assert_eq!(p["checksum_verified"], false, "{p}");
    }
    // with them: every point checksum-verified
    let (r, doc) = verify_json(&Fixture::shared().root.join("rc-v247-chk/202603"));
    assert_eq!(r.code, Some(0));
    assert!(verdict(&r).ends_with(
        "INFO: Verification passed: every restore point is restorable (0..3); 4 checksums verified"
    ));
    assert!(doc["restore_points"]
        .as_array()
        .expect("points")
        .iter()
        .all(|p| p["checksum_verified"] == true));
}

// One byte of an LZ4 payload flipped in a chain without .chksum (rc-lz4-plain, 1.9.15):
// the LZ4 frame checksums catch it; the error names the file and the LZ4 frame's byte.
#[test]
fn an_lz4_payload_flip_fails_naming_file_and_offset() {
    let s = Scratch::new();
    let dir = scratch_chain(&s, "rc-lz4-plain/chain");
    let full = dir.join("vda.full.data");
    let fr = first_data_frame(&full);
    assert!(fr.lz4_frames[0] > 400, "{fr:?}");
    flip(&full, fr.payload_offset + 300, 0x10);
    let (r, doc) = verify_json(&dir);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    let at = fr.payload_offset;
    assert!(
        r.stderr.contains(&format!(
            "ERROR: Structure DAMAGED: vda.full.data: LZ4 error in payload at byte {at}: "
        )),
        "{}",
        r.stderr
    );
    let line = verdict(&r);
    assert!(line.contains(&format!("ERROR: Verification FAILED: restore points 0..3 are not restorable: vda.full.data: LZ4 error in payload at byte {at}: ")), "{line}");
    assert!(line.ends_with("; no restore point is restorable"), "{line}");
    let f = &doc["files"][0];
    assert_eq!(
        (f["file"].as_str(), f["structure"].as_str()),
        (Some("vda.full.data"), Some("damaged"))
    );
    assert_eq!(f["damage"]["offset"].as_u64(), Some(at), "{f}");
    assert_eq!(f["checksum"], "not_recorded");
    assert_eq!(doc["files"][1]["structure"], "ok");
}

// A data frame length of 2^63 (in an incremental): the frame header walk refuses it,
// naming file and header offset; the points before it stay restorable. In a chain with
// .chksum files the mismatch is reported too (the bytes changed after the backup).
#[test]
fn a_frame_length_of_2_pow_63_fails() {
    for (rel, file, good) in [
        (
            "rc-lz4-plain/chain",
            "vda.inc.virtnbdbackup.1.data",
            "restore point 0 is restorable",
        ),
        (
            "rc-v247-chk/202603",
            "vda.inc.virtnbdbackup.2.data",
            "restore points 0..1 are restorable",
        ),
    ] {
        let s = Scratch::new();
        let dir = scratch_chain(&s, rel);
        let p = dir.join(file);
        let hdr = first_data_frame(&p).header_offset;
        let mut b = fs::read(&p).expect("read");
        let len_at = usize::try_from(hdr).expect("small") + 22; // "data " + 16 hex + " "
        b[len_at..len_at + 16].copy_from_slice(b"8000000000000000");
        fs::write(&p, b).expect("write");
        let (r, doc) = verify_json(&dir);
        assert_eq!(r.code, Some(6), "{}", r.stderr);
        let line = verdict(&r);
        assert!(
            line.contains(&format!(
                "not restorable: {file}: frame at byte {hdr} covers disk bytes "
            )),
            "{line}"
        );
        assert!(
            line.contains("+9223372036854775808, past the virtual size"),
            "{line}"
        );
        assert!(line.ends_with(good), "{line}");
        let f = doc["files"]
            .as_array()
            .expect("files")
            .iter()
            .find(|f| f["file"] == file)
            .expect("file");
        assert_eq!(f["damage"]["offset"].as_u64(), Some(hdr), "{f}");
        if rel.starts_with("rc-v247") {
            assert_eq!(f["checksum"], "mismatch", "{f}");
            assert!(r
                .stderr
                .contains("(checksum MISMATCH: the file changed after the backup)"));
        }
    }
}

// Two incrementals swapped by renaming (data and .chksum alike, so every checksum
// matches): the chain check refuses them as a restore does.
#[test]
fn swapped_incrementals_fail() {
    for rel in ["rc-lz4-plain/chain", "rc-v247-chk/202603"] {
        let s = Scratch::new();
        let dir = scratch_chain(&s, rel);
        for suffix in ["", ".chksum"] {
            let a = dir.join(format!("vda.inc.virtnbdbackup.1.data{suffix}"));
            let b = dir.join(format!("vda.inc.virtnbdbackup.2.data{suffix}"));
            if !a.exists() {
                continue;
            }
            let t = dir.join("swap.tmp");
            fs::rename(&a, &t).expect("mv");
            fs::rename(&b, &a).expect("mv");
            fs::rename(&t, &b).expect("mv");
        }
        let (r, doc) = verify_json(&dir);
        assert_eq!(r.code, Some(6), "{rel}: {}", r.stderr);
        assert!(verdict(&r).ends_with("ERROR: Verification FAILED: restore points 1..3 are not restorable: broken chain at vda.inc.virtnbdbackup.1.data: meta checkpointName is \"virtnbdbackup.2\", expected \"virtnbdbackup.1\"; restore point 0 is restorable"), "{}", verdict(&r));
        assert!(doc["files"]
            .as_array()
            .expect("files")
            .iter()
            .all(|f| f["structure"] == "ok" && f["checksum"] != "mismatch"));
    }
}

// A damaged file that no restore point reads (a stale differential of another disk's
// name) still fails the verification.
#[test]
fn damage_outside_every_restore_point_still_fails() {
    let s = Scratch::new();
    let dir = scratch_chain(&s, "rc-v247-chk/202603");
    fs::write(dir.join("vdz.diff.1795665952.data"), b"not a stream").expect("write");
    let (r, doc) = verify_json(&dir);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert!(
        verdict(&r).contains("ERROR: Verification FAILED: vdz.diff.1795665952.data: "),
        "{}",
        verdict(&r)
    );
    assert!(
        verdict(&r).ends_with("every restore point is restorable (0..3), but this file is damaged")
    );
    assert!(doc["restore_points"]
        .as_array()
        .expect("points")
        .iter()
        .all(|p| p["restorable"] == true));
}

/// A valid uncompressed full of `len` bytes of data, stored sparse: meta, one data
/// frame, stop. Reading its payload takes seconds.
fn huge_stream(path: &Path, len: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let json = format!(
        "{{\n    \"virtualSize\": {len},\n    \"dataSize\": {len},\n    \"date\": \"2026-01-01T00:00:00\",\n    \"diskName\": \"vda\",\n    \"diskFormat\": \"raw\",\n    \"checkpointName\": \"virtnbdbackup.0\",\n    \"compressed\": false,\n    \"compressionMethod\": \"lz4\",\n    \"parentCheckpoint\": \"\",\n    \"incremental\": false,\n    \"streamVersion\": 2\n}}"
    );
    let mut f = fs::File::create(path).expect("create");
    write!(f, "meta {:016x} {:016x}\r\n{json}\r\n", 0, json.len()).expect("meta");
    write!(f, "data {:016x} {len:016x}\r\n", 0).expect("data header");
    f.seek(SeekFrom::Current(i64::try_from(len).expect("len")))
        .expect("seek");
    write!(f, "\r\nstop {:016x} {:016x}\r\n", 0, 0).expect("stop");
}

// SIGINT / SIGTERM during the restore pass over a valid 64 GiB stream (no .chksum, so
// the engine pass is the only long step): 130 / 143, "Interrupted by signal".
#[test]
fn a_signal_stops_the_restore_pass() {
    // the stream itself is sound: a small one verifies
    let s = Scratch::new();
    let small = s.dir.path().join("small");
    fs::create_dir_all(&small).expect("mkdir");
    huge_stream(&small.join("vda.full.data"), 1 << 20);
    let r = s.run(&["--verify", &small.display().to_string()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for (sig, want) in [
        (nix::sys::signal::Signal::SIGINT, 130),
        (nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let s = Scratch::new();
        let dir = s.dir.path().join("bk/big/20260101");
        fs::create_dir_all(&dir).expect("mkdir");
        huge_stream(&dir.join("vda.full.data"), 64 << 30);
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
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(want), "{err}");
        assert!(err.contains("Interrupted by signal"), "{err}");
        assert!(!err.contains("Structure"), "the walk had finished: {err}");
    }
}
