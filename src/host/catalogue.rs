//! vmbackup's SQLite catalogue `<state root>/_state/vmbackup.db` (spec §5): the only
//! file with SQL. Read side for `--list` (§5.3).
//!
//! vmrestore never creates the database: it is opened read-only, with a 5 s busy
//! timeout, and the journal mode is left alone. Missing, unreadable, locked or
//! schema-less databases all mean "catalogue unavailable".
//!
//! The backup tree may be hostile: `_state` and `vmbackup.db` (and SQLite's side
//! files next to it) must be a real directory and regular files, not symlinks, or
//! the catalogue is unavailable too; SQLite itself is told never to open a symlink
//! (`SQLITE_OPEN_NOFOLLOW`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::host::state::{Dir, Refusal};

/// The catalogue path of a state root.
pub fn db_path(state_root: &Path) -> PathBuf {
    state_root.join("_state").join("vmbackup.db")
}

/// The reason given when there is no catalogue at all.
const NO_DATABASE: &str = "no catalogue database";

/// The catalogue file when `_state` is a directory of the backup tree and
/// `vmbackup.db` (and any `-wal`, `-shm`, `-journal` beside it) a regular file in
/// it, none of them a symlink. `Err` is the reason it is unavailable.
fn checked_db_path(state_root: &Path) -> Result<PathBuf, String> {
    let reason = |r: Refusal| match r {
        Refusal::Missing(_) => NO_DATABASE.to_owned(),
        r => r.to_string(),
    };
    let state = Dir::state(state_root, false).map_err(reason)?;
    state.regular_file("vmbackup.db").map_err(reason)?;
    for side in ["vmbackup.db-wal", "vmbackup.db-shm", "vmbackup.db-journal"] {
        match state.regular_file(side) {
            Ok(_) | Err(Refusal::Missing(_)) => {}
            Err(r) => return Err(r.to_string()),
        }
    }
    Ok(db_path(state_root))
}

/// `chain_health` summary of one VM (§5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHealth {
    /// Rows with `chain_status = 'active'`.
    pub active: u64,
    /// Rows with `chain_status = 'broken'`.
    pub broken: u64,
    /// `MAX(last_backup)` of live rows, else `MAX(created_at)` of successful
    /// `vm_backups`, as stored (UTC `YYYY-MM-DD HH:MM:SS`).
    pub last_backup: Option<String>,
}

impl ChainHealth {
    /// `Chains: <A> active, <B> broken, last backup <ISO>`.
    pub fn line(&self) -> String {
        let last = self
            .last_backup
            .as_deref()
            .map(iso_utc)
            .unwrap_or_else(|| "never".into());
        format!(
            "Chains: {} active, {} broken, last backup {last}",
            self.active, self.broken
        )
    }
}

/// `2026-03-08 22:00:01` → `2026-03-08T22:00:01Z`; other shapes are shown as stored.
pub fn iso_utc(stored: &str) -> String {
    let t = stored.trim();
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.fZ",
    ] {
        if let Ok(dt) = chrono::NaiveDateTime::parse_from_str(t, fmt) {
            return dt.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        }
    }
    t.to_owned()
}

