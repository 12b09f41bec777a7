//! qcow2 target conformance: mixed writes mirrored into an in-memory model, then checked
//! with the real `qemu-img` (check, convert -O raw, info, map) for several option sets.
//! `qemu-img` is only used to *check* images here; the product never runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use engine::target::qcow2::{CompressionType, Qcow2Compat, Qcow2Options, Qcow2Target};
use engine::BlockTarget;

const MIB: u64 = 1024 * 1024;

/// `qemu-img`, or `None` after a loud message (the test then passes without checking).
fn qemu_img() -> Option<&'static str> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => Some("qemu-img"),
        _ => {
            eprintln!("\n!!!!!!!! SKIPPED: qemu-img is not installed; qcow2 images are NOT checked (apt-get install qemu-utils) !!!!!!!!\n");
            None
        }
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// xorshift64*: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            // Never all zero, so data clusters cannot be mistaken for holes.
            v.extend_from_slice(&(self.next() | 1).to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The target and a byte model of what it must contain.
struct Pair {
    t: Qcow2Target,
    model: Vec<u8>,
}

impl Pair {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.t
            .write_at(offset, data)
            .unwrap_or_else(|e| panic!("write {offset}+{}: {e}", data.len()));
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, offset: u64, len: u64) {
        self.t
            .write_zeroes(offset, len)
            .unwrap_or_else(|e| panic!("write_zeroes {offset}+{len}: {e}"));
        self.model[offset as usize..(offset + len) as usize].fill(0);
    }
    fn check_read(&mut self, offset: u64, len: usize) {
        let mut buf = vec![0u8; len];
        self.t.read_at(offset, &mut buf).expect("read_at");
        let want = &self.model[offset as usize..offset as usize + len];
        if buf != want {
            panic!(
                "read_at {offset}+{len}: first difference at {}",
                offset as usize + first_diff(&buf, want)
            );
        }
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// 40 MiB + 200 KiB + 512: a multiple of 512, but of no cluster size from 1 KiB up.
const SIZE: u64 = 40 * MIB + 200 * 1024 + 512;

/// Ranges no whole cluster of which may be allocated as data afterwards:
/// (range, holds for v2 too).
fn exercise(p: &mut Pair, rng: &mut Rng) -> Vec<((u64, u64), bool)> {
    let size = p.t.size();
    // Large aligned writes, back to back.
    p.write(0, &rng.bytes(4 * MIB as usize));
    p.write(8 * MIB, &rng.bytes(MIB as usize));
    p.write(9 * MIB, &rng.bytes(MIB as usize));
    // Unaligned, byte-granular.
    p.write(65_536 + 17, &rng.bytes(4096));
    p.write(30 * 65_536 - 777, &rng.bytes(100_001));
    p.write(12_345, &[0xab]);
    p.write(5 * MIB - 1, &rng.bytes(3));
    p.write(6 * MIB + 511, &rng.bytes(1));
    // Overlapping overwrite across many clusters.
    p.write(2 * MIB + 333, &rng.bytes(3 * MIB as usize));
    p.check_read(0, 6 * MIB as usize);
    // Zeroes over data: aligned-ish and byte-granular.
    p.zero(MIB, 2 * MIB);
    p.zero(3 * MIB + 7, 1000);
    // Zeroes over never-written space.
    p.zero(20 * MIB, 10 * MIB);
    // Zeroes across data and unallocated space.
    p.zero(9 * MIB + MIB / 2, 2 * MIB + 12_345);
    // Data back into a zeroed range.
    p.write(MIB + 128 * 1024, &rng.bytes(64 * 1024));
    p.write(9 * MIB + MIB / 2 + 100, &rng.bytes(5000));
    p.check_read(0, 12 * MIB as usize);
    // The last cluster of the disk, then zero its tail, then the very last byte.
    p.write(size - 5000, &rng.bytes(5000));
    p.zero(size - 1000, 1000);
    p.write(size - 1, &[0x5a]);
    p.write(32 * MIB, &rng.bytes(4 * MIB as usize));
    // Many small mixed writes and zeroes in one area.
    for _ in 0..300 {
        let off = 14 * MIB + rng.below(4 * MIB);
        let len = (1 + rng.below(20_000)).min(18 * MIB - off);
        if rng.below(4) == 0 {
            p.zero(off, len.max(1) * 5);
        } else {
            p.write(off, &rng.bytes(len as usize));
        }
        if rng.below(16) == 0 {
            let at = 14 * MIB + rng.below(3 * MIB);
            p.check_read(at, 100_000);
        }
    }
    p.t.flush().expect("flush");
    // Zeroing a whole area that has data and holes, then writing a few bytes into it.
    p.zero(32 * MIB - 4096, 2 * MIB + 8192);
    p.write(33 * MIB + 3, &rng.bytes(10));
    p.check_read(size - 6 * MIB, 6 * MIB as usize);
    vec![
        ((20 * MIB, 30 * MIB), true),
        ((MIB + 192 * 1024, 3 * MIB), false),
        ((32 * MIB - 4096, 33 * MIB), false),
    ]
}

/// Data extents (offset, length) from `qemu-img map` (human output lists data only).
fn qemu_data_extents(q: &str, img: &Path) -> Vec<(u64, u64)> {
    let (ok, text) = run(Command::new(q).args(["map", "--output=human"]).arg(img));
    assert!(ok, "qemu-img map failed: {text}");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((hex(f.next()?), hex(f.next()?)))
        })
        .collect()
}

