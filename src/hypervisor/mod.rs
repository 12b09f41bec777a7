//! The libvirt boundary: a small synchronous trait returning owned data, so that no
//! `virt::` type leaves `hypervisor/libvirt.rs`.

use std::path::PathBuf;

pub mod libvirt;

/// A domain's run state, as virsh names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or blocked).
    Running,
    /// Paused or suspended.
    Paused,
    /// Shut off (not running).
    ShutOff,
    /// Shutting down, crashed, no state.
    Other(&'static str),
}

impl DomainState {
    /// virsh's word for the state (`running`, `paused`, `shut off`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShutOff => "shut off",
            Self::Other(s) => s,
        }
    }

    /// True when the domain has a QEMU process (running, paused, shutting down).
    pub fn is_active(self) -> bool {
        self != Self::ShutOff
    }
}

/// What we need to know about a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Name.
    pub name: String,
    /// UUID string.
    pub uuid: String,
    /// Run state.
    pub state: DomainState,
}

/// One disk source of a defined domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    /// Domain name.
    pub domain: String,
    /// `<target dev>`.
    pub target: String,
    /// Source file or device.
    pub path: PathBuf,
    /// `device` attribute (`disk`, `cdrom`, ...).
    pub device: String,
}

/// An active storage pool and its target directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// `<target><path>`.
    pub path: PathBuf,
}

/// Which undefine variant succeeded (the cascade of spec §4.4 step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undefined {
    /// With NVRAM and checkpoint metadata.
    NvramAndCheckpoints,
    /// With checkpoint metadata.
    Checkpoints,
    /// With NVRAM.
    Nvram,
    /// Plain.
    Plain,
}

/// A libvirt failure: what we tried and libvirt's message.
#[derive(Debug, thiserror::Error)]
#[error("libvirt: {op}: {message}")]
pub struct HvError {
    /// The operation (`define`, `lookup my-vm`, ...).
    pub op: String,
    /// libvirt's message.
    pub message: String,
}

/// Result with [`HvError`].
pub type HvResult<T> = Result<T, HvError>;

/// What vmrestore asks of the hypervisor.
pub trait Hypervisor {
    /// The connection URI.
    fn uri(&self) -> &str;
    /// The domain called `name`, if defined.
    fn lookup(&self, name: &str) -> HvResult<Option<DomainInfo>>;
    /// All domains (defined and transient).
    fn domains(&self) -> HvResult<Vec<DomainInfo>>;
    /// The domain XML (`inactive`: the persistent definition).
    fn xml(&self, name: &str, inactive: bool) -> HvResult<String>;
    /// The domain's configuration, typed (disks, NVRAM, MACs).
    fn domain(&self, name: &str, inactive: bool) -> HvResult<nbdfmt::DomainConfig> {
        let xml = self.xml(name, inactive)?;
        nbdfmt::DomainConfig::parse(&xml).map_err(|e| HvError {
            op: format!("dumpxml {name}"),
            message: format!("VM '{name}' XML: {e}"),
        })
    }
    /// Defines (or redefines) a persistent domain.
    fn define(&self, xml: &str) -> HvResult<DomainInfo>;
    /// Undefines, trying NVRAM + checkpoint metadata first, then weaker variants.
    fn undefine(&self, name: &str) -> HvResult<Undefined>;
    /// Undefines keeping the NVRAM file (UUID re-injection).
    fn undefine_keep_nvram(&self, name: &str) -> HvResult<()>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> HvResult<()>;
    /// Stops a running domain immediately.
    fn destroy(&self, name: &str) -> HvResult<()>;
    /// Every disk source of every domain.
    fn live_disks(&self) -> HvResult<Vec<LiveDisk>>;
    /// Active storage pools.
    fn active_pools(&self) -> HvResult<Vec<Pool>>;
    /// Rescans a pool.
    fn refresh_pool(&self, name: &str) -> HvResult<()>;
    /// Names of the domain's checkpoints.
    fn checkpoints(&self, name: &str) -> HvResult<Vec<String>>;
    /// Sets autostart.
    fn set_autostart(&self, name: &str, on: bool) -> HvResult<()>;
    /// Creates and starts a transient domain (gone when it stops).
    fn create_transient(&self, xml: &str) -> HvResult<DomainInfo>;
    /// True when the domain has a persistent definition.
    fn is_persistent(&self, name: &str) -> HvResult<bool>;
    /// Starts pulling the whole backing chain of `disk` into its top image.
    fn block_pull(&self, name: &str, disk: &str) -> HvResult<()>;
    /// The running block job of `disk`: `Some((done, total))`, `None` when there is none.
    fn block_job(&self, name: &str, disk: &str) -> HvResult<Option<(u64, u64)>>;
    /// Makes QEMU write everything it holds for the image `path` of the running
    /// domain (data and qcow2 metadata caches) to the file: after it, the file alone
    /// is the disk.
    fn flush_image(&self, name: &str, path: &std::path::Path) -> HvResult<()>;
    /// Asks the running domain's QEMU guest agent for a `guest-ping` (2 s at most).
    fn guest_ping(&self, name: &str) -> HvResult<()>;
    /// A screenshot of the domain's first screen: the MIME type and the bytes.
    fn screenshot(&self, name: &str) -> HvResult<(String, Vec<u8>)>;
}

