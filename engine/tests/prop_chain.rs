//! Random chains (overlapping extents, zero frames, compressed or not, up to 50
//! incrementals) restore to exactly what a naive byte-array replay gives.

use engine::target::raw::RawTarget;
use engine::{apply, ApplyOptions, DiskPlan};
use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
use proptest::prelude::*;

const SIZE: u64 = 256 * 1024;

/// A random stream body: increasing non-overlapping frames inside SIZE.
fn frames(base: bool) -> impl Strategy<Value = Vec<(u64, u64, u8, bool)>> {
    proptest::collection::vec(
        (0u64..SIZE / 512, 1u64..64, any::<u8>(), any::<bool>()),
        0..12,
    )
    .prop_map(move |mut v| {
        v.sort_by_key(|x| x.0);
        let mut out = Vec::new();
        let mut pos = 0;
        for (blk, n, byte, zero) in v {
            let start = (blk * 512).max(pos);
            let len = (n * 512).min(SIZE - start.min(SIZE));
            if start >= SIZE || len == 0 {
                continue;
            }
            // only a base stream carries zero frames
            out.push((start, len, byte, zero && base));
            pos = start + len;
        }
        out
    })
}

fn stream(
    frames: &[(u64, u64, u8, bool)],
    opts: &StreamOptions,
    salt: u64,
) -> (Vec<u8>, Vec<WriteFrame>) {
    let mut wf = Vec::new();
    for &(s, l, b, z) in frames {
        if z {
            wf.push(WriteFrame::Zero(s, l));
        } else {
            // mixed content: a pattern with some all-zero runs so zero detection is exercised
            let data: Vec<u8> = (0..l)
                .map(|i| {
                    if b < 16 {
                        0
                    } else {
                        b ^ ((i + salt) % 251) as u8
                    }
                })
                .collect();
            wf.push(WriteFrame::Data(s, data));
        }
    }
    (write_stream(opts, &wf), wf)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn chain_equals_naive_replay(
        base in frames(true),
        incs in proptest::collection::vec(frames(false), 0..50),
        compressed in any::<bool>(),
        threaded in any::<bool>(),
        shrink in 0u64..3,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let mut model = vec![0u8; SIZE as usize];
        let mut paths = Vec::new();
        let n_files = 1 + incs.len();
        for (i, body) in std::iter::once(&base).chain(incs.iter()).enumerate() {
            let n = i as u32;
            // the newest stream may declare a smaller disk (older frames past it are cut off)
            let size = if i + 1 == n_files { SIZE - shrink * 64 * 1024 } else { SIZE };
            let body: Vec<_> = body.iter().copied().filter(|f| f.0 + f.1 <= size).collect();
            let body = &body;
            let mut o = if n == 0 { StreamOptions::full("vda", size, 0) } else { StreamOptions::inc("vda", n, size, 0) };
            if compressed { o = o.compressed(2); }
            let (bytes, wf) = stream(body, &o, i as u64);
            for f in &wf {
                match f {
                    WriteFrame::Data(s, d) => model[*s as usize..*s as usize + d.len()].copy_from_slice(d),
                    WriteFrame::Zero(s, l) => model[*s as usize..(*s + *l) as usize].fill(0),
                }
            }
            let name = if n == 0 { "vda.full.data".to_owned() } else { format!("vda.inc.virtnbdbackup.{n}.data") };
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            paths.push(p);
        }
        let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
        let out = dir.path().join("out.raw");
        let t = RawTarget::create(&out, plan.virtual_size).expect("target");
        // Small chains go inline unless told otherwise: both paths must agree with the model.
        let inline_max_bytes = if threaded { 0 } else { engine::apply::INLINE_MAX_BYTES };
        let opts = ApplyOptions { chunk_size: 4096 * 3, memory_cap: 64 * 1024, inline_max_bytes, ..ApplyOptions::default() };
        let size = plan.virtual_size as usize;
        apply(&[plan], vec![Box::new(t)], &opts).expect("apply");
        let got = std::fs::read(&out).expect("read");
        prop_assert!(got == model[..size], "restored content differs from the naive replay");
    }
}

/// The collapse as it was before the merge: every file's frames laid over an in-memory
/// `ExtentMap`, newest last (the oracle).
fn old_collapse(paths: &[std::path::PathBuf]) -> (engine::ExtentMap, u64) {
    let indexes: Vec<nbdfmt::StreamIndex> = paths
        .iter()
        .map(|p| {
            nbdfmt::StreamIndex::read_file(std::fs::File::open(p).expect("open")).expect("index")
        })
        .collect();
    let size = indexes.last().expect("a file").meta.virtual_size;
    let mut map = engine::ExtentMap::new();
    for (i, ix) in indexes.iter().enumerate() {
        for (j, fr) in ix.frames.iter().enumerate() {
            let end = fr.end().min(size);
            if fr.start >= end {
                continue;
            }
            let source = match fr.kind {
                nbdfmt::FrameKind::Data => engine::Source::Data {
                    file: i as u32,
                    frame: j as u32,
                },
                _ => engine::Source::Zero,
            };
            map.insert(fr.start, end - fr.start, source);
        }
    }
    (map, size)
}

