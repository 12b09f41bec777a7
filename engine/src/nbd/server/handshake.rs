//! The server's handshake: fixed newstyle option haggling until the client enters
//! transmission (`EXPORT_NAME`, `GO`) or aborts; with TLS configured, FORCEDTLS
//! (`STARTTLS` first, then a new round of haggling over TLS).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::context::{invalid, Ctx, BASE_ALLOCATION_ID, EXPORT_FLAGS};
use crate::nbd::proto::*;

/// Longest option payload read into memory.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest option payload skipped (beyond: hard disconnect).
const MAX_OPTION_SKIP: u32 = 16 << 20;

/// What the handshake settled.
pub(super) struct Session {
    pub export: usize,
    pub structured: bool,
    pub base_allocation: bool,
}

/// What the options so far asked for.
#[derive(Default)]
struct Asked {
    structured: bool,
    /// (export, selected) of the last SET_META_CONTEXT.
    meta: Option<(usize, bool)>,
}

impl Asked {
    /// The session for export `idx`.
    fn session(&self, idx: usize) -> Session {
        Session {
            export: idx,
            structured: self.structured,
            base_allocation: self.meta.is_some_and(|(e, sel)| sel && e == idx),
        }
    }
}

async fn reply_opt<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| invalid("option reply too long"))?;
    wr.write_all(&option_reply_header(opt, kind, len)).await?;
    wr.write_all(data).await
}

async fn reply_err<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> std::io::Result<()> {
    reply_opt(wr, opt, kind, msg.as_bytes()).await?;
    wr.flush().await
}

/// Cursor over an option payload.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Where TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls {
    /// Not configured: `STARTTLS` is unsupported.
    Off,
    /// Configured, not negotiated yet (FORCEDTLS): only `STARTTLS` and `ABORT` work.
    Required,
    /// Negotiated: the options run over TLS.
    Active,
}

/// How a round of option haggling ended.
pub(super) enum Haggled {
    /// Into transmission (`EXPORT_NAME`, `GO`).
    Go(Session),
    /// The client aborted.
    Aborted,
    /// `STARTTLS` was acknowledged: the TLS handshake comes next, then a new round.
    StartTls,
}

/// Option haggling (after [`greet`]) until the client enters transmission, aborts,
/// or starts TLS. A new round after `STARTTLS` forgets everything asked before it,
/// as the protocol requires.
pub(super) async fn haggle<R, W>(
    rd: &mut R,
    wr: &mut W,
    ctx: &Ctx,
    no_zeroes: bool,
    tls: Tls,
) -> std::io::Result<Haggled>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut asked = Asked::default();
    loop {
        if rd.read_u64().await? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_SKIP {
                return Err(invalid(format!("{} of {len} bytes", option_name(opt))));
            }
            tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
            reply_err(wr, opt, REP_ERR_TOO_BIG, "option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        tracing::trace!(option = option_name(opt), len, "option");
        if tls == Tls::Required && !tls_gate(wr, opt).await? {
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                return export_name(wr, ctx, &data, no_zeroes, &asked)
                    .await
                    .map(Haggled::Go)
            }
            OPT_ABORT => {
                let _ = reply_err(wr, opt, REP_ACK, "").await;
                return Ok(Haggled::Aborted);
            }
            OPT_LIST => list(wr, ctx, opt, len).await?,
            OPT_INFO | OPT_GO => {
                if let Some(s) = info(wr, ctx, opt, &data, &asked).await? {
                    return Ok(Haggled::Go(s));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    reply_err(wr, opt, REP_ERR_INVALID, "takes no data").await?;
                    continue;
                }
                asked.structured = true;
                reply_err(wr, opt, REP_ACK, "").await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(wr, ctx, opt, &data, &mut asked).await?;
            }
            OPT_STARTTLS => {
                if starttls(wr, opt, len, tls).await? {
                    return Ok(Haggled::StartTls);
                }
            }
            _ => {
                reply_err(wr, opt, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

/// FORCEDTLS before `STARTTLS`: `true` lets `opt` through (`STARTTLS`, `ABORT`);
/// anything else gets `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME`, which has no error
/// reply, a hard disconnect.
async fn tls_gate<W: AsyncWrite + Unpin>(wr: &mut W, opt: u32) -> std::io::Result<bool> {
    match opt {
        OPT_STARTTLS | OPT_ABORT => Ok(true),
        OPT_EXPORT_NAME => Err(invalid(
            "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: this server requires TLS",
        )),
        _ => {
            reply_err(
                wr,
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            Ok(false)
        }
    }
}

/// `NBD_OPT_STARTTLS`: `true` once acknowledged (the TLS handshake is next).
async fn starttls<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    len: u32,
    tls: Tls,
) -> std::io::Result<bool> {
    let (kind, msg) = match tls {
        Tls::Off => (REP_ERR_UNSUP, "TLS is not supported by this server"),
        Tls::Active => (REP_ERR_INVALID, "TLS is already active"),
        Tls::Required if len != 0 => (REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
        Tls::Required => (REP_ACK, ""),
    };
    reply_err(wr, opt, kind, msg).await?;
    Ok(kind == REP_ACK)
}

/// Our greeting (fixed newstyle, no zeroes) and the client's flags: whether it
/// asked for no zeroes.
pub(super) async fn greet<R, W>(rd: &mut R, wr: &mut W) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&NBDMAGIC.to_be_bytes()).await?;
    wr.write_all(&IHAVEOPT.to_be_bytes()).await?;
    wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    wr.flush().await?;
    let cflags = rd.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid(format!("unknown client flags {cflags:#x}")));
    }
    Ok(cflags & FLAG_C_NO_ZEROES != 0)
}

/// `NBD_OPT_EXPORT_NAME`: into transmission, or (no such export) a hard disconnect.
async fn export_name<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ctx: &Ctx,
    data: &[u8],
    no_zeroes: bool,
    asked: &Asked,
) -> std::io::Result<Session> {
    let name = String::from_utf8_lossy(data);
    let Some(idx) = ctx.lookup(&name) else {
        // No error reply exists for EXPORT_NAME: hard disconnect.
        return Err(invalid(format!(
            "no export {name:?} (exports: {})",
            ctx.names()
        )));
    };
    wr.write_all(&ctx.exports[idx].size().to_be_bytes()).await?;
    wr.write_all(&EXPORT_FLAGS.to_be_bytes()).await?;
    if !no_zeroes {
        wr.write_all(&[0u8; 124]).await?;
    }
    wr.flush().await?;
    Ok(asked.session(idx))
}

