//! Parsing a large stream: `StreamIndex::read` (through a 64 KiB `BufReader`, as the
//! planner does) over a 2 GiB disk's full backup with 32 768 data frames of 16 KiB
//! and a zero frame after each (65 536 frames, 512 MiB of payload), uncompressed and
//! LZ4-compressed (trailer with 32 768 entries). Throughput is in frames.
//!
//! `preadbuf_64k` is what the planner does (`ChainFile::open`: `StreamIndex::read_file`,
//! positioned reads, a buffer kept across seeks). The other rows are the alternatives
//! it was measured against: a plain `BufReader` (every seek drops the buffer), a smaller
//! one, and relative seeks that keep the buffer (`common::RelSeek`).

mod common;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{write_stream, Fill, Piece, RelSeek};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nbdfmt::writer::StreamOptions;
use nbdfmt::StreamIndex;

const DISK: u64 = 2 << 30;
const DATA_FRAMES: u64 = 32_768;
const DATA_LEN: u64 = 16 << 10;

fn make(dir: &Path, compressed: bool) -> PathBuf {
    let step = DISK / DATA_FRAMES;
    let mut pieces = Vec::with_capacity(2 * DATA_FRAMES as usize);
    for i in 0..DATA_FRAMES {
        pieces.push(Piece::Data {
            start: i * step,
            len: DATA_LEN,
        });
        pieces.push(Piece::Zero {
            start: i * step + DATA_LEN,
            len: step - DATA_LEN,
        });
    }
    let mut opts = StreamOptions::full("vda", DISK, 0);
    if compressed {
        opts = opts.compressed(2);
    }
    let p = dir.join(if compressed {
        "lz4.full.data"
    } else {
        "plain.full.data"
    });
    write_stream(&p, &opts, &pieces, &|_| 1, Fill::Mixed, false).expect("stream");
    p
}

#[derive(Clone, Copy)]
enum Via {
    BufReader,
    RelSeek,
    PreadBuf,
}

fn index(p: &Path, cap: usize, via: Via) -> StreamIndex {
    let f = File::open(p).expect("open");
    match via {
        Via::RelSeek => StreamIndex::read(RelSeek::new(cap, f)).expect("index"),
        Via::BufReader => StreamIndex::read(BufReader::with_capacity(cap, f)).expect("index"),
        Via::PreadBuf => StreamIndex::read(nbdfmt::PreadBuf::new(f, cap)).expect("index"),
    }
}

fn bench_parse(c: &mut Criterion) {
    let dir = common::bench_tempdir("parse");
    let mut g = c.benchmark_group("stream_index");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(2 * DATA_FRAMES));
    for compressed in [false, true] {
        let p = make(dir.path(), compressed);
        eprintln!(
            "{}: {} frames indexed",
            p.display(),
            index(&p, 64 << 10, Via::PreadBuf).frames.len()
        );
        let name = if compressed {
            "lz4_65536_frames"
        } else {
            "plain_65536_frames"
        };
        let variants: &[(usize, Via, &str)] = if compressed {
            &[
                (64 << 10, Via::PreadBuf, "preadbuf_64k"),
                (64 << 10, Via::BufReader, "bufreader_64k"),
                (64 << 10, Via::RelSeek, "relseek_64k"),
            ]
        } else {
            &[
                (64 << 10, Via::PreadBuf, "preadbuf_64k"),
                (64 << 10, Via::BufReader, "bufreader_64k"),
                (4 << 10, Via::BufReader, "bufreader_4k"),
                (64 << 10, Via::RelSeek, "relseek_64k"),
                (4 << 10, Via::RelSeek, "relseek_4k"),
            ]
        };
        for &(cap, via, v) in variants {
            g.bench_function(BenchmarkId::new(name, v), |b| {
                b.iter(|| index(&p, cap, via))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
