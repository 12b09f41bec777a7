//! NBD client target: restores into a remote block device (`qemu-nbd`, `nbdkit`,
//! a hypervisor's NBD export) over TCP or a Unix socket.
//!
//! Blocking, plain std sockets, one connection. Negotiation: fixed newstyle, structured
//! replies, `base:allocation`, `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`).
//! Writes are pipelined: `write_at`/`write_zeroes` send their requests and return;
//! up to `max_in_flight` requests (`max_in_flight_bytes` of payload) stay unanswered,
//! and a failure reported later surfaces on the next call, at the latest on `flush`
//! (which waits for every reply before sending `NBD_CMD_FLUSH`). Overlapping requests
//! are never in flight together, and reads wait for all writes, so the server's
//! freedom to reorder cannot reorder what the engine writes.
//!
//! `write_zeroes` uses `NBD_CMD_WRITE_ZEROES` without `NO_HOLE`, so the server may
//! punch holes; without server support it writes zero buffers. `TCP_NODELAY` is set.
//!
//! Files: `socket` (the stream), `handshake` (option haggling), `transmission`
//! (requests in flight and their replies); this one holds the target itself.

mod handshake;
mod socket;
mod transmission;

use std::io::{self, BufReader, BufWriter};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::nbd::proto::*;
use crate::nbd::uri::NbdUri;
use crate::target::BlockTarget;
use handshake::Handshake;
use socket::{proto_err, Sock};
use transmission::{Extents, Failure, Pending, ReplyError, Wire};

pub use handshake::BlockSizes;

/// Client knobs.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The export is known to read as zero everywhere (freshly created image or
    /// `nbdkit memory`): zero ranges need no write. Wrong here means stale data!
    pub fresh: bool,
    /// Largest READ/WRITE request (also capped by the server's maximum block size).
    pub request_size: usize,
    /// Requests in flight at most.
    pub max_in_flight: usize,
    /// Write payload in flight at most.
    pub max_in_flight_bytes: usize,
    /// Socket read/write timeout.
    pub timeout: Option<Duration>,
    /// Ask for structured replies (and with them `base:allocation`).
    pub structured_replies: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            fresh: false,
            request_size: 4 << 20,
            max_in_flight: 16,
            max_in_flight_bytes: 64 << 20,
            timeout: Some(Duration::from_secs(600)),
            structured_replies: true,
        }
    }
}

/// A restore target behind an NBD server.
#[derive(Debug)]
pub struct NbdTarget {
    uri: String,
    label: PathBuf,
    wire: Wire,
    size: u64,
    flags: u16,
    block: BlockSizes,
    opts: NbdOptions,
    request_size: usize,
    broken: bool,
    finished: bool,
}

impl NbdTarget {
    /// Connects to `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
    /// The export is not assumed to read as zero (see [`NbdOptions::fresh`]).
    pub fn connect(uri: &str) -> Result<Self> {
        Self::connect_with(uri, NbdOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(uri: &str, opts: NbdOptions) -> Result<Self> {
        let parsed = NbdUri::parse(uri)?;
        let label = PathBuf::from(uri);
        let io = |op: &'static str| {
            let label = label.clone();
            move |e: io::Error| Error::target(op, &label, e)
        };
        let sock = Sock::connect(&parsed.addr, opts.timeout, &label)?;
        sock.set_timeout(opts.timeout).map_err(io("connecting"))?;
        let rd = BufReader::with_capacity(256 * 1024, sock.try_clone().map_err(io("connecting"))?);
        let wr = BufWriter::with_capacity(64 * 1024, sock);
        // The target exists before the handshake, so a failed one ends like a dropped
        // target (soft disconnect, see `Drop`).
        let mut t = Self {
            uri: uri.to_owned(),
            label: label.clone(),
            wire: Wire::new(rd, wr, uri),
            size: 0,
            flags: 0,
            block: handshake::Negotiated::default().block,
            request_size: opts.request_size,
            opts,
            broken: false,
            finished: false,
        };
        let n = Handshake::new(&mut t.wire.rd, &mut t.wire.wr)
            .run(&parsed.export, t.opts.structured_replies)
            .map_err(io("negotiating with"))?;
        (t.size, t.flags, t.block) = (n.size, n.flags, n.block);
        (t.wire.structured, t.wire.meta_id) = (n.structured, n.meta_id);
        let max = t.block.maximum.max(1) as usize;
        t.request_size = t.opts.request_size.clamp(4096, max.max(4096)).min(max);
        let min = t.block.minimum.max(1) as usize;
        t.request_size -= t.request_size % min;
        if t.request_size == 0 {
            return Err(Error::Unsupported(format!(
                "{uri}: unusable block sizes {:?}",
                t.block
            )));
        }
        tracing::debug!(
            uri,
            size = t.size,
            flags = t.flags,
            structured = t.wire.structured,
            base_allocation = t.wire.meta_id.is_some(),
            block = ?t.block,
            "NBD connected"
        );
        Ok(t)
    }

    /// The URI connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Transmission flags sent by the server.
    pub fn export_flags(&self) -> u16 {
        self.flags
    }

    /// True when the server marked the export read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// True when structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.wire.structured
    }

