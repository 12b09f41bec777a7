//! Restores one disk of a virtnbdbackup directory with the engine, as the product
//! does: scan the set, plan the restore point, apply into a staged target (qcow2 with
//! the options of the newest `qcow.json`, or raw for a `.raw`/`.img` name), which syncs
//! it, then rename it into place (directory synced). Prints bytes and times.
//!
//! ```text
//! restore_chain <chain-dir> <disk> <out.qcow2|out.raw> [--point N] [--force]
//!     [--chunk-size BYTES] [--readers N] [--memory-cap BYTES]
//!     [--no-verify] [--no-checksums] [--no-readback]
//! ```
//! `--no-verify` turns off both the `.chksum` verification and the read-back.
//!
//! Experiment (not the product path): `--direct` writes a qcow2 target through imago on
//! an `O_DIRECT` file descriptor (imago bounces unaligned buffers), to measure what
//! bypassing the page cache would gain. Compat 1.1 / zlib / no lazy refcounts only.

use std::path::PathBuf;
use std::time::Instant;

use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, BlockTarget, DiskPlan, StagedPath};
use nbdfmt::BackupSet;

fn usage() -> ! {
    eprintln!(
        "usage: restore_chain <chain-dir> <disk[,disk...]> <out.qcow2|out.raw|out-dir> [--point N] [--force]\n\
         \x20   [--chunk-size BYTES] [--readers N] [--memory-cap BYTES] [--no-verify] [--no-checksums] [--no-readback] [--direct]"
    );
    std::process::exit(2)
}

/// `4194304`, `4096k`, `4m`, `1g`.
fn size_arg(s: Option<String>) -> usize {
    let Some(s) = s else { usage() };
    let (num, mult) = match s.to_ascii_lowercase().chars().last() {
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s.as_str(), 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .unwrap_or_else(|_| usage())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut pos = Vec::new();
    let mut point: Option<u32> = None;
    let mut force = false;
    let mut direct = false;
    let mut opts = ApplyOptions::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--point" => {
                point = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--force" => force = true,
            "--direct" => direct = true,
            "--chunk-size" => opts.chunk_size = size_arg(it.next()),
            "--memory-cap" => opts.memory_cap = size_arg(it.next()),
            "--readers" => opts.readers = size_arg(it.next()),
            "--no-verify" => {
                opts.verify_checksums = false;
                opts.verify_readback = false;
            }
            "--no-checksums" => opts.verify_checksums = false,
            "--no-readback" => opts.verify_readback = false,
            "-h" | "--help" => usage(),
            _ if a.starts_with("--") => usage(),
            _ => pos.push(a),
        }
    }
    let [dir, disk, out] = <[String; 3]>::try_from(pos).unwrap_or_else(|_| usage());
    // `vda,vdb,vdc`: all those disks at once (the pipeline runs them in parallel), into
    // `<out>/<disk>.qcow2` (or `.raw` when `out` ends in `.raw`, `<out-stem>/<disk>.raw`).
    let disks: Vec<&str> = disk.split(',').collect();
    let out = PathBuf::from(out);
    let raw = out.extension().is_some_and(|e| e == "raw" || e == "img");
    let outs: Vec<PathBuf> = if disks.len() == 1 {
        vec![out.clone()]
    } else {
        let dir = if raw {
            out.with_extension("")
        } else {
            out.clone()
        };
        std::fs::create_dir_all(&dir)?;
        disks
            .iter()
            .map(|d| dir.join(format!("{d}.{}", if raw { "raw" } else { "qcow2" })))
            .collect()
    };
    let t0 = Instant::now();

    let set = BackupSet::scan(std::path::Path::new(&dir))?;
    let point = match point.or_else(|| set.latest()) {
        Some(p) => p,
        None => return Err(format!("{dir}: no restore points").into()),
    };
    if let Some(rp) = set.point(point) {
        if let Some(p) = rp.problems.first() {
            return Err(format!("restore point {point} is incomplete: {p}").into());
        }
    }
    let t_scan = t0.elapsed();

    let plans = disks
        .iter()
        .map(|d| DiskPlan::for_point(&set, d, point))
        .collect::<engine::Result<Vec<_>>>()?;
    let t_plan = t0.elapsed();

    let mut staged = Vec::new();
    let mut targets: Vec<Box<dyn BlockTarget>> = Vec::new();
    for (plan, out) in plans.iter().zip(&outs) {
        let s = StagedPath::new(out);
        let _ = std::fs::remove_file(s.temp_path());
        targets.push(if raw {
            Box::new(RawTarget::create(s.temp_path(), plan.virtual_size)?)
        } else {
            let qopts = match &plan.qcow {
                Some(info) => Qcow2Options::from_qcow_info(info)?,
                None => Qcow2Options::default(),
            };
            if direct {
                Box::new(direct::DirectQcow2::create(
                    s.temp_path(),
                    plan.virtual_size,
                    &qopts,
                )?)
            } else {
                Box::new(Qcow2Target::create(
                    s.temp_path(),
                    plan.virtual_size,
                    &qopts,
                )?)
            }
        });
        staged.push(s);
    }
    let report = apply(&plans, targets, &opts)?;
    let t_apply = t0.elapsed();
    for s in staged {
        s.commit(force)?;
    }
    let total = t0.elapsed();

    let mut data_total = 0;
    for ((plan, d), out) in plans.iter().zip(&report.disks).zip(&outs) {
        let files = plan.files.len();
        let verified = d.checksums.iter().filter(|(_, s)| s.is_some()).count();
        data_total += plan.data_bytes();
        println!(
            "restore_chain {}@{point} -> {} ({}): files={files} file_bytes={} extents={} live_bytes={}",
            plan.disk,
            out.display(),
            if raw {
                "raw"
            } else if direct {
                "qcow2, O_DIRECT"
            } else {
                "qcow2"
            },
            plan.file_bytes(),
            plan.stats.extents,
            plan.data_bytes(),
        );
        println!(
            "  bytes_written={} zero_skipped={} zeroed={} bytes_read={} checksums_verified={verified}/{files} readback_verified={}",
            d.bytes_written, d.bytes_zero_skipped, d.bytes_zeroed, d.bytes_read, d.readback_verified
        );
    }
    println!(
        "  time_ms scan={:.1} plan={:.1} apply={:.1} commit={:.1} total={:.1}  ({:.0} MiB/s of live data; chunk={} readers={} memory_cap={})",
        ms(t_scan),
        ms(t_plan - t_scan),
        ms(t_apply - t_plan),
        ms(total - t_apply),
        ms(total),
        data_total as f64 / (1 << 20) as f64 / total.as_secs_f64(),
        opts.chunk_size,
        opts.readers,
        opts.memory_cap
    );
    Ok(())
}

