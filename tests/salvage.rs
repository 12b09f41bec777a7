//! Salvage restores (`--include-incomplete`, issue 17 item 8), through the built
//! binary, on copies of the real-chain fixture: each damage class of `rc-damage`
//! and synthetic damage made in a copy (a file cut mid-frame, a flipped byte in an
//! LZ4 payload, a deleted incremental, a flipped byte under a `.chksum`).
//!
//! For each: exit 6 with the `Salvage restore: … PARTIALLY` summary, a catalogue
//! row `partial`, and a damage map beside the disk that names exactly the damaged
//! guest ranges; the image equals the expected content of the restore point outside
//! them (the fixture's sha256 per 1 MiB block, or an undamaged copy restored
//! normally), holds zeros where the map says missing and the previous point's
//! content where it says stale. Content checks need `qemu-img` (else SKIP lines).

mod clisupport;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use clisupport::{fixture_src, Run, Scratch};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const K64: u64 = 64 << 10;

// ---------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir");
    for e in fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).expect("copy");
        }
    }
}

/// A copy of one fixture VM (and the catalogue) under `<scratch>/backups`.
struct Case {
    s: Scratch,
    root: PathBuf,
    vm: &'static str,
}

impl Case {
    fn new(vm: &'static str) -> Self {
        let s = Scratch::new();
        let root = s.dir.path().join("backups");
        fs::create_dir_all(root.join("_state")).expect("mkdir");
        for f in ["vmbackup.db", "vmbackup.db-shm", "vmbackup.db-wal"] {
            let from = fixture_src().join("backups/_state").join(f);
            if from.exists() {
                fs::copy(&from, root.join("_state").join(f)).expect("copy db");
            }
        }
        copy_dir(&fixture_src().join("backups").join(vm), &root.join(vm));
        Self { s, root, vm }
    }

