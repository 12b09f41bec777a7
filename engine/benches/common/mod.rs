//! Input generation shared by the engine benchmarks and the `genchain` example
//! (included there with `#[path]`): deterministic, seekable disk content and
//! virtnbdbackup-format streams written with nbdfmt's writer.
//!
//! Content model: the disk is cut into 64 KiB granules; each granule holds the bytes
//! of one "generation" id (0 = never written, reads as zero). The bytes of generation
//! `id` at disk offset `o` depend only on `(id, o)`, so any range of a final image can
//! be regenerated without keeping the image (used for one-file chains and checks).
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

use nbdfmt::writer::{StreamOptions, StreamWriter};

/// Content granularity (and alignment of every extent we generate).
pub const GRANULE: u64 = 64 * 1024;

/// Largest data frame we write (virtnbdbackup writes one frame per extent; LZ4
/// splits frames of 32 MiB or more into 32 MiB pieces, so this exercises that).
pub const MAX_FRAME: u64 = 64 << 20;

/// What the data bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every byte pseudo-random (LZ4 cannot compress it).
    Random,
    /// Per 4 KiB block: 2 KiB pseudo-random, 2 KiB text (LZ4 ratio about 2, like
    /// typical guest data). Never all zero.
    Mixed,
}

impl Fill {
    /// Parses `random` / `mixed`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Self::Random),
            "mixed" => Some(Self::Mixed),
            _ => None,
        }
    }
}

/// splitmix64's finaliser: a good 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small sequential PRNG (splitmix64) for layouts.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5eed_5eed_5eed_5eed)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

const TEXT: &[u8] = b"Mar  3 04:17:22 bench kernel: [ 1234.567890] EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none.\n\
GET /index.html HTTP/1.1 200 5120 \"-\" \"Mozilla/5.0 (X11; Linux x86_64)\" rt=0.004 upstream=127.0.0.1:8080\n";

fn text_half() -> &'static [u8; 2048] {
    static T: std::sync::OnceLock<[u8; 2048]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0u8; 2048];
        for (i, b) in t.iter_mut().enumerate() {
            *b = TEXT[i % TEXT.len()];
        }
        t
    })
}

/// Writes the bytes generation `id` has at `disk_off` into `buf`. `disk_off` and
/// `buf.len()` must be multiples of 4096.
pub fn fill(buf: &mut [u8], id: u64, disk_off: u64, how: Fill) {
    assert!(
        disk_off % 4096 == 0 && buf.len() % 4096 == 0,
        "unaligned fill"
    );
    let key = mix(id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef);
    match how {
        Fill::Random => {
            let base = disk_off / 8;
            for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&mix(key ^ (base + i as u64)).to_le_bytes());
            }
        }
        Fill::Mixed => {
            for (b, block) in buf.chunks_exact_mut(4096).enumerate() {
                let blk = disk_off / 4096 + b as u64;
                let (rnd, txt) = block.split_at_mut(2048);
                for (i, w) in rnd.chunks_exact_mut(8).enumerate() {
                    w.copy_from_slice(&mix(key ^ (blk * 512 + i as u64)).to_le_bytes());
                }
                txt.copy_from_slice(text_half());
                txt[..8].copy_from_slice(&blk.to_le_bytes());
                txt[8..16].copy_from_slice(&id.to_le_bytes());
            }
        }
    }
}

/// One frame of a stream to generate (granule-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Data frame over `[start, start + len)`.
    Data { start: u64, len: u64 },
    /// Zero frame.
    Zero { start: u64, len: u64 },
}

