//! vmbackup's SQLite catalogue `<state root>/_state/vmbackup.db` (spec §5): the only
//! file with SQL. Read side for `--list` (§5.3).
//!
//! vmrestore never creates the database: it is opened read-only, with a 5 s busy
//! timeout, and the journal mode is left alone. Missing, unreadable, locked or
//! schema-less databases all mean "catalogue unavailable".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// The catalogue path of a state root.
pub fn db_path(state_root: &Path) -> PathBuf {
    state_root.join("_state").join("vmbackup.db")
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

/// A read-only connection to an existing catalogue.
#[derive(Debug)]
pub struct Catalogue {
    conn: Connection,
}

impl Catalogue {
    /// Opens `<state root>/_state/vmbackup.db` read-only; `None` when it does not
    /// exist or cannot be opened.
    pub fn open_read_only(state_root: &Path) -> Option<Self> {
        let path = db_path(state_root);
        if !path.is_file() {
            return None;
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ok()?;
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
                    last_backup: last.filter(|s| !s.is_empty()),
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
            if let (vm, Some(t)) = row? {
                out.insert(vm, t);
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
}