    /// A path inside the backup copy.
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(self.vm).join(rel)
    }

    /// A data-only restore into `<scratch>/<out>`; its run and the restored image.
    fn restore(&self, out: &str, extra: &[&str]) -> (Run, PathBuf) {
        let dir = self.s.dir.path().join(out);
        let root = self.root.display().to_string();
        let d = dir.display().to_string();
        let mut a = vec![
            "--vm",
            self.vm,
            "--backup-path",
            &root,
            "--connect",
            "test:///default",
            "--skip-config",
            "--restore-path",
            &d,
        ];
        a.extend_from_slice(extra);
        let r = self.s.run(&a);
        let img = fs::read_dir(&dir)
            .map(|rd| {
                rd.map(|e| e.expect("entry").path())
                    .find(|p| p.extension().is_some_and(|x| x == "qcow2"))
            })
            .ok()
            .flatten()
            .unwrap_or_else(|| dir.join("none.qcow2"));
        (r, img)
    }

    /// A salvage restore that must end partially: exit 6, the summary, the map, the
    /// catalogue row.
    fn salvage(&self, out: &str, extra: &[&str]) -> (Vec<u8>, Value) {
        let mut a = vec!["--include-incomplete"];
        a.extend_from_slice(extra);
        let (r, img) = self.restore(out, &a);
        assert_eq!(r.code, Some(6), "salvage exit code\n{}", r.stderr);
        let map_path = PathBuf::from(format!("{}.damage.json", img.display()));
        let map: Value = serde_json::from_slice(
            &fs::read(&map_path)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", map_path.display(), r.stderr)),
        )
        .expect("map json");
        let summary = format!(
            "Salvage restore: vda restored PARTIALLY — {} bytes missing, {} bytes possibly stale",
            map["missing_bytes"], map["stale_bytes"]
        );
        assert!(r.stderr.contains(&summary), "no {summary:?}\n{}", r.stderr);
        assert!(
            r.stderr.contains(&format!("see {}", map_path.display())),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("Restore complete"), "{}", r.stderr);
        assert_eq!(map["schema"], "vmrestore.damage/1");
        assert_eq!(map["disk"], "vda");
        assert_eq!(map["image"], img.display().to_string());
        // nothing but the disk and its map in the restore path
        let mut left: Vec<String> = fs::read_dir(img.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let name = img
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(left, [name.clone(), format!("{name}.damage.json")]);
        let row = self.last_session();
        assert_eq!(
            (row.0.as_str(), row.1, row.2),
            ("partial", 6, 1),
            "catalogue row"
        );
        assert!(row
            .3
            .is_some_and(|m| m.starts_with("Salvage restore: vda restored PARTIALLY")));
        (guest(&img), map)
    }

    /// A normal restore of this (undamaged) copy at `point`: the guest bytes.
    fn exact(&self, out: &str, point: &str) -> Vec<u8> {
        self.exact_in(out, point, &[])
    }

    /// [`exact`](Self::exact) with more arguments (`--period`).
    fn exact_in(&self, out: &str, point: &str, extra: &[&str]) -> Vec<u8> {
        let mut a = vec!["--restore-point", point];
        a.extend_from_slice(extra);
        let (r, img) = self.restore(out, &a);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        guest(&img)
    }

    /// outcome, exit_code, include_incomplete, error_message of the newest row.
    fn last_session(&self) -> (String, i64, i64, Option<String>) {
        let db = self.root.join("_state/vmbackup.db");
        let c =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("db");
        c.query_row(
            "SELECT outcome, exit_code, include_incomplete, error_message FROM restore_sessions ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("row")
    }
}

fn qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The guest-visible bytes of an image (`qemu-img convert -O raw`); empty without
/// qemu-img (content checks then print SKIP).
fn guest(img: &Path) -> Vec<u8> {
    if !qemu_img() {
        eprintln!(
            "SKIP content check of {}: qemu-img not installed",
            img.display()
        );
        return Vec::new();
    }
    let raw = img.with_extension("raw-check");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert {}", img.display());
    let b = fs::read(&raw).expect("raw");
    fs::remove_file(&raw).expect("rm raw");
    b
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The damage map's ranges as (offset, length, state, file).
fn ranges(map: &Value) -> Vec<(u64, u64, String, String)> {
    map["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().expect("offset"),
                r["length"].as_u64().expect("length"),
                r["state"].as_str().expect("state").to_owned(),
                r["file"].as_str().expect("file").to_owned(),
            )
        })
        .collect()
}

fn row(offset: u64, length: u64, state: &str, file: &str) -> (u64, u64, String, String) {
    (offset, length, state.to_owned(), file.to_owned())
}

/// The map's file entries as (file, status, at_offset).
fn files(map: &Value) -> Vec<(String, String, Option<u64>)> {
    map["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["file"].as_str().expect("file").to_owned(),
                f["status"].as_str().expect("status").to_owned(),
                f["at_offset"].as_u64(),
            )
        })
        .collect()
}

fn file(name: &str, status: &str, at: Option<u64>) -> (String, String, Option<u64>) {
    (name.to_owned(), status.to_owned(), at)
}

/// `got` equals `want` outside the map's ranges, and is zero where it says missing.
fn check_outside(got: &[u8], want: &[u8], map: &Value) {
    if got.is_empty() {
        return;
    }
    assert_eq!(got.len(), want.len(), "image size");
    let mut pos = 0usize;
    for (o, l, state, _) in ranges(map) {
        let (s, e) = (o as usize, (o + l) as usize);
        assert!(got[pos..s] == want[pos..s], "bytes {pos}..{s} differ");
        if state == "missing" {
            assert!(
                got[s..e].iter().all(|b| *b == 0),
                "missing {s}..{e} not zero"
            );
        }
        pos = e;
    }
    assert!(got[pos..] == want[pos..], "bytes {pos}.. differ");
}

/// `got` equals `older` on every range of the map in `state`.
fn check_on(got: &[u8], older: &[u8], map: &Value, state: &str) {
    if got.is_empty() {
        return;
    }
    for (o, l, st, _) in ranges(map) {
        if st == state {
            let (s, e) = (o as usize, (o + l) as usize);
            assert!(got[s..e] == older[s..e], "{state} range {s}..{e} differs");
        }
    }
}