/// Percent-encodes a path for an SQLite `file:` URI.
fn uri_path(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in p.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A read-only connection to an existing catalogue.
#[derive(Debug)]
pub struct Catalogue {
    conn: Connection,
}

impl Catalogue {
    /// Opens `<state root>/_state/vmbackup.db` read-only; `None` when it does not
    /// exist or cannot be opened.
    ///
    /// A plain read-only open of a WAL database makes SQLite create the `-wal` and
    /// `-shm` side files when they are missing, which a listing must not do. When
    /// there is no WAL content (no `-wal`, or an empty one) the main file holds
    /// everything and is opened with `immutable=1`, which creates nothing; when a
    /// writer's files are present the normal read-only open (with locking) is used.
    pub fn open_read_only(state_root: &Path) -> Option<Self> {
        let path = checked_db_path(state_root).ok()?;
        let side = |suffix: &str| {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            PathBuf::from(p)
        };
        let wal_len = std::fs::symlink_metadata(side("-wal"))
            .map(|m| m.len())
            .ok();
        let shm = std::fs::symlink_metadata(side("-shm")).is_ok_and(|m| m.is_file());
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = if (wal_len.is_some() && shm) || wal_len.unwrap_or(0) > 0 {
            Connection::open_with_flags(&path, flags).ok()?
        } else {
            let uri = format!("file:{}?immutable=1", uri_path(&path));
            Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI).ok()?
        };
        conn.busy_timeout(Duration::from_millis(5000)).ok()?;
        Some(Self { conn })
    }

    /// The `chain_health` summary of every VM that has rows (§5.3), read in one go
    /// so that a failure omits the line for every VM. `Err` = unavailable.
    pub fn chain_health(&self) -> rusqlite::Result<BTreeMap<String, ChainHealth>> {
        let mut out: BTreeMap<String, ChainHealth> = BTreeMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT vm_name,
                    SUM(chain_status = 'active'),
                    SUM(chain_status = 'broken'),
                    MAX(CASE WHEN chain_status IN ('deleted', 'purged') THEN NULL ELSE last_backup END)
             FROM chain_health GROUP BY vm_name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (vm, active, broken, last) = row?;
            let count = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            out.insert(
                vm,
                ChainHealth {
                    active: count(active),
                    broken: count(broken),
                    last_backup: last.filter(|s| !s.trim().is_empty()),
                },
            );
        }
        if out.values().any(|h| h.last_backup.is_none()) {
            // the fallback table is optional: without it the VM shows "never"
            if let Ok(fallback) = self.last_successful_backups() {
                for (vm, h) in out.iter_mut() {
                    if h.last_backup.is_none() {
                        h.last_backup = fallback.get(vm).cloned();
                    }
                }
            }
        }
        Ok(out)
    }

    fn last_successful_backups(&self) -> rusqlite::Result<BTreeMap<String, String>> {
        let mut stmt = self.conn.prepare("SELECT vm_name, MAX(created_at) FROM vm_backups WHERE status = 'success' GROUP BY vm_name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            // blank like an empty `last_backup`: "never", not an empty time
            if let (vm, Some(t)) = row? {
                if !t.trim().is_empty() {
                    out.insert(vm, t);
                }
            }
        }
        Ok(out)
    }
}