    /// True when `base:allocation` block status is available.
    pub fn has_block_status(&self) -> bool {
        self.wire.meta_id.is_some()
    }

    /// The server's block size constraints.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block
    }

    fn err(&self, op: &'static str, e: io::Error) -> Error {
        Error::target(op, &self.label, e)
    }

    fn failure_error(&self, f: &Failure) -> Error {
        let source = match f.code {
            Some(c) => io::Error::from_raw_os_error(c as i32),
            None => io::Error::other(f.msg.clone()),
        };
        Error::target(f.op, &self.label, source)
    }

    /// Fails when the connection is unusable or an earlier request failed.
    fn check(&self) -> Result<()> {
        if let Some(f) = &self.wire.failed {
            return Err(self.failure_error(f));
        }
        if self.finished {
            return Err(Error::internal(format!("{}: already finished", self.uri)));
        }
        Ok(())
    }

    /// A broken connection: every later call fails with this.
    fn broken(&mut self, op: &'static str, e: io::Error) -> Error {
        self.broken = true;
        self.wire.fail(op, None, e.to_string());
        self.err(op, e)
    }

    fn bounds(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Unsupported(format!(
                "{}: {len} bytes at {offset} are past the end ({})",
                self.uri, self.size
            )));
        }
        let min = u64::from(self.block.minimum.max(1));
        if offset % min != 0 || len % min != 0 {
            return Err(Error::Unsupported(format!(
                "{}: {len} bytes at {offset} are not aligned to the server's {min}-byte blocks",
                self.uri
            )));
        }
        Ok(())
    }

    /// Sends a request; a failure breaks the connection (named `op`).
    fn send(
        &mut self,
        op: &'static str,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64> {
        match self.wire.send_request(kind, 0, offset, len, payload) {
            Ok(h) => Ok(h),
            Err(e) => Err(self.broken(op, e)),
        }
    }

    /// Reads one reply message into `buf`; a failure breaks the connection.
    fn pump(&mut self, op: &'static str, buf: &mut [u8]) -> Result<()> {
        match self.wire.pump(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broken(op, e)),
        }
    }

    /// Waits until a write of `bytes` payload over `[offset, offset + len)` may be sent
    /// (see [`Wire::make_room`]).
    fn make_room(&mut self, op: &'static str, offset: u64, len: u64, bytes: usize) -> Result<()> {
        let (max, max_bytes) = (self.opts.max_in_flight, self.opts.max_in_flight_bytes);
        match self.wire.make_room(offset, len, bytes, max, max_bytes) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broken(op, e)),
        }
    }

    /// Waits for every reply.
    fn drain(&mut self, op: &'static str) -> Result<()> {
        match self.wire.drain() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broken(op, e)),
        }
    }

    fn writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::target(
                "writing",
                &self.label,
                io::Error::from_raw_os_error(EPERM as i32),
            ));
        }
        Ok(())
    }

    fn queue_write(&mut self, kind: u16, offset: u64, len: u64, payload: &[u8]) -> Result<()> {
        let op = if kind == CMD_WRITE {
            "writing"
        } else {
            "zeroing"
        };
        self.make_room(op, offset, len, payload.len())?;
        let l32 = u32::try_from(len).map_err(|_| Error::internal("request too long"))?;
        let h = self.send(op, kind, offset, l32, payload)?;
        self.wire
            .pending
            .insert(h, Pending::Write { offset, len, op });
        self.wire.write_bytes_in_flight += payload.len();
        Ok(())
    }

    /// The `base:allocation` descriptors `(length, flags)` of `[pos, pos + n)`.
    fn block_status(&mut self, pos: u64, n: u32) -> Result<Extents> {
        let h = self.send("querying", CMD_BLOCK_STATUS, pos, n, &[])?;
        self.wire.pending.insert(
            h,
            Pending::Status {
                extents: Vec::new(),
                error: None,
            },
        );
        let (extents, error) = loop {
            self.pump("querying", &mut [])?;
            if let Some(done) = self.wire.take_status(h) {
                break done;
            }
        };
        if let Some((code, msg)) = error {
            tracing::warn!(uri = %self.uri, "block status failed: {} {msg}", error_name(code));
            return Err(Error::target(
                "querying",
                &self.label,
                io::Error::from_raw_os_error(code as i32),
            ));
        }
        if extents.is_empty() || extents.iter().any(|e| e.0 == 0) {
            let e = proto_err("empty block status reply");
            return Err(self.broken("querying", e));
        }
        Ok(extents)
    }
}

