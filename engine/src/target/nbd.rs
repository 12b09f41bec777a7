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

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::nbd::proto::*;
use crate::nbd::uri::{NbdAddr, NbdUri};
use crate::target::BlockTarget;

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

/// Block size constraints from `NBD_INFO_BLOCK_SIZE` (defaults when not sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum (alignment of every request).
    pub minimum: u32,
    /// Preferred.
    pub preferred: u32,
    /// Maximum READ/WRITE payload.
    pub maximum: u32,
}

#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Self::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

/// A request waiting for its reply.
#[derive(Debug)]
enum Pending {
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
        error: Option<(u32, String)>,
    },
    /// A BLOCK_STATUS: descriptors `(length, flags)` of our context.
    Status {
        extents: Vec<(u32, u32)>,
        error: Option<(u32, String)>,
    },
}

/// A finished block status: handle, descriptors `(length, flags)`, error.
type StatusDone = (u64, Vec<(u32, u32)>, Option<(u32, String)>);

/// A later-reported failure, kept to be returned by every following call.
#[derive(Debug, Clone)]
struct Failure {
    op: &'static str,
    code: Option<u32>,
    msg: String,
}

/// A restore target behind an NBD server.
#[derive(Debug)]
pub struct NbdTarget {
    uri: String,
    label: PathBuf,
    rd: BufReader<Sock>,
    wr: BufWriter<Sock>,
    size: u64,
    flags: u16,
    structured: bool,
    meta_id: Option<u32>,
    block: BlockSizes,
    opts: NbdOptions,
    request_size: usize,
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    write_bytes_in_flight: usize,
    /// Reads answered completely: handle and error.
    done_reads: Vec<(u64, Option<(u32, String)>)>,
    /// Block status answered: handle, descriptors, error.
    done_status: Vec<StatusDone>,
    failed: Option<Failure>,
    broken: bool,
    finished: bool,
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// An option reply: type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

fn rep_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
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
        let sock = match &parsed.addr {
            NbdAddr::Unix(p) => Sock::Unix(UnixStream::connect(p).map_err(io("connecting"))?),
            NbdAddr::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(io("resolving"))?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut got = None;
                for a in addrs {
                    match TcpStream::connect_timeout(
                        &a,
                        opts.timeout.unwrap_or(Duration::from_secs(30)),
                    ) {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = got.ok_or(last).map_err(io("connecting"))?;
                // Requests are small writes; Nagle + delayed ACK would cost ~40 ms each.
                s.set_nodelay(true).map_err(io("connecting"))?;
                Sock::Tcp(s)
            }
        };
        sock.set_timeout(opts.timeout).map_err(io("connecting"))?;
        let rd = BufReader::with_capacity(256 * 1024, sock.try_clone().map_err(io("connecting"))?);
        let wr = BufWriter::with_capacity(64 * 1024, sock);
        let mut t = Self {
            uri: uri.to_owned(),
            label: label.clone(),
            rd,
            wr,
            size: 0,
            flags: 0,
            structured: false,
            meta_id: None,
            block: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_BLOCK,
            },
            request_size: opts.request_size,
            opts,
            next_handle: 1,
            pending: HashMap::new(),
            write_bytes_in_flight: 0,
            done_reads: Vec::new(),
            done_status: Vec::new(),
            failed: None,
            broken: false,
            finished: false,
        };
        t.handshake(&parsed.export)
            .map_err(io("negotiating with"))?;
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
            structured = t.structured,
            base_allocation = t.meta_id.is_some(),
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
        self.structured
    }

    /// True when `base:allocation` block status is available.
    pub fn has_block_status(&self) -> bool {
        self.meta_id.is_some()
    }

    /// The server's block size constraints.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        self.wr.write_all(&IHAVEOPT.to_be_bytes())?;
        self.wr.write_all(&opt.to_be_bytes())?;
        self.wr.write_all(&(data.len() as u32).to_be_bytes())?;
        self.wr.write_all(data)?;
        self.wr.flush()
    }

    fn read_opt_reply(&mut self, opt: u32) -> io::Result<OptReply> {
        if read_u64(&mut self.rd)? != OPT_REPLY_MAGIC {
            return Err(proto_err("bad option reply magic"));
        }
        let o = read_u32(&mut self.rd)?;
        if o != opt {
            return Err(proto_err(format!(
                "reply to {} while waiting for {}",
                option_name(o),
                option_name(opt)
            )));
        }
        let kind = read_u32(&mut self.rd)?;
        let len = read_u32(&mut self.rd)?;
        if len > 1 << 20 {
            return Err(proto_err(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data)?;
        Ok(OptReply { kind, data })
    }

    fn handshake(&mut self, export: &str) -> io::Result<()> {
        if read_u64(&mut self.rd)? != NBDMAGIC {
            return Err(proto_err("not an NBD server"));
        }
        match read_u64(&mut self.rd)? {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(proto_err("oldstyle NBD servers are not supported")),
            _ => return Err(proto_err("unknown NBD handshake")),
        }
        let hflags = read_u16(&mut self.rd)?;
        let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let mut cflags = 0u32;
        if fixed {
            cflags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.wr.write_all(&cflags.to_be_bytes())?;
        self.wr.flush()?;
        if export.len() > MAX_STRING {
            return Err(proto_err("export name too long"));
        }
        let name = export.as_bytes();
        if fixed {
            if self.opts.structured_replies {
                self.send_option(OPT_STRUCTURED_REPLY, &[])?;
                let r = self.read_opt_reply(OPT_STRUCTURED_REPLY)?;
                self.structured = r.kind == REP_ACK;
            }
            if self.structured {
                let mut d = Vec::new();
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                self.send_option(OPT_SET_META_CONTEXT, &d)?;
                loop {
                    let r = self.read_opt_reply(OPT_SET_META_CONTEXT)?;
                    match r.kind {
                        REP_META_CONTEXT if r.data.len() >= 4 => {
                            if &r.data[4..] == BASE_ALLOCATION.as_bytes() {
                                self.meta_id = Some(be32(&r.data[..4]));
                            }
                        }
                        REP_ACK => break,
                        k if k & REP_FLAG_ERROR != 0 => {
                            self.meta_id = None;
                            break;
                        }
                        _ => return Err(proto_err("unexpected reply to SET_META_CONTEXT")),
                    }
                }
            }
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&1u16.to_be_bytes());
            d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            self.send_option(OPT_GO, &d)?;
            let mut have_export = false;
            loop {
                let r = self.read_opt_reply(OPT_GO)?;
                match r.kind {
                    REP_INFO if r.data.len() >= 2 => {
                        let t = be16(&r.data[..2]);
                        if t == INFO_EXPORT && r.data.len() == 12 {
                            self.size = be64(&r.data[2..10]);
                            self.flags = be16(&r.data[10..12]);
                            have_export = true;
                        } else if t == INFO_BLOCK_SIZE && r.data.len() == 14 {
                            self.block = BlockSizes {
                                minimum: be32(&r.data[2..6]),
                                preferred: be32(&r.data[6..10]),
                                maximum: be32(&r.data[10..14]),
                            };
                        }
                    }
                    REP_INFO => return Err(proto_err("short NBD_REP_INFO")),
                    REP_ACK => {
                        if !have_export {
                            return Err(proto_err("NBD_OPT_GO ended without NBD_INFO_EXPORT"));
                        }
                        return Ok(());
                    }
                    REP_ERR_UNSUP => break, // old server: EXPORT_NAME below
                    k if k & REP_FLAG_ERROR != 0 => {
                        let msg = r.message();
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("export {export:?}: {}: {msg}", rep_name(k)),
                        ));
                    }
                    _ => return Err(proto_err("unexpected reply to NBD_OPT_GO")),
                }
            }
        }
        self.wr.write_all(&IHAVEOPT.to_be_bytes())?;
        self.wr.write_all(&OPT_EXPORT_NAME.to_be_bytes())?;
        self.wr.write_all(&(name.len() as u32).to_be_bytes())?;
        self.wr.write_all(name)?;
        self.wr.flush()?;
        self.size = read_u64(&mut self.rd).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the server closed the connection: no export {export:?}?"),
                )
            } else {
                e
            }
        })?;
        self.flags = read_u16(&mut self.rd)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            self.rd.read_exact(&mut z)?;
        }
        Ok(())
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
        if let Some(f) = &self.failed {
            return Err(self.failure_error(f));
        }
        if self.finished {
            return Err(Error::Internal(format!("{}: already finished", self.uri)));
        }
        Ok(())
    }

    fn fail(&mut self, op: &'static str, code: Option<u32>, msg: String) {
        if self.failed.is_none() {
            tracing::warn!(uri = %self.uri, op, code, "{msg}");
            self.failed = Some(Failure { op, code, msg });
        }
    }

    /// A broken connection: every later call fails with this.
    fn broken(&mut self, op: &'static str, e: io::Error) -> Error {
        self.broken = true;
        self.fail(op, None, e.to_string());
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

    fn send_request(
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

    /// Reads one reply message (simple reply, or one structured chunk) and applies it.
    /// `buf` receives read payloads.
    fn pump(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let magic = read_u32(&mut self.rd)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
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
                    Pending::Read {
                        offset,
                        len,
                        buf_off,
                        ..
                    } => {
                        if error != 0 {
                            self.done_reads.push((handle, Some((error, String::new()))));
                        } else if self.structured {
                            return Err(proto_err("simple reply with data to a structured read"));
                        } else {
                            let n = len as usize;
                            self.rd.read_exact(&mut buf[buf_off..buf_off + n])?;
                            let _ = offset;
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
            STRUCTURED_REPLY_MAGIC => {
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
                let mut chunk_error = None;
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    if plen < 6 {
                        return Err(proto_err("short error chunk"));
                    }
                    let mut d = vec![0u8; plen as usize];
                    self.rd.read_exact(&mut d)?;
                    let code = be32(&d[..4]);
                    let mlen = be16(&d[4..6]) as usize;
                    let msg =
                        String::from_utf8_lossy(d.get(6..6 + mlen).unwrap_or(&[])).into_owned();
                    chunk_error = Some((if code == 0 { EIO } else { code }, msg));
                } else {
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
                        ) => {
                            if plen < 8 {
                                return Err(proto_err("short OFFSET_DATA chunk"));
                            }
                            let at = read_u64(&mut self.rd)?;
                            let n = u64::from(plen - 8);
                            if at < *offset || at + n > *offset + *len {
                                return Err(proto_err("OFFSET_DATA outside the request"));
                            }
                            let s = *buf_off + (at - *offset) as usize;
                            self.rd.read_exact(&mut buf[s..s + n as usize])?;
                            *covered += n;
                        }
                        (
                            REPLY_TYPE_OFFSET_HOLE,
                            Pending::Read {
                                offset,
                                len,
                                buf_off,
                                covered,
                                ..
                            },
                        ) => {
                            if plen != 12 {
                                return Err(proto_err("bad OFFSET_HOLE chunk"));
                            }
                            let at = read_u64(&mut self.rd)?;
                            let n = u64::from(read_u32(&mut self.rd)?);
                            if at < *offset || at + n > *offset + *len {
                                return Err(proto_err("OFFSET_HOLE outside the request"));
                            }
                            let s = *buf_off + (at - *offset) as usize;
                            buf[s..s + n as usize].fill(0);
                            *covered += n;
                        }
                        (REPLY_TYPE_BLOCK_STATUS, Pending::Status { extents, .. }) => {
                            if plen < 12 || (plen - 4) % 8 != 0 {
                                return Err(proto_err("bad BLOCK_STATUS chunk"));
                            }
                            let mut d = vec![0u8; plen as usize];
                            self.rd.read_exact(&mut d)?;
                            let id = be32(&d[..4]);
                            if Some(id) == self.meta_id {
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
                }
                if let Some(ce) = chunk_error {
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
                }
                if done {
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
                Ok(())
            }
            m => Err(proto_err(format!("bad reply magic {m:#010x}"))),
        }
    }

    /// Waits until fewer than `max` requests and `bytes` write bytes are in flight
    /// and nothing in flight overlaps `[offset, offset + len)`.
    fn make_room(&mut self, op: &'static str, offset: u64, len: u64, bytes: usize) -> Result<()> {
        loop {
            let overlap = self.pending.values().any(|p| match *p {
                Pending::Write {
                    offset: o, len: l, ..
                } => o < offset + len && offset < o + l,
                _ => false,
            });
            let busy = self.pending.len() >= self.opts.max_in_flight.max(1)
                || (self.write_bytes_in_flight > 0
                    && self.write_bytes_in_flight + bytes > self.opts.max_in_flight_bytes);
            if !overlap && !busy {
                return Ok(());
            }
            if let Err(e) = self.pump(&mut []) {
                return Err(self.broken(op, e));
            }
        }
    }

    /// Waits for every reply.
    fn drain(&mut self, op: &'static str) -> Result<()> {
        while !self.pending.is_empty() {
            if let Err(e) = self.pump(&mut []) {
                return Err(self.broken(op, e));
            }
        }
        Ok(())
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
        match self.send_request(kind, 0, offset, l32, payload) {
            Ok(h) => {
                self.pending.insert(h, Pending::Write { offset, len, op });
                self.write_bytes_in_flight += payload.len();
                Ok(())
            }
            Err(e) => Err(self.broken(op, e)),
        }
    }
}

// Completed reads/status results live outside `Pending` so `pump` can hand them over.
impl NbdTarget {
    fn take_read(&mut self, handle: u64) -> Option<Option<(u32, String)>> {
        let i = self.done_reads.iter().position(|(h, _)| *h == handle)?;
        Some(self.done_reads.swap_remove(i).1)
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
        let mut first_err: Option<(u32, String)> = None;
        while next < total || !outstanding.is_empty() {
            while next < total && outstanding.len() < self.opts.max_in_flight.max(1) {
                let n = (total - next).min(self.request_size);
                let at = offset + next as u64;
                let h = match self.send_request(CMD_READ, 0, at, n as u32, &[]) {
                    Ok(h) => h,
                    Err(e) => return Err(self.broken("reading", e)),
                };
                self.pending.insert(
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
            if let Err(e) = self.pump(buf) {
                return Err(self.broken("reading", e));
            }
            outstanding.retain(|&h| match self.take_read(h) {
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
            let h = match self.send_request(CMD_FLUSH, 0, 0, 0, &[]) {
                Ok(h) => h,
                Err(e) => return Err(self.broken("flushing", e)),
            };
            self.pending.insert(h, Pending::Flush);
            self.drain("flushing")?;
        }
        self.check()
    }

    fn sync(&mut self) -> Result<()> {
        self.flush()
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        let _ = self.send_request(CMD_DISC, 0, 0, 0, &[]);
        self.wr.get_ref().shutdown();
        self.finished = true;
        Ok(())
    }

    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.meta_id.is_none() {
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
            let h = match self.send_request(CMD_BLOCK_STATUS, 0, pos, n, &[]) {
                Ok(h) => h,
                Err(e) => return Err(self.broken("querying", e)),
            };
            self.pending.insert(
                h,
                Pending::Status {
                    extents: Vec::new(),
                    error: None,
                },
            );
            let (extents, error) = loop {
                if let Err(e) = self.pump(&mut []) {
                    return Err(self.broken("querying", e));
                }
                if let Some(i) = self.done_status.iter().position(|d| d.0 == h) {
                    let (_, x, e) = self.done_status.swap_remove(i);
                    break (x, e);
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
            for (l, flags) in extents {
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
            let _ = self.send_request(CMD_DISC, 0, 0, 0, &[]);
            self.wr.get_ref().shutdown();
        }
    }
}
