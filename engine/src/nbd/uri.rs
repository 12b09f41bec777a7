//! NBD URIs as libnbd and qemu write them: `nbd://host[:port]/export` and
//! `nbd+unix:///export?socket=PATH` (percent-encoding decoded). TLS schemes (`nbds`)
//! are refused.

use std::path::PathBuf;

use super::proto::DEFAULT_PORT;
use crate::error::{Error, Result};

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP host (name or address, IPv6 without brackets) and port.
    Tcp {
        /// Host.
        host: String,
        /// Port (10809 when not given).
        port: u16,
    },
    /// Unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub addr: NbdAddr,
    /// Export name (`""`: the server's default export).
    pub export: String,
}

fn bad(uri: &str, why: &str) -> Error {
    Error::Unsupported(format!("bad NBD URI {uri:?}: {why}"))
}

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = unhex(*b.get(i + 1)?)?;
            let lo = unhex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl NbdUri {
    /// Parses `nbd://…` or `nbd+unix://…`.
    pub fn parse(uri: &str) -> Result<Self> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad(uri, "no scheme"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            s if s.starts_with("nbds") => {
                return Err(bad(uri, "TLS (nbds) is not supported"));
            }
            _ => return Err(bad(uri, "scheme must be nbd:// or nbd+unix://")),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad(uri, "bad percent-encoding"))?;
        let mut socket = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" if unix => {
                    socket =
                        Some(percent_decode(v).ok_or_else(|| bad(uri, "bad percent-encoding"))?);
                }
                _ => return Err(bad(uri, &format!("unsupported parameter {k:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "nbd+unix takes no host (nbd+unix:///export?socket=…)",
                ));
            }
            let s = socket.ok_or_else(|| bad(uri, "nbd+unix needs ?socket=PATH"))?;
            if s.is_empty() {
                return Err(bad(uri, "empty socket path"));
            }
            NbdAddr::Unix(PathBuf::from(s))
        } else {
            let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                let (h, tail) = r.split_once(']').ok_or_else(|| bad(uri, "unclosed ["))?;
                let port = match tail.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if tail.is_empty() => None,
                    None => return Err(bad(uri, "junk after ]")),
                };
                (h.to_owned(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p)),
                    None => (authority.to_owned(), None),
                }
            };
            if host.is_empty() {
                return Err(bad(uri, "no host"));
            }
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p.parse().map_err(|_| bad(uri, "bad port"))?,
            };
            NbdAddr::Tcp { host, port }
        };
        Ok(Self { addr, export })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let u = NbdUri::parse("nbd://127.0.0.1:10900/vda").expect("tcp");
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "vda");
        let u = NbdUri::parse("nbd://example.org").expect("default port");
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "example.org".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:1234/a%20b").expect("v6");
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd+unix:///vdb?socket=/run/x%2By.sock").expect("unix");
        assert_eq!(u.addr, NbdAddr::Unix("/run/x+y.sock".into()));
        assert_eq!(u.export, "vdb");
        assert_eq!(u.to_string(), "nbd+unix:///vdb?socket=/run/x+y.sock");
        for b in [
            "nbds://h/e",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "http://h/e",
            "nbd://h:xx/e",
            "nbd://h/e?tls=on",
            "nbd:///e",
        ] {
            assert!(NbdUri::parse(b).is_err(), "{b}");
        }
    }
}
