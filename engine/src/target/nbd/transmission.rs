//! The client in transmission: requests sent ([`Wire::send_request`]), what is still in
//! flight ([`Pending`]) and the replies that answer it ([`Wire::pump`]: simple replies
//! and structured reply chunks). Write failures are kept ([`Failure`]) and returned by
//! every later call of the target.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};

use super::socket::{proto_err, read_u16, read_u32, read_u64, Sock};
use crate::nbd::proto::*;

/// An error a reply carried: NBD error value and message.
pub(super) type ReplyError = (u32, String);

/// Block status descriptors `(length, flags)`.
pub(super) type Extents = Vec<(u32, u32)>;

/// A request waiting for its reply.
#[derive(Debug)]
pub(super) enum Pending {
    /// WRITE or WRITE_ZEROES over `[offset, offset + len)`.
    Write {
        offset: u64,
        len: u64,
        op: &'static str,
    },
    Flush,
    /// A READ into `buf[buf_off..buf_off + len]`.
    Read {
        offset: u64,
        len: u64,
        buf_off: usize,
        covered: u64,
        error: Option<ReplyError>,
    },
    /// A BLOCK_STATUS: descriptors `(length, flags)` of our context.
    Status {
        extents: Extents,
        error: Option<ReplyError>,
    },
}

/// A finished block status: handle, descriptors `(length, flags)`, error.
type StatusDone = (u64, Extents, Option<ReplyError>);

/// A later-reported failure, kept to be returned by every following call.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub op: &'static str,
    pub code: Option<u32>,
    pub msg: String,
}

/// The connection once in transmission.
#[derive(Debug)]
pub(super) struct Wire {
    pub rd: BufReader<Sock>,
    pub wr: BufWriter<Sock>,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, when negotiated.
    pub meta_id: Option<u32>,
    next_handle: u64,
    pub pending: HashMap<u64, Pending>,
    pub write_bytes_in_flight: usize,
    /// Reads answered completely: handle and error.
    done_reads: Vec<(u64, Option<ReplyError>)>,
    /// Block status answered: handle, descriptors, error.
    done_status: Vec<StatusDone>,
    pub failed: Option<Failure>,
    /// For log lines.
    uri: String,
}

impl Wire {
    pub(super) fn new(rd: BufReader<Sock>, wr: BufWriter<Sock>, uri: &str) -> Self {
        Self {
            rd,
            wr,
            structured: false,
            meta_id: None,
            next_handle: 1,
            pending: HashMap::new(),
            write_bytes_in_flight: 0,
            done_reads: Vec::new(),
            done_status: Vec::new(),
            failed: None,
            uri: uri.to_owned(),
        }
    }

    /// Keeps the first failure (logged) for every later call.
    pub(super) fn fail(&mut self, op: &'static str, code: Option<u32>, msg: String) {
        if self.failed.is_none() {
            tracing::warn!(uri = %self.uri, op, code, "{msg}");
            self.failed = Some(Failure { op, code, msg });
        }
    }

