//! Writes a benchmark backup chain laid out exactly as virtnbdbackup does, with
//! nbdfmt's stream writer:
//!
//! ```text
//! vda.full.data (+ .chksum)                 vda.virtnbdbackup.N.qcow.json
//! vda.inc.virtnbdbackup.N.data (+ .chksum)  vmconfig.virtnbdbackup.N.xml
//! checkpoints/virtnbdbackup.N.xml           bench.cpt
//! ```
//! File mtimes increase with N (virtnbdrestore 1.9 orders files by mtime).
//!
//! ```text
//! genchain <case> <dir> [--compress] [--level L] [--fill mixed|random] [--no-chksum] [--seed S]
//! ```
//! Cases (64 KiB granules, deterministic for a seed):
//! - `a`:  4 GiB disk, full with 1 GiB in extents of up to 32 MiB, then 10 incrementals
//!   of ~100 MiB each in extents of 64 KiB–1 MiB at random places.
//! - `b`:  4 GiB disk, the same full, then 29 incrementals (30 points) that each
//!   rewrite the same hot 100 MiB (100 extents of 1 MiB).
//! - `c`:  4 GiB disk, full with 256 MiB, then 365 incrementals of 1 MiB each
//!   (extents of 64–256 KiB at random places; the data accumulates).
//! - `c1`: one full backup with the final content of `c` (c').
//! - `d`:  64 MiB disk, full with 1 MiB and 2 incrementals of 512 KiB (a 2 MiB chain).
//! - `e`:  a 3-disk VM: vda 4 GiB (full 512 MiB), vdb 2 GiB (full 256 MiB), vdc 1 GiB
//!   (full 128 MiB), each with 5 incrementals of 1/8 of its full at random places; every
//!   checkpoint covers the three disks.
//! - `h`:  one VM of a whole host (`scripts/bench-host.sh`): vda 2 GiB (full 256 MiB),
//!   vdb 1 GiB (full 128 MiB), each with 3 incrementals of 1/8 of its full.
//!
//! - `f1m`, `f4m`: one full stream of 1,000,000 / 4,000,000 one-byte data frames, one
//!   every other byte (a legal, hostile stream: 4 MiB of data in 4M frames, 172 MB file).
//! - `x16m`: a 16,777,216-extent chain: a 16 MiB full in one data frame, then two
//!   incrementals of 4,194,304 one-byte frames each, at offsets 4i and 4i + 2, so the
//!   final map alternates inc1, full, inc2, full byte by byte.
//! - `s100k`: a 6.1 GiB disk whose full holds 100,000 extents of 4 KiB, 64 KiB apart
//!   (391 MiB of data; zero frames between them, as a full has). `s400k`: the same with
//!   400,000 extents (24.4 GiB disk, 1.5 GiB of data).
//!
//! `--fill mixed` (default): each 4 KiB block is half pseudo-random, half text (LZ4 ratio
//! about 2, like guest data); `random`: incompressible. Uncompressed and compressed
//! variants of a case hold the same disk content.

#[path = "../benches/common/mod.rs"]
mod common;

use std::fs::{self, File, FileTimes};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use common::{full_pieces, inc_pieces, write_stream, Fill, Rng, GRANULE};
use nbdfmt::writer::StreamOptions;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

struct Args {
    case: String,
    dir: PathBuf,
    level: Option<u32>,
    fill: Fill,
    chksum: bool,
    seed: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: genchain <a|b|c|c1|d|e|f1m|f4m|x16m|s100k|s400k> <dir> [--compress] [--level L] [--fill mixed|random] [--no-chksum] [--seed S]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut pos = Vec::new();
    let mut a = Args {
        case: String::new(),
        dir: PathBuf::new(),
        level: None,
        fill: Fill::Mixed,
        chksum: true,
        seed: 1,
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--compress" => a.level = Some(a.level.unwrap_or(2)),
            "--level" => {
                a.level = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--fill" => {
                a.fill = it
                    .next()
                    .and_then(|v| Fill::parse(&v))
                    .unwrap_or_else(|| usage())
            }
            "--no-chksum" => a.chksum = false,
            "--seed" => {
                a.seed = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "-h" | "--help" => usage(),
            _ if x.starts_with("--") => usage(),
            _ => pos.push(x),
        }
    }
    let [case, dir] = <[String; 2]>::try_from(pos).unwrap_or_else(|_| usage());
    a.case = case;
    a.dir = PathBuf::from(dir);
    a
}

