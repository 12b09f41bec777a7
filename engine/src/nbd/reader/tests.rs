//! The reader against a restore of the same chain: every window of the disk reads
//! the restored bytes, across many table pages, plain and LZ4; allocation agrees
//! with the extent map.

use std::fs;

use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
use nbdfmt::BackupSet;

use super::*;
use crate::extent::Source;
use crate::target::raw::RawTarget;
use crate::{apply, ApplyOptions};

const SIZE: u64 = 4 << 20;

fn bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8 & 0x0f // compressible
        })
        .collect()
}

/// A full of 3,000 small frames (data and zero) and two incrementals of 1,000
/// frames each overlapping it: thousands of runs, many table pages.
fn chain(dir: &std::path::Path, compressed: bool) {
    let c = |o: StreamOptions| if compressed { o.compressed(1) } else { o };
    let mut full = Vec::new();
    for i in 0..3000u64 {
        let at = i * 1024;
        full.push(if i % 3 == 2 {
            WriteFrame::Zero(at, 700)
        } else {
            WriteFrame::Data(at, bytes(i, 700))
        });
    }
    let inc = |k: u64| -> Vec<WriteFrame> {
        (0..1000u64)
            .map(|i| WriteFrame::Data(i * 3000 + k * 500, bytes(10_000 * k + i, 300 + k * 100)))
            .collect()
    };
    let files = [
        (
            "vda.full.data",
            write_stream(&c(StreamOptions::full("vda", SIZE, 0)), &full),
        ),
        (
            "vda.inc.virtnbdbackup.1.data",
            write_stream(&c(StreamOptions::inc("vda", 1, SIZE, 0)), &inc(1)),
        ),
        (
            "vda.inc.virtnbdbackup.2.data",
            write_stream(&c(StreamOptions::inc("vda", 2, SIZE, 0)), &inc(2)),
        ),
    ];
    for (name, b) in files {
        fs::write(dir.join(name), b).expect("write");
    }
}

#[test]
fn reads_equal_the_restored_disk_across_many_pages() {
    for compressed in [false, true] {
        let d = tempfile::tempdir().expect("tmp");
        chain(d.path(), compressed);
        let set = BackupSet::scan(d.path()).expect("scan");
        let plan = || DiskPlan::for_point(&set, "vda", 2).expect("plan");
        let out = d.path().join("out.raw");
        let t = RawTarget::create(&out, SIZE).expect("target");
        apply(&[plan()], vec![Box::new(t)], &ApplyOptions::default()).expect("apply");
        let want = fs::read(&out).expect("read");
        let map = plan().extent_map().expect("map");
        let r = ChainReader::new(plan()).expect("reader");
        assert!(r.table.len() > 4 * 256, "{} runs", r.table.len());
        let mut x = 12345u64;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % SIZE;
            let len = (x >> 40) % 20_000 + 1;
            let len = len.min(SIZE - off);
            let mut buf = vec![0xAAu8; len as usize];
            r.read_at(off, &mut buf).expect("read");
            assert!(
                buf == want[off as usize..(off + len) as usize],
                "{off}+{len}"
            );
            // allocation: data exactly where the map has data
            let runs = r.allocation(off, len, usize::MAX).expect("allocation");
            let mut pos = off;
            for (l, data) in runs {
                for b in [pos, pos + l - 1] {
                    let has = map.iter().any(|e| {
                        e.start <= b && b < e.end() && matches!(e.source, Source::Data { .. })
                    });
                    assert_eq!(has, data, "byte {b}");
                }
                pos += l;
            }
            assert_eq!(pos, off + len);
        }
        let mut all = vec![0u8; SIZE as usize];
        r.read_at(0, &mut all).expect("read all");
        assert!(all == want, "whole disk");
        // a limit keeps whole runs only
        let two = r.allocation(0, SIZE, 2).expect("allocation");
        assert_eq!(two.len(), 2);
        assert_eq!(two, r.allocation(0, SIZE, usize::MAX).expect("all")[..2]);
    }
}
