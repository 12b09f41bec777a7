//! A read-only NBD server that exports disks straight from their backup chains
//! (instant recovery: boot or mount a restore point without restoring it first).
//!
//! ```text
//!  listener (unix / tcp) ──accept──▶ connection task ── handshake (fixed newstyle)
//!                                          │
//!                                          ▼ transmission
//!     request reader ──READ──▶ [per-connection + server byte budget] ──▶ blocking task:
//!          │                      ChainReader::read_pieces (pread / LZ4 + LRU cache)
//!          │                                              │
//!          └──BLOCK_STATUS / FLUSH / DISC / writes──▶ reply writer (one lock, any order)
//! ```
//! Protocol: fixed newstyle with `NO_ZEROES`; options `EXPORT_NAME`, `GO`, `INFO`
//! (`INFO_EXPORT`, `INFO_NAME`, `INFO_DESCRIPTION`, `INFO_BLOCK_SIZE`), `LIST`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`),
//! `ABORT`; anything else gets `NBD_REP_ERR_UNSUP`. Commands: `READ` (structured
//! replies with `OFFSET_DATA`/`OFFSET_HOLE` chunks when negotiated, simple replies
//! otherwise), `BLOCK_STATUS` (`base:allocation`: data 0, zero extents and gaps
//! `HOLE|ZERO`), `FLUSH` (no-op), `DISC`; writes, trims and write-zeroes get `EPERM`.
//! Transmission flags: `HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN`.
//! Block sizes: minimum 1, preferred 4 KiB, maximum 32 MiB (larger requests: `EINVAL`).
//!
//! Memory: at most `connection_buffer` bytes of read payload in flight per connection
//! and `server_buffer` in all, plus the decoded-LZ4 cache (`cache_bytes`) and one
//! decoded LZ4 frame (≤ 32 MiB for virtnbdbackup output) per busy I/O thread.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::proto::*;
use super::reader::{ChainReader, Lz4Cache, Piece, DEFAULT_CACHE_BYTES};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::plan::DiskPlan;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (a stale socket file is replaced; a live one refused).
    Unix(PathBuf),
    /// A TCP address (port 0: an ephemeral port, see [`Server::uris`]).
    Tcp(SocketAddr),
}

impl Listen {
    /// A TCP listener from `host:port` text (`127.0.0.1:10809`, `[::1]:0`, `localhost:10809`).
    pub fn tcp(addr: &str) -> Result<Self> {
        addr.to_socket_addrs()
            .map_err(|e| Error::Unsupported(format!("bad listen address {addr}: {e}")))?
            .next()
            .map(Self::Tcp)
            .ok_or_else(|| Error::Unsupported(format!("listen address {addr} resolves to nothing")))
    }
}

/// Called once the listeners are bound, with the URIs of every export.
pub type ReadyFn = Arc<dyn Fn(&[String]) + Send + Sync>;

/// Server knobs.
#[derive(Clone)]
pub struct ServeOptions {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Decoded-LZ4 cache shared by all exports.
    pub cache_bytes: usize,
    /// Read payload in flight per connection (requests wait beyond it).
    pub connection_buffer: usize,
    /// Read payload in flight in the whole server.
    pub server_buffer: usize,
    /// Async worker threads.
    pub worker_threads: usize,
    /// Threads doing file reads and LZ4 decoding at once.
    pub io_threads: usize,
    /// A client that has not finished the handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Verify every chain file against its `.chksum` before serving (reads all of it).
    pub verify_checksums: bool,
    /// Called with the export URIs once listening (see also [`Server::uris`]).
    pub on_ready: Option<ReadyFn>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 32,
            cache_bytes: DEFAULT_CACHE_BYTES,
            connection_buffer: 64 << 20,
            server_buffer: 256 << 20,
            worker_threads: 2,
            io_threads: 8,
            handshake_timeout: Duration::from_secs(30),
            verify_checksums: false,
            on_ready: None,
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("max_connections", &self.max_connections)
            .field("cache_bytes", &self.cache_bytes)
            .field("connection_buffer", &self.connection_buffer)
            .field("server_buffer", &self.server_buffer)
            .field("worker_threads", &self.worker_threads)
            .field("io_threads", &self.io_threads)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("verify_checksums", &self.verify_checksums)
            .finish_non_exhaustive()
    }
}