/// The disk's history: granule ids after each checkpoint are derived step by step.
struct Layout {
    disk: u64,
    /// Per checkpoint (0 = full): the granules written by that backup.
    steps: Vec<Vec<u64>>,
}

/// Marks `count` granules from `g` (clamped to the disk).
fn extent(out: &mut Vec<u64>, g: u64, count: u64, n: u64) {
    out.extend(g..(g + count).min(n));
}

/// A full with `data` bytes in extents of 1..=max granules spread over the disk.
fn full_layout(rng: &mut Rng, disk: u64, data: u64, max: u64) -> Vec<u64> {
    let n = disk / GRANULE;
    let want = data / GRANULE;
    let mut out = Vec::new();
    // Average run length (max+1)/2; the gaps share the rest of the disk evenly.
    let runs = (want * 2 / (max + 1)).max(1);
    let gap_mean = (n - want) / runs;
    let mut g = 0u64;
    let mut left = want;
    while left > 0 && g < n {
        g += rng.range(1, 2 * gap_mean.max(1) - 1).min(n - g - 1);
        let len = rng.range(1, max).min(left).min(n - g);
        extent(&mut out, g, len, n);
        left -= len;
        g += len;
    }
    // If the gaps ran past the end, fill the rest from the start of the free space.
    if left > 0 {
        let used: std::collections::BTreeSet<u64> = out.iter().copied().collect();
        out.extend((0..n).filter(|x| !used.contains(x)).take(left as usize));
    }
    out
}

/// `bytes` in extents of 1..=max granules at random places.
fn scattered(rng: &mut Rng, disk: u64, bytes: u64, max: u64) -> Vec<u64> {
    let n = disk / GRANULE;
    let mut left = bytes / GRANULE;
    let mut out = Vec::new();
    while left > 0 {
        let len = rng.range(1, max).min(left);
        let g = rng.range(0, n - len);
        extent(&mut out, g, len, n);
        left -= len;
    }
    out
}

/// The VM's disks (target name and history), every one with the same number of steps.
fn layouts(case: &str, seed: u64) -> Vec<(&'static str, Layout)> {
    match case {
        "e" => multi_disk(
            seed ^ 0x65,
            &[("vda", 4 * GIB), ("vdb", 2 * GIB), ("vdc", GIB)],
            5,
        ),
        // one VM of a whole host (scripts/bench-host.sh)
        "h" => multi_disk(seed ^ 0x68, &[("vda", 2 * GIB), ("vdb", GIB)], 3),
        _ => vec![("vda", layout(case, seed))],
    }
}

/// Disks of a multi-disk VM: each a full of 1/8 of the disk, then `incs` incrementals
/// of 1/8 of that full at random places.
fn multi_disk(
    seed: u64,
    disks: &[(&'static str, u64)],
    incs: usize,
) -> Vec<(&'static str, Layout)> {
    let mut rng = Rng::new(seed);
    disks
        .iter()
        .map(|&(name, disk)| {
            let full = disk / 8;
            let mut steps = vec![full_layout(&mut rng, disk, full, 256)];
            for _ in 0..incs {
                steps.push(scattered(&mut rng, disk, full / 8, 16));
            }
            (name, Layout { disk, steps })
        })
        .collect()
}

fn layout(case: &str, seed: u64) -> Layout {
    // c1 must have c's content: same layout, same seed.
    let key = if case == "c1" { "c" } else { case };
    let mut rng = Rng::new(seed ^ key.bytes().fold(0u64, |a, b| a * 131 + u64::from(b)));
    match case {
        "a" => {
            let disk = 4 * GIB;
            let mut steps = vec![full_layout(&mut rng, disk, GIB, 512)];
            for _ in 0..10 {
                steps.push(scattered(&mut rng, disk, 100 * MIB, 16));
            }
            Layout { disk, steps }
        }
        "b" => {
            let disk = 4 * GIB;
            let mut steps = vec![full_layout(&mut rng, disk, GIB, 512)];
            let n = disk / GRANULE;
            let mut hot = Vec::new();
            for _ in 0..100 {
                let g = rng.range(0, n / 16 - 1) * 16;
                extent(&mut hot, g, 16, n);
            }
            for _ in 0..29 {
                steps.push(hot.clone());
            }
            Layout { disk, steps }
        }
        "c" | "c1" => {
            let disk = 4 * GIB;
            let mut steps = vec![full_layout(&mut rng, disk, 256 * MIB, 256)];
            for _ in 0..365 {
                steps.push(scattered(&mut rng, disk, MIB, 4));
            }
            Layout { disk, steps }
        }
        "d" => {
            let disk = 64 * MIB;
            let mut steps = vec![full_layout(&mut rng, disk, MIB, 4)];
            for _ in 0..2 {
                steps.push(scattered(&mut rng, disk, 512 << 10, 4));
            }
            Layout { disk, steps }
        }
        _ => usage(),
    }
}

fn qcow_json(name: &str, disk: u64, allocated: u64) -> String {
    // What `qemu-img info --output=json` prints for a qemu-img-created qcow2.
    format!(
        r#"{{
    "virtual-size": {disk},
    "filename": "/var/lib/libvirt/images/bench-{name}.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": {actual},
    "format-specific": {{
        "type": "qcow2",
        "data": {{
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }}
    }},
    "dirty-flag": false
}}"#,
        actual = allocated + 3 * 65536 + (disk / GRANULE / 8192 + 1) * 65536
    )
}

