//! The SQLite catalogue read for `--list` (`vmrestore::catalogue`).
//!
//! Two modes, by the top bit of the first byte:
//! - rows: the rest describes `chain_health` and `vm_backups` rows (NULL, integers,
//!   UTF-8 text, raw non-UTF-8 text, blobs) and the schema (typed or untyped
//!   columns, tables missing, WAL with the writer still open). They are written to a
//!   fresh database and read back with `Catalogue::open_read_only` +
//!   `chain_health`, which must equal a model of the SQL computed here: exact
//!   active/broken counts, the latest stored time of live rows else of successful
//!   backups, values only ever ones that were stored, and `Err` (never a panic) when
//!   a value has the wrong type;
//! - file: the rest is the database file itself (corrupt catalogues); reading must
//!   not panic.
//!
//! Both: `list_health` creates no file next to the database, every health line names
//! a time or `never`, and `iso_utc` is idempotent and only reformats what it parses.
#![no_main]

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rusqlite::types::Value;
use rusqlite::Connection;
use vmrestore::host::catalogue::{db_path, iso_utc, list_health, Catalogue, ChainHealth};

const VOCAB: [&str; 20] = [
    "vm1",
    "vm2",
    "my-vm",
    "active",
    "broken",
    "deleted",
    "purged",
    "archived",
    "success",
    "failed",
    "2026-03-08 22:00:01",
    "2026-03-08T22:00:01.5Z",
    "2026-03-09 00:00:00.123456",
    "",
    " ",
    "a b%?#",
    "Active",
    "2026-13-45 99:99:99",
    "+10000-01-01 00:00:00",
    " 2026-01-02 03:04:05 ",
];
const INTS: [i64; 5] = [0, 1, -1, i64::MAX, i64::MIN];
const MAX_ROWS: usize = 48;

