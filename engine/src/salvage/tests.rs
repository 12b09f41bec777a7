//! Salvage plans of generated chains with one damage each, applied to a raw file:
//! the bytes outside the damaged ranges are those of the undamaged chain, the
//! missing ranges are zero, the stale ranges hold the older version.

use std::fs;
use std::path::Path;

use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
use nbdfmt::BackupSet;

use super::*;
use crate::target::raw::RawTarget;
use crate::{apply, ApplyOptions};

const K: u64 = 64 << 10;
const SIZE: u64 = 1 << 20;

fn bytes(seed: u8, len: u64) -> Vec<u8> {
    // incompressible enough that LZ4 frames have several blocks
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// full: data 0+K (0x11…), data 2K+2K, data 6K+K, zero elsewhere; inc 1: data K+K,
/// data 6K+K; inc 2: data 3K+K. Returns the files' bytes.
fn chain(dir: &Path, compressed: bool, chksum: bool) -> Vec<Vec<u8>> {
    let c = |o: StreamOptions| if compressed { o.compressed(3) } else { o };
    let full = write_stream(
        &c(StreamOptions::full("vda", SIZE, 0)),
        &[
            WriteFrame::Data(0, bytes(1, K)),
            WriteFrame::Zero(K, K),
            WriteFrame::Data(2 * K, bytes(2, 2 * K)),
            WriteFrame::Zero(4 * K, 2 * K),
            WriteFrame::Data(6 * K, bytes(3, K)),
            WriteFrame::Zero(7 * K, SIZE - 7 * K),
        ],
    );
    let inc1 = write_stream(
        &c(StreamOptions::inc("vda", 1, SIZE, 0)),
        &[
            WriteFrame::Data(K, bytes(4, K)),
            WriteFrame::Data(6 * K, bytes(5, K)),
        ],
    );
    let inc2 = write_stream(
        &c(StreamOptions::inc("vda", 2, SIZE, 0)),
        &[WriteFrame::Data(3 * K, bytes(6, K))],
    );
    let files = vec![full, inc1, inc2];
    for (name, b) in [
        "vda.full.data",
        "vda.inc.virtnbdbackup.1.data",
        "vda.inc.virtnbdbackup.2.data",
    ]
    .iter()
    .zip(&files)
    {
        fs::write(dir.join(name), b).expect("write");
        if chksum {
            let sum = nbdfmt::checksum::adler32_of(&b[..]).expect("adler");
            fs::write(dir.join(format!("{name}.chksum")), sum.to_string()).expect("chksum");
        }
    }
    files
}

/// Restores `disk` at `n` through a salvage plan into a raw file; its bytes.
fn salvage(dir: &Path, n: u32) -> (Vec<u8>, DamageReport) {
    let set = BackupSet::scan(dir).expect("scan");
    let s = plan_point(&set, "vda", n, false, None, &Cancel::new()).expect("salvage plan");
    let out = dir.join(format!("out-{n}.raw"));
    let _ = fs::remove_file(&out);
    let t = RawTarget::create(&out, s.plan.virtual_size).expect("target");
    apply(&[s.plan], vec![Box::new(t)], &ApplyOptions::default()).expect("apply");
    (fs::read(&out).expect("read"), s.damage)
}

/// The content of an undamaged chain at `n`, restored normally.
fn exact(n: u32, compressed: bool) -> Vec<u8> {
    let d = tempfile::tempdir().expect("tmp");
    chain(d.path(), compressed, false);
    let set = BackupSet::scan(d.path()).expect("scan");
    let plan = DiskPlan::for_point(&set, "vda", n).expect("plan");
    let out = d.path().join("exact.raw");
    let t = RawTarget::create(&out, SIZE).expect("target");
    apply(&[plan], vec![Box::new(t)], &ApplyOptions::default()).expect("apply");
    fs::read(&out).expect("read")
}

fn rows(d: &DamageReport) -> Vec<(u64, u64, &'static str, &str)> {
    d.ranges
        .iter()
        .map(|r| (r.offset, r.length, r.state.as_str(), r.file.as_str()))
        .collect()
}

fn statuses(d: &DamageReport) -> Vec<&'static str> {
    d.files.iter().map(|f| f.status.as_str()).collect()
}

