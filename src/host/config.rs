//! Backup-root resolution (spec §7.1) and `vmbackup.conf` reading (§7.2).
//!
//! The config file is read as data, never executed. Only `BACKUP_PATH` matters; a
//! value that only a shell could evaluate (`$VAR`, `${...}`, `$(...)`, backticks)
//! is a configuration error naming the file and line, not something to guess at.
//!
//! The config root `/opt/vmbackup/config` can be replaced with the environment
//! variable `VMRESTORE_CONFIG_ROOT` (a hook for tests and packaging).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::AppError;

/// Where vmbackup keeps its instances.
pub const DEFAULT_CONFIG_ROOT: &str = "/opt/vmbackup/config";

/// Longest config line we accept.
pub const MAX_LINE: usize = 64 * 1024;

/// The environment the cascade depends on (read once, in `app`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEnv {
    /// `VMRESTORE_CONFIG_ROOT`, else [`DEFAULT_CONFIG_ROOT`].
    pub config_root: PathBuf,
    /// `VMBACKUP_INSTANCE` when set and non-empty.
    pub instance: Option<String>,
}

impl ConfigEnv {
    /// Reads the two variables from the process environment.
    pub fn from_env() -> Self {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            config_root: non_empty("VMRESTORE_CONFIG_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_ROOT)),
            instance: non_empty("VMBACKUP_INSTANCE").map(|v| v.to_string_lossy().into_owned()),
        }
    }

    /// `<config root>/<instance>/vmbackup.conf`.
    pub fn conf_file(&self, instance: &str) -> PathBuf {
        self.config_root.join(instance).join("vmbackup.conf")
    }
}

/// Where the effective backup root came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// `--backup-path` or the dirname of a path-valued VM argument.
    Cli,
    /// `BACKUP_PATH` of this instance's config file.
    Instance {
        /// Instance name.
        name: String,
        /// The config file read.
        file: PathBuf,
    },
}

/// The effective backup root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRoot {
    /// The root, as given (one trailing `/` stripped), not canonicalised.
    pub path: PathBuf,
    /// Where it came from.
    pub source: RootSource,
}

/// §7.1: CLI path, else `--config-instance`, else `VMBACKUP_INSTANCE`, else `default`.
pub fn resolve_backup_root(
    cli_path: Option<&str>,
    instance_flag: Option<&str>,
    env: &ConfigEnv,
) -> Result<BackupRoot, AppError> {
    if let Some(p) = cli_path {
        return Ok(BackupRoot {
            path: PathBuf::from(p),
            source: RootSource::Cli,
        });
    }
    let instance = instance_flag
        .map(str::to_owned)
        .or_else(|| env.instance.clone())
        .unwrap_or_else(|| "default".to_owned());
    let file = env.conf_file(&instance);
    let unresolvable = || {
        AppError::Config(format!(
            "Cannot resolve backup path. Use --backup-path or install vmbackup with a configured BACKUP_PATH in {}",
            file.display()
        ))
    };
    let bad_name = instance.contains('/') || instance == "." || instance == "..";
    if bad_name || !file.is_file() {
        if instance == "default" {
            return Err(unresolvable());
        }
        return Err(AppError::Config(format!(
            "Config instance '{instance}' not found: {}",
            file.display()
        )));
    }
    match read_backup_path(&file)? {
        Some(path) => Ok(BackupRoot {
            path,
            source: RootSource::Instance {
                name: instance,
                file,
            },
        }),
        None => Err(unresolvable()),
    }
}

/// Reads `BACKUP_PATH` from a `vmbackup.conf` (last qualifying line wins; one
/// trailing `/` removed). `None` when no line sets a non-empty value.
pub fn read_backup_path(file: &Path) -> Result<Option<PathBuf>, AppError> {
    let f = File::open(file)
        .map_err(|e| AppError::Config(format!("Cannot read {}: {e}", file.display())))?;
    parse_backup_path(f, file)
}

/// [`read_backup_path`] on the contents of `file` given as a reader (errors still
/// name `file` and the line).
pub fn parse_backup_path(contents: impl Read, file: &Path) -> Result<Option<PathBuf>, AppError> {
    let mut reader = BufReader::new(contents);
    let mut found: Option<Vec<u8>> = None;
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        line_no += 1;
        let n = reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| AppError::Config(format!("Cannot read {}: {e}", file.display())))?;
        if n == 0 {
            break;
        }
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if line.len() > MAX_LINE {
            return Err(AppError::ConfigLine {
                path: file.to_path_buf(),
                line: line_no,
                reason: format!("line longer than {MAX_LINE} bytes"),
            });
        }
        match parse_line(line) {
            Ok(Some(v)) => found = Some(v),
            Ok(None) => {}
            Err(reason) => {
                return Err(AppError::ConfigLine {
                    path: file.to_path_buf(),
                    line: line_no,
                    reason,
                })
            }
        }
    }
    Ok(found.filter(|v| !v.is_empty()).map(|v| {
        let s = match v.strip_suffix(b"/") {
            Some(t) if !t.is_empty() => t,
            _ => &v[..],
        };
        PathBuf::from(OsStr::from_bytes(s))
    }))
}