impl BlockTarget for NbdTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn starts_zeroed(&self) -> bool {
        self.opts.fresh
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check()?;
        self.writable()?;
        self.bounds(offset, data.len() as u64)?;
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(self.request_size);
            self.queue_write(
                CMD_WRITE,
                offset + pos as u64,
                n as u64,
                &data[pos..pos + n],
            )?;
            pos += n;
        }
        self.check()
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.writable()?;
        self.bounds(offset, len)?;
        if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
            // No NO_HOLE flag: the server may deallocate. 1 GiB per request.
            let max = (1u64 << 30) - (1u64 << 30) % u64::from(self.block.minimum.max(1));
            let mut pos = 0u64;
            while pos < len {
                let n = (len - pos).min(max);
                self.queue_write(CMD_WRITE_ZEROES, offset + pos, n, &[])?;
                pos += n;
            }
        } else {
            let zeros = vec![
                0u8;
                self.request_size
                    .min(usize::try_from(len).unwrap_or(usize::MAX))
            ];
            let mut pos = 0u64;
            while pos < len {
                let n = (len - pos).min(zeros.len() as u64) as usize;
                self.queue_write(CMD_WRITE, offset + pos, n as u64, &zeros[..n])?;
                pos += n as u64;
            }
        }
        self.check()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        self.bounds(offset, buf.len() as u64)?;
        // Reads see every write: wait for all replies first.
        self.drain("reading")?;
        self.check()?;
        let total = buf.len();
        let mut next = 0usize;
        let mut outstanding: Vec<u64> = Vec::new();
        let mut first_err: Option<ReplyError> = None;
        while next < total || !outstanding.is_empty() {
            while next < total && outstanding.len() < self.opts.max_in_flight.max(1) {
                let n = (total - next).min(self.request_size);
                let at = offset + next as u64;
                let h = self.send("reading", CMD_READ, at, n as u32, &[])?;
                self.wire.pending.insert(
                    h,
                    Pending::Read {
                        offset: at,
                        len: n as u64,
                        buf_off: next,
                        covered: 0,
                        error: None,
                    },
                );
                outstanding.push(h);
                next += n;
            }
            self.pump("reading", buf)?;
            outstanding.retain(|&h| match self.wire.take_read(h) {
                None => true,
                Some(r) => {
                    if let Some(e) = r {
                        first_err.get_or_insert(e);
                    }
                    false
                }
            });
        }
        match first_err {
            None => Ok(()),
            Some((code, msg)) => {
                tracing::warn!(uri = %self.uri, offset, len = total, "read failed: {} {msg}", error_name(code));
                Err(Error::target(
                    "reading",
                    &self.label,
                    io::Error::from_raw_os_error(code as i32),
                ))
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        self.check()?;
        self.drain("flushing")?;
        self.check()?;
        if self.flags & FLAG_SEND_FLUSH != 0 {
            let h = self.send("flushing", CMD_FLUSH, 0, 0, &[])?;
            self.wire.pending.insert(h, Pending::Flush);
            self.drain("flushing")?;
        }
        self.check()
    }

    fn sync(&mut self) -> Result<()> {
        self.flush()
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        let _ = self.wire.send_request(CMD_DISC, 0, 0, 0, &[]);
        self.wire.wr.get_ref().shutdown();
        self.finished = true;
        Ok(())
    }

    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.wire.meta_id.is_none() {
            return Ok(vec![(offset, len)]);
        }
        self.check()?;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Unsupported(format!(
                "{}: block status past the end",
                self.uri
            )));
        }
        self.drain("querying")?;
        let end = offset + len;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(1 << 30) as u32;
            for (l, flags) in self.block_status(pos, n)? {
                if pos >= end {
                    break;
                }
                let l = u64::from(l).min(end - pos);
                if flags & STATE_ZERO == 0 {
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == pos => last.1 += l,
                        _ => out.push((pos, l)),
                    }
                }
                pos += l;
            }
        }
        Ok(out)
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        if !self.finished && !self.broken {
            // Soft disconnect, best effort; unanswered requests are abandoned.
            let _ = self.wire.send_request(CMD_DISC, 0, 0, 0, &[]);
            self.wire.wr.get_ref().shutdown();
        }
    }
}
