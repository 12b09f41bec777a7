//! Apply throughput: one 256 MiB full stream (64 data frames of 4 MiB, `.chksum`
//! present) written into a fresh raw file and a fresh qcow2 image, uncompressed and
//! LZ4-compressed, with the default options (checksum + read-back verification) and
//! without verification. Each iteration creates the target, applies (which ends with
//! the target's fsync) and is timed; the file is removed untimed.
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
    assert_eq!(rep.disks[0].bytes_written, SIZE);
    std::fs::remove_file(out).expect("rm");
    d
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

criterion_group!(benches, bench_apply);
criterion_main!(benches);
