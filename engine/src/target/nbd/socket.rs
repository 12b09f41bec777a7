//! The client's connection: a TCP or Unix stream ([`Sock`]) and the big-endian reads
//! both protocol phases use.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::nbd::uri::NbdAddr;

#[derive(Debug)]
pub(super) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    /// Connects to `addr`; TCP tries each resolved address in turn (`timeout` each,
    /// 30 s without one). Errors name `label` (the URI).
    pub(super) fn connect(addr: &NbdAddr, timeout: Option<Duration>, label: &Path) -> Result<Self> {
        let io = |op: &'static str| move |e: io::Error| Error::target(op, label, e);
        Ok(match addr {
            NbdAddr::Unix(p) => Self::Unix(UnixStream::connect(p).map_err(io("connecting"))?),
            NbdAddr::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(io("resolving"))?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut got = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout.unwrap_or(Duration::from_secs(30)))
                    {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = got.ok_or(last).map_err(io("connecting"))?;
                // Requests are small writes; Nagle + delayed ACK would cost ~40 ms each.
                s.set_nodelay(true).map_err(io("connecting"))?;
                Self::Tcp(s)
            }
        })
    }

    pub(super) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    pub(super) fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Self::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    pub(super) fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

/// A protocol violation by the server.
pub(super) fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(super) fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

pub(super) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub(super) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