/// `NBD_OPT_LIST`: every export's name.
async fn list<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ctx: &Ctx,
    opt: u32,
    len: u32,
) -> std::io::Result<()> {
    if len != 0 {
        return reply_err(wr, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await;
    }
    for e in &ctx.exports {
        let name = e.disk().as_bytes();
        let mut d = Vec::with_capacity(4 + name.len());
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        reply_opt(wr, opt, REP_SERVER, &d).await?;
    }
    reply_err(wr, opt, REP_ACK, "").await
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's size, flags, block sizes (and name or
/// description when asked). `Some`: `GO` succeeded, into transmission.
async fn info<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ctx: &Ctx,
    opt: u32,
    data: &[u8],
    asked: &Asked,
) -> std::io::Result<Option<Session>> {
    let mut c = Cur(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let reqs = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
        c.0.is_empty().then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        reply_err(wr, opt, REP_ERR_INVALID, "malformed request").await?;
        return Ok(None);
    };
    let Some(idx) = ctx.lookup(name) else {
        let msg = format!("no export {name:?}; exports: {}", ctx.names());
        reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await?;
        return Ok(None);
    };
    let r = &ctx.exports[idx];
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&r.size().to_be_bytes());
    info.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
    reply_opt(wr, opt, REP_INFO, &info).await?;
    // Block sizes are sent whether asked or not (allowed; min 1 binds nobody).
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&MAX_BLOCK.to_be_bytes());
    reply_opt(wr, opt, REP_INFO, &bs).await?;
    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(r.disk().as_bytes());
        reply_opt(wr, opt, REP_INFO, &d).await?;
    }
    if reqs.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(format!("{} from its backup chain (read-only)", r.disk()).as_bytes());
        reply_opt(wr, opt, REP_INFO, &d).await?;
    }
    reply_err(wr, opt, REP_ACK, "").await?;
    Ok((opt == OPT_GO).then(|| asked.session(idx)))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: only `base:allocation`
/// exists, and only after structured replies.
async fn meta_context<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ctx: &Ctx,
    opt: u32,
    data: &[u8],
    asked: &mut Asked,
) -> std::io::Result<()> {
    if !asked.structured {
        return reply_err(
            wr,
            opt,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        )
        .await;
    }
    let mut c = Cur(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        if n as usize > data.len() / 4 {
            return None;
        }
        let qs = (0..n).map(|_| c.string()).collect::<Option<Vec<&str>>>()?;
        c.0.is_empty().then_some((name, qs))
    })();
    let Some((name, queries)) = parsed else {
        return reply_err(wr, opt, REP_ERR_INVALID, "malformed request").await;
    };
    let Some(idx) = ctx.lookup(name) else {
        let msg = format!("no export {name:?}; exports: {}", ctx.names());
        return reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await;
    };
    let (matches, id) = if opt == OPT_LIST_META_CONTEXT {
        let m = queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == "base:" || *q == BASE_ALLOCATION);
        (m, 0)
    } else {
        (queries.contains(&BASE_ALLOCATION), BASE_ALLOCATION_ID)
    };
    if matches {
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply_opt(wr, opt, REP_META_CONTEXT, &d).await?;
    }
    if opt == OPT_SET_META_CONTEXT {
        asked.meta = Some((idx, matches));
    }
    reply_err(wr, opt, REP_ACK, "").await
}
