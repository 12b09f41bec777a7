//! The server's transmission phase: the command loop of one connection. Reads run as
//! tasks of their own (within the connection's and the server's byte budgets) and
//! reply in any order through one shared writer; everything else is answered inline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::context::{invalid, units, ConnRead, ConnWrite, Ctx, BASE_ALLOCATION_ID};
use super::handshake::Session;
use crate::nbd::proto::*;
use crate::nbd::reader::{ChainReader, Piece};

/// Holes shorter than this inside a read are sent as data (fewer chunks).
const MIN_HOLE_CHUNK: u64 = 4096;
/// Most block-status descriptors in one reply.
const MAX_DESCRIPTORS: usize = 16 * 1024;

type SharedWriter = Arc<Mutex<BufWriter<ConnWrite>>>;

/// Writes one error reply (structured when negotiated).
async fn send_error(
    wr: &SharedWriter,
    structured: bool,
    handle: u64,
    err: u32,
    msg: &str,
) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    if structured {
        let m = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
        w.write_all(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            6 + m.len() as u32,
        ))
        .await?;
        w.write_all(&err.to_be_bytes()).await?;
        w.write_all(&(m.len() as u16).to_be_bytes()).await?;
        w.write_all(m).await?;
    } else {
        w.write_all(&simple_reply(err, handle)).await?;
    }
    w.flush().await
}

/// A plain success without payload.
async fn send_ok(wr: &SharedWriter, handle: u64) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    w.write_all(&simple_reply(0, handle)).await?;
    w.flush().await
}

/// Turns the pieces of a read into reply chunks: `(offset in buf, len, data?)`;
/// short holes ride along as data.
pub(super) fn chunks(base: u64, pieces: &[Piece]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for p in pieces {
        let data = p.is_data() || p.len() < MIN_HOLE_CHUNK;
        let (o, l) = ((p.offset() - base) as usize, p.len() as usize);
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 += l,
            _ => out.push((o, l, data)),
        }
    }
    out
}

async fn send_read(
    wr: &SharedWriter,
    structured: bool,
    handle: u64,
    offset: u64,
    buf: &[u8],
    pieces: &[Piece],
) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    if !structured {
        w.write_all(&simple_reply(0, handle)).await?;
        w.write_all(buf).await?;
        return w.flush().await;
    }
    let cs = chunks(offset, pieces);
    if cs.is_empty() {
        w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
            .await?;
        return w.flush().await;
    }
    let last = cs.len() - 1;
    for (i, &(o, l, data)) in cs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let at = (offset + o as u64).to_be_bytes();
        if data {
            w.write_all(&chunk_header(
                flags,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + l as u32,
            ))
            .await?;
            w.write_all(&at).await?;
            w.write_all(&buf[o..o + l]).await?;
        } else {
            w.write_all(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, handle, 12))
                .await?;
            w.write_all(&at).await?;
            w.write_all(&(l as u32).to_be_bytes()).await?;
        }
    }
    w.flush().await
}

async fn send_block_status(
    wr: &SharedWriter,
    handle: u64,
    runs: &[(u64, bool)],
) -> std::io::Result<()> {
    let mut payload = Vec::with_capacity(4 + 8 * runs.len());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for &(len, data) in runs {
        // Runs come from a request of at most u32::MAX bytes.
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        let flags = if data { 0 } else { STATE_HOLE | STATE_ZERO };
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    let mut w = wr.lock().await;
    w.write_all(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload.len() as u32,
    ))
    .await?;
    w.write_all(&payload).await?;
    w.flush().await
}

/// An unknown command flag on a command that is answered: the NBD spec says it
/// SHOULD be refused, not ignored (writes are refused whatever their flags).
fn unknown_flags(req: &Request) -> Option<String> {
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    let unknown = req.flags & !known;
    (unknown != 0 && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS | CMD_FLUSH))
        .then(|| format!("unknown command flags {unknown:#x}"))
}

