//! Listening: [`Server::bind`] opens the exports and binds the sockets, [`Server::run`]
//! or [`Server::spawn`] accepts connections until cancelled (each one: handshake, then
//! transmission), [`ServeHandle`] stops a spawned server.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::context::{invalid, units, BoxStream, ConnRead, ConnWrite, Counters, Ctx};
use super::handshake::{greet, haggle, Haggled, Session, Tls};
use super::options::{ServeOptions, ServeStats};
use super::stall::StallGuard;
use super::tls::TlsConfig;
use super::transmission::transmission;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::nbd::proto::{MAX_BLOCK, MAX_STRING};
use crate::nbd::reader::{ChainReader, Lz4Cache};
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

/// A bound listener.
#[derive(Debug)]
enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, SocketAddr),
}

/// Percent-encodes everything but unreserved characters and `/`.
pub(super) fn pct(s: &str) -> String {
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
    /// The export's URI; `tls`: the `nbds` schemes, which tell clients to `STARTTLS`.
    fn uri(&self, export: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            Self::Unix(_, p) => format!(
                "nbd{s}+unix:///{}?socket={}",
                pct(export),
                pct(&p.to_string_lossy())
            ),
            Self::Tcp(_, a) => format!("nbd{s}://{a}/{}", pct(export)),
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

/// Binds every listener (on the server's runtime).
async fn bind_all(listen: &[Listen]) -> Result<Vec<Bound>> {
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
    Ok(out)
}

/// Refuses what cannot be served: no disks, nowhere to listen, duplicate or bad
/// export names.
fn check_exports(plans: &[DiskPlan], listen: &[Listen]) -> Result<()> {
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
    Ok(())
}

impl Server {
    /// Opens every disk's chain files and binds the listeners (nothing is served yet).
    /// Export names are the disk targets; they must be distinct.
    pub fn bind(plans: Vec<DiskPlan>, listen: &[Listen], opts: ServeOptions) -> Result<Self> {
        check_exports(&plans, listen)?;
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
            .map_err(|e| Error::internal(format!("cannot start the I/O runtime: {e}")))?;
        let bound = rt.block_on(bind_all(listen))?;
        Ok(Self {
            rt,
            bound,
            exports,
            opts,
        })
    }

    /// One URI per listener and export, e.g. `nbd+unix:///vda?socket=/run/x.sock`,
    /// `nbd://127.0.0.1:10809/vda` (with TLS: `nbds+unix://`, `nbds://`).
    pub fn uris(&self) -> Vec<String> {
        let tls = self.opts.tls.is_some();
        self.bound
            .iter()
            .flat_map(|b| self.exports.iter().map(move |e| b.uri(e.disk(), tls)))
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
        tracing::info!(
            "NBD server stopped: {} connection(s), {} request(s), {} bytes read, {} error(s)",
            stats.connections,
            stats.requests,
            stats.bytes_read,
            stats.errors
        );
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
            .map_err(|e| Error::internal(format!("cannot start the server thread: {e}")))?;
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

async fn accept_loop(b: Bound, ctx: Arc<Ctx>, limit: Arc<Semaphore>) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = accept(&b, ctx.opts.send_stall) => r,
        };
        let (stream, peer) = match accepted {
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
            connection(stream, &peer, ctx).await;
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

/// The next client, its writes guarded against a peer that stops reading
/// ([`StallGuard`]).
async fn accept(b: &Bound, stall: Duration) -> std::io::Result<(BoxStream, String)> {
    match b {
        Bound::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((
                Box::new(StallGuard::new(s, stall)),
                format!("unix:{}", p.display()),
            ))
        }
        Bound::Tcp(l, _) => {
            let (s, peer) = l.accept().await?;
            // Replies are a header plus payload in separate writes: no Nagle delays.
            s.set_nodelay(true)?;
            Ok((Box::new(StallGuard::new(s, stall)), peer.to_string()))
        }
    }
}

type Reader = BufReader<ConnRead>;
type Writer = BufWriter<ConnWrite>;

/// The buffered halves of a stream.
fn buffered(stream: BoxStream) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (
        BufReader::with_capacity(64 * 1024, r),
        BufWriter::with_capacity(64 * 1024, w),
    )
}

/// One connection: the handshake (bounded by `handshake_timeout`), then transmission.
async fn connection(stream: BoxStream, peer: &str, ctx: Arc<Ctx>) {
    let hs = tokio::select! {
        _ = ctx.cancel.cancelled() => return,
        r = tokio::time::timeout(ctx.opts.handshake_timeout, negotiate(stream, &ctx)) => r,
    };
    let (session, rd, wr) = match hs {
        Err(_) => {
            tracing::warn!(%peer, "handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake ended");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(x))) => x,
    };
    tracing::debug!(
        %peer,
        export = ctx.exports[session.export].disk(),
        structured = session.structured,
        base_allocation = session.base_allocation,
        tls = ctx.opts.tls.is_some(),
        "transmission"
    );
    if let Err(e) = transmission(rd, wr, session, &ctx).await {
        tracing::debug!(%peer, error = %e, "transmission ended");
    }
}

/// The greeting and option haggling, with the TLS handshake in between when the
/// client sends `STARTTLS`. `None`: the client aborted.
async fn negotiate(
    stream: BoxStream,
    ctx: &Ctx,
) -> std::io::Result<Option<(Session, Reader, Writer)>> {
    let (mut rd, mut wr) = buffered(stream);
    let no_zeroes = greet(&mut rd, &mut wr).await?;
    let mut tls = if ctx.opts.tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    loop {
        match haggle(&mut rd, &mut wr, ctx, no_zeroes, tls).await? {
            Haggled::Go(s) => return Ok(Some((s, rd, wr))),
            Haggled::Aborted => return Ok(None),
            Haggled::StartTls => {
                let Some(cfg) = &ctx.opts.tls else {
                    return Err(invalid("STARTTLS acknowledged without TLS configured"));
                };
                (rd, wr) = start_tls(rd, wr, cfg).await?;
                tls = Tls::Active;
            }
        }
    }
}

/// The TLS handshake on the connection's socket, after `STARTTLS` was acknowledged.
async fn start_tls(rd: Reader, wr: Writer, cfg: &TlsConfig) -> std::io::Result<(Reader, Writer)> {
    // The client must wait for our ACK before its ClientHello: bytes buffered already
    // were sent in plaintext ahead of TLS (a command injection, as in CVE-2011-0411
    // for SMTP) and must not be read as if they came over TLS.
    if !rd.buffer().is_empty() {
        return Err(invalid(
            "data sent after NBD_OPT_STARTTLS ahead of the TLS handshake",
        ));
    }
    // The ACK was flushed: the write buffer is empty too.
    let plain = rd.into_inner().unsplit(wr.into_inner());
    let tls = cfg.acceptor().accept(plain).await?;
    Ok(buffered(Box::new(tls)))
}
