//! `nbdfmt`: reads virtnbdbackup backup sets exactly — the sparse-stream `.data` files
//! (plain and LZ4-compressed), their `.chksum` files and the side files — and orders
//! each disk's chain by checkpoint metadata. Pure, synchronous `std::io`.
//!
//! # The sparse stream
//!
//! ```text
//! meta <0:16 hex> <len:16 hex>\r\n  {JSON meta, len bytes}\r\n
//! data <start>    <length>\r\n      payload (raw: length bytes; LZ4: trailer size)\r\n
//! zero <start>    <length>\r\n      (no payload)
//! ...                                 (offsets strictly increasing, no overlap)
//! stop 0000000000000000 0000000000000000\r\n
//! [compressed only]  [trailer JSON]\r\n comp 0000000000000000 <len of trailer>\r\n
//! ```
//! Every header is 40 ASCII bytes; numbers are 16 lowercase hex digits. The trailer
//! lists the stored size of each data payload (one LZ4 frame, or several for extents
//! of 32 MiB or more). A `.chksum` holds the decimal adler32 of the whole file.
//!
//! # Example
//!
//! ```
//! use nbdfmt::{StreamReader, FrameKind};
//! # let bytes = nbdfmt::writer::write_stream(
//! #     &nbdfmt::writer::StreamOptions::full("vda", 1 << 20, 0),
//! #     &[nbdfmt::writer::WriteFrame::Data(0, vec![0x55; 4096]),
//! #       nbdfmt::writer::WriteFrame::Zero(4096, (1 << 20) - 4096)]);
//! let mut r = StreamReader::open(std::io::Cursor::new(bytes))?;
//! assert_eq!(r.meta().disk_name, "vda");
//! let mut buf = vec![0u8; 65536];
//! while let Some(frame) = r.next_frame()? {
//!     if frame.kind == FrameKind::Data {
//!         while let Some((disk_offset, n)) = r.read_chunk(&mut buf)? {
//!             assert_eq!(&buf[..n], &vec![0x55; n][..]);
//!             # let _ = disk_offset;
//!         }
//!     }
//! }
//! # Ok::<(), nbdfmt::Error>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backupset;
pub mod checksum;
pub mod error;
pub mod frame;
pub mod lz4;
pub mod meta;
pub mod preadbuf;
pub mod reader;
pub mod sidecar;
pub mod slots;
pub mod small;
pub mod trailer;
pub mod vmconfig;
#[cfg(feature = "writer")]
pub mod writer;

pub use backupset::{
    BackupSet, Problem, ProblemKind, RestorePoint, SetKind, StreamContent, StreamFile,
};
pub use error::{Error, ErrorKind, Result};
pub use frame::{FrameHeader, FrameKind, HEADER_LEN};
pub use meta::{Compression, StreamMeta};
pub use preadbuf::PreadBuf;
pub use reader::{Frame, StreamIndex, StreamReader};
pub use sidecar::{BackupFile, Ident, QcowInfo, StreamLevel};
pub use slots::{ChainSlot, SlotFile};
pub use trailer::TrailerEntry;
pub use vmconfig::{CheckpointConfig, DiskConfig, DomainConfig};