fn manifest() -> Value {
    serde_json::from_slice(
        &fs::read(fixture_src().join("expected/manifest.json")).expect("manifest"),
    )
    .expect("manifest json")
}

/// The manifest's record of `vm`'s disk vda at `point` of the chain `dir`.
fn disk_record(vm: &str, dir: &str, point: &str) -> Value {
    let m = manifest();
    let chain = m["vms"][vm]["chains"]
        .as_array()
        .expect("chains")
        .iter()
        .find(|c| c["dir"] == dir)
        .unwrap_or_else(|| panic!("chain {dir}"))
        .clone();
    chain["restore_points"]
        .as_array()
        .expect("points")
        .iter()
        .find(|p| p["name"] == point)
        .unwrap_or_else(|| panic!("point {point}"))["disks"]["vda"]
        .clone()
}

/// Every 1 MiB block of `got` that no damaged range touches has the manifest's
/// sha256 (a block the manifest leaves out is zero). Returns the blocks checked.
fn check_blocks(got: &[u8], map: &Value, vm: &str, dir: &str, point: &str) -> usize {
    if got.is_empty() {
        return 0;
    }
    let rec = disk_record(vm, dir, point);
    let blocks = rec["blocks_1MiB"].as_object().expect("blocks");
    let damaged = ranges(map);
    let mut checked = 0;
    for (i, b) in got.chunks(MIB as usize).enumerate() {
        let (s, e) = (i as u64 * MIB, (i as u64 + 1) * MIB);
        if damaged.iter().any(|(o, l, _, _)| *o < e && o + l > s) {
            continue;
        }
        match blocks.get(&i.to_string()) {
            Some(h) => assert_eq!(sha(b), h.as_str().expect("sha"), "block {i}"),
            None => assert!(b.iter().all(|x| *x == 0), "block {i} is not zero"),
        }
        checked += 1;
    }
    checked
}

fn expected_sha(vm: &str, dir: &str, point: &str) -> String {
    disk_record(vm, dir, point)["sha256"]
        .as_str()
        .expect("sha")
        .to_owned()
}

/// The offset of the `n`-th `data` frame header of a stream file.
fn data_header(path: &Path, n: usize) -> u64 {
    let b = fs::read(path).expect("read");
    b.windows(5)
        .enumerate()
        .filter(|(i, w)| *w == b"data " && b.get(i + 38..i + 40) == Some(b"\r\n"))
        .map(|(i, _)| i as u64)
        .nth(n)
        .expect("data header")
}

fn flip(path: &Path, offset: u64, mask: u8) {
    let mut b = fs::read(path).expect("read");
    b[offset as usize] ^= mask;
    fs::write(path, b).expect("write");
}

