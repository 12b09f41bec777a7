//! `engine`: turns a virtnbdbackup chain into bytes on a target — plan first (one
//! extent map per disk, newest data wins), then write every live block once.
//!
//! ```no_run
//! use engine::{apply, ApplyOptions, DiskPlan, target::raw::RawTarget, StagedPath};
//! let set = nbdfmt::BackupSet::scan(std::path::Path::new("/backups/vm/2026-W10"))?;
//! let plan = DiskPlan::for_point(&set, "vda", 3)?;            // reads headers only
//! let out = StagedPath::new(std::path::Path::new("/restore/vm-vda.raw"));
//! let target = RawTarget::create(out.temp_path(), plan.virtual_size)?;
//! let report = apply(&[plan], vec![Box::new(target)], &ApplyOptions::default())?;
//! out.commit(false)?;                                           // final name only now
//! # let _ = report;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod apply;
pub mod cancel;
pub mod chain;
pub mod error;
pub mod extent;
pub mod framelog;
pub mod merge;
pub mod nbd;
pub mod output;
pub mod plan;
pub mod rollback;
pub mod salvage;
pub mod target;

pub use apply::{apply, ApplyOptions, ApplyReport, DiskReport, Progress};
pub use cancel::Cancel;
pub use chain::{ChainFile, Frames};
pub use error::{Error, ErrorKind, Result};
pub use extent::{Extent, ExtentMap, Source};
pub use merge::{Merge, MergeStats, Piece};
pub use output::StagedPath;
pub use plan::DiskPlan;
pub use rollback::{save_device_image, DeviceImageReport};
pub use target::BlockTarget;