    pub(super) fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            length: len,
        };
        self.wr.write_all(&r.encode())?;
        if !payload.is_empty() {
            self.wr.write_all(payload)?;
        }
        self.wr.flush()?;
        Ok(handle)
    }

    /// Waits until fewer than `max` requests and `max_bytes` write bytes (with `bytes`
    /// more) are in flight and nothing in flight overlaps `[offset, offset + len)`.
    pub(super) fn make_room(
        &mut self,
        offset: u64,
        len: u64,
        bytes: usize,
        max: usize,
        max_bytes: usize,
    ) -> io::Result<()> {
        loop {
            let overlap = self.pending.values().any(|p| match *p {
                Pending::Write {
                    offset: o, len: l, ..
                } => o < offset + len && offset < o + l,
                _ => false,
            });
            let busy = self.pending.len() >= max.max(1)
                || (self.write_bytes_in_flight > 0
                    && self.write_bytes_in_flight + bytes > max_bytes);
            if !overlap && !busy {
                return Ok(());
            }
            self.pump(&mut [])?;
        }
    }

    /// Waits for every reply.
    pub(super) fn drain(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.pump(&mut [])?;
        }
        Ok(())
    }

    /// The outcome of a read once answered completely: `Some(error)`.
    pub(super) fn take_read(&mut self, handle: u64) -> Option<Option<ReplyError>> {
        let i = self.done_reads.iter().position(|(h, _)| *h == handle)?;
        Some(self.done_reads.swap_remove(i).1)
    }

    /// The outcome of a block status once answered: descriptors and error.
    pub(super) fn take_status(&mut self, handle: u64) -> Option<(Extents, Option<ReplyError>)> {
        let i = self.done_status.iter().position(|d| d.0 == handle)?;
        let (_, x, e) = self.done_status.swap_remove(i);
        Some((x, e))
    }

    /// Reads one reply message (simple reply, or one structured chunk) and applies it.
    /// `buf` receives read payloads.
    pub(super) fn pump(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match read_u32(&mut self.rd)? {
            SIMPLE_REPLY_MAGIC => self.simple_reply(buf),
            STRUCTURED_REPLY_MAGIC => self.structured_chunk(buf),
            m => Err(proto_err(format!("bad reply magic {m:#010x}"))),
        }
    }

    fn simple_reply(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let error = read_u32(&mut self.rd)?;
        let handle = read_u64(&mut self.rd)?;
        let Some(p) = self.pending.remove(&handle) else {
            return Err(proto_err(format!("reply for unknown handle {handle}")));
        };
        match p {
            Pending::Write { len, op, offset } => {
                self.write_bytes_in_flight =
                    self.write_bytes_in_flight.saturating_sub(len as usize);
                if error != 0 && op == "writing" {
                    self.fail(
                        op,
                        Some(error),
                        format!("write of {len} bytes at {offset}: {}", error_name(error)),
                    );
                } else if error != 0 {
                    self.fail(
                        op,
                        Some(error),
                        format!("zeroing {len} bytes at {offset}: {}", error_name(error)),
                    );
                }
            }
            Pending::Flush => {
                if error != 0 {
                    self.fail("flushing", Some(error), error_name(error).into());
                }
            }
            Pending::Read { len, buf_off, .. } => {
                if error != 0 {
                    self.done_reads.push((handle, Some((error, String::new()))));
                } else if self.structured {
                    return Err(proto_err("simple reply with data to a structured read"));
                } else {
                    let n = len as usize;
                    self.rd.read_exact(&mut buf[buf_off..buf_off + n])?;
                    self.done_reads.push((handle, None));
                }
            }
            Pending::Status { .. } => {
                self.done_status.push((
                    handle,
                    Vec::new(),
                    Some((
                        if error == 0 { EIO } else { error },
                        "simple reply to block status".into(),
                    )),
                ));
            }
        }
        Ok(())
    }

    fn structured_chunk(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if !self.structured {
            return Err(proto_err("structured reply not negotiated"));
        }
        let flags = read_u16(&mut self.rd)?;
        let kind = read_u16(&mut self.rd)?;
        let handle = read_u64(&mut self.rd)?;
        let plen = read_u32(&mut self.rd)?;
        let done = flags & REPLY_FLAG_DONE != 0;
        let Some(p) = self.pending.get_mut(&handle) else {
            return Err(proto_err(format!("chunk for unknown handle {handle}")));
        };
        // Error chunks are the same for every command.
        if kind & REPLY_TYPE_ERROR_BIT != 0 {
            let ce = read_error_chunk(&mut self.rd, plen)?;
            let write_op = match p {
                Pending::Read { error, .. } | Pending::Status { error, .. } => {
                    error.get_or_insert(ce.clone());
                    None
                }
                Pending::Write { op, .. } => Some(*op),
                Pending::Flush => Some("flushing"),
            };
            if let Some(op) = write_op {
                self.fail(op, Some(ce.0), format!("{}: {}", error_name(ce.0), ce.1));
            }
        } else {
            read_chunk(&mut self.rd, kind, plen, p, buf, self.meta_id)?;
        }
        if done {
            self.complete(handle);
        }
        Ok(())
    }

    /// The last chunk of `handle` arrived: its request is answered.
    fn complete(&mut self, handle: u64) {
        match self.pending.remove(&handle) {
            Some(Pending::Write { len, .. }) => {
                self.write_bytes_in_flight =
                    self.write_bytes_in_flight.saturating_sub(len as usize);
            }
            Some(Pending::Read {
                len,
                covered,
                error,
                ..
            }) => {
                let e = match error {
                    Some(e) => Some(e),
                    None if covered != len => {
                        Some((EIO, format!("reply covered {covered} of {len} bytes")))
                    }
                    None => None,
                };
                self.done_reads.push((handle, e));
            }
            Some(Pending::Status { extents, error }) => {
                self.done_status.push((handle, extents, error));
            }
            Some(Pending::Flush) | None => {}
        }
    }
}

