//! Restore progress on stderr: per-disk bars with rate and ETA on a terminal
//! (indicatif), plain periodic lines on a pipe (journald, CI logs), nothing when
//! stderr is redirected to a regular file (the run log has the summary).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use engine::apply::ProgressFn;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::ui::report::Reporter;

/// Where stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// An interactive terminal.
    Terminal,
    /// A pipe or socket.
    Stream,
    /// A regular file.
    File,
}

/// Classifies stderr.
pub fn stderr_sink() -> Sink {
    let err = std::io::stderr();
    if err.is_terminal() {
        return Sink::Terminal;
    }
    match nix::sys::stat::fstat(err.as_fd()) {
        Ok(st) if (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFREG => Sink::File,
        _ => Sink::Stream,
    }
}

/// The progress callback for a restore, chosen by where stderr goes.
pub fn for_restore(log: Arc<dyn Reporter>) -> Option<ProgressFn> {
    match stderr_sink() {
        Sink::File => None,
        Sink::Stream => Some(crate::ui::report::line_progress(log)),
        Sink::Terminal => Some(bars()),
    }
}

fn bars() -> ProgressFn {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix:>6} [{bar:36.cyan/blue}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    Arc::new(move |p: &engine::Progress| {
        let mut m = bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = m.entry(p.disk.clone()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(p.total));
            b.set_style(style.clone());
            b.set_prefix(p.disk.clone());
            b
        });
        bar.set_length(p.total);
        bar.set_position(p.done);
        if p.done >= p.total {
            bar.finish();
        }
    })
}