/// Whole clusters inside `range`.
fn whole_clusters(range: (u64, u64), cs: u64) -> (u64, u64) {
    (range.0.div_ceil(cs) * cs, range.1 / cs * cs)
}

fn conformance(name: &str, opts: Qcow2Options) {
    let Some(q) = qemu_img() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join(format!("{name}.qcow2"));
    let t = Qcow2Target::create(&img, SIZE, &opts).expect("create");
    let mut p = Pair {
        t,
        model: vec![0u8; SIZE as usize],
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(opts.cluster_size));
    let holes = exercise(&mut p, &mut rng);

    // Our own mapping view before finishing.
    let cs = u64::from(opts.cluster_size);
    let ours = p.t.data_ranges(0, SIZE).expect("data_ranges");
    for &(range, on_v2) in &holes {
        if opts.compat == Qcow2Compat::V2 && !on_v2 {
            continue;
        }
        let (a, b) = whole_clusters(range, cs);
        if a >= b {
            continue;
        }
        for &(o, l) in &ours {
            assert!(
                o + l <= a || o >= b,
                "{name}: data_ranges shows data {o}+{l} inside zeroed clusters {a}..{b}"
            );
        }
    }
    let mut full = vec![0u8; SIZE as usize];
    p.t.read_at(0, &mut full).expect("read all");
    assert!(
        full == p.model,
        "{name}: read-back differs at {}",
        first_diff(&full, &p.model)
    );
    p.t.finish().expect("finish");
    drop(p.t);

    let (ok, text) = run(Command::new(q).args(["check", "--output=human"]).arg(&img));
    assert!(
        ok && text.contains("No errors were found"),
        "{name}: qemu-img check:\n{text}"
    );

    let raw = dir.path().join(format!("{name}.raw"));
    let (ok, text) = run(Command::new(q)
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    assert!(ok, "{name}: qemu-img convert: {text}");
    let converted = std::fs::read(&raw).expect("read raw");
    assert_eq!(converted.len(), p.model.len(), "{name}: converted size");
    assert!(
        converted == p.model,
        "{name}: qemu-img's view differs from the model at {}",
        first_diff(&converted, &p.model)
    );

    let (ok, text) = run(Command::new(q).args(["info", "--output=json"]).arg(&img));
    assert!(ok, "{name}: qemu-img info: {text}");
    let info = nbdfmt::QcowInfo::parse(text.as_bytes()).expect("info json");
    assert_eq!(info.format.as_deref(), Some("qcow2"), "{name}");
    assert_eq!(info.virtual_size, Some(SIZE), "{name}");
    assert_eq!(info.cluster_size, Some(cs), "{name}");
    assert_eq!(info.compat.as_deref(), Some(opts.compat.as_str()), "{name}");
    assert_eq!(info.lazy_refcounts, opts.lazy_refcounts, "{name}");
    assert_eq!(
        info.compression_type.as_deref(),
        Some(opts.compression_type.as_str()),
        "{name}"
    );
    assert_eq!(
        info.refcount_bits,
        Some(u64::from(opts.refcount_bits)),
        "{name}"
    );
    assert!(!info.extended_l2 && info.data_file.is_none(), "{name}");
    // And the options round-trip through our own qcow.json reader.
    assert_eq!(
        Qcow2Options::from_qcow_info(&info).expect("options"),
        opts,
        "{name}"
    );

    let extents = qemu_data_extents(q, &img);
    for &(range, on_v2) in &holes {
        if opts.compat == Qcow2Compat::V2 && !on_v2 {
            continue;
        }
        let (a, b) = whole_clusters(range, cs);
        if a >= b {
            continue;
        }
        for &(o, l) in &extents {
            assert!(
                o + l <= a || o >= b,
                "{name}: qemu-img map shows data {o}+{l} inside zeroed clusters {a}..{b}"
            );
        }
    }
}

#[test]
fn qcow2_conformance_default_64k_v3() {
    conformance("default", Qcow2Options::default());
}

#[test]
fn qcow2_conformance_4k_v3_lazy_zstd() {
    conformance(
        "4k-lazy-zstd",
        Qcow2Options {
            cluster_size: 4096,
            lazy_refcounts: true,
            compression_type: CompressionType::Zstd,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_2m_v3_zstd_refcount64() {
    conformance(
        "2m-zstd-rc64",
        Qcow2Options {
            cluster_size: 2 * 1024 * 1024,
            compression_type: CompressionType::Zstd,
            refcount_bits: 64,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_64k_v3_lazy_refcount1() {
    conformance(
        "64k-lazy-rc1",
        Qcow2Options {
            lazy_refcounts: true,
            refcount_bits: 1,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_512_v3_lazy_zstd() {
    // The smallest cluster: the header plus imago's feature-name table fill it exactly.
    conformance(
        "512-lazy-zstd",
        Qcow2Options {
            cluster_size: 512,
            lazy_refcounts: true,
            compression_type: CompressionType::Zstd,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_64k_v2() {
    conformance(
        "64k-v2",
        Qcow2Options {
            compat: Qcow2Compat::V2,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_4k_v2() {
    conformance(
        "4k-v2",
        Qcow2Options {
            compat: Qcow2Compat::V2,
            cluster_size: 4096,
            ..Qcow2Options::default()
        },
    );
}

#[test]
fn qcow2_conformance_2m_v2() {
    conformance(
        "2m-v2",
        Qcow2Options {
            compat: Qcow2Compat::V2,
            cluster_size: 2 * 1024 * 1024,
            ..Qcow2Options::default()
        },
    );
}

/// A 10 TiB image: creating it, zeroing all of it and writing its last bytes is cheap.
#[test]
fn qcow2_huge_sparse_image() {
    let Some(q) = qemu_img() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    for opts in [
        Qcow2Options::default(),
        Qcow2Options {
            compat: Qcow2Compat::V2,
            ..Qcow2Options::default()
        },
    ] {
        let img = dir
            .path()
            .join(format!("huge-{}.qcow2", opts.compat.as_str()));
        let size = 10 << 40;
        let start = Instant::now();
        let mut t = Qcow2Target::create(&img, size, &opts).expect("create");
        t.write_zeroes(0, size).expect("zero everything");
        t.write_at(size - 4096, &[0x11u8; 4096])
            .expect("write last block");
        t.write_zeroes(0, size - 4096)
            .expect("zero everything again");
        let mut b = [0u8; 8192];
        t.read_at(size - 8192, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 0x11));
        assert_eq!(
            t.data_ranges(0, size).expect("map"),
            vec![(size - 65_536, 65_536)]
        );
        t.finish().expect("finish");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "took {:?}",
            start.elapsed()
        );
        let len = std::fs::metadata(&img).expect("stat").len();
        assert!(len < 8 * MIB, "{len} bytes for an almost empty image");
        let (ok, text) = run(Command::new(q).args(["check"]).arg(&img));
        assert!(ok, "qemu-img check: {text}");
    }
}

/// Another process's image is never touched.
#[test]
fn qcow2_create_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("taken.qcow2");
    std::fs::write(&img, b"not ours").expect("write");
    assert!(Qcow2Target::create(&img, MIB, &Qcow2Options::default()).is_err());
    assert_eq!(std::fs::read(&img).expect("read"), b"not ours");
    let mut t = Qcow2Target::create(&dir.path().join("new.qcow2"), MIB, &Qcow2Options::default())
        .expect("create");
    t.finish().expect("finish");
    assert!(
        Qcow2Target::create(&dir.path().join("new.qcow2"), MIB, &Qcow2Options::default()).is_err()
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// CPU time (user + system) of the calling thread, from /proc (clock ticks, 10 ms).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn time_raw(path: &Path, total: u64, chunk: &[u8]) -> Duration {
    use std::os::unix::fs::FileExt;
    let start = Instant::now();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create raw");
    let mut off = 0;
    while off < total {
        f.write_all_at(chunk, off).expect("pwrite");
        off += chunk.len() as u64;
    }
    f.sync_all().expect("fsync");
    start.elapsed()
}

fn time_qcow2(path: &Path, total: u64, chunk: &[u8]) -> Duration {
    let start = Instant::now();
    let mut t = Qcow2Target::create(path, total, &Qcow2Options::default()).expect("create");
    let mut off = 0;
    while off < total {
        t.write_at(off, chunk).expect("write");
        off += chunk.len() as u64;
    }
    t.finish().expect("finish");
    start.elapsed()
}

fn time_cp(src: &Path, dst: &Path) -> Duration {
    let start = Instant::now();
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .expect("cp")
        .success();
    assert!(ok);
    std::fs::File::open(dst)
        .expect("open")
        .sync_all()
        .expect("fsync");
    start.elapsed()
}

/// Throughput, 1 GiB of non-zero data written sequentially, each run ending with fsync:
/// `cargo test --release -p engine --test qcow2_target -- --ignored --nocapture qcow2_throughput`
/// (directory: `VMRESTORE_BENCH_DIR`, default /tmp; runs: `VMRESTORE_BENCH_REPS`, default 5).
/// The writers run in a rotating order, and every output is deleted and `sync`ed away
/// before the next run starts, so one run's writeback and discards do not land on another.
#[test]
#[ignore = "throughput measurement (1 GiB per run); run in release with --nocapture"]
fn qcow2_throughput_1gib() {
    let base =
        PathBuf::from(std::env::var("VMRESTORE_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()));
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let total = 1024 * MIB;
    let reps: usize = std::env::var("VMRESTORE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut rng = Rng(42);
    let buf = rng.bytes(4 * MIB as usize);
    let names = [
        "raw pwrite 1M",
        "raw pwrite 4M",
        "cp --sparse=always",
        "qcow2 1M",
        "qcow2 4M",
        "qcow2 64K",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let settle = || {
        let ok = Command::new("sync")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "sync");
    };
    // The source for cp: in the page cache, like a restore's final raw data would be.
    let src = dir.path().join("src.raw");
    time_raw(&src, total, &buf[..MIB as usize]);
    for rep in 0..reps {
        for k in 0..names.len() {
            let which = (rep + k) % names.len();
            let out = dir.path().join(format!("out-{which}"));
            let cpu0 = thread_cpu();
            let d = match which {
                0 => time_raw(&out, total, &buf[..MIB as usize]),
                1 => time_raw(&out, total, &buf),
                2 => time_cp(&src, &out),
                3 => time_qcow2(&out, total, &buf[..MIB as usize]),
                4 => time_qcow2(&out, total, &buf),
                _ => time_qcow2(&out, total, &buf[..65_536]),
            };
            results[which].push(mibps(total, d));
            cpu[which].push((thread_cpu() - cpu0).as_secs_f64());
            if rep == 0 && which == 3 {
                if let Some(q) = qemu_img() {
                    let (ok, text) = run(Command::new(q).arg("compare").arg(&src).arg(&out));
                    assert!(ok, "qemu-img compare: {text}");
                }
            }
            std::fs::remove_file(&out).expect("rm");
            settle();
        }
        let line: Vec<String> = names
            .iter()
            .zip(&results)
            .map(|(n, r)| format!("{n} {:.0}", r[rep]))
            .collect();
        eprintln!("rep {rep}: {} MiB/s", line.join(" | "));
    }
    let med: Vec<f64> = results.into_iter().map(median).collect();
    let cpu_med: Vec<f64> = cpu.into_iter().map(median).collect();
    eprintln!(
        "median CPU s/GiB of this thread (cp runs in a child, not counted): raw 1M {:.2} | raw 4M {:.2} | qcow2 1M {:.2} | qcow2 4M {:.2} | qcow2 64K {:.2}",
        cpu_med[0], cpu_med[1], cpu_med[3], cpu_med[4], cpu_med[5]
    );
    let line: Vec<String> = names
        .iter()
        .zip(&med)
        .map(|(n, m)| format!("{n} {m:.0}"))
        .collect();
    eprintln!("median of {reps}: {} MiB/s", line.join(" | "));
    eprintln!(
        "time vs cp --sparse=always: qcow2 1M {:.2}x, 4M {:.2}x, 64K {:.2}x; vs raw pwrite 4M: qcow2 1M {:.2}x, 4M {:.2}x, 64K {:.2}x",
        med[2] / med[3],
        med[2] / med[4],
        med[2] / med[5],
        med[1] / med[3],
        med[1] / med[4],
        med[1] / med[5]
    );
}
