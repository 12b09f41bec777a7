//! What a planner and the executor work with: the [`Context`] of one restore (the
//! backup set, the flags, libvirt, where lines go) and the [`Outcome`] it reports.

use std::path::PathBuf;

use engine::apply::ProgressFn;
use engine::{ApplyOptions, Cancel};
use nbdfmt::BackupSet;

use crate::cli::request::RestoreOptions;
use crate::hypervisor::Hypervisor;
use crate::restore::plan::Effect;
use crate::restore::point::RestorePoint;
use crate::ui::report::Reporter;

/// Everything a planner and the executor need, resolved by the caller (data dir,
/// VM name, lock, connection).
pub struct Context<'a> {
    /// The VM name from the backup's XML (libvirt name).
    pub vm: String,
    /// The scanned data directory.
    pub set: &'a BackupSet,
    /// `--restore-point`.
    pub point: RestorePoint,
    /// The shared restore flags.
    pub options: RestoreOptions,
    /// The hypervisor connection (read-only for dry-run).
    pub hv: &'a dyn Hypervisor,
    /// Output lines.
    pub log: &'a dyn Reporter,
    /// Cancellation from SIGINT/SIGTERM/SIGHUP.
    pub cancel: Cancel,
    /// Progress lines for the engine.
    pub progress: Option<ProgressFn>,
    /// swtpm's state root (`/var/lib/libvirt/swtpm`; under [`Self::sandbox`] when set).
    pub swtpm_root: PathBuf,
    /// libvirt's NVRAM directory (`/var/lib/libvirt/qemu/nvram`; under
    /// [`Self::sandbox`] when set): every NVRAM file a restore installs goes here.
    pub nvram_dir: PathBuf,
    /// Where a domain's host files (NVRAM) go when the hypervisor is libvirt's test
    /// driver: under the restore path, never the host's real `/var/lib/libvirt` — the
    /// test driver runs no guest that would read them, and a trial run against it must
    /// not replace the NVRAM of a real VM of the same name.
    pub sandbox: Option<PathBuf>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("vm", &self.vm)
            .field("dir", &self.set.dir)
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

/// What a finished restore reports (summary line, catalogue row, JSON).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The final summary line (spec §3.4).
    pub summary: String,
    /// Resolved endpoint checkpoint.
    pub checkpoint: u32,
    /// Devices restored or attempted.
    pub disks: Vec<String>,
    /// Target path column (restore path, the original disk paths, or URIs).
    pub target_path: String,
    /// `restored` | `failed` | `skipped` | `none`.
    pub tpm_result: &'static str,
    /// True when the summary carries `TPM ✗` or `UUID ✗`.
    pub partial: bool,
    /// Clone name.
    pub target_name: Option<String>,
    /// What was done (empty for a dry run).
    pub effects: Vec<Effect>,
    /// The plan as JSON (dry run).
    pub plan: Option<serde_json::Value>,
    /// Mode-specific results for the JSON document (`test_boot`).
    pub extra: Option<serde_json::Value>,
    /// Set when the run finished its actions but the mode failed its purpose (a test
    /// boot without a sign of life): the command exits with this (exit 5).
    pub failure: Option<String>,
    /// Disks a salvage restore wrote partially (`--include-incomplete`): the run
    /// exits 6 and is recorded as `partial`.
    pub salvaged: Vec<crate::restore::salvage::Salvaged>,
}

impl Outcome {
    /// The process status of this finished run: 6 after a partial salvage.
    pub fn exit_status(&self) -> crate::error::ExitStatus {
        if self.salvaged.is_empty() {
            crate::error::ExitStatus::Ok
        } else {
            crate::error::ExitStatus::Engine
        }
    }
}

impl Context<'_> {
    /// Where the NVRAM file the domain XML names at `path` is written: libvirt's NVRAM
    /// directory ([`Self::nvram_dir`]) under the path's file name when it is domain
    /// `owner`'s (`<owner>_VARS…`) —
    /// `path` itself only when it already lies there ([`crate::host::nvram::confined`]).
    /// A path the backup's XML points elsewhere is WARNed about once, here.
    pub fn host_nvram(&self, path: &std::path::Path, owner: &str) -> PathBuf {
        let dir = &self.nvram_dir;
        let dest = crate::host::nvram::confined(path, dir, owner);
        if self.sandbox.is_none() && dest != path {
            self.log.warn(
                "restore_nvram",
                &format!(
                    "The backup's domain XML puts NVRAM at {}, not {}/<vm>_VARS…: it is installed as {} and the domain's <nvram> says so",
                    crate::ui::format::printable(&path.display().to_string()),
                    dir.display(),
                    dest.display()
                ),
            );
        }
        dest
    }

    /// Engine options for this restore (cancellation, progress).
    pub fn apply_options(&self) -> ApplyOptions {
        let whole = ApplyOptions::default();
        ApplyOptions {
            memory_cap: whole.memory_cap / usize::from(self.options.concurrent.max(1)),
            cancel: self.cancel.clone(),
            progress: self.progress.clone(),
            ..whole
        }
    }
}

/// Seconds since the epoch (for `.before-restore.<epoch>` names).
pub fn epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
