//! Property tests for the sparse-stream reader, driven by the test writer (feature
//! "writer", enabled by nbdfmt's dev-dependency on itself).
//!
//! - writer → reader: random streams (raw and LZ4) read back to exactly the frames and
//!   bytes written, whatever the read buffer size, and `StreamIndex` agrees;
//! - hostile input: random bytes and mutated valid streams never panic, and a stream the
//!   reader accepts in full only ever yields data inside `virtualSize` adding up to
//!   `dataSize`.
//!
//! Case counts and sizes keep the whole file well under 20 s in a debug build.

use std::io::Cursor;

use nbdfmt::reader::{read_meta, StreamIndex, StreamReader};
use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
use nbdfmt::{Frame, FrameHeader, FrameKind, StreamMeta};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// One frame of a generated stream, placed `gap` bytes after the previous one.
#[derive(Debug, Clone)]
enum Seg {
    Data { gap: u64, payload: Vec<u8> },
    Zero { gap: u64, len: u64 },
}

/// A generated stream: what the writer is given.
#[derive(Debug, Clone)]
struct Spec {
    opts: StreamOptions,
    frames: Vec<WriteFrame>,
}

impl Spec {
    fn bytes(&self) -> Vec<u8> {
        write_stream(&self.opts, &self.frames)
    }

    fn data_size(&self) -> u64 {
        self.frames
            .iter()
            .map(|f| match f {
                WriteFrame::Data(_, d) => d.len() as u64,
                WriteFrame::Zero(..) => 0,
            })
            .sum()
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // incompressible, usually shorter than one LZ4 block
        4 => vec(any::<u8>(), 0..3000),
        // compressible runs, some longer than one 64 KiB LZ4 block (linked blocks)
        2 => (any::<u8>(), 1usize..100_000).prop_map(|(b, n)| vec![b; n]),
        // a pattern that compresses, but not to nothing
        1 => (any::<u8>(), 1usize..80_000)
            .prop_map(|(seed, n)| (0..n).map(|i| ((i / 7) as u8).wrapping_mul(31) ^ seed).collect()),
    ]
}

fn gap() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1u64..4096, 4096u64..(1 << 30)]
}

fn seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        3 => (gap(), payload()).prop_map(|(gap, payload)| Seg::Data { gap, payload }),
        2 => (gap(), 1u64..(1 << 32)).prop_map(|(gap, len)| Seg::Zero { gap, len }),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        vec(seg(), 0..7),
        prop_oneof![Just(0u64), 1u64..(1 << 20)],
        proptest::option::of(1u32..13),
        any::<bool>(),
    )
        .prop_map(|(segs, tail, level, incremental)| {
            let mut pos = 0u64;
            let mut frames = Vec::with_capacity(segs.len());
            for s in segs {
                match s {
                    Seg::Data { gap, payload } => {
                        let start = pos + gap;
                        pos = start + payload.len() as u64;
                        frames.push(WriteFrame::Data(start, payload));
                    }
                    Seg::Zero { gap, len } => {
                        let start = pos + gap;
                        pos = start + len;
                        frames.push(WriteFrame::Zero(start, len));
                    }
                }
            }
            let virtual_size = pos + tail;
            let opts = if incremental {
                StreamOptions::inc("vdb", 3, virtual_size, 0)
            } else {
                StreamOptions::full("vdb", virtual_size, 0)
            };
            let opts = match level {
                Some(l) => opts.compressed(l),
                None => opts,
            };
            Spec { opts, frames }
        })
}

/// What a complete, successful walk over a stream produced.
#[derive(Debug)]
struct Walk {
    meta: StreamMeta,
    /// Each frame with the payload bytes read from it (empty for zero frames).
    frames: Vec<(Frame, Vec<u8>)>,
}

/// Opens `bytes`, walks every frame and reads every payload with a `buf_len` buffer.
/// Checks, with asserts, what must hold whenever the reader returns `Ok`.
fn walk(bytes: &[u8], buf_len: usize) -> nbdfmt::Result<Walk> {
    let mut r = StreamReader::open(Cursor::new(bytes))?;
    let meta = r.meta().clone();
    let mut frames: Vec<(Frame, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; buf_len];
    let mut prev_end = 0u64;
    while let Some(f) = r.next_frame()? {
        assert!(matches!(f.kind, FrameKind::Data | FrameKind::Zero), "{f:?}");
        assert!(
            f.start >= prev_end,
            "frame {f:?} overlaps the previous one ending at {prev_end}"
        );
        assert!(
            f.start
                .checked_add(f.length)
                .is_some_and(|e| e <= meta.virtual_size),
            "{f:?} past {}",
            meta.virtual_size
        );
        prev_end = f.end();
        let mut data = Vec::new();
        if f.kind == FrameKind::Data {
            while let Some((at, n)) = r.read_chunk(&mut buf)? {
                assert!(n > 0 && n <= buf.len());
                assert_eq!(
                    at,
                    f.start + data.len() as u64,
                    "chunks of {f:?} are not contiguous"
                );
                assert!(at + n as u64 <= f.end(), "chunk {at}+{n} beyond {f:?}");
                data.extend_from_slice(&buf[..n]);
            }
            assert_eq!(
                data.len() as u64,
                f.length,
                "payload of {f:?} ended early without an error"
            );
        }
        frames.push((f, data));
    }
    assert!(r.is_finished());
    assert_eq!(r.next_frame().ok().flatten(), None, "frames after stop");
    let sum: u64 = frames.iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(
        sum, meta.data_size,
        "accepted stream yields {sum} bytes, meta says {}",
        meta.data_size
    );
    Ok(Walk { meta, frames })
}