/// The `--list` health lines of a backup root, or an empty map when the catalogue
/// is unavailable for any reason (silently, spec §5.3).
pub fn list_health(state_root: &Path) -> BTreeMap<String, ChainHealth> {
    Catalogue::open_read_only(state_root)
        .and_then(|c| c.chain_health().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &Path, sql: &str) {
        std::fs::create_dir_all(dir.join("_state")).expect("mkdir");
        let c = Connection::open(db_path(dir)).expect("create");
        c.execute_batch(sql).expect("sql");
    }

    const SCHEMA: &str = "CREATE TABLE chain_health (id INTEGER PRIMARY KEY, vm_name TEXT NOT NULL, period_id TEXT NOT NULL,
        chain_location TEXT NOT NULL, chain_status TEXT NOT NULL DEFAULT 'active', last_backup TEXT, created_at TEXT);
        CREATE TABLE vm_backups (id INTEGER PRIMARY KEY, vm_name TEXT, status TEXT, created_at TEXT);";

    #[test]
    fn statement_38_health_line() {
        let d = tempfile::tempdir().expect("tempdir");
        db(
            d.path(),
            &format!(
                "{SCHEMA}
                INSERT INTO chain_health (vm_name, period_id, chain_location, chain_status, last_backup) VALUES
                 ('my-vm','2026-W09','x','active','2026-03-01 22:00:01'),
                 ('my-vm','2026-W10','x','active','2026-03-08 22:00:01'),
                 ('my-vm','2026-W08','x','broken','2026-02-20 22:00:01'),
                 ('my-vm','2026-W07','x','deleted','2026-09-09 22:00:01'),
                 ('other','2026-W07','x','archived',NULL);
                INSERT INTO vm_backups (vm_name, status, created_at) VALUES ('other','success','2026-01-02 03:04:05'),
                 ('other','failed','2026-05-02 03:04:05');"
            ),
        );
        let h = list_health(d.path());
        assert_eq!(
            h["my-vm"].line(),
            "Chains: 2 active, 1 broken, last backup 2026-03-08T22:00:01Z"
        );
        assert_eq!(
            h["other"].line(),
            "Chains: 0 active, 0 broken, last backup 2026-01-02T03:04:05Z"
        );
        assert!(!h.contains_key("third"));
    }

    #[test]
    fn listing_creates_no_side_files() {
        let d = tempfile::tempdir().expect("tempdir");
        db(d.path(), &format!("{SCHEMA} PRAGMA journal_mode=WAL; INSERT INTO chain_health (vm_name, period_id, chain_location) VALUES ('a b%?#', 'p', 'x');"));
        let state = d.path().join("_state");
        for f in ["vmbackup.db-wal", "vmbackup.db-shm"] {
            let _ = std::fs::remove_file(state.join(f));
        }
        let h = list_health(d.path());
        assert_eq!(h["a b%?#"].active, 1);
        let mut names: Vec<String> = std::fs::read_dir(&state)
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["vmbackup.db"]);
        assert_eq!(uri_path(Path::new("/a b/%?#")), "/a%20b/%25%3F%23");
    }

    #[test]
    fn statement_39_unavailable_is_silent_and_never_created() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(list_health(d.path()).is_empty());
        assert!(!db_path(d.path()).exists());
        std::fs::create_dir_all(d.path().join("_state")).expect("mkdir");
        std::fs::write(
            db_path(d.path()),
            b"this is not a database, just text of some length....",
        )
        .expect("write");
        assert!(list_health(d.path()).is_empty());
        let e = tempfile::tempdir().expect("tempdir");
        db(
            e.path(),
            "CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT);",
        );
        assert!(list_health(e.path()).is_empty());
        assert_eq!(iso_utc("garbage"), "garbage");
    }

    // issue 18 (6): a `_state`, `vmbackup.db` or side file that is a symlink is not
    // followed: nothing is read or written through it
    #[test]
    fn issue18_symlinked_state_pieces_are_refused() {
        use std::os::unix::fs::symlink;
        let outside = tempfile::tempdir().expect("tempdir");
        db(
            outside.path(),
            &format!("{SCHEMA} INSERT INTO chain_health (vm_name, period_id, chain_location) VALUES ('vm', 'p', 'x');"),
        );
        let real_state = outside.path().join("_state");
        let before = std::fs::read(real_state.join("vmbackup.db")).expect("read");
        let row = RestoreSession {
            vm_name: "vm".into(),
            restore_mode: "dr".into(),
            outcome: "success".into(),
            ..RestoreSession::default()
        };
        let check = |root: &Path, what: &str| {
            assert!(
                list_health(root).is_empty(),
                "{what}: read through a symlink"
            );
            let e = record_restore(root, &row).expect_err(what);
            assert!(e.contains("symbolic link"), "{what}: {e}");
        };
        // `_state` itself
        let a = tempfile::tempdir().expect("tempdir");
        symlink(&real_state, a.path().join("_state")).expect("symlink");
        check(a.path(), "_state");
        // `_state/vmbackup.db`
        let b = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(b.path().join("_state")).expect("mkdir");
        symlink(real_state.join("vmbackup.db"), db_path(b.path())).expect("symlink");
        check(b.path(), "vmbackup.db");
        // a side file next to a real database
        let c = tempfile::tempdir().expect("tempdir");
        db(c.path(), SCHEMA);
        symlink(
            outside.path().join("wal"),
            c.path().join("_state/vmbackup.db-wal"),
        )
        .expect("symlink");
        let e = record_restore(c.path(), &row).expect_err("side file");
        assert!(
            e.contains("vmbackup.db-wal") && e.contains("symbolic link"),
            "{e}"
        );
        assert!(!outside.path().join("wal").exists());

        assert_eq!(
            std::fs::read(real_state.join("vmbackup.db")).expect("read"),
            before,
            "the outside database was written"
        );
        let mut names: Vec<_> = std::fs::read_dir(&real_state)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["vmbackup.db"], "side files created outside");
        // and a real one is still written
        let d = tempfile::tempdir().expect("tempdir");
        db(d.path(), SCHEMA);
        record_restore(d.path(), &row).expect("recorded");
        assert_eq!(
            record_restore(tempfile::tempdir().expect("t").path(), &row),
            Err(NO_DATABASE.to_owned())
        );
    }

    // Found by the catalogue fuzz target: a blank time printed "last backup " (empty).
    #[test]
    fn blank_times_are_missing_times() {
        let d = tempfile::tempdir().expect("tempdir");
        db(
            d.path(),
            &format!(
                "{SCHEMA}
                INSERT INTO chain_health (vm_name, period_id, chain_location, last_backup) VALUES
                 ('a','p','x',' '), ('b','p','x',''), ('c','p','x','');
                INSERT INTO vm_backups (vm_name, status, created_at) VALUES
                 ('a','success','2026-01-02 03:04:05'), ('b','success','  '), ('c','success','');"
            ),
        );
        let h = list_health(d.path());
        assert_eq!(
            h["a"].line(),
            "Chains: 1 active, 0 broken, last backup 2026-01-02T03:04:05Z"
        );
        for vm in ["b", "c"] {
            assert_eq!(h[vm].last_backup, None);
            assert!(h[vm].line().ends_with("last backup never"));
        }
    }
}

