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
        // names from a backup tree reach messages: a control character (an escape
        // sequence, a newline that forges a second log line) is shown escaped
        let mut msg = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut msg), event)?;
        writeln!(writer, "{}", format::printable(&msg))
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

/// The directory for run logs: `$LOG_DIR`; else `/var/log/vmrestore` (created when
/// it can be, as root); else the user's state directory (`$XDG_STATE_HOME/vmrestore`,
/// `~/.local/state/vmrestore`); else `/var/tmp/vmrestore-<uid>` (0700, ours). Never
/// next to the executable: a copied binary would log into `/usr/local/bin/logs`.
pub fn log_dir(env_log_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = env_log_dir {
        return d.to_path_buf();
    }
    let system = Path::new("/var/log/vmrestore");
    if system.is_dir() || std::fs::create_dir_all(system).is_ok() {
        return system.to_path_buf();
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })
        .map(|d| d.join("vmrestore"));
    if let Some(d) = state.filter(|d| std::fs::create_dir_all(d).is_ok()) {
        return d;
    }
    own_tmp_dir()
}

/// `/var/tmp/vmrestore-<uid>`: created 0700, or reused only when it is a real
/// directory owned by us (a shared directory anyone can plant in).
fn own_tmp_dir() -> PathBuf {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = nix::unistd::getuid().as_raw();
    let d = PathBuf::from(format!("/var/tmp/vmrestore-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&d);
    match std::fs::symlink_metadata(&d) {
        Ok(m) if m.is_dir() && m.uid() == uid => d,
        _ => PathBuf::from("/tmp"),
    }
}

/// A random 64-bit value for a fresh file name.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}

/// Creates a new file (mode 0600) in `dir`: `name` when that name is free, else a
/// fresh `<stem>-<random>.log`. Never opens an existing file and never follows a
/// symlink (`O_CREAT|O_EXCL|O_NOFOLLOW`): in a shared directory such as `/tmp`, a
/// name planted in advance (a symlink to a root-owned file, a file someone else can
/// read) is passed over, not written to. Returns the file and its path.
fn create_new(dir: &Path, name: &str) -> std::io::Result<(File, PathBuf)> {
    let open = |p: &Path| {
        OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY)
            .open(p)
    };
    let first = dir.join(name);
    let mut err = match open(&first) {
        Ok(f) => return Ok((f, first)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => e,
        Err(e) => return Err(e),
    };
    let stem = name.strip_suffix(".log").unwrap_or(name);
    for _ in 0..8 {
        let p = dir.join(format!("{stem}-{:016x}.log", nonce()));
        match open(&p) {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => err = e,
            Err(e) => return Err(e),
        }
    }
    Err(err)
}

/// Opens (creates, mode 0600) the run log and writes its header.
#[derive(Debug)]
pub struct RunLog;

impl RunLog {
    /// Creates `<dir>/<label>-<YYYYMMDD-HHMMSS>.log` (falling back to `/tmp`, then
    /// `/tmp/vmrestore-<epoch>.log`), writes the header block with `fields`, and
    /// makes it the destination of every later log line. Returns its path.
    ///
    /// The file is always a new one (`create_new`): when the name is taken (a
    /// second run in the same second, or a name planted in `/tmp`) a fresh unique
    /// name is used instead, and said (WARN when the name held a symlink or other
    /// non-file).
    pub fn open(dir: &Path, label: &str, fields: &[(&str, String)]) -> PathBuf {
        let now = chrono::Local::now();
        let name = format!("{}-{}.log", sanitize(label), now.format("%Y%m%d-%H%M%S"));
        let tmp = Path::new("/tmp");
        let dir = if std::fs::create_dir_all(dir).is_ok() {
            dir
        } else {
            tmp
        };
        let epoch = format!("vmrestore-{}.log", now.timestamp());
        let mut candidates = vec![(dir, name.as_str())];
        if dir != tmp {
            candidates.push((tmp, name.as_str()));
        }
        candidates.push((tmp, epoch.as_str()));
        for (d, n) in candidates {
            let Ok((mut file, path)) = create_new(d, n) else {
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
            if path.file_name() != Some(std::ffi::OsStr::new(n)) {
                say_taken(&d.join(n), &path);
            }
            return path;
        }
        PathBuf::from("/dev/null")
    }
}

/// Says that the log name `taken` was passed over for `used`.
fn say_taken(taken: &Path, used: &Path) {
    let what = match std::fs::symlink_metadata(taken) {
        Ok(m) if m.file_type().is_symlink() => "is a symbolic link",
        Ok(m) if !m.is_file() => "is not a regular file",
        _ => {
            tracing::info!(target: "main", "Log file {} already exists: logging to {}", taken.display(), used.display());
            return;
        }
    };
    tracing::warn!(target: "main", "Log file {} {what} (not followed): logging to {}", taken.display(), used.display());
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

    // issue 18 (5): a name planted in a shared directory is never opened: not through
    // a symlink (root's file would get the log), not as an existing file
    #[test]
    fn issue18_create_new_never_reuses_a_name() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let d = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let target = outside.path().join("root-file");
        std::fs::write(&target, "keep\n").expect("write");
        symlink(&target, d.path().join("vm-1.log")).expect("symlink");
        symlink(outside.path().join("dangling"), d.path().join("vm-2.log")).expect("symlink");
        std::fs::write(d.path().join("vm-3.log"), "theirs\n").expect("write");
        for n in ["vm-1.log", "vm-2.log", "vm-3.log"] {
            let (mut f, p) = create_new(d.path(), n).expect("created");
            f.write_all(b"log\n").expect("write");
            assert_ne!(p, d.path().join(n));
            assert_eq!(p.parent(), Some(d.path()));
            let md = std::fs::symlink_metadata(&p).expect("md");
            assert!(md.is_file());
            assert_eq!(md.permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::read_to_string(&p).expect("read"), "log\n");
        }
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep\n");
        assert!(!outside.path().join("dangling").exists());
        assert_eq!(
            std::fs::read_to_string(d.path().join("vm-3.log")).expect("read"),
            "theirs\n"
        );
        let (_, p) = create_new(d.path(), "vm-4.log").expect("free name");
        assert_eq!(p, d.path().join("vm-4.log"));
    }
}
