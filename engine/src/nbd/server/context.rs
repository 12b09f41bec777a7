//! What every connection of a running server shares ([`Ctx`]): the exports, the
//! options, the cancel token, the server-wide byte budget and the counters; plus the
//! protocol constants of this server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::Semaphore;

use super::options::{ServeOptions, ServeStats};
use crate::cancel::Cancel;
use crate::nbd::proto::*;
use crate::nbd::reader::ChainReader;

/// Byte budgets are counted in units of this size.
const BUDGET_UNIT: usize = 64 * 1024;
/// Transmission flags of every export.
pub(super) const EXPORT_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
/// Context id of `base:allocation` after `SET_META_CONTEXT`.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// A client's byte stream: TCP, a Unix socket, or TLS over either.
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One connection, whatever carries it. Boxed, because `STARTTLS` replaces the
/// stream under a running handshake.
pub(super) type BoxStream = Box<dyn Stream>;
/// Its halves: the request reader and the shared reply writer.
pub(super) type ConnRead = ReadHalf<BoxStream>;
pub(super) type ConnWrite = WriteHalf<BoxStream>;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ServeStats {
        ServeStats {
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

pub(super) struct Ctx {
    pub exports: Vec<Arc<ChainReader>>,
    pub opts: ServeOptions,
    pub cancel: Cancel,
    pub server_budget: Arc<Semaphore>,
    pub counters: Counters,
}

impl Ctx {
    /// Export by name; `""` is the first disk.
    pub(super) fn lookup(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|r| r.disk() == name)
    }

    pub(super) fn names(&self) -> String {
        self.exports
            .iter()
            .map(|r| r.disk())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Budget units for `bytes`.
pub(super) fn units(bytes: usize) -> usize {
    bytes.div_ceil(BUDGET_UNIT).max(1)
}

/// A protocol violation by the client.
pub(super) fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}