/// One `restore_sessions` row (spec §5.4), written once per non-dry-run restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreSession {
    /// UTC `YYYY-MM-DD HH:MM:SS`.
    pub start_time: String,
    /// UTC `YYYY-MM-DD HH:MM:SS`.
    pub end_time: String,
    /// Whole seconds.
    pub duration_sec: i64,
    /// Resolved source VM name.
    pub vm_name: String,
    /// `dr` | `clone` | `data-only` | `disk` | `disk-extract`.
    pub restore_mode: String,
    /// Clone name.
    pub target_name: Option<String>,
    /// Data dir.
    pub source_path: String,
    /// Period dir name, `accumulate`, or archive chain name.
    pub period_id: Option<String>,
    /// As requested.
    pub restore_point: String,
    /// Resolved endpoint.
    pub checkpoint: Option<i64>,
    /// Restore path or original disk paths.
    pub target_path: Option<String>,
    /// Devices.
    pub disks: Option<String>,
    /// `--force`.
    pub forced: bool,
    /// `--include-incomplete`.
    pub include_incomplete: bool,
    /// `restored` | `failed` | `skipped` | `none`.
    pub tpm_result: Option<String>,
    /// `success` | `partial` | `failed` | `interrupted`.
    pub outcome: String,
    /// Exit code.
    pub exit_code: i64,
    /// Last error text.
    pub error_message: Option<String>,
    /// Log file.
    pub log_file: Option<String>,
    /// Host name.
    pub hostname: Option<String>,
    /// `$SUDO_USER` or the current user.
    pub invoked_by: Option<String>,
}

const RESTORE_SESSIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS restore_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, start_time TEXT NOT NULL, end_time TEXT, duration_sec INTEGER,
    vm_name TEXT NOT NULL, restore_mode TEXT NOT NULL, target_name TEXT, source_path TEXT NOT NULL,
    period_id TEXT, restore_point TEXT, checkpoint INTEGER, target_path TEXT, disks TEXT,
    forced INTEGER DEFAULT 0, include_incomplete INTEGER DEFAULT 0, tpm_result TEXT, outcome TEXT NOT NULL,
    exit_code INTEGER NOT NULL, error_message TEXT, log_file TEXT, hostname TEXT, invoked_by TEXT,
    vmrestore_version TEXT, created_at TEXT DEFAULT CURRENT_TIMESTAMP);
