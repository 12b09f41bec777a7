//! NBD, natively: a read-only server that exports restore points straight from their
//! backup chains ([`server`], for instant recovery), the random-access chain reader
//! behind it ([`reader`]), and the wire format shared with the NBD client target
//! ([`crate::target::nbd`]).
//!
//! ```no_run
//! use engine::nbd::server::{Listen, ServeOptions, Server};
//! let set = nbdfmt::BackupSet::scan(std::path::Path::new("/backups/vm/2026-W10"))?;
//! let plan = engine::DiskPlan::for_point(&set, "vda", 3)?;
//! let cancel = engine::Cancel::new();
//! let server = Server::bind(
//!     vec![plan],
//!     &[Listen::Unix("/run/vmrestore/vm.sock".into())],
//!     ServeOptions::default(),
//! )?;
//! for uri in server.uris() {
//!     println!("{uri}"); // nbd+unix:///vda?socket=/run/vmrestore/vm.sock
//! }
//! server.run(cancel)?; // until cancel.trigger(sig)
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod proto;
pub mod reader;
pub mod server;
pub mod uri;

pub use reader::{ChainReader, Lz4Cache, Piece};
pub use server::{
    serve, Listen, ServeHandle, ServeOptions, ServeStats, Server, TlsConfig, TlsError, TlsFile,
};
pub use uri::{NbdAddr, NbdUri};