/// After a command: go on, or end transmission with this result (after the drain).
enum Next {
    Continue,
    End(std::io::Result<()>),
}

/// One connection in transmission.
struct Conn<'a> {
    ctx: &'a Arc<Ctx>,
    wr: SharedWriter,
    reader: Arc<ChainReader>,
    /// Export size.
    size: u64,
    s: Session,
    /// Read payload in flight on this connection.
    conn_budget: Arc<Semaphore>,
}

pub(super) async fn transmission(
    mut rd: BufReader<ConnRead>,
    wr: BufWriter<ConnWrite>,
    s: Session,
    ctx: &Arc<Ctx>,
) -> std::io::Result<()> {
    let reader = ctx.exports[s.export].clone();
    let conn = Conn {
        ctx,
        wr: Arc::new(Mutex::new(wr)),
        size: reader.size(),
        reader,
        s,
        conn_budget: Arc::new(Semaphore::new(
            units(ctx.opts.connection_buffer).max(units(MAX_BLOCK as usize)),
        )),
    };
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        // Reap finished requests without waiting (a racing join in the select below
        // could drop a half-read header: read_exact is not cancel-safe).
        while tasks.try_join_next().is_some() {}
        if conn.conn_budget.is_closed() {
            break Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a reply could not be sent",
            ));
        }
        let mut hdr = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            _ = ctx.cancel.cancelled() => break Ok(()),
            r = rd.read_exact(&mut hdr) => r,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Some(req) = Request::decode(&hdr) else {
            break Err(invalid("bad request magic"));
        };
        ctx.counters.requests.fetch_add(1, Ordering::Relaxed);
        // An error sending a reply ends the connection at once (`?`), without the drain.
        match conn.command(&mut rd, req, &mut tasks).await? {
            Next::Continue => {}
            Next::End(r) => break r,
        }
    };
    // Soft disconnect or shutdown: finish what is in flight (bounded), then close.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    let mut w = conn.wr.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