fn truncate(path: &Path, len: u64) {
    File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

// ---------------------------------------------------------------------------------
// rc-damage: the real damage classes
// ---------------------------------------------------------------------------------

#[test]
fn real_truncated_full_salvages_the_frames_before_the_cut() {
    // 20260513: vda.full.data (LZ4, 1.9.15) cut to 30 % inside the payload of its
    // frame `data 2MiB+64KiB` (header at byte 1671); no trailer is left
    let c = Case::new("rc-damage");
    let dir = "backups/rc-damage/20260513";
    for (point, out) in [("0", "p0"), ("1", "p1")] {
        let (got, map) = c.salvage(out, &["--period", "20260513", "--restore-point", point]);
        let mut want_files = vec![file("vda.full.data", "truncated", Some(1711))];
        if point == "1" {
            want_files.push(file("vda.inc.virtnbdbackup.1.data", "ok", None));
        }
        assert_eq!(files(&map), want_files);
        assert_eq!(
            ranges(&map),
            [
                // the cut frame, exactly (its header is readable)
                row(2 * MIB, K64, "missing", "vda.full.data"),
                // whatever the rest of the full held: unknown
                row(2 * MIB + K64, 8 * MIB - K64, "missing", "vda.full.data"),
            ],
            "point {point}"
        );
        assert!(map["ranges"][1]["why"]
            .as_str()
            .expect("why")
            .contains("cannot be known"));
        assert_eq!(map["missing_bytes"], 8 * MIB);
        // blocks 0 and 1 (frames data 0+192K, zero, data 1M+64K, zero) are exact
        let n = check_blocks(
            &got,
            &map,
            "rc-damage",
            dir,
            &format!("virtnbdbackup.{point}"),
        );
        assert!(got.is_empty() || n == 2, "{n} blocks checked");
        if !got.is_empty() {
            assert!(got[2 * MIB as usize..].iter().all(|b| *b == 0));
        }
    }
}

#[test]
fn real_missing_incremental_leaves_everything_else_possibly_stale() {
    // 20260512 (2.47, LZ4, .chksum): vda.inc.virtnbdbackup.3.data deleted; point 3
    // wrote 0x67 at 1MiB+64KiB, point 4 0x68 at 9MiB+64KiB
    let c = Case::new("rc-damage");
    let dir = "backups/rc-damage/20260512";
    let p2 = c.exact_in("p2", "2", &["--period", "20260512"]);
    if !p2.is_empty() {
        assert_eq!(sha(&p2), expected_sha("rc-damage", dir, "virtnbdbackup.2"));
    }
    let (got, map) = c.salvage("p4", &["--period", "20260512"]);
    assert_eq!(map["restore_point"], 4);
    assert_eq!(
        files(&map),
        [
            file("vda.full.data", "ok", None),
            file("vda.inc.virtnbdbackup.1.data", "ok", None),
            file("vda.inc.virtnbdbackup.2.data", "ok", None),
            file("vda.inc.virtnbdbackup.3.data", "missing", None),
            file("vda.inc.virtnbdbackup.4.data", "ok", None),
        ]
    );
    let inc3 = "vda.inc.virtnbdbackup.3.data";
    assert_eq!(
        ranges(&map),
        [
            row(0, 9 * MIB, "stale", inc3),
            row(9 * MIB + K64, MIB - K64, "stale", inc3),
        ]
    );
    assert!(map["ranges"][0]["why"]
        .as_str()
        .expect("why")
        .starts_with("possibly stale: ranges changed after checkpoint 2 cannot be known"));
    if !got.is_empty() {
        // the expected point 4, built from point 2 and the manifest's pattern writes
        let mut e4 = p2.clone();
        e4[MIB as usize..(MIB + K64) as usize].fill(0x67);
        e4[9 * MIB as usize..(9 * MIB + K64) as usize].fill(0x68);
        assert_eq!(sha(&e4), expected_sha("rc-damage", dir, "virtnbdbackup.4"));
        check_outside(&got, &e4, &map);
        // the stale ranges hold the last good older version: point 2
        check_on(&got, &p2, &map, "stale");
    }
    // point 3 itself: nothing newer, the whole disk is possibly stale, and is point 2
    let (got, map) = c.salvage("p3", &["--period", "20260512", "--restore-point", "3"]);
    assert_eq!(ranges(&map), [row(0, 10 * MIB, "stale", inc3)]);
    if !got.is_empty() {
        assert_eq!(got, p2);
    }
}

#[test]
fn real_bit_flip_under_chksum_is_used_but_unverified() {
    // 20260515 (2.47, uncompressed): one bit of the full's payload flipped at file
    // byte 393785 (xor 0x08), in the frame for disk 4MiB+256KiB → disk 4MiB+128KiB
    let c = Case::new("rc-damage");
    let dir = "backups/rc-damage/20260515";
    let (got, map) = c.salvage("p2", &["--period", "20260515"]);
    assert_eq!(
        files(&map),
        [
            file("vda.full.data", "checksum_mismatch", None),
            file("vda.inc.virtnbdbackup.1.data", "ok", None),
            file("vda.inc.virtnbdbackup.2.data", "ok", None),
        ]
    );
    // all of the full that inc 1 (6MiB+64KiB) and inc 2 (0+64KiB) did not rewrite
    assert_eq!(
        ranges(&map),
        [
            row(K64, 6 * MIB - K64, "unverified", "vda.full.data"),
            row(6 * MIB + K64, 4 * MIB - K64, "unverified", "vda.full.data"),
        ]
    );
    if !got.is_empty() {
        let flipped = 4 * MIB + 128 * 1024;
        let mut fixed = got.clone();
        fixed[flipped as usize] ^= 0x08;
        assert_eq!(
            sha(&fixed),
            expected_sha("rc-damage", dir, "virtnbdbackup.2")
        );
    }
}

#[test]
fn real_partial_backup_is_not_mixed_in() {
    // 20260516: the third backup was killed; vda.inc.virtnbdbackup.2.data.partial
    // holds the header of `data 2MiB+384KiB` and part of its LZ4 payload
    let c = Case::new("rc-damage");
    let dir = "backups/rc-damage/20260516";
    let (got, map) = c.salvage("p2", &["--period", "20260516"]);
    assert_eq!(
        files(&map),
        [
            file("vda.full.data", "ok", None),
            file("vda.inc.virtnbdbackup.1.data", "ok", None),
            file("vda.inc.virtnbdbackup.2.data.partial", "partial", Some(415)),
        ]
    );
    let partial = "vda.inc.virtnbdbackup.2.data.partial";
    assert_eq!(
        ranges(&map),
        [
            // the interrupted frame's range, exactly; [0, 2MiB) was not changed
            row(2 * MIB, 384 * 1024, "stale", partial),
            row(2 * MIB + 384 * 1024, 8 * MIB - 384 * 1024, "stale", partial),
        ]
    );
    if !got.is_empty() {
        // exactly the consistent state of checkpoint 1
        assert_eq!(sha(&got), expected_sha("rc-damage", dir, "virtnbdbackup.1"));
    }
}

#[test]
fn real_clean_and_degraded_chains_restore_normally() {
    // 20260514 is healthy, 20260511 lacks only a qcow.json: nothing is damaged, so
    // the salvage check changes nothing — exit 0, "Restore complete", no map
    let c = Case::new("rc-damage");
    for (period, out) in [("20260514", "a"), ("20260511", "b")] {
        let (r, img) = c.restore(out, &["--period", period, "--include-incomplete"]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(r.stderr.contains("nothing damaged"), "{}", r.stderr);
        assert!(r.stderr.contains("Restore complete"), "{}", r.stderr);
        assert!(!Path::new(&format!("{}.damage.json", img.display())).exists());
        let got = guest(&img);
        if !got.is_empty() {
            assert_eq!(
                sha(&got),
                expected_sha(
                    "rc-damage",
                    &format!("backups/rc-damage/{period}"),
                    "virtnbdbackup.2"
                )
            );
        }
        assert_eq!(c.last_session().0, "success");
    }
}

// ---------------------------------------------------------------------------------
// Synthetic damage in a copy
// ---------------------------------------------------------------------------------

#[test]
fn incremental_cut_mid_frame_keeps_the_frames_before_it() {
    // rc-long (2.47, uncompressed, .chksum): inc 6 has frames 3616768+12K,
    // 4014080+12K and 5836800+12K; cut inside the second one's payload
    let pristine = Case::new("rc-long");
    let e6 = pristine.exact("e6", "6");
    let p5 = pristine.exact("p5", "5");
    let c = Case::new("rc-long");
    let inc6 = c.p("vda.inc.virtnbdbackup.6.data");
    let second = data_header(&inc6, 1);
    truncate(&inc6, second + 40 + 5000);
    let (got, map) = c.salvage("s6", &["--restore-point", "6"]);
    let name = "vda.inc.virtnbdbackup.6.data";
    let f = files(&map);
    assert_eq!(f.len(), 7);
    assert!(f[..6].iter().all(|x| x.1 == "ok"), "{f:?}");
    assert_eq!(f[6], file(name, "truncated", Some(second + 40)));
    assert_eq!(
        ranges(&map),
        [
            // the frame before the cut is used, but its .chksum cannot vouch for it
            row(3_616_768, 12_288, "unverified", name),
            // the cut frame, exactly
            row(4_014_080, 12_288, "stale", name),
            // after it: what the rest of inc 6 changed cannot be known
            row(4_026_368, 8 * MIB - 4_026_368, "stale", name),
        ]
    );
    assert!(map["ranges"][2]["why"]
        .as_str()
        .expect("why")
        .starts_with("possibly stale: ranges changed after checkpoint 5 cannot be known"));
    if !got.is_empty() {
        assert_eq!(
            sha(&e6),
            expected_sha("rc-long", "backups/rc-long", "virtnbdbackup.6")
        );
        check_outside(&got, &e6, &map);
        check_on(&got, &e6, &map, "unverified");
        check_on(&got, &p5, &map, "stale");
    }
}

#[test]
fn lz4_full_cut_mid_frame_is_walked_without_its_trailer() {
    // rc-lz4-plain's full (LZ4): data 0+1MiB, then data 12MiB+512KiB; cut inside the
    // second payload, so the trailer with the payload sizes is gone
    let pristine = Case::new("rc-lz4-plain");
    let e0 = pristine.exact("e0", "0");
    let c = Case::new("rc-lz4-plain");
    let full = c.p("chain/vda.full.data");
    let second = data_header(&full, 1);
    truncate(&full, second + 40 + 100_000);
    let (got, map) = c.salvage("s0", &["--restore-point", "0"]);
    assert_eq!(
        files(&map),
        [file("vda.full.data", "truncated", Some(second + 40))]
    );
    assert_eq!(
        ranges(&map),
        [
            row(12 * MIB, 512 * 1024, "missing", "vda.full.data"),
            row(
                12 * MIB + 512 * 1024,
                20 * MIB - 512 * 1024,
                "missing",
                "vda.full.data"
            ),
        ]
    );
    check_outside(&got, &e0, &map);
}

#[test]
fn flipped_lz4_byte_loses_only_its_frame() {
    // rc-lz4-plain's full, first payload (data 0+1MiB): its LZ4 checksums catch the
    // flip; the trailer still gives the payload's length, so the second frame and
    // every incremental are used
    let pristine = Case::new("rc-lz4-plain");
    let e3 = pristine.exact("e3", "3");
    let c = Case::new("rc-lz4-plain");
    let full = c.p("chain/vda.full.data");
    let first = data_header(&full, 0);
    flip(&full, first + 40 + 1500, 0x10);
    let (got, map) = c.salvage("s3", &[]);
    let f = files(&map);
    assert_eq!(f[0], file("vda.full.data", "corrupt", Some(first + 40)));
    assert!(f[1..].iter().all(|x| x.1 == "ok"), "{f:?}");
    // 0+64KiB was rewritten by inc 3; the rest of the lost frame has no older data
    assert_eq!(
        ranges(&map),
        [row(K64, MIB - K64, "missing", "vda.full.data")]
    );
    check_outside(&got, &e3, &map);
    if !got.is_empty() {
        assert_eq!(
            sha(&e3),
            expected_sha(
                "rc-lz4-plain",
                "backups/rc-lz4-plain/chain",
                "virtnbdbackup.3"
            )
        );
    }
}

#[test]
fn flipped_lz4_byte_in_an_incremental_keeps_the_older_version() {
    // rc-lz4-plain inc 2: one frame, data 24MiB+256KiB
    let pristine = Case::new("rc-lz4-plain");
    let e3 = pristine.exact("e3", "3");
    let p1 = pristine.exact("p1", "1");
    let c = Case::new("rc-lz4-plain");
    let inc2 = c.p("chain/vda.inc.virtnbdbackup.2.data");
    let h = data_header(&inc2, 0);
    flip(&inc2, h + 40 + 3000, 0x01);
    let (got, map) = c.salvage("s3", &[]);
    let name = "vda.inc.virtnbdbackup.2.data";
    assert_eq!(files(&map)[2], file(name, "corrupt", Some(h + 40)));
    assert_eq!(ranges(&map), [row(24 * MIB, 256 * 1024, "stale", name)]);
    check_outside(&got, &e3, &map);
    check_on(&got, &p1, &map, "stale");
}

#[test]
fn deleted_incremental_in_a_copy() {
    // rc-acc-files (LZ4): delete inc 2 (data 6MiB+64KiB); inc 3 (1MiB+64KiB) and
    // inc 4 (23MiB+64KiB) still apply
    let pristine = Case::new("rc-acc-files");
    let e4 = pristine.exact("e4", "4");
    let p1 = pristine.exact("p1", "1");
    let c = Case::new("rc-acc-files");
    fs::remove_file(c.p("vda.inc.virtnbdbackup.2.data")).expect("rm");
    let (got, map) = c.salvage("s4", &[]);
    let inc2 = "vda.inc.virtnbdbackup.2.data";
    assert_eq!(files(&map)[2], file(inc2, "missing", None));
    let size = map["virtual_size"].as_u64().expect("size");
    assert_eq!(
        ranges(&map),
        [
            row(0, MIB, "stale", inc2),
            row(MIB + K64, 22 * MIB - K64, "stale", inc2),
            row(23 * MIB + K64, size - 23 * MIB - K64, "stale", inc2),
        ]
    );
    check_outside(&got, &e4, &map);
    // what the missing inc 2 would have changed holds point 1's data (older)
    check_on(&got, &p1, &map, "stale");
}

#[test]
fn flipped_byte_under_chksum_in_a_copy() {
    // rc-v247-chk inc 1 (uncompressed, .chksum): data 9MiB+128KiB, payload at 419
    let pristine = Case::new("rc-v247-chk");
    let e3 = pristine.exact("e3", "3");
    let c = Case::new("rc-v247-chk");
    let inc1 = c.p("202603/vda.inc.virtnbdbackup.1.data");
    flip(&inc1, 419 + 1000, 0x10);
    let (got, map) = c.salvage("s3", &[]);
    let name = "vda.inc.virtnbdbackup.1.data";
    assert_eq!(files(&map)[1], file(name, "checksum_mismatch", None));
    assert_eq!(ranges(&map), [row(9 * MIB, 128 * 1024, "unverified", name)]);
    if !got.is_empty() {
        let mut want = e3.clone();
        want[(9 * MIB + 1000) as usize] ^= 0x10;
        assert!(
            got == want,
            "the image differs elsewhere than the flipped byte"
        );
    }
}

// ---------------------------------------------------------------------------------
// What is printed, and what is committed
// ---------------------------------------------------------------------------------

#[test]
fn dry_run_and_json_say_partial() {
    let c = Case::new("rc-damage");
    let (r, img) = c.restore(
        "d",
        &["--period", "20260513", "--include-incomplete", "--dry-run"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("would write the damage map"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("would be restored PARTIALLY"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("Restore complete"), "{}", r.stderr);
    assert!(!img.exists() && !c.s.dir.path().join("d").exists());
    let (r, _) = c.restore(
        "j",
        &["--period", "20260513", "--include-incomplete", "--json"],
    );
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(doc["outcome"], "partial");
    assert_eq!(doc["exit_code"], 6);
    assert_eq!(doc["salvage"][0]["disk"], "vda");
    assert_eq!(doc["salvage"][0]["missing_bytes"], 8 * MIB);
    let effects: Vec<&str> = doc["effects"]
        .as_array()
        .expect("effects")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(effects.contains(&"write-damage-map"), "{effects:?}");
}

#[test]
fn a_taken_map_name_is_refused_before_anything_is_written() {
    // an old damage map where the new one goes: no --force, so the salvage is
    // refused before anything is written (exit 4) — no disk, the old map untouched,
    // no temporary file left
    let c = Case::new("rc-damage");
    let out = c.s.dir.path().join("o");
    fs::create_dir_all(&out).expect("mkdir");
    let old = out.join("rc-damage-vda.qcow2.damage.json");
    fs::write(&old, b"old").expect("old map");
    let (r, _) = c.restore("o", &["--period", "20260513", "--include-incomplete"]);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    let left: Vec<String> = fs::read_dir(&out)
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["rc-damage-vda.qcow2.damage.json"], "{}", r.stderr);
    assert_eq!(fs::read(&old).expect("old"), b"old");
    // with --force the salvage replaces it; a later clean restore of the same disk
    // takes the stale map away
    let (r, _) = c.restore(
        "o",
        &["--period", "20260513", "--include-incomplete", "--force"],
    );
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert_ne!(fs::read(&old).expect("map"), b"old");
    let (r, _) = c.restore("o", &["--period", "20260514", "--force"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!old.exists(), "a stale damage map survived a clean restore");
}

#[test]
fn disk_in_place_salvage_writes_the_map_beside_the_disk() {
    let c = Case::new("rc-damage");
    let images = c.s.dir.path().join("images");
    fs::create_dir_all(&images).expect("mkdir");
    let disk = images.join("rc-damage-vda.qcow2");
    fs::write(&disk, b"original vda").expect("disk");
    let node = c.s.dir.path().join("node.xml");
    fs::write(
        &node,
        format!(
            "<node>\n  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n    <name>rc-damage</name>\n    <uuid>6d1b7f5e-3c0a-4c8e-9a51-b3e4c2d9f0cc</uuid>\n    <memory>1048576</memory>\n    <vcpu>1</vcpu>\n    <os><type>hvm</type></os>\n    <devices>\n      <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        <source file='{}'/>\n        <target dev='vda' bus='virtio'/>\n      </disk>\n    </devices>\n    <test:runstate>5</test:runstate>\n  </domain>\n</node>\n",
            disk.display()
        ),
    )
    .expect("node");
    let uri = format!("test://{}", node.display());
    let root = c.root.display().to_string();
    let r = c.s.run(&[
        "--vm",
        "rc-damage",
        "--backup-path",
        &root,
        "--connect",
        &uri,
        "--period",
        "20260516",
        "--disk",
        "vda",
        "--include-incomplete",
    ]);
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    let map = PathBuf::from(format!("{}.damage.json", disk.display()));
    assert!(
        r.stderr.contains("Salvage restore: vda restored PARTIALLY"),
        "{}",
        r.stderr
    );
    assert!(map.exists(), "{}", r.stderr);
    assert_eq!(
        fs::read(images.join("rc-damage-vda.qcow2.pre-restore")).expect("rollback"),
        b"original vda"
    );
    let got = guest(&disk);
    if !got.is_empty() {
        assert_eq!(
            sha(&got),
            expected_sha("rc-damage", "backups/rc-damage/20260516", "virtnbdbackup.1")
        );
    }
    assert_eq!(c.last_session().0, "partial");
}

/// The salvage keeps the frames it checked in `$TMPDIR`: one that does not exist is a
/// storage problem (exit 4, naming it), not a partial restore (6); no disk is left.
#[test]
fn a_missing_tmpdir_is_a_storage_error_and_writes_no_disk() {
    let c = Case::new("rc-damage");
    let out = c.s.dir.path().join("o");
    let tmp = c.s.dir.path().join("no-such-tmp");
    let root = c.root.display().to_string();
    let o = out.display().to_string();
    let r = c.s.run_env(
        &[
            "--vm",
            c.vm,
            "--backup-path",
            &root,
            "--connect",
            "test:///default",
            "--skip-config",
            "--restore-path",
            &o,
            "--period",
            "20260513",
            "--include-incomplete",
        ],
        &[("TMPDIR", tmp.to_str().expect("utf8"))],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("salvage frame log") && r.stderr.contains("no-such-tmp"),
        "{}",
        r.stderr
    );
    let images = fs::read_dir(&out)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(images, 0, "a disk took its final name");
}