/// The payload of an error chunk: NBD error (EIO for 0) and message.
fn read_error_chunk(rd: &mut impl Read, plen: u32) -> io::Result<ReplyError> {
    if plen < 6 {
        return Err(proto_err("short error chunk"));
    }
    let mut d = vec![0u8; plen as usize];
    rd.read_exact(&mut d)?;
    let code = be32(&d[..4]);
    let mlen = be16(&d[4..6]) as usize;
    let msg = String::from_utf8_lossy(d.get(6..6 + mlen).unwrap_or(&[])).into_owned();
    Ok((if code == 0 { EIO } else { code }, msg))
}

/// The payload of a non-error chunk of type `kind` for request `p`: read data into
/// `buf`, holes zeroed, block status descriptors of context `meta_id` collected.
fn read_chunk(
    rd: &mut impl Read,
    kind: u16,
    plen: u32,
    p: &mut Pending,
    buf: &mut [u8],
    meta_id: Option<u32>,
) -> io::Result<()> {
    match (kind, &mut *p) {
        (REPLY_TYPE_NONE, _) => {
            if plen != 0 {
                return Err(proto_err("NONE chunk with payload"));
            }
        }
        (
            REPLY_TYPE_OFFSET_DATA,
            Pending::Read {
                offset,
                len,
                buf_off,
                covered,
                ..
            },
        ) => *covered += read_data_chunk(rd, plen, (*offset, *len, *buf_off), buf)?,
        (
            REPLY_TYPE_OFFSET_HOLE,
            Pending::Read {
                offset,
                len,
                buf_off,
                covered,
                ..
            },
        ) => *covered += read_hole_chunk(rd, plen, (*offset, *len, *buf_off), buf)?,
        (REPLY_TYPE_BLOCK_STATUS, Pending::Status { extents, .. }) => {
            if plen < 12 || (plen - 4) % 8 != 0 {
                return Err(proto_err("bad BLOCK_STATUS chunk"));
            }
            let mut d = vec![0u8; plen as usize];
            rd.read_exact(&mut d)?;
            let id = be32(&d[..4]);
            if Some(id) == meta_id {
                for e in d[4..].chunks_exact(8) {
                    extents.push((be32(&e[..4]), be32(&e[4..])));
                }
            }
        }
        _ => {
            return Err(proto_err(format!(
                "unexpected chunk type {kind} for {}",
                match p {
                    Pending::Write { .. } => "a write",
                    Pending::Flush => "a flush",
                    Pending::Read { .. } => "a read",
                    Pending::Status { .. } => "block status",
                }
            )));
        }
    }
    Ok(())
}

/// A read request as its chunks see it: disk offset, length, and where in the caller's
/// buffer its bytes go.
type ReadSpan = (u64, u64, usize);

/// An `OFFSET_DATA` chunk of the read `span`: its bytes into `buf`; how many.
fn read_data_chunk(
    rd: &mut impl Read,
    plen: u32,
    (offset, len, buf_off): ReadSpan,
    buf: &mut [u8],
) -> io::Result<u64> {
    if plen < 8 {
        return Err(proto_err("short OFFSET_DATA chunk"));
    }
    let at = read_u64(rd)?;
    let n = u64::from(plen - 8);
    if at < offset || at + n > offset + len {
        return Err(proto_err("OFFSET_DATA outside the request"));
    }
    let s = buf_off + (at - offset) as usize;
    rd.read_exact(&mut buf[s..s + n as usize])?;
    Ok(n)
}

/// An `OFFSET_HOLE` chunk of the read `span`: zeroes into `buf`; how many.
fn read_hole_chunk(
    rd: &mut impl Read,
    plen: u32,
    (offset, len, buf_off): ReadSpan,
    buf: &mut [u8],
) -> io::Result<u64> {
    if plen != 12 {
        return Err(proto_err("bad OFFSET_HOLE chunk"));
    }
    let at = read_u64(rd)?;
    let n = u64::from(read_u32(rd)?);
    if at < offset || at + n > offset + len {
        return Err(proto_err("OFFSET_HOLE outside the request"));
    }
    let s = buf_off + (at - offset) as usize;
    buf[s..s + n as usize].fill(0);
    Ok(n)
}