/// `got` equals `want` outside the damaged ranges; missing ranges are zero.
fn check_outside(got: &[u8], want: &[u8], d: &DamageReport) {
    let mut pos = 0usize;
    for r in &d.ranges {
        let (s, e) = (r.offset as usize, (r.offset + r.length) as usize);
        assert_eq!(got[pos..s], want[pos..s], "bytes {pos}..{s} differ");
        if r.state == RangeState::Missing {
            assert!(
                got[s..e].iter().all(|b| *b == 0),
                "missing {s}..{e} not zero"
            );
        }
        pos = e;
    }
    assert_eq!(got[pos..], want[pos..], "bytes {pos}.. differ");
}

/// Offset of the `n`-th `data` header in a stream.
fn data_header(b: &[u8], n: usize) -> usize {
    b.windows(5)
        .enumerate()
        .filter(|(_, w)| w == b"data ")
        .map(|(i, _)| i)
        .nth(n)
        .expect("data header")
}

#[test]
fn clean_chain_salvages_exactly() {
    for compressed in [false, true] {
        let d = tempfile::tempdir().expect("tmp");
        chain(d.path(), compressed, true);
        let (got, dmg) = salvage(d.path(), 2);
        assert!(dmg.is_clean(), "{dmg:?}");
        assert_eq!(got, exact(2, compressed));
    }
}

#[test]
fn truncated_full_keeps_the_frames_before_the_cut() {
    for compressed in [false, true] {
        let d = tempfile::tempdir().expect("tmp");
        let files = chain(d.path(), compressed, false);
        // cut inside the payload of the full's second data frame (disk 2K+2K)
        let cut = data_header(&files[0], 1) + 40 + 100;
        fs::write(d.path().join("vda.full.data"), &files[0][..cut]).expect("cut");
        let (got, dmg) = salvage(d.path(), 0);
        assert_eq!(statuses(&dmg), ["truncated"], "{compressed}");
        assert_eq!(
            rows(&dmg),
            [
                (2 * K, 2 * K, "missing", "vda.full.data"),
                (4 * K, SIZE - 4 * K, "missing", "vda.full.data"),
            ],
            "{compressed}"
        );
        check_outside(&got, &exact(0, compressed), &dmg);
        // at point 2, inc 1 and inc 2 are intact and rewrite parts of the lost range
        let (got, dmg) = salvage(d.path(), 2);
        assert_eq!(statuses(&dmg), ["truncated", "ok", "ok"]);
        assert_eq!(
            rows(&dmg),
            [
                (2 * K, K, "missing", "vda.full.data"),
                (4 * K, 2 * K, "missing", "vda.full.data"),
                (7 * K, SIZE - 7 * K, "missing", "vda.full.data"),
            ]
        );
        check_outside(&got, &exact(2, compressed), &dmg);
    }
}

#[test]
fn corrupt_lz4_payload_loses_only_its_frame() {
    let d = tempfile::tempdir().expect("tmp");
    let files = chain(d.path(), true, false);
    // a byte in the middle of inc 1's first LZ4 payload (disk K+K)
    let mut b = files[1].clone();
    let at = data_header(&b, 0) + 40 + 2000;
    b[at] ^= 0x20;
    fs::write(d.path().join("vda.inc.virtnbdbackup.1.data"), &b).expect("flip");
    let (got, dmg) = salvage(d.path(), 1);
    assert_eq!(statuses(&dmg), ["ok", "corrupt"]);
    assert_eq!(dmg.files[1].at_offset, Some(data_header(&b, 0) as u64 + 40));
    assert_eq!(
        rows(&dmg),
        [(K, K, "stale", "vda.inc.virtnbdbackup.1.data")]
    );
    let want = exact(1, true);
    check_outside(&got, &want, &dmg);
    // the stale range holds the older version (the full's zero frame)
    assert!(got[K as usize..2 * K as usize].iter().all(|b| *b == 0));
}

