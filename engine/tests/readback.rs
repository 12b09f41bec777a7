//! The read-back catches a target that stores something else than it was given: on
//! the read-back thread (targets with a storage file: raw, qcow2) and inline through
//! `read_at` (targets without: NBD), in the middle of a large restore (rolling
//! read-back) and in its last pieces; a clean restore of the same chain verifies.

use std::fs::File;
use std::path::{Path, PathBuf};

use engine::target::qcow2::{Qcow2Options, Qcow2Target};
use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, BlockTarget, DiskPlan, ErrorKind};
use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 192 * MIB;

/// One full stream with 160 MiB of non-zero data in 1 MiB frames, a hole between each.
fn chain(dir: &Path) -> PathBuf {
    chain_of(dir, 160)
}

/// `n` MiB of non-zero data in 1 MiB frames, a hole between each.
fn chain_of(dir: &Path, n: u64) -> PathBuf {
    let mut frames = Vec::new();
    for i in 0..n {
        let start = i * MIB + i * 65536;
        let data: Vec<u8> = (0..MIB).map(|j| ((i * 7 + j) % 251 + 1) as u8).collect();
        frames.push(WriteFrame::Data(start, data));
    }
    let p = dir.join("vda.full.data");
    std::fs::write(
        &p,
        write_stream(&StreamOptions::full("vda", SIZE, 0), &frames),
    )
    .expect("w");
    p
}

/// Flips one byte of the write that covers `bad_at`; optionally hides its storage file.
#[derive(Debug)]
struct Corrupting<T> {
    inner: T,
    bad_at: u64,
    storage: bool,
}

impl<T: BlockTarget> BlockTarget for Corrupting<T> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn starts_zeroed(&self) -> bool {
        self.inner.starts_zeroed()
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> engine::Result<()> {
        if (offset..offset + data.len() as u64).contains(&self.bad_at) {
            let mut d = data.to_vec();
            d[(self.bad_at - offset) as usize] ^= 0x20;
            return self.inner.write_at(offset, &d);
        }
        self.inner.write_at(offset, data)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> engine::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> engine::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn flush(&mut self) -> engine::Result<()> {
        self.inner.flush()
    }
    fn sync(&mut self) -> engine::Result<()> {
        self.inner.sync()
    }
    fn finish(&mut self) -> engine::Result<()> {
        self.inner.finish()
    }
    fn storage_file(&self) -> Option<File> {
        if self.storage {
            self.inner.storage_file()
        } else {
            None
        }
    }
    fn host_extents(&mut self, offset: u64, len: u64) -> engine::Result<Option<Vec<(u64, u64)>>> {
        if self.storage {
            self.inner.host_extents(offset, len)
        } else {
            Ok(None)
        }
    }
    fn data_ranges(&mut self, offset: u64, len: u64) -> engine::Result<Vec<(u64, u64)>> {
        self.inner.data_ranges(offset, len)
    }
}

fn run(plan: &DiskPlan, target: Box<dyn BlockTarget>) -> engine::Result<engine::ApplyReport> {
    apply(
        std::slice::from_ref(plan),
        vec![target],
        &ApplyOptions::default(),
    )
}

#[test]
fn readback_catches_corruption_everywhere() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = DiskPlan::from_paths("vda", &[chain(dir.path())], None).expect("plan");
    // Frame 3 (read back while writing goes on) and frame 159 (among the last pieces).
    let early = 3 * MIB + 3 * 65536 + 12345;
    let late = 159 * MIB + 159 * 65536 + 777;
    let mut n = 0;
    for bad_at in [early, late] {
        for storage in [true, false] {
            for qcow in [false, true] {
                n += 1;
                let out = dir.path().join(format!("out{n}"));
                let target: Box<dyn BlockTarget> = if qcow {
                    let t = Qcow2Target::create(&out, SIZE, &Qcow2Options::default()).expect("q");
                    Box::new(Corrupting {
                        inner: t,
                        bad_at,
                        storage,
                    })
                } else {
                    let t = RawTarget::create(&out, SIZE).expect("raw");
                    Box::new(Corrupting {
                        inner: t,
                        bad_at,
                        storage,
                    })
                };
                let e = run(&plan, target).expect_err("corruption must be caught");
                assert_eq!(e.kind(), ErrorKind::VerifyFailed, "{e}");
                assert!(e.to_string().contains("differs from the backup"), "{e}");
                // One 160 MiB output at a time: ten kept would need 1.6 GB of scratch
                // space, more than a CI machine's /tmp may have.
                std::fs::remove_file(&out).expect("rm");
            }
        }
    }
    for qcow in [false, true] {
        let out = dir.path().join(format!("clean-{qcow}"));
        let target: Box<dyn BlockTarget> = if qcow {
            Box::new(Qcow2Target::create(&out, SIZE, &Qcow2Options::default()).expect("q"))
        } else {
            Box::new(RawTarget::create(&out, SIZE).expect("raw"))
        };
        let r = run(&plan, target).expect("clean restore");
        assert!(r.disks[0].readback_verified);
        assert_eq!(r.disks[0].bytes_written, 160 * MIB);
        std::fs::remove_file(&out).expect("rm");
    }
}

/// A chain small enough to be restored inline (no reader, writer or read-back thread):
/// the read-back goes through the target and still catches a flipped byte, in raw and
/// qcow2 targets; the clean restore verifies.
#[test]
fn inline_restore_reads_back_too() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = DiskPlan::from_paths("vda", &[chain_of(dir.path(), 4)], None).expect("plan");
    assert!(plan.data_bytes() <= engine::apply::INLINE_MAX_BYTES);
    let bad_at = 2 * MIB + 2 * 65536 + 99;
    for qcow in [false, true] {
        for corrupt in [true, false] {
            let out = dir.path().join(format!("small-{qcow}-{corrupt}"));
            let bad_at = if corrupt { bad_at } else { u64::MAX };
            let target: Box<dyn BlockTarget> = if qcow {
                Box::new(Corrupting {
                    inner: Qcow2Target::create(&out, SIZE, &Qcow2Options::default()).expect("q"),
                    bad_at,
                    storage: true,
                })
            } else {
                Box::new(Corrupting {
                    inner: RawTarget::create(&out, SIZE).expect("raw"),
                    bad_at,
                    storage: true,
                })
            };
            match run(&plan, target) {
                Err(e) if corrupt => {
                    assert_eq!(e.kind(), ErrorKind::VerifyFailed, "{e}");
                }
                Ok(r) if !corrupt => {
                    assert!(r.disks[0].readback_verified);
                    assert_eq!(r.disks[0].bytes_written, 4 * MIB);
                }
                r => panic!("qcow {qcow} corrupt {corrupt}: {:?}", r.map(|_| ())),
            }
        }
    }
}
