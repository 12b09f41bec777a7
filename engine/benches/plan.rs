//! Planning a 365-point chain: `DiskPlan::from_paths` over a full plus 365 small
//! incrementals (64 data frames of 4 KiB each at random offsets of a 4 GiB disk,
//! `.chksum` files present). Measures indexing (frame headers, `.chksum` reads) and
//! folding into the extent map; files are in the page cache after the first pass.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{write_stream, Fill, Piece, Rng};
use criterion::{criterion_group, criterion_main, Criterion};
use engine::DiskPlan;
use nbdfmt::writer::StreamOptions;

const DISK: u64 = 4 << 30;
const INCS: u32 = 365;
const FRAMES_PER_INC: usize = 64;
const BLOCK: u64 = 4096;

fn make_chain(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut rng = Rng::new(365);
    let mut paths = Vec::new();
    // A small full: 64 data frames of 64 KiB with zero frames between.
    let mut pieces = Vec::new();
    let step = DISK / 64;
    for i in 0..64 {
        pieces.push(Piece::Data {
            start: i * step,
            len: 64 << 10,
        });
        pieces.push(Piece::Zero {
            start: i * step + (64 << 10),
            len: step - (64 << 10),
        });
    }
    let full = dir.join("vda.full.data");
    write_stream(
        &full,
        &StreamOptions::full("vda", DISK, 0),
        &pieces,
        &|_| 1,
        Fill::Random,
        true,
    )
    .expect("full");
    paths.push(full);
    for n in 1..=INCS {
        let mut offs: Vec<u64> = (0..FRAMES_PER_INC)
            .map(|_| rng.range(0, DISK / BLOCK - 1) * BLOCK)
            .collect();
        offs.sort_unstable();
        offs.dedup();
        let pieces: Vec<Piece> = offs
            .into_iter()
            .map(|start| Piece::Data { start, len: BLOCK })
            .collect();
        let p = dir.join(format!("vda.inc.virtnbdbackup.{n}.data"));
        write_stream(
            &p,
            &StreamOptions::inc("vda", n, DISK, 0),
            &pieces,
            &|_| u64::from(n) + 1,
            Fill::Random,
            true,
        )
        .expect("inc");
        paths.push(p);
    }
    paths
}

fn bench_plan(c: &mut Criterion) {
    let dir = common::bench_tempdir("plan");
    let paths = make_chain(dir.path());
    let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
    eprintln!(
        "plan_365: {} files, {} extents, {} live data bytes",
        plan.files.len(),
        plan.stats.extents,
        plan.data_bytes()
    );
    let mut g = c.benchmark_group("plan_365");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("from_paths", |b| {
        b.iter(|| DiskPlan::from_paths("vda", &paths, None).expect("plan"))
    });
    // The same indexing (and `.chksum` reads) through a plain 64 KiB `BufReader`, as
    // `from_paths` did before `StreamIndex::read_file` (every header seek drops it).
    g.bench_function("index_bufreader_64k", |b| {
        b.iter(|| {
            paths
                .iter()
                .map(|p| {
                    let f = std::fs::File::open(p).expect("open");
                    let i =
                        nbdfmt::StreamIndex::read(std::io::BufReader::with_capacity(64 << 10, f))
                            .expect("index");
                    (
                        i.frames.len(),
                        nbdfmt::checksum::stored_checksum(p).expect("chksum"),
                    )
                })
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