#[test]
fn missing_incremental_is_possibly_stale_everywhere_else() {
    let d = tempfile::tempdir().expect("tmp");
    chain(d.path(), false, false);
    fs::remove_file(d.path().join("vda.inc.virtnbdbackup.1.data")).expect("rm");
    let (got, dmg) = salvage(d.path(), 2);
    assert_eq!(statuses(&dmg), ["ok", "missing", "ok"]);
    assert_eq!(
        rows(&dmg),
        [
            (0, 3 * K, "stale", "vda.inc.virtnbdbackup.1.data"),
            (4 * K, SIZE - 4 * K, "stale", "vda.inc.virtnbdbackup.1.data"),
        ]
    );
    assert!(dmg.ranges[0]
        .why
        .starts_with("possibly stale: ranges changed after checkpoint 0 cannot be known"));
    check_outside(&got, &exact(2, false), &dmg);
}

#[test]
fn checksum_mismatch_marks_what_is_used_unverified() {
    let d = tempfile::tempdir().expect("tmp");
    let files = chain(d.path(), false, true);
    let mut b = files[1].clone();
    let at = data_header(&b, 1) + 40 + 10;
    b[at] ^= 1;
    fs::write(d.path().join("vda.inc.virtnbdbackup.1.data"), &b).expect("flip");
    let (got, dmg) = salvage(d.path(), 2);
    assert_eq!(statuses(&dmg), ["ok", "checksum_mismatch", "ok"]);
    assert_eq!(
        rows(&dmg),
        [
            (K, K, "unverified", "vda.inc.virtnbdbackup.1.data"),
            (6 * K, K, "unverified", "vda.inc.virtnbdbackup.1.data"),
        ]
    );
    let mut want = exact(2, false);
    want[(6 * K + 10) as usize] ^= 1;
    assert_eq!(got, want);
}

#[test]
fn partial_incremental_is_not_used_and_mapped() {
    for compressed in [false, true] {
        let d = tempfile::tempdir().expect("tmp");
        let files = chain(d.path(), compressed, false);
        fs::remove_file(d.path().join("vda.inc.virtnbdbackup.1.data")).expect("rm");
        fs::remove_file(d.path().join("vda.inc.virtnbdbackup.2.data")).expect("rm");
        // interrupted inside its second frame's payload
        let cut = data_header(&files[1], 1) + 50;
        fs::write(
            d.path().join("vda.inc.virtnbdbackup.1.data.partial"),
            &files[1][..cut],
        )
        .expect("partial");
        let (got, dmg) = salvage(d.path(), 1);
        assert_eq!(statuses(&dmg), ["ok", "partial"], "{compressed}");
        let name = "vda.inc.virtnbdbackup.1.data.partial";
        assert_eq!(
            rows(&dmg),
            [
                (K, K, "stale", name),
                (6 * K, K, "stale", name),
                (7 * K, SIZE - 7 * K, "stale", name),
            ],
            "{compressed}"
        );
        // exactly the state of checkpoint 0
        assert_eq!(got, exact(0, compressed));
    }
}

#[test]
fn corrupt_header_ends_the_file_there() {
    let d = tempfile::tempdir().expect("tmp");
    let files = chain(d.path(), false, false);
    let mut b = files[0].clone();
    let at = data_header(&b, 1);
    b[at + 1] ^= 0x01; // `data` → `deta`
    fs::write(d.path().join("vda.full.data"), &b).expect("flip");
    let (got, dmg) = salvage(d.path(), 0);
    assert_eq!(statuses(&dmg), ["corrupt"]);
    assert_eq!(dmg.files[0].at_offset, Some(at as u64));
    // frames up to the bad header are known (data 0+K, zero K+K): the rest is not
    assert_eq!(
        rows(&dmg),
        [(2 * K, SIZE - 2 * K, "missing", "vda.full.data")]
    );
    check_outside(&got, &exact(0, false), &dmg);
}

#[test]
fn broken_link_is_treated_as_missing() {
    let d = tempfile::tempdir().expect("tmp");
    chain(d.path(), false, false);
    let p = d.path().join("vda.inc.virtnbdbackup.2.data");
    let b = fs::read(&p).expect("read");
    let s = String::from_utf8_lossy(&b).replace(
        "\"parentCheckpoint\": \"virtnbdbackup.1\"",
        "\"parentCheckpoint\": \"virtnbdbackup.7\"",
    );
    fs::write(&p, s.as_bytes()).expect("write");
    let (got, dmg) = salvage(d.path(), 2);
    assert_eq!(statuses(&dmg), ["ok", "ok", "corrupt"]);
    assert_eq!(
        rows(&dmg),
        [(0, SIZE, "stale", "vda.inc.virtnbdbackup.2.data")]
    );
    assert_eq!(got, exact(1, false));
}