const UUID: &str = "6d1b7f5e-3c0a-4c8e-9a51-b3e4c2d9f001";

fn domain_xml(indent: &str, disks: &[(&str, u64)]) -> String {
    let devices: String = disks
        .iter()
        .map(|(name, _)| {
            format!(
                r"    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/bench-{name}.qcow2'/>
      <target dev='{name}' bus='virtio'/>
    </disk>
"
            )
        })
        .collect();
    let x = format!(
        r"<domain type='kvm'>
  <name>bench</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}  </devices>
</domain>
"
    );
    x.lines().map(|l| format!("{indent}{l}\n")).collect()
}

fn checkpoint_xml(n: u32, disks: &[(&str, u64)]) -> String {
    let parent = if n == 0 {
        String::new()
    } else {
        format!(
            "  <parent>\n    <name>virtnbdbackup.{}</name>\n  </parent>\n",
            n - 1
        )
    };
    let cp_disks: String = disks
        .iter()
        .map(|(name, size)| {
            format!("    <disk name='{name}' checkpoint='bitmap' bitmap='virtnbdbackup.{n}' size='{size}'/>\n")
        })
        .collect();
    format!(
        "<domaincheckpoint>\n  <name>virtnbdbackup.{n}</name>\n  <description>Backup checkpoint</description>\n{parent}  <creationTime>{}</creationTime>\n  <disks>\n{cp_disks}  </disks>\n{}</domaincheckpoint>\n",
        1_767_225_600 + u64::from(n) * 86_400,
        domain_xml("  ", disks)
    )
}

fn set_mtime(path: &Path, n: u32) -> std::io::Result<()> {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + u64::from(n) * 86_400);
    File::options()
        .write(true)
        .open(path)?
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
}