/// One line: `Ok(Some(value))` when it assigns `BACKUP_PATH`, `Ok(None)` when it
/// does not, `Err` when the value would need a shell to evaluate.
fn parse_line(line: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut rest = trim_start(line);
    if rest.starts_with(b"#") {
        return Ok(None);
    }
    if let Some(r) = rest.strip_prefix(b"export") {
        if r.first().is_some_and(|c| *c == b' ' || *c == b'\t') {
            rest = trim_start(r);
        }
    }
    let Some(r) = rest.strip_prefix(b"BACKUP_PATH") else {
        return Ok(None);
    };
    let r = trim_start(r);
    let Some(r) = r.strip_prefix(b"=") else {
        return Ok(None);
    };
    let (value, rest) = assigned_value(trim_start(r))?;
    // After the value: nothing, a comment or `;`. Another word would make the line a
    // command with BACKUP_PATH in its environment only.
    let rest = trim_start(rest);
    if !(rest.is_empty() || rest.starts_with(b"#") || rest.starts_with(b";")) {
        return Err(needs_shell());
    }
    Ok(Some(value.to_vec()))
}

fn needs_shell() -> String {
    "BACKUP_PATH needs a shell to evaluate ($VAR, ${...}, $(...), backticks, ~, operators or a word after the value); vmrestore reads vmbackup.conf as data — use a literal path".to_owned()
}

/// The value after `BACKUP_PATH=` (quoted or bare) and what follows it.
fn assigned_value(r: &[u8]) -> Result<(&[u8], &[u8]), String> {
    Ok(match r.first() {
        Some(b'\'') => {
            // single quotes: literal in sh, no expansion at all
            let body = &r[1..];
            let end = body
                .iter()
                .position(|c| *c == b'\'')
                .ok_or("unterminated ' quote in BACKUP_PATH")?;
            let rest = &body[end + 1..];
            if rest
                .first()
                .is_some_and(|c| !matches!(c, b' ' | b'\t' | b';'))
            {
                return Err(needs_shell()); // 'a'b is one word: sh concatenates
            }
            (&body[..end], rest)
        }
        Some(b'"') => {
            let body = &r[1..];
            let end = body
                .iter()
                .position(|c| *c == b'"')
                .ok_or("unterminated \" quote in BACKUP_PATH")?;
            let v = &body[..end];
            let rest = &body[end + 1..];
            if v.iter().any(|c| matches!(c, b'$' | b'`' | b'\\'))
                || rest
                    .first()
                    .is_some_and(|c| !matches!(c, b' ' | b'\t' | b';'))
            {
                return Err(needs_shell());
            }
            (v, rest)
        }
        _ => {
            let end = r
                .iter()
                .position(|c| matches!(c, b' ' | b'\t' | b';'))
                .unwrap_or(r.len());
            let v = &r[..end];
            // sh expands `~` at the start and after `:` of an assignment, and
            // `& | < > ( )` end the word as operators.
            if v.iter().any(|c| {
                matches!(
                    c,
                    b'$' | b'`' | b'\\' | b'"' | b'\'' | b'&' | b'|' | b'<' | b'>' | b'(' | b')'
                )
            }) || v.starts_with(b"~")
                || v.windows(2).any(|w| w == b":~")
            {
                return Err(needs_shell());
            }
            (v, &r[end..])
        }
    })
}

fn trim_start(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    &b[i..]
}

