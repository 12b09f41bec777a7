//! Issue 18 item 11 / issue 20: streams of very many tiny frames restore correctly, and
//! the disk is written in disk order with neighbouring pieces joined — a handful of
//! writes, never one per frame (the memory side is measured by
//! `scripts/bench-extents.sh`, not asserted here).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, BlockTarget, DiskPlan};
use nbdfmt::writer::{StreamOptions, StreamWriter};

/// A raw target that counts its writes.
struct Counting {
    inner: RawTarget,
    writes: Arc<AtomicU64>,
}

impl BlockTarget for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn starts_zeroed(&self) -> bool {
        self.inner.starts_zeroed()
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> engine::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
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
    fn data_ranges(&mut self, offset: u64, len: u64) -> engine::Result<Vec<(u64, u64)>> {
        self.inner.data_ranges(offset, len)
    }
}

/// A stream of `n` one-byte data frames `stride` bytes apart, starting at `first`
/// (`salt` varies the bytes); the model of the disk is updated.
fn tiny_stream(
    path: &std::path::Path,
    opts: &StreamOptions,
    n: u64,
    first: u64,
    stride: u64,
    salt: u8,
    model: &mut [u8],
) {
    let mut o = opts.clone();
    o.data_size = n;
    let f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut w = StreamWriter::new(f, &o).expect("meta");
    for i in 0..n {
        let at = first + i * stride;
        let b = (i as u8).wrapping_mul(7) ^ salt | 1;
        w.data(at, &[b]).expect("frame");
        model[at as usize] = b;
    }
    w.finish().expect("finish");
}

fn restore(paths: &[std::path::PathBuf], inline: u64) -> (Vec<u8>, u64) {
    let plan = DiskPlan::from_paths("vda", paths, None).expect("plan");
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out.raw");
    let writes = Arc::new(AtomicU64::new(0));
    let t = Counting {
        inner: RawTarget::create(&out, plan.virtual_size).expect("target"),
        writes: writes.clone(),
    };
    let opts = ApplyOptions {
        inline_max_bytes: inline,
        ..ApplyOptions::default()
    };
    let r = apply(&[plan], vec![Box::new(t)], &opts).expect("apply");
    assert!(r.disks[0].readback_verified);
    (
        std::fs::read(&out).expect("read"),
        writes.load(Ordering::Relaxed),
    )
}

#[test]
fn a_hundred_thousand_one_byte_frames_are_a_few_writes() {
    for compressed in [false, true] {
        let dir = tempfile::tempdir().expect("tmp");
        let size = 256 * 1024;
        let mut model = vec![0u8; size as usize];
        let p = dir.path().join("vda.full.data");
        let mut o = StreamOptions::full("vda", size, 0);
        if compressed {
            o = o.compressed(1);
        }
        // one byte every other byte: the one-byte gaps travel as zeroes
        tiny_stream(&p, &o, 100_000, 0, 2, 0, &mut model);
        for inline in [0, engine::apply::INLINE_MAX_BYTES] {
            let (got, writes) = restore(std::slice::from_ref(&p), inline);
            assert!(got == model, "content differs (lz4 {compressed})");
            assert!(writes <= 4, "{writes} writes for 100,000 frames");
        }
    }
}

#[test]
fn interleaved_files_are_joined_in_disk_order() {
    // a full of one frame, two incrementals each rewriting every fourth byte: the final
    // map alternates file by file, byte by byte
    let dir = tempfile::tempdir().expect("tmp");
    let size = 64 * 1024;
    let mut model = vec![0u8; size as usize];
    let base = dir.path().join("a.data");
    let full: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    model.copy_from_slice(&full);
    std::fs::write(
        &base,
        nbdfmt::writer::write_stream(
            &StreamOptions::full("vda", size, 0),
            &[nbdfmt::writer::WriteFrame::Data(0, full)],
        ),
    )
    .expect("write");
    let (i1, i2) = (dir.path().join("b.data"), dir.path().join("c.data"));
    tiny_stream(
        &i1,
        &StreamOptions::inc("vda", 1, size, 0),
        size / 4,
        0,
        4,
        0x40,
        &mut model,
    );
    tiny_stream(
        &i2,
        &StreamOptions::inc("vda", 2, size, 0),
        size / 4,
        2,
        4,
        0x80,
        &mut model,
    );
    let paths = [base, i1, i2];
    let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
    assert_eq!(plan.stats.extents, size);
    for inline in [0, engine::apply::INLINE_MAX_BYTES] {
        let (got, writes) = restore(&paths, inline);
        assert!(got == model, "content differs");
        assert!(writes <= 2, "{writes} writes");
    }
}

/// More LZ4 frames interrupted at once than decoders are kept paused: 24 compressed
/// files, each one frame nested inside the previous one's, so going in disk order every
/// older frame is left half decoded until its tail comes back; the oldest decoders are
/// dropped and their frames decoded again from the start. With and without `.chksum`
/// (the two decoding paths).
#[test]
fn nested_lz4_frames_beyond_the_paused_decoder_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    let size: u64 = 1 << 20;
    let step: u64 = 8192;
    let mut model = vec![0u8; size as usize];
    let mut paths = Vec::new();
    for i in 0..24u64 {
        let (s, e) = (i * step, size - i * step);
        let data: Vec<u8> = (s..e)
            .map(|o| ((o * 31 + i * 7) % 253) as u8 ^ (o / 4096) as u8)
            .collect();
        model[s as usize..e as usize].copy_from_slice(&data);
        let o = if i == 0 {
            StreamOptions::full("vda", size, 0)
        } else {
            StreamOptions::inc("vda", i as u32, size, 0)
        }
        .compressed(1);
        let bytes = nbdfmt::writer::write_stream(&o, &[nbdfmt::writer::WriteFrame::Data(s, data)]);
        let p = dir.path().join(format!("f{i:02}.data"));
        std::fs::write(&p, &bytes).expect("write");
        paths.push((p, bytes));
    }
    for chksum in [false, true] {
        for (p, bytes) in &paths {
            let mut c = p.as_os_str().to_owned();
            c.push(".chksum");
            if chksum {
                let mut h = simd_adler32::Adler32::new();
                h.write(bytes);
                std::fs::write(&c, h.finish().to_string()).expect("chksum");
            } else {
                let _ = std::fs::remove_file(&c);
            }
        }
        let files: Vec<_> = paths.iter().map(|(p, _)| p.clone()).collect();
        for inline in [0, engine::apply::INLINE_MAX_BYTES] {
            let (got, _) = restore(&files, inline);
            assert!(got == model, "content differs (chksum {chksum})");
        }
    }
}
