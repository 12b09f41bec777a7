//! The client's handshake: fixed newstyle option haggling (`STRUCTURED_REPLY`,
//! `SET_META_CONTEXT base:allocation`, `GO` with `INFO_BLOCK_SIZE`), falling back to
//! `EXPORT_NAME` for servers without `GO` (or without fixed newstyle).

use std::io::{self, BufReader, BufWriter, Read, Write};

use super::socket::{proto_err, read_u16, read_u32, read_u64, Sock};
use crate::nbd::proto::*;

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

/// What the handshake settled.
#[derive(Debug, Clone)]
pub(super) struct Negotiated {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, when the server selected it.
    pub meta_id: Option<u32>,
    pub block: BlockSizes,
}

impl Default for Negotiated {
    fn default() -> Self {
        Self {
            size: 0,
            flags: 0,
            structured: false,
            meta_id: None,
            block: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_BLOCK,
            },
        }
    }
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

/// `u32` length + bytes, as option payloads carry names.
fn push_string(d: &mut Vec<u8>, s: &[u8]) {
    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
    d.extend_from_slice(s);
}

/// One handshake over the connection's two halves.
pub(super) struct Handshake<'a> {
    rd: &'a mut BufReader<Sock>,
    wr: &'a mut BufWriter<Sock>,
    /// What is settled so far.
    n: Negotiated,
}

impl<'a> Handshake<'a> {
    pub(super) fn new(rd: &'a mut BufReader<Sock>, wr: &'a mut BufWriter<Sock>) -> Self {
        Self {
            rd,
            wr,
            n: Negotiated::default(),
        }
    }

    /// Negotiates `export`, asking for structured replies (and `base:allocation`) when
    /// `structured_replies`; what was settled, once in transmission.
    pub(super) fn run(mut self, export: &str, structured_replies: bool) -> io::Result<Negotiated> {
        let (fixed, no_zeroes) = self.greet()?;
        if export.len() > MAX_STRING {
            return Err(proto_err("export name too long"));
        }
        let name = export.as_bytes();
        if fixed {
            if structured_replies {
                self.send_option(OPT_STRUCTURED_REPLY, &[])?;
                let r = self.read_opt_reply(OPT_STRUCTURED_REPLY)?;
                self.n.structured = r.kind == REP_ACK;
            }
            if self.n.structured {
                self.set_meta_context(name)?;
            }
            if self.go(export)? {
                return Ok(self.n);
            }
        }
        self.export_name(export, no_zeroes)?;
        Ok(self.n)
    }

    /// The server's greeting and our flags: (fixed newstyle, no zeroes).
    fn greet(&mut self) -> io::Result<(bool, bool)> {
        if read_u64(self.rd)? != NBDMAGIC {
            return Err(proto_err("not an NBD server"));
        }
        match read_u64(self.rd)? {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(proto_err("oldstyle NBD servers are not supported")),
            _ => return Err(proto_err("unknown NBD handshake")),
        }
        let hflags = read_u16(self.rd)?;
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
        Ok((fixed, no_zeroes))
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        self.wr.write_all(&IHAVEOPT.to_be_bytes())?;
        self.wr.write_all(&opt.to_be_bytes())?;
        self.wr.write_all(&(data.len() as u32).to_be_bytes())?;
        self.wr.write_all(data)?;
        self.wr.flush()
    }

    fn read_opt_reply(&mut self, opt: u32) -> io::Result<OptReply> {
        if read_u64(self.rd)? != OPT_REPLY_MAGIC {
            return Err(proto_err("bad option reply magic"));
        }
        let o = read_u32(self.rd)?;
        if o != opt {
            return Err(proto_err(format!(
                "reply to {} while waiting for {}",
                option_name(o),
                option_name(opt)
            )));
        }
        let kind = read_u32(self.rd)?;
        let len = read_u32(self.rd)?;
        if len > 1 << 20 {
            return Err(proto_err(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data)?;
        Ok(OptReply { kind, data })
    }

    /// `SET_META_CONTEXT base:allocation`; a refusal only leaves block status out.
    fn set_meta_context(&mut self, name: &[u8]) -> io::Result<()> {
        let mut d = Vec::new();
        push_string(&mut d, name);
        d.extend_from_slice(&1u32.to_be_bytes());
        push_string(&mut d, BASE_ALLOCATION.as_bytes());
        self.send_option(OPT_SET_META_CONTEXT, &d)?;
        loop {
            let r = self.read_opt_reply(OPT_SET_META_CONTEXT)?;
            match r.kind {
                REP_META_CONTEXT if r.data.len() >= 4 => {
                    if &r.data[4..] == BASE_ALLOCATION.as_bytes() {
                        self.n.meta_id = Some(be32(&r.data[..4]));
                    }
                }
                REP_ACK => return Ok(()),
                k if k & REP_FLAG_ERROR != 0 => {
                    self.n.meta_id = None;
                    return Ok(());
                }
                _ => return Err(proto_err("unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    /// `GO` with `INFO_BLOCK_SIZE`. `Ok(false)`: the server does not know `GO` (use
    /// `EXPORT_NAME`); `Ok(true)`: in transmission.
    fn go(&mut self, export: &str) -> io::Result<bool> {
        let mut d = Vec::new();
        push_string(&mut d, export.as_bytes());
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
                        self.n.size = be64(&r.data[2..10]);
                        self.n.flags = be16(&r.data[10..12]);
                        have_export = true;
                    } else if t == INFO_BLOCK_SIZE && r.data.len() == 14 {
                        self.n.block = BlockSizes {
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
                    return Ok(true);
                }
                REP_ERR_UNSUP => return Ok(false), // old server: EXPORT_NAME
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

    /// `EXPORT_NAME`: no error reply exists, a missing export closes the connection.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> io::Result<()> {
        let name = export.as_bytes();
        self.wr.write_all(&IHAVEOPT.to_be_bytes())?;
        self.wr.write_all(&OPT_EXPORT_NAME.to_be_bytes())?;
        self.wr.write_all(&(name.len() as u32).to_be_bytes())?;
        self.wr.write_all(name)?;
        self.wr.flush()?;
        self.n.size = read_u64(self.rd).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the server closed the connection: no export {export:?}?"),
                )
            } else {
                e
            }
        })?;
        self.n.flags = read_u16(self.rd)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            self.rd.read_exact(&mut z)?;
        }
        Ok(())
    }
}