/// Every configured backup root: `BACKUP_PATH` of each readable
/// `<config root>/*/vmbackup.conf` (unreadable or unparsable files are skipped).
pub fn configured_roots(env: &ConfigEnv) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(&env.config_root) else {
        return Vec::new();
    };
    let mut roots: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .map(|e| e.path().join("vmbackup.conf"))
        .filter(|f| f.is_file())
        .filter_map(|f| read_backup_path(&f).ok().flatten())
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// The first root of `roots` that contains `path` (or is it), compared as
/// `realpath -m` paths, component-wise (§4.1 step 1).
pub fn root_containing(path: &Path, roots: &[PathBuf]) -> Option<PathBuf> {
    roots
        .iter()
        .find(|r| crate::host::paths::is_inside(path, r))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("vmbackup.conf");
        std::fs::write(&f, text).expect("write");
        (d, f)
    }

    fn value(text: &str) -> Result<Option<PathBuf>, AppError> {
        let (_d, f) = conf(text);
        read_backup_path(&f)
    }

    #[test]
    fn backup_path_values() {
        assert_eq!(
            value("BACKUP_PATH=\"/srv/bk/\"\n").expect("ok"),
            Some("/srv/bk".into())
        ); // statement 21
        assert_eq!(value("#BACKUP_PATH=/x\n").expect("ok"), None); // statement 22
        assert_eq!(
            value("BACKUP_PATH=/a\nBACKUP_PATH=/b\n").expect("ok"),
            Some("/b".into())
        ); // statement 23
        assert_eq!(
            value("  export BACKUP_PATH = '/m n/$x'  # c\n").expect("ok"),
            Some("/m n/$x".into())
        );
        assert_eq!(
            value("BACKUP_PATH=/a # comment\n").expect("ok"),
            Some("/a".into())
        );
        assert_eq!(value("BACKUP_PATH=\"\"\n").expect("ok"), None);
        assert_eq!(value("BACKUP_PATH=/\n").expect("ok"), Some("/".into()));
        assert_eq!(
            value("BACKUP_PATHS=/x\nXBACKUP_PATH=/y\n").expect("ok"),
            None
        );
        assert_eq!(value("BACKUP_PATH=/a\r\n").expect("ok"), Some("/a".into()));
        // literal in sh: `~` inside a word, `#` inside a word, `;` after the value
        assert_eq!(
            value("BACKUP_PATH=/a~b#c # d\n").expect("ok"),
            Some("/a~b#c".into())
        );
        assert_eq!(
            value("BACKUP_PATH='/a'; x\n").expect("ok"),
            Some("/a".into())
        );
    }

    #[test]
    fn shell_values_are_config_errors() {
        for bad in [
            "BACKUP_PATH=$HOME/bk",
            "BACKUP_PATH=\"${BASE}/bk\"",
            "BACKUP_PATH=$(cat /etc/bk)",
            "BACKUP_PATH=`cat /x`",
            "BACKUP_PATH=\"/a",
            // what sh (and the config fuzz target's model of it) would not read as a
            // literal: it would expand `~`, treat operators as such, concatenate
            // quoted pieces, or run a command with BACKUP_PATH set only for it
            "BACKUP_PATH=~/bk",
            "BACKUP_PATH=/a:~/b",
            "BACKUP_PATH=/a|b",
            "BACKUP_PATH=/a&",
            "BACKUP_PATH=/a>b",
            "BACKUP_PATH='/a'$(id)",
            "BACKUP_PATH=\"/a\"b",
            "BACKUP_PATH='/a'#b",
            "BACKUP_PATH=/a cmd",
            "BACKUP_PATH=\"/a\" cmd",
        ] {
            let e = value(&format!("# x\n{bad}\n")).expect_err(bad);
            assert_eq!(e.exit_status(), crate::error::ExitStatus::Config);
            assert!(e.to_string().contains("vmbackup.conf:2:"), "{e}");
        }
    }

    #[test]
    fn long_lines_are_rejected() {
        let e = value(&format!("X={}\nBACKUP_PATH=/a\n", "y".repeat(MAX_LINE))).expect_err("long");
        assert!(e.to_string().contains(":1: line longer than"), "{e}");
        assert!(value(&format!("X={}\nBACKUP_PATH=/a\n", "y".repeat(MAX_LINE - 2))).is_ok());
    }

    #[test]
    fn cascade() {
        let d = tempfile::tempdir().expect("tempdir");
        for (inst, path) in [("prod", "/p"), ("test", "/t")] {
            std::fs::create_dir(d.path().join(inst)).expect("mkdir");
            std::fs::write(
                d.path().join(inst).join("vmbackup.conf"),
                format!("BACKUP_PATH={path}\n"),
            )
            .expect("write");
        }
        let env = ConfigEnv {
            config_root: d.path().to_path_buf(),
            instance: Some("test".into()),
        };
        // statement 19: the flag beats the environment
        assert_eq!(
            resolve_backup_root(None, Some("prod"), &env)
                .expect("ok")
                .path,
            PathBuf::from("/p")
        );
        assert_eq!(
            resolve_backup_root(None, None, &env).expect("ok").path,
            PathBuf::from("/t")
        );
        // statement 20: a CLI path bypasses config files
        assert_eq!(
            resolve_backup_root(Some("/b"), Some("nope"), &env)
                .expect("ok")
                .source,
            RootSource::Cli
        );
        let e = resolve_backup_root(None, Some("nope"), &env).expect_err("missing");
        assert_eq!(
            e.to_string(),
            format!(
                "Config instance 'nope' not found: {}/nope/vmbackup.conf",
                d.path().display()
            )
        );
        let e = resolve_backup_root(None, Some("../prod"), &env).expect_err("slash");
        assert!(e
            .to_string()
            .starts_with("Config instance '../prod' not found"));
        let env = ConfigEnv {
            config_root: d.path().to_path_buf(),
            instance: None,
        };
        let e = resolve_backup_root(None, None, &env).expect_err("no default");
        assert!(e
            .to_string()
            .starts_with("Cannot resolve backup path. Use --backup-path"));
        assert_eq!(
            configured_roots(&env),
            vec![PathBuf::from("/p"), PathBuf::from("/t")]
        );
    }

    #[test]
    fn containment() {
        let roots = vec![PathBuf::from("/tmp/x/bk")];
        assert!(root_containing(Path::new("/tmp/x/bk/restore"), &roots).is_some());
        assert!(root_containing(Path::new("/tmp/x/bk"), &roots).is_some());
        assert!(root_containing(Path::new("/tmp/x/bk/../bk/a"), &roots).is_some());
        assert!(root_containing(Path::new("/tmp/x/bk2"), &roots).is_none()); // statement 28
    }
}