/// Runs of consecutive granules `g` (of `0..n`) with `pred(g)`, as (first, count),
/// split so no run is longer than `max` granules.
pub fn runs(n: u64, max: u64, mut pred: impl FnMut(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut g = 0;
    while g < n {
        if !pred(g) {
            g += 1;
            continue;
        }
        let s = g;
        while g < n && g - s < max && pred(g) {
            g += 1;
        }
        out.push((s, g - s));
    }
    out
}

/// The frames of a full backup of a disk whose granule ids are `ids`: data frames
/// over written granules, zero frames over the rest (as virtnbdbackup writes a full).
pub fn full_pieces(ids: &[u32]) -> Vec<Piece> {
    let n = ids.len() as u64;
    let mut out = Vec::new();
    let mut g = 0u64;
    while g < n {
        let s = g;
        let data = ids[g as usize] != 0;
        while g < n && (ids[g as usize] != 0) == data && (!data || g - s < MAX_FRAME / GRANULE) {
            g += 1;
        }
        let (start, len) = (s * GRANULE, (g - s) * GRANULE);
        out.push(if data {
            Piece::Data { start, len }
        } else {
            Piece::Zero { start, len }
        });
    }
    out
}

/// The data frames of an incremental that wrote the granules where `ids[g] == id`.
pub fn inc_pieces(ids: &[u32], id: u32) -> Vec<Piece> {
    runs(ids.len() as u64, MAX_FRAME / GRANULE, |g| {
        ids[g as usize] == id
    })
    .into_iter()
    .map(|(s, c)| Piece::Data {
        start: s * GRANULE,
        len: c * GRANULE,
    })
    .collect()
}

/// Result of writing one stream.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// File size.
    pub size: u64,
    /// adler32 of the file (the `.chksum` value).
    pub adler: u32,
    /// Data bytes (sum of data frame lengths).
    pub data: u64,
}

/// Writes one stream to `path` (and `<path>.chksum` when `chksum`). `opts.data_size`
/// is computed; the content of granule `g` of a data frame is generation `id_of(g)`.
pub fn write_stream(
    path: &Path,
    opts: &StreamOptions,
    pieces: &[Piece],
    id_of: &dyn Fn(u64) -> u64,
    how: Fill,
    chksum: bool,
) -> io::Result<Written> {
    let mut o = opts.clone();
    o.data_size = pieces
        .iter()
        .map(|p| match p {
            Piece::Data { len, .. } => *len,
            Piece::Zero { .. } => 0,
        })
        .sum();
    let out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut w = StreamWriter::new(out, &o)?;
    let mut buf: Vec<u8> = Vec::new();
    for p in pieces {
        match *p {
            Piece::Data { start, len } => {
                let n = usize::try_from(len).map_err(io::Error::other)?;
                buf.resize(n, 0);
                let mut off = 0u64;
                while off < len {
                    let g = (start + off) / GRANULE;
                    let piece = GRANULE.min(len - off) as usize;
                    fill(
                        &mut buf[off as usize..off as usize + piece],
                        id_of(g),
                        start + off,
                        how,
                    );
                    off += piece as u64;
                }
                w.data(start, &buf)?;
            }
            Piece::Zero { start, len } => w.zero(start, len)?,
        }
    }
    let (out, adler, size) = w.finish()?;
    drop(out.into_inner().map_err(|e| e.into_error())?);
    if chksum {
        let mut c = path.as_os_str().to_owned();
        c.push(".chksum");
        std::fs::write(c, adler.to_string())?;
    }
    Ok(Written {
        size,
        adler,
        data: o.data_size,
    })
}

/// Where benchmark inputs go: `$VMRESTORE_BENCH_DIR` or `/var/tmp` (outside the repo).
pub fn bench_tempdir(tag: &str) -> tempfile::TempDir {
    let base = std::env::var_os("VMRESTORE_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix(&format!("vmrestore-bench-{tag}-"))
        .tempdir_in(base)
        .expect("cannot create a temporary directory for benchmark inputs")
}

/// A `BufReader` whose absolute seeks become relative ones, so a seek that lands inside
/// the buffer keeps it (no syscall, no refill). This is what `nbdfmt::reader::read_at`
/// would do if it used `Seek::seek_relative` from the reader's known position instead of
/// `seek(SeekFrom::Start(..))`, which makes `BufReader` drop its buffer on every header.
#[derive(Debug)]
pub struct RelSeek<R> {
    inner: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> RelSeek<R> {
    /// Wraps `r` (positioned at 0) with a buffer of `cap` bytes.
    pub fn new(cap: usize, r: R) -> Self {
        Self {
            inner: BufReader::with_capacity(cap, r),
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for RelSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for RelSeek<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        match to {
            SeekFrom::Start(x) => {
                let delta = i64::try_from(x).map_err(io::Error::other)?
                    - i64::try_from(self.pos).map_err(io::Error::other)?;
                self.inner.seek_relative(delta)?;
                self.pos = x;
            }
            other => self.pos = self.inner.seek(other)?,
        }
        Ok(self.pos)
    }
}