/// Runs every entry point on hostile bytes. None may panic; when the full walk is
/// accepted, the cheaper readers must accept too and agree.
fn check_hostile(bytes: &[u8], buf_len: usize) {
    let _ = FrameHeader::parse(bytes, 0);
    let meta = read_meta(Cursor::new(bytes));
    let index = StreamIndex::read(Cursor::new(bytes));
    // Walk headers only, skipping every payload.
    if let Ok(mut r) = StreamReader::open(Cursor::new(bytes)) {
        while let Ok(Some(_)) = r.next_frame() {}
    }
    if let Ok(w) = walk(bytes, buf_len) {
        let meta = meta.expect("read_meta accepts what the full walk accepts");
        assert_eq!(meta, w.meta);
        let index = index.expect("StreamIndex accepts what the full walk accepts");
        let walked: Vec<&Frame> = w.frames.iter().map(|(f, _)| f).collect();
        assert_eq!(index.frames.iter().collect::<Vec<_>>(), walked);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Overwrite(Index, Vec<u8>),
    Remove(Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), vec(any::<u8>(), 1..4)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        // hex digits make header fields change value instead of failing to parse
        2 => (any::<Index>(), vec(prop_oneof![Just(b'0'), Just(b'f'), Just(b'8'), any::<u8>()], 1..17))
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::FlipBit(i, b) => {
            let at = i.index(bytes.len());
            bytes[at] ^= 1 << b;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Insert(i, b) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Overwrite(i, b) => {
            let at = i.index(bytes.len());
            let end = (at + b.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&b[..end - at]);
        }
        Mutation::Remove(i, n) => {
            let at = i.index(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}

/// A small valid stream to mutate: few frames, short payloads, so each case is cheap.
fn small_spec() -> impl Strategy<Value = Spec> {
    spec().prop_map(|mut s| {
        for f in &mut s.frames {
            if let WriteFrame::Data(_, d) = f {
                d.truncate(600);
            }
        }
        // truncating payloads shrinks extents, so the layout stays valid
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Everything written is read back: meta, frame list, payload bytes.
    #[test]
    fn writer_reader_roundtrip(spec in spec()) {
        let bytes = spec.bytes();
        let w = walk(&bytes, 65536).expect("a written stream reads back");
        prop_assert_eq!(w.meta.virtual_size, spec.opts.virtual_size);
        prop_assert_eq!(w.meta.data_size, spec.data_size());
        prop_assert_eq!(w.meta.is_compressed(), spec.opts.compression_level.is_some());
        prop_assert_eq!(w.meta.incremental, spec.opts.incremental);
        prop_assert_eq!(w.frames.len(), spec.frames.len());
        for ((f, data), want) in w.frames.iter().zip(&spec.frames) {
            match want {
                WriteFrame::Data(start, payload) => {
                    prop_assert_eq!((f.kind, f.start, f.length), (FrameKind::Data, *start, payload.len() as u64));
                    prop_assert!(data == payload, "payload of {:?} differs", f);
                }
                WriteFrame::Zero(start, len) => {
                    prop_assert_eq!((f.kind, f.start, f.length), (FrameKind::Zero, *start, *len));
                    prop_assert_eq!(f.stored_len, 0);
                }
            }
        }
        let index = StreamIndex::read(Cursor::new(&bytes)).expect("index");
        let walked: Vec<Frame> = w.frames.into_iter().map(|(f, _)| f).collect();
        prop_assert_eq!(index.frames, walked);
        prop_assert_eq!(index.file_size, bytes.len() as u64);
        prop_assert_eq!(read_meta(Cursor::new(&bytes)).expect("meta"), w.meta);
    }

    /// Buffers of 1, 3, 4096 and 65536 bytes give the same frames and bytes.
    #[test]
    fn read_sizes_agree(spec in spec()) {
        let bytes = spec.bytes();
        let reference = walk(&bytes, 65536).expect("reference read");
        for len in [1usize, 3, 4096] {
            let w = walk(&bytes, len).expect("read");
            prop_assert_eq!(w.frames.len(), reference.frames.len());
            for ((f, d), (rf, rd)) in w.frames.iter().zip(&reference.frames) {
                prop_assert_eq!(f, rf);
                prop_assert!(d == rd, "buffer {} differs in {:?}", len, f);
            }
        }
    }

    /// Payloads read in part, or not at all, are skipped correctly by next_frame.
    #[test]
    fn partial_reads_then_skip(spec in spec(), reads in vec(0usize..4, 8)) {
        let bytes = spec.bytes();
        let mut r = StreamReader::open(Cursor::new(&bytes)).expect("open");
        let mut buf = vec![0u8; 1000];
        let mut i = 0;
        while let Some(f) = r.next_frame().expect("frame") {
            let want = &spec.frames[i];
            if let WriteFrame::Data(start, payload) = want {
                prop_assert_eq!((f.start, f.length), (*start, payload.len() as u64));
                let mut got = 0usize;
                for _ in 0..reads[i % reads.len()] {
                    match r.read_chunk(&mut buf).expect("chunk") {
                        Some((at, n)) => {
                            prop_assert_eq!(at, start + got as u64);
                            prop_assert!(buf[..n] == payload[got..got + n]);
                            got += n;
                        }
                        None => break,
                    }
                }
            }
            i += 1;
        }
        prop_assert_eq!(i, spec.frames.len());
        prop_assert!(r.is_finished());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Random bytes: errors, never panics.
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        check_hostile(&bytes, 7);
    }

    /// A valid meta frame followed by random bytes (gets past open, into the frame walk).
    #[test]
    fn random_body_never_panics(body in vec(prop_oneof![any::<u8>(), Just(b'0'), Just(b' ')], 0..300), compressed: bool) {
        let opts = StreamOptions::full("vda", 1 << 20, 0);
        let opts = if compressed { opts.compressed(2) } else { opts };
        let mut bytes = write_stream(&opts, &[]);
        let body_start = 40 + opts.meta_json().len() + 2;
        bytes.truncate(body_start);
        bytes.extend_from_slice(&body);
        check_hostile(&bytes, 5);
    }

    /// Bit flips, truncation, insertion, overwrites and removals of valid streams:
    /// never a panic; an accepted stream stays inside virtualSize and sums to dataSize.
    #[test]
    fn mutated_streams_keep_invariants(spec in small_spec(), muts in vec(mutation(), 1..4), buf_len in prop_oneof![Just(1usize), Just(3), Just(4096)]) {
        let mut bytes = spec.bytes();
        for m in &muts {
            apply(&mut bytes, m);
        }
        check_hostile(&bytes, buf_len);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text as the meta's date, including non-ASCII near the fixed positions:
    /// accepted or `BadMeta`, never a panic.
    #[test]
    fn meta_with_any_date_never_panics(date in prop_oneof!["2026-01-01T00:00:[0-9]{0,2}\\PC{0,3}", "\\PC{0,24}"]) {
        let mut opts = StreamOptions::full("vda", 1 << 20, 0);
        opts.date = date;
        let json = opts.meta_json();
        if let Err(e) = StreamMeta::parse(json.as_bytes(), 40) {
            prop_assert_eq!(e.offset(), Some(40));
        }
        let bytes = write_stream(&opts, &[]);
        check_hostile(&bytes, 4096);
    }
}

/// A data frame whose header length disagrees with its LZ4 content is rejected,
/// whatever the buffer size (no short, silently accepted payload).
#[test]
fn decoded_length_is_checked_for_every_buffer_size() {
    let opts = StreamOptions::full("vda", 1 << 20, 0).compressed(2);
    let mut bytes = write_stream(&opts, &[WriteFrame::Data(0, vec![9u8; 5000])]);
    let hdr = FrameHeader::new(FrameKind::Data, 0, 5000).encode();
    let pos = bytes
        .windows(40)
        .position(|w| w == hdr)
        .expect("data header");
    // claim 5001 bytes (and a dataSize to match), the LZ4 frame holds 5000
    bytes[pos..pos + 40].copy_from_slice(&FrameHeader::new(FrameKind::Data, 0, 5001).encode());
    let (from, to) = (b"\"dataSize\": 5000", b"\"dataSize\": 5001");
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("dataSize in meta");
    bytes[at..at + to.len()].copy_from_slice(to);
    for len in [1usize, 3, 4096, 65536] {
        assert!(walk(&bytes, len).is_err(), "buffer {len}");
    }
}