fn main() -> std::io::Result<()> {
    let a = parse_args();
    let started = Instant::now();
    if let Some(t) = tiny::layout(&a.case) {
        return tiny::write(&a, &t, started);
    }
    let vm = layouts(&a.case, a.seed);
    let sizes: Vec<(&str, u64)> = vm.iter().map(|(name, l)| (*name, l.disk)).collect();
    fs::create_dir_all(a.dir.join("checkpoints"))?;
    if fs::read_dir(&a.dir)?.count() > 1 {
        eprintln!("genchain: {} is not empty", a.dir.display());
        std::process::exit(1);
    }
    // Per disk: the id of the step that last wrote each granule (0: never).
    let mut ids: Vec<Vec<u32>> = vm
        .iter()
        .map(|(_, l)| vec![0u32; (l.disk / GRANULE) as usize])
        .collect();
    let mut files = Vec::new();
    let mut total = (0u64, 0u64);
    let one_file = a.case == "c1";
    let steps = vm[0].1.steps.len();
    let last = steps - 1;
    for i in 0..steps {
        let id = i as u32 + 1;
        for ((_, lay), ids) in vm.iter().zip(ids.iter_mut()) {
            for &g in &lay.steps[i] {
                ids[g as usize] = id;
            }
        }
        if one_file && i < last {
            continue;
        }
        let n = i as u32;
        // The files of this checkpoint (for a one-file chain: only point 0).
        let point = if one_file { 0 } else { n };
        let mut written = Vec::new();
        for (d, ((name, lay), ids)) in vm.iter().zip(&ids).enumerate() {
            let (path, opts, pieces) = if i == 0 || one_file {
                (
                    a.dir.join(format!("{name}.full.data")),
                    StreamOptions::full(name, lay.disk, 0),
                    full_pieces(ids),
                )
            } else {
                (
                    a.dir.join(format!("{name}.inc.virtnbdbackup.{n}.data")),
                    StreamOptions::inc(name, n, lay.disk, 0),
                    inc_pieces(ids, id),
                )
            };
            let opts = match a.level {
                Some(l) => opts.compressed(l),
                None => opts,
            };
            // Disks other than the first get content of their own.
            let salt = (d as u64) << 32;
            let w = write_stream(
                &path,
                &opts,
                &pieces,
                &|g| u64::from(ids[g as usize]) | if ids[g as usize] == 0 { 0 } else { salt },
                a.fill,
                a.chksum,
            )?;
            total.0 += w.size;
            total.1 += w.data;
            files.push(path.clone());
            let allocated = ids.iter().filter(|&&x| x != 0).count() as u64 * GRANULE;
            let qj = a
                .dir
                .join(format!("{name}.virtnbdbackup.{point}.qcow.json"));
            fs::write(&qj, qcow_json(name, lay.disk, allocated))?;
            let mut cs = path.as_os_str().to_owned();
            cs.push(".chksum");
            let cs = PathBuf::from(cs);
            written.extend([path, qj]);
            if cs.exists() {
                written.push(cs);
            }
        }
        let vmx = a.dir.join(format!("vmconfig.virtnbdbackup.{point}.xml"));
        fs::write(&vmx, domain_xml("", &sizes))?;
        let cp = a.dir.join(format!("checkpoints/virtnbdbackup.{point}.xml"));
        fs::write(&cp, checkpoint_xml(point, &sizes))?;
        written.extend([vmx, cp]);
        for p in &written {
            set_mtime(p, point)?;
        }
    }
    let points = if one_file { 1 } else { steps as u32 };
    let cpt: Vec<String> = (0..points)
        .map(|n| format!("\"virtnbdbackup.{n}\""))
        .collect();
    fs::write(a.dir.join("bench.cpt"), format!("[{}]", cpt.join(", ")))?;
    let live: u64 = ids
        .iter()
        .map(|ids| ids.iter().filter(|&&x| x != 0).count() as u64 * GRANULE)
        .sum();
    println!(
        "genchain {}: {} disk(s), {} files, {} points (last {}), disks {} MiB, {} MiB of stream files, {} MiB of data frames, final content {} MiB, {}{} in {:.1}s",
        a.case,
        vm.len(),
        files.len(),
        points,
        points - 1,
        sizes.iter().map(|(_, s)| s / MIB).sum::<u64>(),
        total.0 / MIB,
        total.1 / MIB,
        live / MIB,
        if a.level.is_some() { "lz4" } else { "uncompressed" },
        if a.fill == Fill::Random { ", random fill" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Cases whose frames are not made of 64 KiB granules (`f1m`, `f4m`, `x16m`, `s100k`, `s400k`):
/// each stream is written frame by frame, with the same side files as the other cases.
mod tiny {
    use super::*;
    use common::{fill, mix};
    use nbdfmt::writer::StreamWriter;
    use std::io::{BufWriter, Write};

    /// One stream's frames, produced on the fly (millions of them).
    pub enum Step {
        /// `count` data frames of `len` bytes at `first + i * stride`, with zero frames
        /// between them when `zeroes` (a full's layout).
        Frames {
            first: u64,
            count: u64,
            len: u64,
            stride: u64,
            zeroes: bool,
        },
    }

    pub struct Tiny {
        pub disk: u64,
        pub steps: Vec<Step>,
    }

    pub fn layout(case: &str) -> Option<Tiny> {
        let frames = |count: u64| Step::Frames {
            first: 0,
            count,
            len: 1,
            stride: 2,
            zeroes: false,
        };
        Some(match case {
            "f1m" => Tiny {
                disk: 2_000_384,
                steps: vec![frames(1_000_000)],
            },
            "f4m" => Tiny {
                disk: 8_000_000,
                steps: vec![frames(4_000_000)],
            },
            "x16m" => {
                let n = 1u64 << 22;
                let inc = |first| Step::Frames {
                    first,
                    count: n,
                    len: 1,
                    stride: 4,
                    zeroes: false,
                };
                Tiny {
                    disk: 4 * n,
                    steps: vec![
                        Step::Frames {
                            first: 0,
                            count: 1,
                            len: 4 * n,
                            stride: 4 * n,
                            zeroes: false,
                        },
                        inc(0),
                        inc(2),
                    ],
                }
            }
            "s100k" | "s400k" => {
                let count = if case == "s100k" { 100_000 } else { 400_000 };
                Tiny {
                    disk: count * GRANULE,
                    steps: vec![Step::Frames {
                        first: 0,
                        count,
                        len: 4096,
                        stride: GRANULE,
                        zeroes: true,
                    }],
                }
            }
            _ => return None,
        })
    }

    /// The content step `id` writes at `[start, start + len)`: the granule cases' fill
    /// where 4 KiB aligned, else one pseudo-random non-zero byte per offset.
    fn content(buf: &mut Vec<u8>, id: u64, start: u64, len: u64, how: Fill) {
        buf.resize(len as usize, 0);
        if start % 4096 == 0 && len % 4096 == 0 {
            fill(buf, id, start, how);
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (mix(id << 48 ^ (start + i as u64)) as u8) | 1;
            }
        }
    }

    fn write_step(
        path: &Path,
        opts: &StreamOptions,
        step: &Step,
        id: u64,
        a: &Args,
    ) -> std::io::Result<(u64, u64)> {
        let Step::Frames {
            first,
            count,
            len,
            stride,
            zeroes,
        } = *step;
        let mut o = opts.clone();
        o.data_size = count * len;
        let out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        let mut w = StreamWriter::new(out, &o)?;
        let mut buf = Vec::new();
        for i in 0..count {
            let s = first + i * stride;
            content(&mut buf, id, s, len, a.fill);
            w.data(s, &buf)?;
            let gap_end = if i + 1 < count {
                s + stride
            } else {
                o.virtual_size
            };
            if zeroes && gap_end > s + len {
                w.zero(s + len, gap_end - s - len)?;
            }
        }
        let (out, adler, size) = w.finish()?;
        drop(out.into_inner().map_err(|e| e.into_error())?);
        if a.chksum {
            let mut c = path.as_os_str().to_owned();
            c.push(".chksum");
            fs::write(c, adler.to_string())?;
        }
        Ok((size, o.data_size))
    }

    pub fn write(a: &Args, t: &Tiny, started: Instant) -> std::io::Result<()> {
        fs::create_dir_all(a.dir.join("checkpoints"))?;
        if fs::read_dir(&a.dir)?.count() > 1 {
            eprintln!("genchain: {} is not empty", a.dir.display());
            std::process::exit(1);
        }
        let sizes = [("vda", t.disk)];
        let mut total = (0u64, 0u64);
        for (i, step) in t.steps.iter().enumerate() {
            let n = i as u32;
            let (path, opts) = if i == 0 {
                (
                    a.dir.join("vda.full.data"),
                    StreamOptions::full("vda", t.disk, 0),
                )
            } else {
                (
                    a.dir.join(format!("vda.inc.virtnbdbackup.{n}.data")),
                    StreamOptions::inc("vda", n, t.disk, 0),
                )
            };
            let opts = match a.level {
                Some(l) => opts.compressed(l),
                None => opts,
            };
            let (size, data) = write_step(&path, &opts, step, u64::from(n) + 1, a)?;
            total.0 += size;
            total.1 += data;
            let qj = a.dir.join(format!("vda.virtnbdbackup.{n}.qcow.json"));
            fs::write(&qj, qcow_json("vda", t.disk, total.1))?;
            let vmx = a.dir.join(format!("vmconfig.virtnbdbackup.{n}.xml"));
            fs::write(&vmx, domain_xml("", &sizes))?;
            let cp = a.dir.join(format!("checkpoints/virtnbdbackup.{n}.xml"));
            fs::write(&cp, checkpoint_xml(n, &sizes))?;
            let mut cs = path.as_os_str().to_owned();
            cs.push(".chksum");
            for p in [path, qj, vmx, cp, PathBuf::from(cs)] {
                if p.exists() {
                    set_mtime(&p, n)?;
                }
            }
        }
        let cpt: Vec<String> = (0..t.steps.len())
            .map(|n| format!("\"virtnbdbackup.{n}\""))
            .collect();
        fs::write(a.dir.join("bench.cpt"), format!("[{}]", cpt.join(", ")))?;
        let mut so = std::io::stdout().lock();
        writeln!(
            so,
            "genchain {}: 1 disk, {} files, disk {} bytes, {} MiB of stream files, {} bytes of data frames, {} in {:.1}s",
            a.case,
            t.steps.len(),
            t.disk,
            total.0 / MIB,
            total.1,
            if a.level.is_some() { "lz4" } else { "uncompressed" },
            started.elapsed().as_secs_f64()
        )
    }
}