/// The host part of a libvirt URI (`qemu+ssh://host/system` → `host`), if any.
pub fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next().unwrap_or_default();
    (!host.is_empty()).then_some(host)
}

/// The host of `uri` when it is another machine (`qemu+ssh://kvm2/system`); `None`
/// for this host (`qemu:///system`, `test:///…`, `localhost`).
pub fn remote_host(uri: &str) -> Option<&str> {
    uri_host(uri).filter(|h| !matches!(*h, "localhost" | "127.0.0.1" | "::1" | "[::1]"))
}

/// The pool whose path is the longest component-wise prefix of `dir` (spec §4.12).
pub fn pool_for(pools: &[Pool], dir: &std::path::Path) -> Option<Pool> {
    pools
        .iter()
        .filter(|p| dir.starts_with(&p.path))
        .max_by_key(|p| p.path.components().count())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_have_a_host() {
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("test:///default"), None);
        assert_eq!(uri_host("qemu+ssh://root@kvm2/system"), Some("kvm2"));
        assert_eq!(uri_host("qemu+tcp://kvm3:16509/system"), Some("kvm3"));
        assert_eq!(uri_host("qemu://localhost/system?x=1"), Some("localhost"));
        assert_eq!(uri_host(""), None);
    }

    #[test]
    fn longest_component_prefix_wins() {
        let pools = vec![
            Pool {
                name: "root".into(),
                path: "/var/lib".into(),
            },
            Pool {
                name: "images".into(),
                path: "/var/lib/libvirt/images".into(),
            },
            Pool {
                name: "img2".into(),
                path: "/var/lib/libvirt/images2".into(),
            },
        ];
        assert_eq!(
            pool_for(&pools, std::path::Path::new("/var/lib/libvirt/images/sub")).map(|p| p.name),
            Some("images".into())
        );
        assert_eq!(
            pool_for(&pools, std::path::Path::new("/var/lib/libvirt/images2")).map(|p| p.name),
            Some("img2".into())
        );
        assert_eq!(pool_for(&pools, std::path::Path::new("/srv")), None);
    }
}

/// Used when no libvirt connection can be made and the mode does not need one
/// (data-only restore, disk extract): no domains, no disks, no pools. Anything that
/// would change libvirt fails.
#[derive(Debug, Clone)]
pub struct Offline {
    /// Why there is no connection (reported on use).
    pub reason: String,
}

impl Offline {
    fn no(&self, op: &str) -> HvError {
        HvError {
            op: op.to_owned(),
            message: format!("no libvirt connection ({})", self.reason),
        }
    }
}

impl Hypervisor for Offline {
    fn uri(&self) -> &str {
        ""
    }
    fn lookup(&self, _: &str) -> HvResult<Option<DomainInfo>> {
        Ok(None)
    }
    fn domains(&self) -> HvResult<Vec<DomainInfo>> {
        Ok(Vec::new())
    }
    fn xml(&self, name: &str, _: bool) -> HvResult<String> {
        Err(self.no(&format!("dumpxml {name}")))
    }
    fn define(&self, _: &str) -> HvResult<DomainInfo> {
        Err(self.no("define"))
    }
    fn undefine(&self, name: &str) -> HvResult<Undefined> {
        Err(self.no(&format!("undefine {name}")))
    }
    fn undefine_keep_nvram(&self, name: &str) -> HvResult<()> {
        Err(self.no(&format!("undefine {name}")))
    }
    fn start(&self, name: &str) -> HvResult<()> {
        Err(self.no(&format!("start {name}")))
    }
    fn destroy(&self, name: &str) -> HvResult<()> {
        Err(self.no(&format!("destroy {name}")))
    }
    fn live_disks(&self) -> HvResult<Vec<LiveDisk>> {
        Err(self.no("list disks"))
    }
    fn active_pools(&self) -> HvResult<Vec<Pool>> {
        Ok(Vec::new())
    }
    fn refresh_pool(&self, name: &str) -> HvResult<()> {
        Err(self.no(&format!("pool-refresh {name}")))
    }
    fn checkpoints(&self, _: &str) -> HvResult<Vec<String>> {
        Ok(Vec::new())
    }
    fn set_autostart(&self, name: &str, _: bool) -> HvResult<()> {
        Err(self.no(&format!("autostart {name}")))
    }
    fn create_transient(&self, _: &str) -> HvResult<DomainInfo> {
        Err(self.no("create"))
    }
    fn is_persistent(&self, name: &str) -> HvResult<bool> {
        Err(self.no(&format!("dominfo {name}")))
    }
    fn block_pull(&self, name: &str, disk: &str) -> HvResult<()> {
        Err(self.no(&format!("blockpull {name} {disk}")))
    }
    fn block_job(&self, name: &str, disk: &str) -> HvResult<Option<(u64, u64)>> {
        Err(self.no(&format!("blockjob {name} {disk}")))
    }
    fn flush_image(&self, name: &str, path: &std::path::Path) -> HvResult<()> {
        Err(self.no(&format!("flush {name} {}", path.display())))
    }
    fn guest_ping(&self, name: &str) -> HvResult<()> {
        Err(self.no(&format!("guest-ping {name}")))
    }
    fn screenshot(&self, name: &str) -> HvResult<(String, Vec<u8>)> {
        Err(self.no(&format!("screenshot {name}")))
    }
}
