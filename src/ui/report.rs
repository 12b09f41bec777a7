//! Where the user-visible lines of a restore go: [`Reporter`] (stderr + log file in
//! the binary through `tracing`, a buffer in tests), and the plain progress lines
//! for a pipe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::ui::format::iec_size;

/// Where the user-visible lines go.
pub trait Reporter: Send + Sync {
    /// An INFO line from `component`.
    fn info(&self, component: &str, msg: &str);
    /// A WARN line.
    fn warn(&self, component: &str, msg: &str);
    /// An ERROR line.
    fn error(&self, component: &str, msg: &str);
    /// A bare line on stdout (banners, spacing).
    fn plain(&self, line: &str) {
        println!("{line}");
    }
}

/// Sends lines to the log-line subscriber under the component names of spec §7.3.
#[derive(Debug, Clone, Copy)]
pub struct TracingReporter;

macro_rules! emit {
    ($level:ident, $component:expr, $msg:expr, [$($c:literal),*]) => {
        match $component {
            $($c => tracing::$level!(target: $c, "{}", $msg),)*
            _ => tracing::$level!(target: "restore_vm", "{}", $msg),
        }
    };
}

macro_rules! components {
    ($level:ident, $component:expr, $msg:expr) => {
        emit!(
            $level,
            $component,
            $msg,
            [
                "restore_vm",
                "preflight_free_space",
                "preflight_disk_safety",
                "predict_output_files",
                "restore_disk",
                "define_vm",
                "define_new_identity",
                "restore_nvram",
                "restore_tpm",
                "refresh_storage_pool",
                "serve",
                "main"
            ]
        )
    };
}

impl Reporter for TracingReporter {
    fn info(&self, component: &str, msg: &str) {
        components!(info, component, msg);
    }
    fn warn(&self, component: &str, msg: &str) {
        components!(warn, component, msg);
    }
    fn error(&self, component: &str, msg: &str) {
        components!(error, component, msg);
    }
    fn plain(&self, line: &str) {
        crate::ui::write_stdout(&format!("{line}\n"));
    }
}

/// A progress callback printing one plain line per disk every 2 s (and at the end).
pub fn line_progress(log: Arc<dyn Reporter>) -> engine::apply::ProgressFn {
    let last = Mutex::new(HashMap::<String, Instant>::new());
    Arc::new(move |p: &engine::Progress| {
        let now = Instant::now();
        let mut m = last.lock().unwrap_or_else(PoisonError::into_inner);
        let due = m
            .get(&p.disk)
            .is_none_or(|t| now.duration_since(*t).as_secs() >= 2)
            || p.done == p.total;
        if due {
            m.insert(p.disk.clone(), now);
            let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
            log.info(
                "restore_disk",
                &format!(
                    "{}: {} of {} ({pct}%)",
                    p.disk,
                    iec_size(p.done),
                    iec_size(p.total)
                ),
            );
        }
    })
}

/// Lines of one VM in a whole-host run: every message carries the VM's name.
#[derive(Debug)]
pub struct Prefixed<'a> {
    /// `[vm] `.
    pub prefix: String,
    /// Where the lines go.
    pub inner: &'a dyn Reporter,
}

impl std::fmt::Debug for dyn Reporter + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter for Prefixed<'_> {
    fn info(&self, component: &str, msg: &str) {
        self.inner.info(component, &format!("{}{msg}", self.prefix));
    }
    fn warn(&self, component: &str, msg: &str) {
        self.inner.warn(component, &format!("{}{msg}", self.prefix));
    }
    fn error(&self, component: &str, msg: &str) {
        self.inner
            .error(component, &format!("{}{msg}", self.prefix));
    }
    fn plain(&self, line: &str) {
        self.inner.plain(line);
    }
}

/// Discards lines (planning a whole host before saying anything).
#[derive(Debug, Default)]
pub struct Quiet;

impl Reporter for Quiet {
    fn info(&self, _: &str, _: &str) {}
    fn warn(&self, _: &str, _: &str) {}
    fn error(&self, _: &str, _: &str) {}
    fn plain(&self, _: &str) {}
}
