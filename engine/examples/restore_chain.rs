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

use std::path::PathBuf;
use std::time::Instant;

use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, BlockTarget, DiskPlan, StagedPath};
use nbdfmt::BackupSet;

fn usage() -> ! {
    eprintln!(
        "usage: restore_chain <chain-dir> <disk> <out.qcow2|out.raw> [--point N] [--force]\n\
         \x20   [--chunk-size BYTES] [--readers N] [--memory-cap BYTES] [--no-verify] [--no-checksums] [--no-readback]"
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
    num.parse::<usize>().map(|n| n * mult).unwrap_or_else(|_| usage())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut pos = Vec::new();
    let mut point: Option<u32> = None;
    let mut force = false;
    let mut opts = ApplyOptions::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--point" => point = Some(it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())),
            "--force" => force = true,
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
    let out = PathBuf::from(out);
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

    let plan = DiskPlan::for_point(&set, &disk, point)?;
    let t_plan = t0.elapsed();

    let raw = out.extension().is_some_and(|e| e == "raw" || e == "img");
    let staged = StagedPath::new(&out);
    let _ = std::fs::remove_file(staged.temp_path());
    let target: Box<dyn BlockTarget> = if raw {
        Box::new(RawTarget::create(staged.temp_path(), plan.virtual_size)?)
    } else {
        let qopts = match &plan.qcow {
            Some(info) => Qcow2Options::from_qcow_info(info)?,
            None => Qcow2Options::default(),
        };
        Box::new(Qcow2Target::create(staged.temp_path(), plan.virtual_size, &qopts)?)
    };
    let files = plan.files.len();
    let file_bytes = plan.file_bytes();
    let data_bytes = plan.data_bytes();
    let extents = plan.map.iter().count();
    let report = apply(std::slice::from_ref(&plan), vec![target], &opts)?;
    let t_apply = t0.elapsed();
    staged.commit(force)?;
    let total = t0.elapsed();

    let d = &report.disks[0];
    let verified = d.checksums.iter().filter(|(_, s)| s.is_some()).count();
    println!(
        "restore_chain {disk}@{point} -> {} ({}): files={files} file_bytes={file_bytes} extents={extents} live_bytes={data_bytes}",
        out.display(),
        if raw { "raw" } else { "qcow2" },
    );
    println!(
        "  bytes_written={} zero_skipped={} zeroed={} bytes_read={} checksums_verified={verified}/{files} readback_verified={}",
        d.bytes_written, d.bytes_zero_skipped, d.bytes_zeroed, d.bytes_read, d.readback_verified
    );
    println!(
        "  time_ms scan={:.1} plan={:.1} apply={:.1} commit={:.1} total={:.1}  ({:.0} MiB/s of live data; chunk={} readers={} memory_cap={})",
        ms(t_scan),
        ms(t_plan - t_scan),
        ms(t_apply - t_plan),
        ms(total - t_apply),
        ms(total),
        data_bytes as f64 / (1 << 20) as f64 / total.as_secs_f64(),
        opts.chunk_size,
        opts.readers,
        opts.memory_cap
    );
    Ok(())
}
