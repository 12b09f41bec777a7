//! Log lines and the per-run log file (spec §7.3).
//!
//! Every diagnostic is a `tracing` event; the subscriber installed by [`init`]
//! prints it as `[YYYY-MM-DD HH:MM:SS] [vmrestore] [<component>] <LEVEL>: <message>`
//! (local time) to stderr and, once [`RunLog::open`] has run, appends the same
//! line to the log file. The component is the event's `target` (commands pass
//! `target: "list_vms"` and the like; module paths are shortened to their last
//! segment). Only INFO, WARN and ERROR exist.
//!
//! The log file is created only by restore, `--verify` and `--dump`: never by the
//! listings, `--help`, `--version` or usage/config errors.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::error::ExitStatus;
use crate::ui::format;

/// The open run log, shared by the subscriber's writer and [`finish`].
static RUN_LOG: Mutex<Option<OpenLog>> = Mutex::new(None);

/// Every WARN line of this run (messages only), for the `--json` document: what a
/// script is told must match what a person reads.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The WARN messages logged so far.
pub fn warnings() -> Vec<String> {
    WARNINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

#[derive(Debug)]
struct OpenLog {
    file: File,
    path: PathBuf,
    started: Instant,
}

fn with_log<T>(f: impl FnOnce(&mut Option<OpenLog>) -> T) -> T {
    // a poisoned lock only means another thread panicked mid-write; keep logging
    let mut guard = RUN_LOG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut guard)
}

/// A 60 × `═` rule (log header and footer).
pub fn rule() -> String {
    "═".repeat(60)
}

/// Formats events as spec §7.3 lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFormat;

/// The component shown for an event target.
pub fn component(target: &str) -> &str {
    target.rsplit("::").next().unwrap_or(target)
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "[{}] [vmrestore] [{}] {}: ",
            format::now_local(),
            component(meta.target()),
            meta.level()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Writes one formatted line to stderr and to the run log, if open.
#[derive(Debug, Default)]
pub struct TeeWriter {
    buf: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        // Diagnostics must never abort the run: a failing stderr or log write is ignored.
        let _ = std::io::stderr().lock().write_all(&self.buf);
        if let Some((_, msg)) = String::from_utf8_lossy(&self.buf).split_once("] WARN: ") {
            WARNINGS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(msg.trim_end().to_owned());
        }
        with_log(|log| {
            if let Some(l) = log {
                let _ = l.file.write_all(&self.buf);
            }
        });
    }
}

/// Makes a [`TeeWriter`] per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tee;

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter::default()
    }
}

/// Installs the process-wide subscriber (binary only). INFO and above.
pub fn init() {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .event_format(LineFormat)
        .with_writer(Tee)
        .finish();
    // Tests may have installed one already; the first one stays.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Appends raw text (command output) to the run log, if one is open.
pub fn append_raw(text: &str) {
    with_log(|log| {
        if let Some(l) = log {
            // see TeeWriter::drop
            let _ = l.file.write_all(text.as_bytes());
        }
    });
}

/// The directory for run logs: `$LOG_DIR`, else `/var/log/vmrestore` if it exists,
/// else `<directory of the executable>/logs`.
pub fn log_dir(env_log_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = env_log_dir {
        return d.to_path_buf();
    }
    let system = Path::new("/var/log/vmrestore");
    if system.is_dir() {
        return system.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.join("logs")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Opens (creates, mode 0600) the run log and writes its header.
#[derive(Debug)]
pub struct RunLog;

impl RunLog {
    /// Creates `<dir>/<label>-<YYYYMMDD-HHMMSS>.log` (falling back to `/tmp`, then
    /// `/tmp/vmrestore-<epoch>.log`), writes the header block with `fields`, and
    /// makes it the destination of every later log line. Returns its path.
    pub fn open(dir: &Path, label: &str, fields: &[(&str, String)]) -> PathBuf {
        let now = chrono::Local::now();
        let name = format!("{}-{}.log", sanitize(label), now.format("%Y%m%d-%H%M%S"));
        let dir = if std::fs::create_dir_all(dir).is_ok() {
            dir.to_path_buf()
        } else {
            PathBuf::from("/tmp")
        };
        let create = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
        };
        let mut candidates = vec![dir.join(&name), PathBuf::from("/tmp").join(&name)];
        candidates.push(PathBuf::from(format!(
            "/tmp/vmrestore-{}.log",
            now.timestamp()
        )));
        for path in candidates {
            let Ok(mut file) = create(&path) else {
                continue;
            };
            let mut header = format!(
                "{}\nvmrestore v{} — {}\n{}\n",
                rule(),
                env!("CARGO_PKG_VERSION"),
                now.format("%Y-%m-%d %H:%M:%S"),
                rule()
            );
            for (k, v) in fields {
                header.push_str(&header_line(k, v));
            }
            header.push_str(&header_line("Log File", &path.display().to_string()));
            header.push_str(&rule());
            header.push('\n');
            // header failures are not fatal; the log lines still go to stderr
            let _ = file.write_all(header.as_bytes());
            with_log(|log| {
                *log = Some(OpenLog {
                    file,
                    path: path.clone(),
                    started: Instant::now(),
                })
            });
            return path;
        }
        PathBuf::from("/dev/null")
    }
}

/// `Key:` padded to 14 columns, then the value.
fn header_line(key: &str, value: &str) -> String {
    let k = format!("{key}:");
    if k.len() < 14 {
        format!("{k:<14}{value}\n")
    } else {
        format!("{k} {value}\n")
    }
}

/// A label usable in a file name (the basename of the CLI VM value).
fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        "unknown".into()
    } else {
        s
    }
}

/// The open run log's path, if any.
pub fn current_path() -> Option<PathBuf> {
    with_log(|log| log.as_ref().map(|l| l.path.clone()))
}

/// Ends the run: if a log file is open, writes the footer (file only), closes the
/// file and logs INFO `Duration: … — exit <rc> — log: <file>` on stderr. Called once by
/// `main`, on success and on failure.
pub fn finish(status: ExitStatus) {
    let Some((path, secs)) = with_log(|log| {
        log.as_ref()
            .map(|l| (l.path.clone(), l.started.elapsed().as_secs()))
    }) else {
        return;
    };
    let rc = status.code();
    append_raw(&format!(
        "{}\nDuration:     {}\nExit Status:  {rc}\n{}\n",
        rule(),
        format::duration(secs),
        rule()
    ));
    // the footer closes the file; the summary line follows on stderr only
    with_log(|log| *log = None);
    tracing::info!(target: "main", "Duration: {} — exit {rc} — log: {}", format::duration(secs), path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lines_align() {
        assert_eq!(header_line("Mode", "verify"), "Mode:         verify\n");
        assert_eq!(
            header_line("Invocation", "vmrestore --x"),
            "Invocation:   vmrestore --x\n"
        );
        assert_eq!(
            header_line("Include Incomplete", "no"),
            "Include Incomplete: no\n"
        );
        assert_eq!(component("vmrestore::cmd::verify"), "verify");
        assert_eq!(component("list_vms"), "list_vms");
        assert_eq!(sanitize(""), "unknown");
        assert_eq!(rule().chars().count(), 60);
    }
}