/// A qcow2 target on an `O_DIRECT` descriptor, for measuring (see the module docs).
mod direct {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};

    use engine::target::qcow2::{CompressionType, Qcow2Compat, Qcow2Options};
    use engine::{BlockTarget, Error, Result};
    use imago::qcow2::Qcow2;
    use imago::{
        DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
        StorageOpenOptions,
    };

    type ImagoFile = imago::file::File;

    #[derive(Debug)]
    pub struct DirectQcow2 {
        path: PathBuf,
        size: u64,
        image: Option<FormatAccess<ImagoFile>>,
        file: File,
    }

    fn gone() -> io::Error {
        io::Error::other("finished")
    }

    impl DirectQcow2 {
        pub fn create(path: &Path, size: u64, opts: &Qcow2Options) -> Result<Self> {
            if opts.compat != Qcow2Compat::V3
                || opts.lazy_refcounts
                || opts.compression_type != CompressionType::Zlib
            {
                return Err(Error::Unsupported(
                    "--direct: only compat 1.1, zlib, no lazy refcounts".into(),
                ));
            }
            let err = |e| Error::target("create", path, e);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                .open(path)
                .map_err(err)?;
            let sopts = || {
                StorageOpenOptions::new()
                    .write(true)
                    .direct(true)
                    .filename(path)
            };
            let storage =
                ImagoFile::from_open_file(file.try_clone().map_err(err)?, sopts()).map_err(err)?;
            Qcow2::<ImagoFile>::create_builder(storage)
                .size(size)
                .cluster_size(opts.cluster_size as usize)
                .refcount_width(opts.refcount_bits as usize)
                .create()
                .map_err(err)?;
            let storage =
                ImagoFile::from_open_file(file.try_clone().map_err(err)?, sopts()).map_err(err)?;
            let q = Qcow2::<ImagoFile>::builder(storage)
                .write(true)
                .open(DenyImplicitOpenGate::default())
                .map_err(err)?;
            Ok(Self {
                path: path.to_path_buf(),
                size,
                image: Some(FormatAccess::new(q)),
                file,
            })
        }

        fn img(&mut self, op: &'static str) -> Result<&mut FormatAccess<ImagoFile>> {
            let p = &self.path;
            self.image
                .as_mut()
                .ok_or_else(|| Error::target(op, p, gone()))
        }
    }

    impl BlockTarget for DirectQcow2 {
        fn size(&self) -> u64 {
            self.size
        }

        fn starts_zeroed(&self) -> bool {
            true
        }

        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            let p = self.path.clone();
            self.img("write")?
                .write(data, offset)
                .map_err(|e| Error::target("write", &p, e))
        }

        fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
            let p = self.path.clone();
            self.img("write zeroes")?
                .discard_to_zero(offset, len)
                .map_err(|e| Error::target("write zeroes", &p, e))
        }

        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let p = self.path.clone();
            self.img("read")?
                .read(buf, offset)
                .map_err(|e| Error::target("read", &p, e))
        }

        fn flush(&mut self) -> Result<()> {
            let p = self.path.clone();
            self.img("flush")?
                .flush()
                .map_err(|e| Error::target("flush", &p, e))
        }

        fn sync(&mut self) -> Result<()> {
            self.flush()?;
            let p = self.path.clone();
            self.img("sync")?
                .sync()
                .map_err(|e| Error::target("sync", &p, e))
        }

        fn finish(&mut self) -> Result<()> {
            let image = self
                .image
                .take()
                .ok_or_else(|| Error::target("finish", &self.path, gone()))?;
            image
                .flush()
                .map_err(|e| Error::target("flush", &self.path, e))?;
            drop(image);
            self.file
                .sync_all()
                .map_err(|e| Error::target("sync", &self.path, e))
        }

        fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
            let p = self.path.clone();
            let image = self.img("map")?;
            let mut out: Vec<(u64, u64)> = Vec::new();
            let (mut pos, end) = (offset, offset + len);
            while pos < end {
                let (mapping, mlen) = image
                    .get_mapping(pos, end - pos)
                    .map_err(|e| Error::target("map", &p, e))?;
                let mlen = mlen.min(end - pos);
                if mlen == 0 {
                    return Err(Error::target(
                        "map",
                        &p,
                        io::Error::other(format!("no mapping at {pos}")),
                    ));
                }
                if !matches!(mapping, Mapping::Zero { .. }) {
                    match out.last_mut() {
                        Some((o, l)) if *o + *l == pos => *l += mlen,
                        _ => out.push((pos, mlen)),
                    }
                }
                pos += mlen;
            }
            Ok(out)
        }
    }
}
