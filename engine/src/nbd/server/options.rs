//! The server's knobs ([`ServeOptions`]) and what it counted ([`ServeStats`]).

use std::sync::Arc;
use std::time::Duration;

use super::tls::TlsConfig;
use crate::nbd::reader::DEFAULT_CACHE_BYTES;

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
    /// A client that takes no byte of a reply for this long is dropped (its read
    /// payload in flight counts against the budget all clients share).
    pub send_stall: Duration,
    /// Verify every chain file against its `.chksum` before serving (reads all of it).
    pub verify_checksums: bool,
    /// TLS: clients must `STARTTLS` before anything else (FORCEDTLS) and the URIs
    /// are `nbds://`; `None`: plain NBD, `STARTTLS` unsupported.
    pub tls: Option<TlsConfig>,
    /// Called with the export URIs once listening (see also
    /// [`Server::uris`](super::Server::uris)).
    pub on_ready: Option<ReadyFn>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 32,
            cache_bytes: DEFAULT_CACHE_BYTES,
            // requests wait beyond these (a request is at most 32 MiB): 16 clients
            // asking 32 MiB each held 275 MB with a 256 MiB server budget
            connection_buffer: 32 << 20,
            server_buffer: 64 << 20,
            worker_threads: 2,
            // each may hold one decoded LZ4 frame (≤ 32 MiB) besides the cache
            io_threads: 4,
            handshake_timeout: Duration::from_secs(30),
            // a client reading at 1 KiB/s is never dropped; one that reads nothing
            // holds its share of the budget for at most this long
            send_stall: Duration::from_secs(30),
            verify_checksums: false,
            tls: None,
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
            .field("send_stall", &self.send_stall)
            .field("verify_checksums", &self.verify_checksums)
            .field("tls", &self.tls)
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