/// Counters of a server's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Connections accepted (refused ones included).
    pub connections: u64,
    /// Transmission requests handled.
    pub requests: u64,
    /// Payload bytes sent for reads.
    pub bytes_read: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ServeStats {
        ServeStats {
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Byte budgets are counted in units of this size.
const BUDGET_UNIT: usize = 64 * 1024;
/// Holes shorter than this inside a read are sent as data (fewer chunks).
const MIN_HOLE_CHUNK: u64 = 4096;
/// Most block-status descriptors in one reply.
const MAX_DESCRIPTORS: usize = 16 * 1024;
/// Longest option payload read into memory.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest option payload skipped (beyond: hard disconnect).
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Transmission flags of every export.
const EXPORT_FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
/// Context id of `base:allocation` after `SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;

struct Ctx {
    exports: Vec<Arc<ChainReader>>,
    opts: ServeOptions,
    cancel: Cancel,
    server_budget: Arc<Semaphore>,
    counters: Counters,
}

impl Ctx {
    /// Export by name; `""` is the first disk.
    fn lookup(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|r| r.disk() == name)
    }

    fn names(&self) -> String {
        self.exports
            .iter()
            .map(|r| r.disk())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A bound listener.
#[derive(Debug)]
enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, SocketAddr),
}

/// Percent-encodes everything but unreserved characters and `/`.
fn pct(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

impl Bound {
    fn uri(&self, export: &str) -> String {
        match self {
            Self::Unix(_, p) => format!(
                "nbd+unix:///{}?socket={}",
                pct(export),
                pct(&p.to_string_lossy())
            ),
            Self::Tcp(_, a) => format!("nbd://{a}/{}", pct(export)),
        }
    }
}

/// A bound, not yet running server. Build with [`Server::bind`], then [`run`](Self::run)
/// it on this thread or [`spawn`](Self::spawn) it on its own.
pub struct Server {
    rt: tokio::runtime::Runtime,
    bound: Vec<Bound>,
    exports: Vec<Arc<ChainReader>>,
    opts: ServeOptions,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("bound", &self.bound)
            .field(
                "exports",
                &self.exports.iter().map(|e| e.disk()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn bind_err(op: &'static str, what: &Path, e: std::io::Error) -> Error {
    Error::target(op, what, e)
}

async fn bind_unix(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => {
            use std::os::unix::fs::FileTypeExt;
            if !md.file_type().is_socket() {
                return Err(bind_err(
                    "binding",
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a socket",
                    ),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(bind_err(
                    "binding",
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another server is listening on it",
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(|e| bind_err("removing stale socket", path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err("inspecting", path, e)),
    }
    UnixListener::bind(path).map_err(|e| bind_err("binding", path, e))
}

impl Server {
    /// Opens every disk's chain files and binds the listeners (nothing is served yet).
    /// Export names are the disk targets; they must be distinct.
    pub fn bind(plans: Vec<DiskPlan>, listen: &[Listen], opts: ServeOptions) -> Result<Self> {
        if plans.is_empty() {
            return Err(Error::Unsupported("nothing to serve: no disks".into()));
        }
        if listen.is_empty() {
            return Err(Error::Unsupported("nothing to listen on".into()));
        }
        for (i, p) in plans.iter().enumerate() {
            if plans[..i].iter().any(|q| q.disk == p.disk) {
                return Err(Error::Unsupported(format!("two disks named {}", p.disk)));
            }
            if p.disk.is_empty() || p.disk.len() > MAX_STRING {
                return Err(Error::Unsupported(format!("bad export name {:?}", p.disk)));
            }
        }
        if opts.verify_checksums {
            for p in &plans {
                for f in &p.files {
                    if f.stored_checksum.is_some() {
                        nbdfmt::checksum::verify_file(&f.path)?;
                    }
                }
            }
        }
        let cache = Arc::new(Lz4Cache::new(opts.cache_bytes));
        let exports = plans
            .into_iter()
            .map(|p| ChainReader::with_cache(p, cache.clone()).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.worker_threads.max(1))
            .max_blocking_threads(opts.io_threads.max(1))
            .thread_name("vmrestore-nbd")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))?;
        let bound = rt.block_on(async {
            let mut out = Vec::new();
            for l in listen {
                match l {
                    Listen::Unix(p) => out.push(Bound::Unix(bind_unix(p).await?, p.clone())),
                    Listen::Tcp(a) => {
                        let what = PathBuf::from(a.to_string());
                        let t = TcpListener::bind(a)
                            .await
                            .map_err(|e| bind_err("binding", &what, e))?;
                        let local = t.local_addr().map_err(|e| bind_err("binding", &what, e))?;
                        out.push(Bound::Tcp(t, local));
                    }
                }
            }
            Ok::<_, Error>(out)
        })?;
        Ok(Self {
            rt,
            bound,
            exports,
            opts,
        })
    }

    /// One URI per listener and export, e.g. `nbd+unix:///vda?socket=/run/x.sock`,
    /// `nbd://127.0.0.1:10809/vda`.
    pub fn uris(&self) -> Vec<String> {
        self.bound
            .iter()
            .flat_map(|b| self.exports.iter().map(move |e| b.uri(e.disk())))
            .collect()
    }

    /// The bound TCP addresses (with the real port when 0 was asked for).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter_map(|b| match b {
                Bound::Tcp(_, a) => Some(*a),
                Bound::Unix(..) => None,
            })
            .collect()
    }

    /// Serves until `cancel` fires; then stops accepting, lets in-flight requests
    /// finish (5 s at most), closes connections and removes its Unix sockets.
    pub fn run(self, cancel: Cancel) -> Result<ServeStats> {
        let uris = self.uris();
        for u in &uris {
            tracing::info!(uri = %u, "serving");
        }
        if let Some(cb) = &self.opts.on_ready {
            cb(&uris);
        }
        let Self {
            rt,
            bound,
            exports,
            opts,
        } = self;
        let ctx = Arc::new(Ctx {
            exports,
            server_budget: Arc::new(Semaphore::new(
                units(opts.server_buffer).max(units(MAX_BLOCK as usize)),
            )),
            opts,
            cancel,
            counters: Counters::default(),
        });
        let conn_limit = Arc::new(Semaphore::new(ctx.opts.max_connections.max(1)));
        let mut sockets = Vec::new();
        rt.block_on(async {
            let mut accepts = JoinSet::new();
            for b in bound {
                if let Bound::Unix(_, p) = &b {
                    sockets.push(p.clone());
                }
                accepts.spawn(accept_loop(b, ctx.clone(), conn_limit.clone()));
            }
            while accepts.join_next().await.is_some() {}
        });
        rt.shutdown_timeout(Duration::from_secs(2));
        for p in sockets {
            let _ = std::fs::remove_file(&p);
        }
        let stats = ctx.counters.snapshot();
        tracing::info!(?stats, "NBD server stopped");
        Ok(stats)
    }

    /// Runs the server on a thread of its own; the handle knows the URIs and stops it.
    pub fn spawn(self, cancel: Cancel) -> Result<ServeHandle> {
        let uris = self.uris();
        let tcp = self.tcp_addrs();
        let c = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("vmrestore-nbd-server".into())
            .spawn(move || self.run(c))
            .map_err(|e| Error::Internal(format!("cannot start the server thread: {e}")))?;
        Ok(ServeHandle {
            uris,
            tcp,
            cancel,
            thread: Some(thread),
        })
    }
}

/// A server running on its own thread. Dropping it stops the server.
#[derive(Debug)]
pub struct ServeHandle {
    uris: Vec<String>,
    tcp: Vec<SocketAddr>,
    cancel: Cancel,
    thread: Option<std::thread::JoinHandle<Result<ServeStats>>>,
}

impl ServeHandle {
    /// One URI per listener and export.
    pub fn uris(&self) -> &[String] {
        &self.uris
    }

    /// The bound TCP addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// The server's cancellation token.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> Result<ServeStats> {
        self.cancel.abort();
        self.join_inner()
    }

    /// Waits until the server stops (its cancel token fired).
    pub fn join(mut self) -> Result<ServeStats> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<ServeStats> {
        match self.thread.take() {
            None => Ok(ServeStats::default()),
            Some(t) => t
                .join()
                .map_err(|_| Error::internal("the NBD server thread panicked"))?,
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel.abort();
            let _ = self.join_inner();
        }
    }
}

/// Serves `plans` read-only over NBD on `listen` until `cancel` fires. Builds its own
/// runtime; `opts.on_ready` learns the URIs once the socket is bound.
pub fn serve(
    plans: Vec<DiskPlan>,
    listen: Listen,
    opts: ServeOptions,
    cancel: Cancel,
) -> Result<()> {
    Server::bind(plans, &[listen], opts)?
        .run(cancel)
        .map(|_| ())
}

fn units(bytes: usize) -> usize {
    bytes.div_ceil(BUDGET_UNIT).max(1)
}

async fn accept_loop(b: Bound, ctx: Arc<Ctx>, limit: Arc<Semaphore>) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = accept(&b) => r,
        };
        let (rd, wr, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = ctx.opts.max_connections, "too many connections, closing");
            continue;
        };
        tracing::debug!(%peer, "connection");
        let ctx = ctx.clone();
        conns.spawn(async move {
            let _permit = permit;
            connection(rd, wr, &peer, ctx).await;
            tracing::debug!(%peer, "connection closed");
        });
    }
    // Let in-flight requests finish, then drop whatever is left.
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn accept(b: &Bound) -> std::io::Result<(BoxRead, BoxWrite, String)> {
    match b {
        Bound::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), format!("unix:{}", p.display())))
        }
        Bound::Tcp(l, _) => {
            let (s, peer) = l.accept().await?;
            // Replies are a header plus payload in separate writes: no Nagle delays.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), peer.to_string()))
        }
    }
}

