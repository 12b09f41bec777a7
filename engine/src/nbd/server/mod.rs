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
//! `ABORT`, and `STARTTLS` when TLS is configured ([`TlsConfig`]: FORCEDTLS, every
//! other option gets `NBD_REP_ERR_TLS_REQD` until then); anything else gets
//! `NBD_REP_ERR_UNSUP`. Commands: `READ` (structured
//! replies with `OFFSET_DATA`/`OFFSET_HOLE` chunks when negotiated, simple replies
//! otherwise), `BLOCK_STATUS` (`base:allocation`: data 0, zero extents and gaps
//! `HOLE|ZERO`), `FLUSH` (no-op), `DISC`; writes, trims and write-zeroes get `EPERM`.
//! Transmission flags: `HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN`.
//! Block sizes: minimum 1, preferred 4 KiB, maximum 32 MiB (larger requests: `EINVAL`).
//!
//! Memory: at most `connection_buffer` bytes of read payload in flight per connection
//! and `server_buffer` in all, plus the decoded-LZ4 cache (`cache_bytes`) and one
//! decoded LZ4 frame (≤ 32 MiB for virtnbdbackup output) per busy I/O thread.
//!
//! Files: `options` (knobs and counters), `listener` (bind, accept, run, spawn, stop),
//! `handshake` (option haggling), `tls` (certificate, key, acceptor), `transmission`
//! (the command loop), `context` (what the connections share).

mod context;
mod handshake;
mod listener;
mod options;
mod stall;
mod tls;
mod transmission;

pub use listener::{serve, Listen, ServeHandle, Server};
pub use options::{ReadyFn, ServeOptions, ServeStats};
pub use tls::{TlsConfig, TlsError, TlsFile};

#[cfg(test)]
mod tests {
    use super::listener::pct;
    use super::transmission::chunks;
    use crate::nbd::reader::Piece;

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
