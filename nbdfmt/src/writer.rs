//! Feature `writer`: produces streams the way virtnbdbackup does (same framing, meta
//! key order and layout, trailer and chunking rules), for tests and benchmarks.
//! LZ4 output is format-identical but not byte-identical to python-lz4's.

use std::io::{self, Write};

use crate::frame::{FrameHeader, FrameKind};
use crate::lz4::encode_frame;
use crate::trailer::{encode_trailer, TrailerEntry};

/// NBD maximum request size of qemu's servers: extents of this size or more are
/// compressed in pieces of this size.
pub const MAX_REQUEST_SIZE: usize = 32 * 1024 * 1024;

/// What goes into the meta frame.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Disk size.
    pub virtual_size: u64,
    /// Sum of all data frame lengths that will be written.
    pub data_size: u64,
    /// Disk target.
    pub disk_name: String,
    /// Checkpoint name.
    pub checkpoint_name: String,
    /// Parent checkpoint; `None` for full/copy.
    pub parent_checkpoint: Option<String>,
    /// Inc/diff.
    pub incremental: bool,
    /// LZ4 level, or `None` for an uncompressed stream.
    pub compression_level: Option<u32>,
    /// `date` text.
    pub date: String,
}

impl StreamOptions {
    /// A full backup of a disk.
    pub fn full(disk: &str, virtual_size: u64, data_size: u64) -> Self {
        Self {
            virtual_size,
            data_size,
            disk_name: disk.to_owned(),
            checkpoint_name: "virtnbdbackup.0".into(),
            parent_checkpoint: None,
            incremental: false,
            compression_level: None,
            date: "2026-01-01T00:00:00.000001".into(),
        }
    }

    /// Incremental N of a disk.
    pub fn inc(disk: &str, n: u32, virtual_size: u64, data_size: u64) -> Self {
        Self {
            checkpoint_name: format!("virtnbdbackup.{n}"),
            parent_checkpoint: Some(format!("virtnbdbackup.{}", n.saturating_sub(1))),
            incremental: true,
            ..Self::full(disk, virtual_size, data_size)
        }
    }

    /// The same, compressed at `level`.
    #[must_use]
    pub fn compressed(mut self, level: u32) -> Self {
        self.compression_level = Some(level);
        self
    }

    /// The meta JSON exactly as Python's `json.dumps(meta, indent=4)` prints it.
    pub fn meta_json(&self) -> String {
        let compressed = self
            .compression_level
            .map_or_else(|| "false".to_owned(), |l| l.to_string());
        let s = |v: &str| serde_json::Value::String(v.to_owned()).to_string();
        format!(
            "{{\n    \"virtualSize\": {},\n    \"dataSize\": {},\n    \"date\": {},\n    \"diskName\": {},\n    \"diskFormat\": \"qcow2\",\n    \"checkpointName\": {},\n    \"compressed\": {},\n    \"compressionMethod\": \"lz4\",\n    \"parentCheckpoint\": {},\n    \"incremental\": {},\n    \"streamVersion\": 2\n}}",
            self.virtual_size,
            self.data_size,
            s(&self.date),
            s(&self.disk_name),
            s(&self.checkpoint_name),
            compressed,
            s(self.parent_checkpoint.as_deref().unwrap_or("")),
            self.incremental
        )
    }
}

/// Writes one stream. Frames must be given in increasing disk order.
pub struct StreamWriter<W: Write> {
    out: W,
    hash: simd_adler32::Adler32,
    compressed: bool,
    trailer: Vec<TrailerEntry>,
    written: u64,
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StreamWriter<W> {
    /// Writes the meta frame.
    pub fn new(out: W, opts: &StreamOptions) -> io::Result<Self> {
        let mut w = Self {
            out,
            hash: simd_adler32::Adler32::new(),
            compressed: opts.compression_level.is_some(),
            trailer: Vec::new(),
            written: 0,
        };
        let json = opts.meta_json();
        w.put(&FrameHeader::new(FrameKind::Meta, 0, json.len() as u64).encode())?;
        w.put(json.as_bytes())?;
        w.put(b"\r\n")?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.write(b);
        self.written += b.len() as u64;
        self.out.write_all(b)
    }

    /// A data frame at `start`.
    pub fn data(&mut self, start: u64, payload: &[u8]) -> io::Result<()> {
        self.put(&FrameHeader::new(FrameKind::Data, start, payload.len() as u64).encode())?;
        if self.compressed {
            if payload.len() >= MAX_REQUEST_SIZE {
                let mut sizes = Vec::new();
                for chunk in payload.chunks(MAX_REQUEST_SIZE) {
                    let f = encode_frame(chunk);
                    sizes.push(f.len() as u64);
                    self.put(&f)?;
                }
                self.trailer.push(TrailerEntry {
                    frames: sizes,
                    chunked: true,
                });
            } else {
                let f = encode_frame(payload);
                self.trailer.push(TrailerEntry {
                    frames: vec![f.len() as u64],
                    chunked: false,
                });
                self.put(&f)?;
            }
        } else {
            self.put(payload)?;
        }
        self.put(b"\r\n")
    }

    /// A zero frame.
    pub fn zero(&mut self, start: u64, length: u64) -> io::Result<()> {
        self.put(&FrameHeader::new(FrameKind::Zero, start, length).encode())
    }

    /// Writes `stop` (and the trailer when compressed); returns the writer, the
    /// adler32 of the file (the `.chksum` value) and its size.
    pub fn finish(mut self) -> io::Result<(W, u32, u64)> {
        self.put(&FrameHeader::new(FrameKind::Stop, 0, 0).encode())?;
        if self.compressed {
            let t = encode_trailer(&self.trailer);
            self.put(t.as_bytes())?;
            self.put(b"\r\n")?;
            self.put(&FrameHeader::new(FrameKind::Comp, 0, t.len() as u64).encode())?;
        }
        self.out.flush()?;
        Ok((self.out, self.hash.finish(), self.written))
    }
}

/// One frame for [`write_stream`].
#[derive(Debug, Clone)]
pub enum WriteFrame {
    /// Data at an offset.
    Data(u64, Vec<u8>),
    /// Zero range.
    Zero(u64, u64),
}

/// Writes a whole stream into a vector; `opts.data_size` is computed from the frames.
pub fn write_stream(opts: &StreamOptions, frames: &[WriteFrame]) -> Vec<u8> {
    let mut o = opts.clone();
    o.data_size = frames
        .iter()
        .map(|f| {
            if let WriteFrame::Data(_, d) = f {
                d.len() as u64
            } else {
                0
            }
        })
        .sum();
    let mut w = StreamWriter::new(Vec::new(), &o).expect("invariant: writing to a Vec");
    for f in frames {
        match f {
            WriteFrame::Data(s, d) => w.data(*s, d),
            WriteFrame::Zero(s, l) => w.zero(*s, *l),
        }
        .expect("invariant: writing to a Vec");
    }
    w.finish().expect("invariant: writing to a Vec").0
}