#[test]
fn lz4_stream_is_followed_past_a_damaged_header() {
    let d = tempfile::tempdir().expect("tmp");
    let files = chain(d.path(), true, false);
    let zero_header = |b: &[u8], n: usize| -> usize {
        b.windows(5)
            .enumerate()
            .filter(|(_, w)| w == b"zero ")
            .map(|(i, _)| i)
            .nth(n)
            .expect("zero header")
    };
    // a zero frame's header (zero K+K): the next header follows it directly
    let mut b = files[0].clone();
    let z = zero_header(&b, 0);
    b[z + 7] = b'x';
    fs::write(d.path().join("vda.full.data"), &b).expect("write");
    let (got, dmg) = salvage(d.path(), 0);
    assert_eq!(statuses(&dmg), ["corrupt"]);
    assert_eq!(rows(&dmg), [(K, K, "missing", "vda.full.data")]);
    check_outside(&got, &exact(0, true), &dmg);
    // a data frame's header (data 2K+2K): the trailer says how long its payload is
    let mut b = files[0].clone();
    let at = data_header(&b, 1);
    b[at + 30] = b'g';
    fs::write(d.path().join("vda.full.data"), &b).expect("write");
    let (got, dmg) = salvage(d.path(), 2);
    assert_eq!(statuses(&dmg), ["corrupt", "ok", "ok"]);
    assert_eq!(dmg.files[0].at_offset, Some(at as u64));
    // what the frame covered lies between the frames around it (2K..4K); inc 2
    // rewrote 3K..4K
    assert_eq!(rows(&dmg), [(2 * K, K, "missing", "vda.full.data")]);
    check_outside(&got, &exact(2, true), &dmg);
}

#[test]
fn a_file_of_damaged_frames_is_given_up_after_max_faults_and_frames_stay_on_disk() {
    // MAX_FAULTS + 500 compressed data frames, every payload but the first corrupt,
    // the trailer intact: each lost frame is stepped over until MAX_FAULTS, then the
    // rest is unknown
    let d = tempfile::tempdir().expect("tmp");
    let n = walk::MAX_FAULTS + 500;
    let frames: Vec<WriteFrame> = (0..n as u64)
        .map(|i| WriteFrame::Data(i * 64, bytes(i as u8, 32)))
        .collect();
    let mut b = write_stream(&StreamOptions::full("vda", SIZE, 0).compressed(3), &frames);
    // every data header, in one pass
    let heads: Vec<usize> = b
        .windows(5)
        .enumerate()
        .filter(|(_, w)| w == b"data ")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(heads.len(), n);
    for h in heads.iter().skip(1) {
        b[h + 40 + 21] ^= 0x5a; // inside the block: its checksum fails
    }
    fs::write(d.path().join("vda.full.data"), &b).expect("write");
    let set = BackupSet::scan(d.path()).expect("scan");
    let s = plan_point(&set, "vda", 0, false, Some(d.path()), &Cancel::new()).expect("plan");
    assert!(matches!(
        s.plan.files[0].frames,
        crate::chain::Frames::Log(_)
    ));
    let f = &s.damage.files[0];
    assert_eq!(f.status, FileStatus::Corrupt);
    assert!(
        f.reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("{} more damaged place(s)", walk::MAX_FAULTS))),
        "{:?}",
        f.reason
    );
    // frame 0 is whole; frames 1..=MAX_FAULTS lost (32 bytes each); after the last
    // of them unknown (missing); the gaps between frames were never data
    let m = walk::MAX_FAULTS as u64;
    let missing = s.damage.bytes(RangeState::Missing);
    assert_eq!(missing, m * 32 + SIZE - (m * 64 + 32));
    assert_eq!(s.damage.ranges[0].offset, 64);
}