/// Extents with adjacent runs of the same source joined (the merge hands out a frame
/// cut by an older file's boundary as two pieces).
fn joined(m: &engine::ExtentMap) -> Vec<(u64, u64, engine::Source)> {
    let mut out: Vec<(u64, u64, engine::Source)> = Vec::new();
    for e in m.iter() {
        match out.last_mut() {
            Some((s, l, src)) if *s + *l == e.start && *src == e.source => *l += e.len,
            _ => out.push((e.start, e.len, e.source)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    /// The k-way merge gives exactly the old in-memory collapse: same extents, same
    /// sources, same counts, whether frames are read from the files or held in memory;
    /// the last file may declare a smaller disk (frames past it are cut off).
    #[test]
    fn merge_equals_in_memory_collapse(
        base in frames(true),
        incs in proptest::collection::vec(frames(false), 0..12),
        compressed in any::<bool>(),
        shrink in 0u64..4,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let mut paths = Vec::new();
        let n_files = 1 + incs.len();
        for (i, body) in std::iter::once(&base).chain(incs.iter()).enumerate() {
            let n = i as u32;
            // the newest file may declare a smaller disk: everything of the older ones
            // past it is cut off
            let size = if i + 1 == n_files { SIZE - shrink * 64 * 1024 } else { SIZE };
            let body: Vec<_> = body.iter().copied().filter(|f| f.0 + f.1 <= size).collect();
            let mut o = if n == 0 { StreamOptions::full("vda", size, 0) } else { StreamOptions::inc("vda", n, size, 0) };
            if compressed { o = o.compressed(2); }
            let (bytes, _) = stream(&body, &o, i as u64);
            let p = dir.path().join(format!("f{i}.data"));
            std::fs::write(&p, bytes).expect("write");
            paths.push(p);
        }
        let (oracle, size) = old_collapse(&paths);
        let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
        prop_assert_eq!(plan.virtual_size, size);
        let merged = plan.extent_map().expect("merge");
        prop_assert_eq!(joined(&merged), joined(&oracle));
        prop_assert_eq!(plan.data_bytes(), oracle.data_bytes());
        prop_assert_eq!(plan.stats.extents, joined(&oracle).len() as u64);
        // frames held in memory (salvage, raw images) merge the same way
        let mem: Vec<engine::ChainFile> = paths
            .iter()
            .map(|p| {
                let ix = nbdfmt::StreamIndex::read_file(std::fs::File::open(p).expect("open")).expect("index");
                engine::ChainFile::from_index(p, ix, None)
            })
            .collect();
        let plan2 = DiskPlan::from_chain("vda", mem, None).expect("plan");
        prop_assert_eq!(joined(&plan2.extent_map().expect("merge")), joined(&oracle));
        prop_assert_eq!(plan2.stats, plan.stats);
    }
}

/// Frame headers of a chain are validated by the plan's merge: a damaged header at the
/// very end of an incremental (past every frame that matters) still fails the plan.
#[test]
fn plan_validates_every_header_of_a_chain() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = stream(
        &[(0, 4096, 0x55, false)],
        &StreamOptions::full("vda", SIZE, 0),
        0,
    )
    .0;
    let mut inc = stream(
        &[(8192, 512, 0x66, false)],
        &StreamOptions::inc("vda", 1, SIZE, 0),
        1,
    )
    .0;
    // the stop frame is the last 40 bytes: make its kind unreadable
    let n = inc.len();
    inc[n - 40..n - 36].copy_from_slice(b"st0p");
    let paths = [dir.path().join("a.data"), dir.path().join("b.data")];
    std::fs::write(&paths[0], base).expect("write");
    std::fs::write(&paths[1], inc).expect("write");
    let e = DiskPlan::from_paths("vda", &paths, None).expect_err("damaged header");
    assert_eq!(e.kind(), engine::ErrorKind::CorruptBackup, "{e}");
    assert!(e.to_string().contains("b.data"), "{e}");
}

/// A file whose every frame a newer file supersedes takes no part in the merge, but its
/// `.chksum` is still verified (on a thread of its own): a mismatch fails the restore.
#[test]
fn superseded_files_are_still_verified() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = stream(
        &[(0, 8192, 0x55, false)],
        &StreamOptions::full("vda", SIZE, 0),
        0,
    )
    .0;
    let inc = stream(
        &[(0, 16384, 0x66, false)],
        &StreamOptions::inc("vda", 1, SIZE, 0),
        1,
    )
    .0;
    let paths = [dir.path().join("a.data"), dir.path().join("b.data")];
    std::fs::write(&paths[0], &base).expect("write");
    std::fs::write(&paths[1], &inc).expect("write");
    let adler = |b: &[u8]| {
        let mut h = simd_adler32::Adler32::new();
        h.write(b);
        h.finish()
    };
    std::fs::write(dir.path().join("b.data.chksum"), adler(&inc).to_string()).expect("chksum");
    for (good, inline) in [
        (true, 0),
        (false, 0),
        (false, engine::apply::INLINE_MAX_BYTES),
    ] {
        let sum = if good { adler(&base) } else { adler(&base) ^ 1 };
        std::fs::write(dir.path().join("a.data.chksum"), sum.to_string()).expect("chksum");
        let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
        assert_eq!(plan.file_live, vec![0, 16384]);
        let out = dir.path().join("out.raw");
        let _ = std::fs::remove_file(&out);
        let t = RawTarget::create(&out, plan.virtual_size).expect("target");
        let opts = ApplyOptions {
            inline_max_bytes: inline,
            ..ApplyOptions::default()
        };
        let r = apply(&[plan], vec![Box::new(t)], &opts);
        if good {
            let r = r.expect("apply");
            let verified = r.disks[0]
                .checksums
                .iter()
                .filter(|(_, s)| s.is_some())
                .count();
            assert_eq!(verified, 2);
        } else {
            let e = r.expect_err("mismatch");
            assert_eq!(e.kind(), engine::ErrorKind::CorruptBackup, "{e}");
            assert!(e.to_string().contains("a.data"), "{e}");
        }
    }
}