/// What the handshake settled.
struct Session {
    export: usize,
    structured: bool,
    base_allocation: bool,
}

async fn connection(rd: BoxRead, wr: BoxWrite, peer: &str, ctx: Arc<Ctx>) {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let hs = tokio::select! {
        _ = ctx.cancel.cancelled() => return,
        r = tokio::time::timeout(ctx.opts.handshake_timeout, handshake(&mut rd, &mut wr, &ctx)) => r,
    };
    let session = match hs {
        Err(_) => {
            tracing::warn!(%peer, "handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake ended");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(s))) => s,
    };
    tracing::debug!(
        %peer,
        export = ctx.exports[session.export].disk(),
        structured = session.structured,
        base_allocation = session.base_allocation,
        "transmission"
    );
    if let Err(e) = transmission(rd, wr, session, &ctx).await {
        tracing::debug!(%peer, error = %e, "transmission ended");
    }
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
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

/// Fixed newstyle negotiation. `Ok(None)`: the client aborted.
async fn handshake<R, W>(rd: &mut R, wr: &mut W, ctx: &Ctx) -> std::io::Result<Option<Session>>
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
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // (export, selected) of the last SET_META_CONTEXT.
    let mut meta: Option<(usize, bool)> = None;
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
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
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
                return Ok(Some(Session {
                    export: idx,
                    structured,
                    base_allocation: meta.is_some_and(|(e, sel)| sel && e == idx),
                }));
            }
            OPT_ABORT => {
                let _ = reply_err(wr, opt, REP_ACK, "").await;
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    reply_err(wr, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in &ctx.exports {
                    let name = e.disk().as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    reply_opt(wr, opt, REP_SERVER, &d).await?;
                }
                reply_err(wr, opt, REP_ACK, "").await?;
            }
            OPT_INFO | OPT_GO => {
                let mut c = Cur(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u16()?;
                    let reqs = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
                    c.0.is_empty().then_some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    reply_err(wr, opt, REP_ERR_INVALID, "malformed request").await?;
                    continue;
                };
                let Some(idx) = ctx.lookup(name) else {
                    let msg = format!("no export {name:?}; exports: {}", ctx.names());
                    reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
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
                    d.extend_from_slice(
                        format!("{} from its backup chain (read-only)", r.disk()).as_bytes(),
                    );
                    reply_opt(wr, opt, REP_INFO, &d).await?;
                }
                reply_err(wr, opt, REP_ACK, "").await?;
                if opt == OPT_GO {
                    return Ok(Some(Session {
                        export: idx,
                        structured,
                        base_allocation: meta.is_some_and(|(e, sel)| sel && e == idx),
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    reply_err(wr, opt, REP_ERR_INVALID, "takes no data").await?;
                    continue;
                }
                structured = true;
                reply_err(wr, opt, REP_ACK, "").await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply_err(
                        wr,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let mut c = Cur(&data);
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
                    reply_err(wr, opt, REP_ERR_INVALID, "malformed request").await?;
                    continue;
                };
                let Some(idx) = ctx.lookup(name) else {
                    let msg = format!("no export {name:?}; exports: {}", ctx.names());
                    reply_err(wr, opt, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
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
                    meta = Some((idx, matches));
                }
                reply_err(wr, opt, REP_ACK, "").await?;
            }
            OPT_STARTTLS => {
                reply_err(
                    wr,
                    opt,
                    REP_ERR_UNSUP,
                    "TLS is not supported by this server",
                )
                .await?;
            }
            _ => {
                reply_err(wr, opt, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

type SharedWriter = Arc<Mutex<BufWriter<BoxWrite>>>;

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
fn chunks(base: u64, pieces: &[Piece]) -> Vec<(usize, usize, bool)> {
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

async fn transmission(
    mut rd: BufReader<BoxRead>,
    wr: BufWriter<BoxWrite>,
    s: Session,
    ctx: &Arc<Ctx>,
) -> std::io::Result<()> {
    let wr: SharedWriter = Arc::new(Mutex::new(wr));
    let reader = ctx.exports[s.export].clone();
    let size = reader.size();
    let conn_budget = Arc::new(Semaphore::new(
        units(ctx.opts.connection_buffer).max(units(MAX_BLOCK as usize)),
    ));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        // Reap finished requests without waiting (a racing join in the select below
        // could drop a half-read header: read_exact is not cancel-safe).
        while tasks.try_join_next().is_some() {}
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
        let fail = |err: u32, msg: String| {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                cmd = command_name(req.kind),
                offset = req.offset,
                len = req.length,
                err = error_name(err),
                "{msg}"
            );
            let wr = wr.clone();
            let structured = s.structured;
            async move { send_error(&wr, structured, req.handle, err, &msg).await }
        };
        let in_bounds = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|e| e <= size);
        match req.kind {
            CMD_READ => {
                if req.length > MAX_BLOCK {
                    fail(
                        EINVAL,
                        format!("read of {} bytes exceeds {MAX_BLOCK}", req.length),
                    )
                    .await?;
                    continue;
                }
                if !in_bounds {
                    fail(EINVAL, format!("read past the end of {size} bytes")).await?;
                    continue;
                }
                let len = req.length as usize;
                let n = u32::try_from(units(len)).unwrap_or(u32::MAX);
                let Ok(p1) = conn_budget.clone().acquire_many_owned(n).await else {
                    break Ok(());
                };
                let Ok(p2) = ctx.server_budget.clone().acquire_many_owned(n).await else {
                    break Ok(());
                };
                let reader = reader.clone();
                let wr = wr.clone();
                let ctx2 = ctx.clone();
                let structured = s.structured;
                tasks.spawn(async move {
                    let _permits = (p1, p2);
                    let off = req.offset;
                    let res = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        reader.read_pieces(off, &mut buf).map(|p| (buf, p))
                    })
                    .await;
                    let sent = match res {
                        Ok(Ok((buf, pieces))) => {
                            ctx2.counters
                                .bytes_read
                                .fetch_add(len as u64, Ordering::Relaxed);
                            send_read(&wr, structured, req.handle, off, &buf, &pieces).await
                        }
                        Ok(Err(e)) => {
                            ctx2.counters.errors.fetch_add(1, Ordering::Relaxed);
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
                            ctx2.counters.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(offset = off, len, error = %e, "read task failed");
                            send_error(&wr, structured, req.handle, EIO, "internal error").await
                        }
                    };
                    if let Err(e) = sent {
                        tracing::debug!(error = %e, "reply not sent");
                    }
                });
            }
            CMD_BLOCK_STATUS => {
                if !s.structured || !s.base_allocation {
                    fail(EINVAL, "no metadata context negotiated".into()).await?;
                    continue;
                }
                if req.length == 0 || !in_bounds {
                    fail(EINVAL, "block status range is empty or past the end".into()).await?;
                    continue;
                }
                let mut runs = reader.allocation(req.offset, u64::from(req.length));
                let keep = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    MAX_DESCRIPTORS
                };
                runs.truncate(keep);
                send_block_status(&wr, req.handle, &runs).await?;
            }
            CMD_DISC => break Ok(()),
            CMD_FLUSH => send_ok(&wr, req.handle).await?,
            CMD_WRITE => {
                // The payload follows the header; skip it, then refuse.
                if req.length > MAX_BLOCK {
                    break Err(invalid(format!("write of {} bytes", req.length)));
                }
                tokio::io::copy(
                    &mut (&mut rd).take(u64::from(req.length)),
                    &mut tokio::io::sink(),
                )
                .await?;
                fail(EPERM, "read-only export".into()).await?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES | CMD_RESIZE => {
                fail(EPERM, "read-only export".into()).await?;
            }
            other => {
                fail(EINVAL, format!("{} not supported", command_name(other))).await?;
            }
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
    let mut w = wr.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_merges_short_holes() {
        let p = [
            Piece::Data {
                offset: 100,
                len: 10,
            },
            Piece::Zero {
                offset: 110,
                len: 100,
            },
            Piece::Data {
                offset: 210,
                len: 10,
            },
            Piece::Zero {
                offset: 220,
                len: 8192,
            },
        ];
        assert_eq!(chunks(100, &p), vec![(0, 120, true), (120, 8192, false)]);
        assert_eq!(pct("vda"), "vda");
        assert_eq!(pct("/run/a b.sock"), "/run/a%20b.sock");
    }
}