/// A value as SQLite stores it, ordered like SQLite orders values.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    Null,
    Int(i64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl Stored {
    fn rank(&self) -> u8 {
        match self {
            Stored::Null => 0,
            Stored::Int(_) => 1,
            Stored::Text(_) => 2,
            Stored::Blob(_) => 3,
        }
    }

    /// The column affinity: TEXT turns integers into their decimal text.
    fn affinity(self, text: bool) -> Self {
        match self {
            Stored::Int(i) if text => Stored::Text(i.to_string().into_bytes()),
            v => v,
        }
    }

    fn is_text(&self, s: &str) -> bool {
        matches!(self, Stored::Text(t) if t == s.as_bytes())
    }

    /// What `row.get::<_, Option<String>>` gives: `Err` for integers, blobs and
    /// non-UTF-8 text.
    fn as_opt_string(&self) -> Result<Option<String>, ()> {
        match self {
            Stored::Null => Ok(None),
            Stored::Text(t) => String::from_utf8(t.clone()).map(Some).map_err(|_| ()),
            _ => Err(()),
        }
    }
}

impl PartialOrd for Stored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stored {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Stored::Int(a), Stored::Int(b)) => a.cmp(b),
            (Stored::Text(a), Stored::Text(b)) | (Stored::Blob(a), Stored::Blob(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// Reads the fuzz input front to back; missing bytes read as 0.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    /// One value: `(what to bind, SQL expression for it, what SQLite stores)`.
    fn value(&mut self) -> (Value, bool, Stored) {
        let kind = self.byte();
        match kind % 6 {
            0 => (Value::Null, false, Stored::Null),
            1 => {
                let b = self.byte();
                let i = INTS.get(usize::from(b)).copied().unwrap_or(i64::from(b));
                (Value::Integer(i), false, Stored::Int(i))
            }
            2 => {
                let s = VOCAB[usize::from(self.byte()) % VOCAB.len()];
                (Value::Text(s.into()), false, Stored::Text(s.into()))
            }
            3 => {
                let n = usize::from(self.byte() % 32);
                let s = String::from_utf8_lossy(self.take(n)).into_owned();
                let b = s.clone().into_bytes();
                (Value::Text(s), false, Stored::Text(b))
            }
            4 => {
                // raw bytes stored as TEXT (possibly not UTF-8)
                let n = usize::from(self.byte() % 32);
                let b = self.take(n).to_vec();
                (Value::Blob(b.clone()), true, Stored::Text(b))
            }
            _ => {
                let n = usize::from(self.byte() % 8);
                let b = self.take(n).to_vec();
                (Value::Blob(b.clone()), false, Stored::Blob(b))
            }
        }
    }
}

#[derive(Debug, Default)]
struct Db {
    vm_backups: bool,
    chain_health: bool,
    wal_open: bool,
    /// TEXT affinity of the name, status and time columns.
    typed: [bool; 3],
    /// (vm_name, chain_status, last_backup)
    health: Vec<[Stored; 3]>,
    /// (vm_name, status, created_at)
    backups: Vec<[Stored; 3]>,
}

fn col(typed: bool) -> &'static str {
    if typed {
        "TEXT"
    } else {
        ""
    }
}

/// Writes the rows; returns the writer when it must stay open (WAL).
fn build(dir: &Path, input: &mut Bytes<'_>, db: &mut Db) -> Connection {
    let conn = Connection::open(db_path(dir)).expect("create db");
    // no journal file to create and delete (it is the writer's business, not read)
    let mode = if db.wal_open { "WAL" } else { "MEMORY" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode={mode}; PRAGMA synchronous=OFF; BEGIN;"
    ))
    .expect("pragmas");
    let [n, s, t] = db.typed.map(col);
    if db.chain_health {
        conn.execute_batch(&format!(
            "CREATE TABLE chain_health (id INTEGER PRIMARY KEY AUTOINCREMENT, vm_name {n},
             period_id TEXT, chain_location TEXT, chain_status {s} DEFAULT 'active',
             last_backup {t}, created_at TEXT DEFAULT CURRENT_TIMESTAMP);"
        ))
        .expect("chain_health");
    }
    if db.vm_backups {
        conn.execute_batch(&format!(
            "CREATE TABLE vm_backups (id INTEGER PRIMARY KEY AUTOINCREMENT, vm_name {n},
             status {s}, created_at {t});"
        ))
        .expect("vm_backups");
    }
    for _ in 0..MAX_ROWS {
        if input.0.is_empty() {
            break;
        }
        let backups = input.byte() & 1 == 1;
        let vals = [input.value(), input.value(), input.value()];
        let (table, cols) = if backups {
            ("vm_backups", "vm_name, status, created_at")
        } else {
            ("chain_health", "vm_name, chain_status, last_backup")
        };
        let exprs: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, (_, cast, _))| match cast {
                true => format!("CAST(?{} AS TEXT)", i + 1),
                false => format!("?{}", i + 1),
            })
            .collect();
        let sql = format!("INSERT INTO {table} ({cols}) VALUES ({})", exprs.join(", "));
        let params: Vec<Value> = vals.iter().map(|(v, _, _)| v.clone()).collect();
        let inserted = conn.execute(&sql, rusqlite::params_from_iter(params));
        let stored = vals.map(|(_, _, s)| s);
        let stored = [0, 1, 2].map(|i| stored[i].clone().affinity(db.typed[i]));
        let exists = if backups {
            db.vm_backups
        } else {
            db.chain_health
        };
        assert_eq!(inserted.is_ok(), exists, "{sql}: {inserted:?}");
        if exists {
            if backups {
                db.backups.push(stored);
            } else {
                db.health.push(stored);
            }
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
    conn
}