impl Conn<'_> {
    /// Answers one request (reads: starts a task that will).
    async fn command(
        &self,
        rd: &mut BufReader<ConnRead>,
        req: Request,
        tasks: &mut JoinSet<()>,
    ) -> std::io::Result<Next> {
        let in_bounds = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|e| e <= self.size);
        if let Some(msg) = unknown_flags(&req) {
            self.fail(&req, EINVAL, msg).await?;
            return Ok(Next::Continue);
        }
        match req.kind {
            CMD_READ => return self.read(req, in_bounds, tasks).await,
            CMD_BLOCK_STATUS => {
                if !self.s.structured || !self.s.base_allocation {
                    self.fail(&req, EINVAL, "no metadata context negotiated".into())
                        .await?;
                    return Ok(Next::Continue);
                }
                if req.length == 0 || !in_bounds {
                    self.fail(
                        &req,
                        EINVAL,
                        "block status range is empty or past the end".into(),
                    )
                    .await?;
                    return Ok(Next::Continue);
                }
                let keep = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    MAX_DESCRIPTORS
                };
                match self
                    .reader
                    .allocation(req.offset, u64::from(req.length), keep)
                {
                    Ok(runs) => send_block_status(&self.wr, req.handle, &runs).await?,
                    Err(e) => {
                        self.fail(&req, EIO, format!("block status: {e}")).await?;
                        return Ok(Next::Continue);
                    }
                }
            }
            CMD_DISC => return Ok(Next::End(Ok(()))),
            CMD_FLUSH => send_ok(&self.wr, req.handle).await?,
            CMD_WRITE => {
                // The payload follows the header; skip it, then refuse.
                if req.length > MAX_BLOCK {
                    return Ok(Next::End(Err(invalid(format!(
                        "write of {} bytes",
                        req.length
                    )))));
                }
                tokio::io::copy(
                    &mut (&mut *rd).take(u64::from(req.length)),
                    &mut tokio::io::sink(),
                )
                .await?;
                self.fail(&req, EPERM, "read-only export".into()).await?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES | CMD_RESIZE => {
                self.fail(&req, EPERM, "read-only export".into()).await?;
            }
            other => {
                self.fail(
                    &req,
                    EINVAL,
                    format!("{} not supported", command_name(other)),
                )
                .await?;
            }
        }
        Ok(Next::Continue)
    }

    /// Counts, logs and answers a request with an error.
    async fn fail(&self, req: &Request, err: u32, msg: String) -> std::io::Result<()> {
        self.ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            cmd = command_name(req.kind),
            offset = req.offset,
            len = req.length,
            err = error_name(err),
            "{msg}"
        );
        send_error(&self.wr, self.s.structured, req.handle, err, &msg).await
    }

    /// `NBD_CMD_READ`: checked, then (once the byte budgets allow) read and answered by
    /// a task of its own.
    async fn read(
        &self,
        req: Request,
        in_bounds: bool,
        tasks: &mut JoinSet<()>,
    ) -> std::io::Result<Next> {
        if req.length > MAX_BLOCK {
            self.fail(
                &req,
                EINVAL,
                format!("read of {} bytes exceeds {MAX_BLOCK}", req.length),
            )
            .await?;
            return Ok(Next::Continue);
        }
        if !in_bounds {
            self.fail(
                &req,
                EINVAL,
                format!("read past the end of {} bytes", self.size),
            )
            .await?;
            return Ok(Next::Continue);
        }
        let len = req.length as usize;
        let n = u32::try_from(units(len)).unwrap_or(u32::MAX);
        let Ok(p1) = self.conn_budget.clone().acquire_many_owned(n).await else {
            return Ok(Next::End(Ok(())));
        };
        let Ok(p2) = self.ctx.server_budget.clone().acquire_many_owned(n).await else {
            return Ok(Next::End(Ok(())));
        };
        tasks.spawn(serve_read(
            self.reader.clone(),
            self.wr.clone(),
            self.ctx.clone(),
            self.s.structured,
            req,
            (p1, p2),
            self.conn_budget.clone(),
        ));
        Ok(Next::Continue)
    }
}

/// The task of one read: the chain read on a blocking thread, then the reply; the
/// permits (byte budgets) are held until it is sent. A reply that cannot be sent
/// closes `conn_budget`, which ends the connection.
async fn serve_read(
    reader: Arc<ChainReader>,
    wr: SharedWriter,
    ctx: Arc<Ctx>,
    structured: bool,
    req: Request,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    conn_budget: Arc<Semaphore>,
) {
    let _permits = permits;
    let off = req.offset;
    let len = req.length as usize;
    let res = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        reader.read_pieces(off, &mut buf).map(|p| (buf, p))
    })
    .await;
    if conn_budget.is_closed() {
        // an earlier reply of this connection failed: nothing more goes out
        return;
    }
    let sent = match res {
        Ok(Ok((buf, pieces))) => {
            ctx.counters
                .bytes_read
                .fetch_add(len as u64, Ordering::Relaxed);
            send_read(&wr, structured, req.handle, off, &buf, &pieces).await
        }
        Ok(Err(e)) => {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(offset = off, len, error = %e, "read failed");
            let msg = e.to_string();
            if structured {
                send_error(&wr, true, req.handle, EIO, &msg).await
            } else {
                // A simple reply with an error carries no payload.
                send_error(&wr, false, req.handle, EIO, &msg).await
            }
        }
        Err(e) => {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(offset = off, len, error = %e, "read task failed");
            send_error(&wr, structured, req.handle, EIO, "internal error").await
        }
    };
    if let Err(e) = sent {
        // half a reply may be on the wire (or the client stopped reading, see
        // `StallGuard`): the connection ends, and no request of it waits for budget
        tracing::warn!(error = %e, "reply not sent; closing the connection");
        conn_budget.close();
    }
}
