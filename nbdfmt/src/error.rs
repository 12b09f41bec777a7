//! The one error type of `nbdfmt`: what went wrong, in which file, at which byte.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A failure reading a backup file. The `kind` says what and where (byte offset);
/// `path` is filled in by whoever opened the file.
#[derive(Debug)]
pub struct Error {
    path: Option<PathBuf>,
    kind: ErrorKind,
}

/// What went wrong, with the byte offset in the file where it was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error while reading.
    #[error("I/O error at byte {offset}: {source}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file ended inside a 40-byte frame header (or where one was expected).
    #[error(
        "truncated stream at byte {offset}: expected a 40-byte frame header, found {got} bytes"
    )]
    TruncatedHeader {
        /// Header position.
        offset: u64,
        /// Bytes that were there.
        got: usize,
    },
    /// The file does not end with the header a complete stream ends with.
    #[error("truncated stream: the last 40 bytes (at byte {offset}) are not the final {expected} header")]
    Truncated {
        /// Where the final header should be.
        offset: u64,
        /// `stop` or `comp`.
        expected: &'static str,
    },
    /// The 40 bytes are not `kind SP hex16 SP hex16 CRLF`. The message describes the
    /// bytes (how many are printable) and never shows them: a "stream" can be a link
    /// to any file (`/etc/shadow`), and errors reach logs and the catalogue.
    #[error(
        "invalid frame header at byte {offset} ({reason}; {printable} of 40 bytes printable ASCII)"
    )]
    BadHeader {
        /// Header position.
        offset: u64,
        /// Which rule was broken.
        reason: &'static str,
        /// How many of the 40 bytes are printable ASCII.
        printable: usize,
    },
    /// A well-formed header with a kind we do not know (the kind bytes are not shown,
    /// see [`ErrorKind::BadHeader`]).
    #[error("unknown frame kind at byte {offset} (not data, zero, meta, stop or comp)")]
    UnknownKind {
        /// Header position.
        offset: u64,
    },
    /// A frame that may not appear at this place (e.g. `meta` in the body).
    #[error("unexpected {kind} frame at byte {offset}: {reason}")]
    UnexpectedFrame {
        /// Header position.
        offset: u64,
        /// The kind found.
        kind: &'static str,
        /// What was expected instead.
        reason: &'static str,
    },
    /// The meta JSON is longer than any real one could be.
    #[error("meta header at byte {offset} claims {len} bytes of JSON (limit {max})")]
    MetaTooLarge {
        /// Header position.
        offset: u64,
        /// Claimed length.
        len: u64,
        /// Our limit.
        max: u64,
    },
    /// The meta JSON does not parse or lacks a required key.
    #[error("invalid meta JSON at byte {offset}: {reason}")]
    BadMeta {
        /// Where the JSON starts.
        offset: u64,
        /// Parser message.
        reason: String,
    },
    /// A payload shorter than its header says.
    #[error("truncated payload at byte {offset}: expected {expected} bytes, found {got}")]
    TruncatedPayload {
        /// Payload position.
        offset: u64,
        /// Bytes the header/trailer promised.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// A payload not followed by CR LF.
    #[error("missing CR LF after payload at byte {offset}")]
    MissingCrlf {
        /// Where the CR LF should be.
        offset: u64,
    },
    /// Frame offsets must strictly increase without overlap.
    #[error("frame at byte {offset} starts at disk offset {start}, before the end of the previous frame ({previous_end})")]
    OutOfOrder {
        /// Header position.
        offset: u64,
        /// Disk offset of this frame.
        start: u64,
        /// End of the previous frame.
        previous_end: u64,
    },
    /// A frame reaching past the disk's virtual size.
    #[error("frame at byte {offset} covers disk bytes {start}+{length}, past the virtual size {virtual_size}")]
    PastVirtualSize {
        /// Header position.
        offset: u64,
        /// Disk offset.
        start: u64,
        /// Length.
        length: u64,
        /// The meta's virtualSize.
        virtual_size: u64,
    },
    /// The sum of data frame lengths differs from the meta's `dataSize`.
    #[error("data size mismatch at stop frame (byte {offset}): meta says {declared}, frames hold {actual}")]
    DataSizeMismatch {
        /// Stop header position.
        offset: u64,
        /// `dataSize` from meta.
        declared: u64,
        /// Sum of data frame lengths.
        actual: u64,
    },
    /// Bytes after the end of the stream.
    #[error("{len} unexpected bytes after the end of the stream at byte {offset}")]
    TrailingData {
        /// Where the extra bytes start.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// A compressed stream whose last 40 bytes are not a `comp` header.
    #[error("compressed stream without a trailer: the last 40 bytes (at byte {offset}) are not a comp header ({reason})")]
    TrailerMissing {
        /// Where the comp header should be.
        offset: u64,
        /// What was found.
        reason: String,
    },
    /// The trailer claims more bytes than the file or our limit allow.
    #[error("trailer length {len} at byte {offset} does not fit the file ({file_size} bytes) or exceeds the limit")]
    TrailerPastFile {
        /// comp header position.
        offset: u64,
        /// Claimed trailer length.
        len: u64,
        /// File size.
        file_size: u64,
    },
    /// The trailer JSON is malformed.
    #[error("invalid compression trailer at byte {offset}: {reason}")]
    BadTrailer {
        /// Where the trailer JSON starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The trailer lists a different number of entries than there are data frames.
    #[error("compression trailer at byte {offset} has {entries} entries but the stream has {data_frames} data frames")]
    TrailerCountMismatch {
        /// Trailer (or stop frame) position.
        offset: u64,
        /// Entries in the trailer.
        entries: usize,
        /// Data frames in the stream.
        data_frames: usize,
    },
    /// The LZ4 frame could not be decoded.
    #[error("LZ4 error in payload at byte {offset}: {reason}")]
    Lz4 {
        /// Position of the LZ4 frame.
        offset: u64,
        /// Decoder message.
        reason: String,
    },
    /// The decoded length differs from the data header's length.
    #[error("decoded payload at byte {offset} is {actual} bytes, the data header says {expected}")]
    DecodedLength {
        /// Payload position.
        offset: u64,
        /// Header length.
        expected: u64,
        /// Decoded length (or a lower bound when it overflowed).
        actual: u64,
    },
    /// A `.chksum` file that is not a decimal u32.
    #[error("invalid checksum file: {reason}")]
    BadChecksumFile {
        /// What was found.
        reason: String,
    },
    /// The adler32 of the file differs from its `.chksum`.
    #[error("checksum mismatch: stored {stored}, computed {computed}")]
    ChecksumMismatch {
        /// From the `.chksum` file.
        stored: u32,
        /// adler32 of the file as it is now.
        computed: u32,
    },
    /// A side file (qcow.json, .cpt, XML) could not be understood.
    #[error("invalid side file at byte {offset}: {reason}")]
    BadSidecar {
        /// Where the problem is (0 when unknown).
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file name and the stream metadata disagree.
    #[error("file name and metadata disagree (meta at byte {offset}): {reason}")]
    NameMismatch {
        /// The meta JSON position.
        offset: u64,
        /// The disagreement.
        reason: String,
    },
    /// A stream whose parent checkpoint is not the previous member of the chain.
    #[error("broken chain (meta at byte {offset}): parent checkpoint is {found:?}, but the previous backup is {expected:?}")]
    BrokenLink {
        /// The meta JSON position.
        offset: u64,
        /// checkpointName of the previous member.
        expected: String,
        /// parentCheckpoint of this stream.
        found: String,
    },
    /// Two base (full or copy) streams for one disk in one directory.
    #[error("two base backups for one disk: this file and {other}")]
    TwoBases {
        /// The other base.
        other: PathBuf,
    },
    /// An incremental stream with no full or copy before it.
    #[error("no full or copy backup precedes this incremental")]
    NoBase,
}

impl Error {
    /// An error without a path yet (the caller knows the file).
    pub fn new(kind: ErrorKind) -> Self {
        Self { path: None, kind }
    }

    /// Attach the path of the file this error is about (keeps an existing one).
    #[must_use]
    pub fn in_file(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// The file, when known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The byte offset in the file, when the error has one.
    pub fn offset(&self) -> Option<u64> {
        use ErrorKind as K;
        match &self.kind {
            K::Io { offset, .. }
            | K::TruncatedHeader { offset, .. }
            | K::Truncated { offset, .. }
            | K::BadHeader { offset, .. }
            | K::UnknownKind { offset, .. }
            | K::UnexpectedFrame { offset, .. }
            | K::MetaTooLarge { offset, .. }
            | K::BadMeta { offset, .. }
            | K::TruncatedPayload { offset, .. }
            | K::MissingCrlf { offset }
            | K::OutOfOrder { offset, .. }
            | K::PastVirtualSize { offset, .. }
            | K::DataSizeMismatch { offset, .. }
            | K::TrailingData { offset, .. }
            | K::TrailerMissing { offset, .. }
            | K::TrailerPastFile { offset, .. }
            | K::BadTrailer { offset, .. }
            | K::TrailerCountMismatch { offset, .. }
            | K::Lz4 { offset, .. }
            | K::DecodedLength { offset, .. }
            | K::BadSidecar { offset, .. }
            | K::NameMismatch { offset, .. }
            | K::BrokenLink { offset, .. } => Some(*offset),
            K::BadChecksumFile { .. }
            | K::ChecksumMismatch { .. }
            | K::TwoBases { .. }
            | K::NoBase => None,
        }
    }

    /// True when the bytes of a backup file are damaged or malformed (as opposed to
    /// an I/O failure or a chain-level problem).
    pub fn is_corruption(&self) -> bool {
        !matches!(
            self.kind,
            ErrorKind::Io { .. }
                | ErrorKind::BrokenLink { .. }
                | ErrorKind::TwoBases { .. }
                | ErrorKind::NoBase
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_at(offset: u64) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::new(ErrorKind::Io { offset, source })
}