/// What `Catalogue::chain_health` must return for `db` (`Err(())` = any error).
fn model(db: &Db) -> Result<BTreeMap<String, ChainHealth>, ()> {
    if !db.chain_health {
        return Err(());
    }
    let mut groups: BTreeMap<&Stored, Vec<&[Stored; 3]>> = BTreeMap::new();
    for r in &db.health {
        groups.entry(&r[0]).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for (vm, rows) in groups {
        let Ok(Some(vm)) = vm.as_opt_string() else {
            return Err(());
        };
        let count = |s: &str| rows.iter().filter(|r| r[1].is_text(s)).count() as u64;
        let last = rows
            .iter()
            .filter(|r| !r[1].is_text("deleted") && !r[1].is_text("purged"))
            .map(|r| &r[2])
            .filter(|v| **v != Stored::Null)
            .max()
            .map_or(Ok(None), Stored::as_opt_string)?;
        let h = ChainHealth {
            active: count("active"),
            broken: count("broken"),
            last_backup: last.filter(|s| !s.trim().is_empty()),
        };
        out.insert(vm, h);
    }
    if out.values().any(|h| h.last_backup.is_none()) {
        if let Ok(fallback) = model_fallback(db) {
            for (vm, h) in out.iter_mut() {
                if h.last_backup.is_none() {
                    h.last_backup = fallback.get(vm).cloned();
                }
            }
        }
    }
    Ok(out)
}

fn model_fallback(db: &Db) -> Result<BTreeMap<String, String>, ()> {
    if !db.vm_backups {
        return Err(());
    }
    let mut groups: BTreeMap<&Stored, Option<&Stored>> = BTreeMap::new();
    for r in db.backups.iter().filter(|r| r[1].is_text("success")) {
        let m = groups.entry(&r[0]).or_default();
        if r[2] != Stored::Null && m.is_none_or(|m| r[2] > *m) {
            *m = Some(&r[2]);
        }
    }
    let mut out = BTreeMap::new();
    for (vm, max) in groups {
        let Ok(Some(vm)) = vm.as_opt_string() else {
            return Err(());
        };
        if let Some(t) = max.map_or(Ok(None), Stored::as_opt_string)? {
            if !t.trim().is_empty() {
                out.insert(vm, t);
            }
        }
    }
    Ok(out)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("_state"))
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn check_iso(s: &str) {
    let once = iso_utc(s);
    assert_eq!(iso_utc(&once), once, "iso_utc not idempotent on {s:?}");
    if once != s.trim() {
        // reformatted: the same time, to the second
        use chrono::{NaiveDateTime, Timelike};
        let out = NaiveDateTime::parse_from_str(&once, "%Y-%m-%dT%H:%M:%SZ")
            .unwrap_or_else(|e| panic!("{s:?} -> {once:?}: {e}"));
        let input = [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.fZ",
        ]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s.trim(), f).ok())
        .unwrap_or_else(|| panic!("{s:?} -> {once:?} but does not parse"));
        assert_eq!(input.with_nanosecond(0), Some(out), "{s:?} -> {once:?}");
    }
}

fn check_lines(health: &BTreeMap<String, ChainHealth>) {
    for h in health.values() {
        let line = h.line();
        let (_, last) = line.split_once(", last backup ").expect("line shape");
        assert!(!last.trim().is_empty(), "{line:?}");
        if let Some(t) = &h.last_backup {
            check_iso(t);
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("vmrestore-fuzz-")
        .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") });
    b.or_else(|_| tempfile::tempdir()).expect("tempdir")
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let flags = input.byte();
    let dir = tempdir();
    std::fs::create_dir(dir.path().join("_state")).expect("mkdir");

    if flags & 0x80 != 0 {
        if let Ok(s) = std::str::from_utf8(input.0) {
            check_iso(s);
        }
        std::fs::write(db_path(dir.path()), input.0).expect("write db");
        if let Some(c) = Catalogue::open_read_only(dir.path()) {
            if let Ok(h) = c.chain_health() {
                check_lines(&h);
            }
        }
        check_lines(&list_health(dir.path()));
        assert_eq!(files(dir.path()), ["vmbackup.db"], "side files created");
        return;
    }

    let mut db = Db {
        vm_backups: flags & 1 == 0,
        chain_health: flags & 2 == 0,
        wal_open: flags & 4 != 0,
        typed: [flags & 8 == 0, flags & 16 == 0, flags & 32 == 0],
        ..Db::default()
    };
    let writer = build(dir.path(), &mut input, &mut db);
    if !db.wal_open {
        drop(writer);
        let before = files(dir.path());
        assert_eq!(before, ["vmbackup.db"]);
        check_read(dir.path(), &db);
        assert_eq!(files(dir.path()), before, "side files created");
    } else {
        let before = files(dir.path());
        check_read(dir.path(), &db);
        assert_eq!(files(dir.path()), before, "side files changed");
        drop(writer);
    }
});

fn check_read(dir: &Path, db: &Db) {
    let want = model(db);
    let cat = Catalogue::open_read_only(dir).expect("an existing catalogue opens");
    let got = cat.chain_health().map_err(|_| ());
    assert_eq!(got, want, "{db:?}");
    drop(cat);
    let listed = list_health(dir);
    assert_eq!(listed, want.clone().unwrap_or_default());
    check_lines(&listed);
}