CREATE INDEX IF NOT EXISTS idx_restore_sessions_vm ON restore_sessions(vm_name);
CREATE INDEX IF NOT EXISTS idx_restore_sessions_start ON restore_sessions(start_time);";

/// How long a catalogue write may take, waiting for vmbackup's lock included: the
/// row is bookkeeping, and the restore (and the VM lock) must not wait on it.
const WRITE_BUDGET: Duration = Duration::from_secs(3);

/// Bounds every statement of `conn`: a busy catalogue waits at most
/// [`WRITE_BUDGET`], and a statement that runs past it (a hostile trigger or view
/// with an endless recursive query) or past a new signal is interrupted.
fn bound(conn: &mut Connection) -> Result<(), String> {
    conn.busy_timeout(WRITE_BUDGET).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + WRITE_BUDGET;
    let signals = crate::signal::received();
    // called every 10,000 SQLite VM steps (~1 ms): returning true interrupts
    conn.progress_handler(
        10_000,
        Some(move || std::time::Instant::now() > deadline || crate::signal::received() != signals),
    )
    .map_err(|e| e.to_string())
}

/// Appends one `restore_sessions` row to an existing catalogue (never creates the
/// database). The table is created if missing; only columns that exist are
/// written, so a vmbackup-created variant of the table is tolerated. One
/// transaction. `Err` carries the reason for the single WARN.
pub fn record_restore(state_root: &Path, row: &RestoreSession) -> Result<(), String> {
    let path = checked_db_path(state_root)?;
    let mut conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(|e| e.to_string())?;
    bound(&mut conn)?;
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    tx.execute_batch(RESTORE_SESSIONS_DDL)
        .map_err(|e| e.to_string())?;
    let existing: Vec<String> = {
        let mut st = tx
            .prepare("SELECT name FROM pragma_table_info('restore_sessions')")
            .map_err(|e| e.to_string())?;
        let names = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| e.to_string())?;
        names
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?
    };
    use rusqlite::types::Value;
    let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Text);
    let cols: Vec<(&str, Value)> = vec![
        ("start_time", Value::Text(row.start_time.clone())),
        ("end_time", Value::Text(row.end_time.clone())),
        ("duration_sec", Value::Integer(row.duration_sec)),
        ("vm_name", Value::Text(row.vm_name.clone())),
        ("restore_mode", Value::Text(row.restore_mode.clone())),
        ("target_name", opt(&row.target_name)),
        ("source_path", Value::Text(row.source_path.clone())),
        ("period_id", opt(&row.period_id)),
        ("restore_point", Value::Text(row.restore_point.clone())),
        (
            "checkpoint",
            row.checkpoint.map_or(Value::Null, Value::Integer),
        ),
        ("target_path", opt(&row.target_path)),
        ("disks", opt(&row.disks)),
        ("forced", Value::Integer(i64::from(row.forced))),
        (
            "include_incomplete",
            Value::Integer(i64::from(row.include_incomplete)),
        ),
        ("tpm_result", opt(&row.tpm_result)),
        ("outcome", Value::Text(row.outcome.clone())),
        ("exit_code", Value::Integer(row.exit_code)),
        ("error_message", opt(&row.error_message)),
        ("log_file", opt(&row.log_file)),
        ("hostname", opt(&row.hostname)),
        ("invoked_by", opt(&row.invoked_by)),
        (
            "vmrestore_version",
            Value::Text(env!("CARGO_PKG_VERSION").to_owned()),
        ),
    ];
    let cols: Vec<(&str, Value)> = cols
        .into_iter()
        .filter(|(c, _)| existing.iter().any(|e| e == c))
        .collect();
    let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
    let marks: Vec<&str> = cols.iter().map(|_| "?").collect();
    let sql = format!(
        "INSERT INTO restore_sessions ({}) VALUES ({})",
        names.join(", "),
        marks.join(", ")
    );
    tx.execute(
        &sql,
        rusqlite::params_from_iter(cols.into_iter().map(|(_, v)| v)),
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}
