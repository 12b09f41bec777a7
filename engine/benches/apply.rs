//! Apply throughput: one 256 MiB full stream (64 data frames of 4 MiB, `.chksum`
//! present) written into a fresh raw file and a fresh qcow2 image, uncompressed and
//! LZ4-compressed, with the default options (checksum + read-back verification) and
//! without verification. Each iteration creates the target, applies (which ends with
//! the target's fsync) and is timed; the file is removed untimed.
//!
//!
//! `apply_subcluster`: a full of 20,000 extents of 4 KiB, 64 KiB apart (zero frames
//! between them, as virtnbdbackup writes a full of a raw-backed disk): 78 MiB of data
//! in a 1.2 GiB disk, into qcow2 with verification — the per-extent cost (the
//! sub-cluster case of `scripts/bench-extents.sh`, s100k, at a criterion's scale).
//!
//! Inputs and targets live in `$VMRESTORE_BENCH_DIR` (default `/var/tmp`); point it
//! at `/dev/shm` to take the disk (and fsync) out and see the CPU cost.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{full_pieces, write_stream, Fill, GRANULE};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, BlockTarget, DiskPlan};
use nbdfmt::writer::StreamOptions;

const SIZE: u64 = 256 << 20;
const FRAME: u64 = 4 << 20;

fn make_stream(dir: &Path, compressed: bool) -> PathBuf {
    let path = dir
        .join(if compressed { "lz4" } else { "plain" })
        .join("vda.full.data");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let ids = vec![1u32; (SIZE / GRANULE) as usize];
    // 4 MiB frames instead of one big extent.
    let pieces: Vec<_> = full_pieces(&ids)
        .into_iter()
        .flat_map(|p| match p {
            common::Piece::Data { start, len } => (0..len / FRAME)
                .map(|i| common::Piece::Data {
                    start: start + i * FRAME,
                    len: FRAME,
                })
                .collect::<Vec<_>>(),
            z => vec![z],
        })
        .collect();
    let mut opts = StreamOptions::full("vda", SIZE, 0);
    if compressed {
        opts = opts.compressed(2);
    }
    write_stream(&path, &opts, &pieces, &|_| 1, Fill::Mixed, true).expect("write stream");
    path
}

#[derive(Clone, Copy)]
enum Kind {
    Raw,
    Qcow2,
}

const SUB_EXTENTS: u64 = 20_000;
const SUB_LEN: u64 = 4096;

fn make_subcluster_stream(dir: &Path) -> PathBuf {
    let path = dir.join("subcluster").join("vda.full.data");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let pieces: Vec<_> = (0..SUB_EXTENTS)
        .flat_map(|i| {
            let start = i * GRANULE;
            [
                common::Piece::Data {
                    start,
                    len: SUB_LEN,
                },
                common::Piece::Zero {
                    start: start + SUB_LEN,
                    len: GRANULE - SUB_LEN,
                },
            ]
        })
        .collect();
    let opts = StreamOptions::full("vda", SUB_EXTENTS * GRANULE, 0);
    write_stream(&path, &opts, &pieces, &|_| 1, Fill::Mixed, true).expect("write stream");
    path
}

fn run_once(plan: &DiskPlan, out: &Path, kind: Kind, opts: &ApplyOptions) -> Duration {
    let _ = std::fs::remove_file(out);
    let t0 = Instant::now();
    let target: Box<dyn BlockTarget> = match kind {
        Kind::Raw => Box::new(RawTarget::create(out, plan.virtual_size).expect("raw target")),
        Kind::Qcow2 => Box::new(
            Qcow2Target::create(out, plan.virtual_size, &Qcow2Options::default())
                .expect("qcow2 target"),
        ),
    };
    let rep = apply(std::slice::from_ref(plan), vec![target], opts).expect("apply");
    let d = t0.elapsed();
    assert_eq!(rep.disks[0].bytes_written, plan_data(plan));
    std::fs::remove_file(out).expect("rm");
    d
}

/// Live data bytes of a single-file plan (what apply must report written).
fn plan_data(plan: &DiskPlan) -> u64 {
    if plan.virtual_size == SIZE {
        SIZE
    } else {
        SUB_EXTENTS * SUB_LEN
    }
}

fn bench_subcluster(c: &mut Criterion) {
    let dir = common::bench_tempdir("apply-subcluster");
    let stream = make_subcluster_stream(dir.path());
    let plan = DiskPlan::from_paths("vda", std::slice::from_ref(&stream), None).expect("plan");
    let mut g = c.benchmark_group("apply_subcluster");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(SUB_EXTENTS));
    let out = dir.path().join("out-subcluster.qcow2");
    let opts = ApplyOptions::default();
    g.bench_function(BenchmarkId::new("qcow2", "verify"), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| run_once(&plan, &out, Kind::Qcow2, &opts))
                .sum()
        })
    });
    g.finish();
}

fn bench_apply(c: &mut Criterion) {
    let dir = common::bench_tempdir("apply");
    let plain = make_stream(dir.path(), false);
    let lz4 = make_stream(dir.path(), true);
    let default = ApplyOptions::default();
    let no_verify = ApplyOptions {
        verify_checksums: false,
        verify_readback: false,
        ..ApplyOptions::default()
    };
    for (group_name, stream) in [("apply_plain", &plain), ("apply_lz4", &lz4)] {
        let plan = DiskPlan::from_paths("vda", std::slice::from_ref(stream), None).expect("plan");
        let mut g = c.benchmark_group(group_name);
        g.sample_size(10)
            .measurement_time(Duration::from_secs(5))
            .warm_up_time(Duration::from_secs(1))
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Bytes(SIZE));
        for (kind, kname) in [(Kind::Raw, "raw"), (Kind::Qcow2, "qcow2")] {
            for (opts, oname) in [(&default, "verify"), (&no_verify, "no_verify")] {
                let out = dir.path().join(format!("out-{group_name}-{kname}-{oname}"));
                g.bench_function(BenchmarkId::new(kname, oname), |b| {
                    b.iter_custom(|iters| {
                        (0..iters).map(|_| run_once(&plan, &out, kind, opts)).sum()
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench_apply, bench_subcluster);
criterion_main!(benches);
