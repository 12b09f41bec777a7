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
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let mut model = vec![0u8; SIZE as usize];
        let mut paths = Vec::new();
        for (i, body) in std::iter::once(&base).chain(incs.iter()).enumerate() {
            let n = i as u32;
            let mut o = if n == 0 { StreamOptions::full("vda", SIZE, 0) } else { StreamOptions::inc("vda", n, SIZE, 0) };
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
        apply(&[plan], vec![Box::new(t)], &opts).expect("apply");
        let got = std::fs::read(&out).expect("read");
        prop_assert!(got == model, "restored content differs from the naive replay");
    }
}
