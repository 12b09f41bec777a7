//! [`Hypervisor`] over the `virt` bindings; the only file that names `virt::`.
//! Checkpoint calls have no safe wrapper in `virt`, so they go through `virt::sys`
//! here, once, with their safety argued beside each call.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::path::PathBuf;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VState};
use virt::enumutil::Enum;
use virt::sys;

use super::{DomainInfo, DomainState, HvError, HvResult, Hypervisor, LiveDisk, Pool, Undefined};

/// A libvirt connection.
#[derive(Debug)]
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

fn err(op: impl Into<String>) -> impl FnOnce(virt::error::Error) -> HvError {
    let op = op.into();
    move |e| HvError {
        op,
        message: e.message().to_owned(),
    }
}

/// A disk name for a C call.
fn c_disk(op: &str, disk: &str) -> HvResult<std::ffi::CString> {
    std::ffi::CString::new(disk).map_err(|_| HvError {
        op: op.to_owned(),
        message: "disk name contains NUL".into(),
    })
}

fn state_of(d: &Domain) -> DomainState {
    match d.state() {
        Ok((Enum::Known(s), _)) => match s {
            VState::Running | VState::Blocked => DomainState::Running,
            VState::Paused | VState::PMSuspended => DomainState::Paused,
            VState::Shutoff => DomainState::ShutOff,
            VState::Shutdown => DomainState::Other("in shutdown"),
            VState::Crashed => DomainState::Other("crashed"),
            VState::NoState => DomainState::Other("no state"),
        },
        _ => DomainState::Other("unknown"),
    }
}

fn info(d: &Domain) -> HvResult<DomainInfo> {
    Ok(DomainInfo {
        name: d.name().map_err(err("domain name"))?,
        uuid: d.uuid_string().map_err(err("domain uuid"))?,
        state: state_of(d),
    })
}

impl Libvirt {
    /// Opens a read-write connection to `uri`.
    pub fn connect(uri: &str) -> HvResult<Self> {
        // libvirt's default handler prints every error to stderr; we report our own.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(err(format!("connecting to {uri}")))?;
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    /// Opens a read-only connection (listing, dry-run).
    pub fn connect_read_only(uri: &str) -> HvResult<Self> {
        virt::error::clear_error_callback();
        let conn =
            Connect::open_read_only(Some(uri)).map_err(err(format!("connecting to {uri}")))?;
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    fn domain(&self, name: &str) -> HvResult<Domain> {
        self.conn
            .lookup_domain_by_name(name)
            .map_err(err(format!("lookup {name}")))
    }
}

/// The block node of the running domain whose image file is `path`, from QMP
/// `query-block` (libvirt names nodes itself: `libvirt-3-format`).
fn node_of(query_block: &str, path: &std::path::Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(query_block).ok()?;
    let want = path.to_str()?;
    v["return"].as_array()?.iter().find_map(|dev| {
        let ins = &dev["inserted"];
        (ins["file"].as_str() == Some(want) || ins["image"]["filename"].as_str() == Some(want))
            .then(|| ins["node-name"].as_str().map(str::to_owned))
            .flatten()
    })
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn lookup(&self, name: &str) -> HvResult<Option<DomainInfo>> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => info(&d).map(Some),
            Err(e) if matches!(e.code(), Enum::Known(virt::error::ErrorNumber::NoDomain)) => {
                Ok(None)
            }
            Err(e) => Err(err(format!("lookup {name}"))(e)),
        }
    }

    fn domains(&self) -> HvResult<Vec<DomainInfo>> {
        let all = self.conn.list_all_domains(0).map_err(err("list domains"))?;
        all.iter().map(info).collect()
    }

    fn xml(&self, name: &str, inactive: bool) -> HvResult<String> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.domain(name)?
            .xml_desc(flags)
            .map_err(err(format!("dumpxml {name}")))
    }

    fn define(&self, xml: &str) -> HvResult<DomainInfo> {
        let d = self.conn.define_domain_xml(xml).map_err(err("define"))?;
        info(&d)
    }

    fn undefine(&self, name: &str) -> HvResult<Undefined> {
        let d = self.domain(name)?;
        let tries = [
            (
                sys::VIR_DOMAIN_UNDEFINE_NVRAM | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
                Undefined::NvramAndCheckpoints,
            ),
            (
                sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
                Undefined::Checkpoints,
            ),
            (sys::VIR_DOMAIN_UNDEFINE_NVRAM, Undefined::Nvram),
            (0, Undefined::Plain),
        ];
        // libvirt ≥ 8.9 deletes the swtpm state on undefine unless told to keep it
        // (the executor moved it aside first; KEEP_TPM keeps libvirt off whatever is
        // there). Older libvirt refuses the unknown flag: the same cascade without it.
        for keep_tpm in [sys::VIR_DOMAIN_UNDEFINE_KEEP_TPM, 0] {
            for (flags, outcome) in tries {
                if d.undefine_flags(flags | keep_tpm).is_ok() {
                    return Ok(outcome);
                }
            }
        }
        d.undefine().map_err(err(format!("undefine {name}")))?;
        Ok(Undefined::Plain)
    }

    fn undefine_keep_nvram(&self, name: &str) -> HvResult<()> {
        let d = self.domain(name)?;
        d.undefine_flags(
            sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
        )
        .or_else(|_| d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM))
        .map_err(err(format!("undefine {name}")))
    }

    fn start(&self, name: &str) -> HvResult<()> {
        self.domain(name)?
            .create()
            .map_err(err(format!("start {name}")))
    }

    fn destroy(&self, name: &str) -> HvResult<()> {
        self.domain(name)?
            .destroy()
            .map_err(err(format!("destroy {name}")))
    }

    fn flush_image(&self, name: &str, path: &std::path::Path) -> HvResult<()> {
        let d = self.domain(name)?;
        let op = format!("flush {name} {}", path.display());
        let q = d
            .qemu_monitor_command(r#"{"execute":"query-block"}"#, 0)
            .map_err(err(op.clone()))?;
        let node = node_of(&q, path).ok_or_else(|| HvError {
            op: op.clone(),
            message: "no block node of the domain has this image".into(),
        })?;
        // HMP qemu-io flush: bdrv_flush of the node, through the qcow2 layer (its
        // metadata caches) to the file; QMP has no plain flush command
        let cmd = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": format!("qemu-io {node} \"flush\"") },
        });
        let out = d
            .qemu_monitor_command(&cmd.to_string(), 0)
            .map_err(err(op.clone()))?;
        let said = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["return"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if said.to_ascii_lowercase().contains("error") {
            return Err(HvError {
                op,
                message: said.trim().to_owned(),
            });
        }
        Ok(())
    }

    fn guest_ping(&self, name: &str) -> HvResult<()> {
        self.domain(name)?
            .qemu_agent_command(r#"{"execute":"guest-ping"}"#, 2, 0)
            .map(|_| ())
            .map_err(err(format!("guest-ping {name}")))
    }

    fn screenshot(&self, name: &str) -> HvResult<(String, Vec<u8>)> {
        let op = format!("screenshot {name}");
        let d = self.domain(name)?;
        let stream = virt::stream::Stream::new(&self.conn, 0).map_err(err(op.clone()))?;
        let mime = d.screenshot(&stream, 0, 0).map_err(err(op.clone()))?;
        let mut data = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        // a screen is a few MiB at most; the cap bounds a misbehaving stream
        while data.len() < (64 << 20) {
            let n = stream.recv(&mut buf).map_err(err(op.clone()))?;
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        stream.finish().map_err(err(op))?;
        Ok((mime, data))
    }

    fn live_disks(&self) -> HvResult<Vec<LiveDisk>> {
        let mut out = Vec::new();
        for d in self.conn.list_all_domains(0).map_err(err("list domains"))? {
            let name = d.name().map_err(err("domain name"))?;
            let Ok(xml) = d.xml_desc(0) else { continue };
            let Ok(cfg) = nbdfmt::DomainConfig::parse(&xml) else {
                continue;
            };
            for disk in cfg.disks {
                if let Some(src) = disk.source {
                    out.push(LiveDisk {
                        domain: name.clone(),
                        target: disk.target,
                        path: PathBuf::from(src),
                        device: disk.device,
                    });
                }
            }
        }
        Ok(out)
    }

    fn active_pools(&self) -> HvResult<Vec<Pool>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(err("list pools"))?;
        let mut out = Vec::new();
        for p in pools {
            let name = p.name().map_err(err("pool name"))?;
            let Ok(xml) = p.xml_desc(0) else { continue };
            let Ok(doc) = roxmltree::Document::parse(&xml) else {
                continue;
            };
            let path = doc
                .root_element()
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
                .and_then(|n| n.text())
                .map(|t| PathBuf::from(t.trim()));
            if let Some(path) = path {
                out.push(Pool { name, path });
            }
        }
        Ok(out)
    }

    fn refresh_pool(&self, name: &str) -> HvResult<()> {
        let p = self
            .conn
            .lookup_storage_pool_by_name(name)
            .map_err(err(format!("pool {name}")))?;
        p.refresh(0).map_err(err(format!("pool-refresh {name}")))
    }

    fn checkpoints(&self, name: &str) -> HvResult<Vec<String>> {
        let d = self.domain(name)?;
        let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
        // SAFETY: `d` is a live domain handle; libvirt allocates `list` (n entries)
        // and hands ownership of the array and of each checkpoint reference to us.
        let n = unsafe { sys::virDomainListAllCheckpoints(d.as_ptr(), &mut list, 0) };
        if n < 0 {
            return Err(err(format!("checkpoint-list {name}"))(
                virt::error::Error::last_error(),
            ));
        }
        let mut names = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: i < n, so the slot is inside the array libvirt returned.
            let cp = unsafe { *list.add(i) };
            // SAFETY: `cp` is a valid checkpoint; the name string is owned by it and
            // copied before the checkpoint is freed.
            let cname = unsafe { sys::virDomainCheckpointGetName(cp) };
            if !cname.is_null() {
                // SAFETY: libvirt returns a NUL-terminated string.
                names.push(
                    unsafe { CStr::from_ptr(cname) }
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            // SAFETY: we own one reference to each listed checkpoint.
            unsafe { sys::virDomainCheckpointFree(cp) };
        }
        if !list.is_null() {
            // SAFETY: the array was malloc'ed by libvirt and is ours to free.
            unsafe { nix::libc::free(list.cast()) };
        }
        names.sort();
        Ok(names)
    }

    fn set_autostart(&self, name: &str, on: bool) -> HvResult<()> {
        self.domain(name)?
            .set_autostart(on)
            .map(|_| ())
            .map_err(err(format!("autostart {name}")))
    }

    fn create_transient(&self, xml: &str) -> HvResult<DomainInfo> {
        let d = self.conn.create_domain_xml(xml, 0).map_err(err("create"))?;
        info(&d)
    }

    fn is_persistent(&self, name: &str) -> HvResult<bool> {
        self.domain(name)?
            .is_persistent()
            .map_err(err(format!("dominfo {name}")))
    }

    fn block_pull(&self, name: &str, disk: &str) -> HvResult<()> {
        let d = self.domain(name)?;
        let op = format!("blockpull {name} {disk}");
        let c = c_disk(&op, disk)?;
        // SAFETY: `d` is a live domain handle and `c` a NUL-terminated string that
        // outlives the call; bandwidth 0 = unlimited, no flags.
        let rc = unsafe { sys::virDomainBlockPull(d.as_ptr(), c.as_ptr(), 0, 0) };
        if rc < 0 {
            return Err(err(op)(virt::error::Error::last_error()));
        }
        Ok(())
    }

    fn block_job(&self, name: &str, disk: &str) -> HvResult<Option<(u64, u64)>> {
        let d = self.domain(name)?;
        let op = format!("blockjob {name} {disk}");
        let c = c_disk(&op, disk)?;
        let mut ji = sys::virDomainBlockJobInfo {
            type_: 0,
            bandwidth: 0,
            cur: 0,
            end: 0,
        };
        // SAFETY: `d` is live, `c` NUL-terminated, `ji` a valid out-parameter that
        // libvirt fills when it returns 1.
        let rc = unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), c.as_ptr(), &mut ji, 0) };
        match rc {
            0 => Ok(None),
            1 => Ok(Some((ji.cur, ji.end))),
            _ => Err(err(op)(virt::error::Error::last_error())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM: &str = "<domain type='test'><name>hv-probe</name><memory>131072</memory><os><type>hvm</type></os>\
        <devices><disk type='file' device='disk'><source file='/tmp/hv-probe.qcow2'/><target dev='vda'/></disk></devices></domain>";

    /// Exercises the real bindings against libvirt's in-process test driver.
    #[test]
    fn test_driver_roundtrip() {
        let hv = Libvirt::connect("test:///default").expect("test driver is built into libvirt0");
        assert_eq!(hv.lookup("hv-probe-missing").expect("lookup"), None);
        let d = hv.define(DOM).expect("define");
        assert_eq!(d.name, "hv-probe");
        assert_eq!(d.state, DomainState::ShutOff);
        assert!(hv
            .xml("hv-probe", true)
            .expect("xml")
            .contains("/tmp/hv-probe.qcow2"));
        assert!(hv
            .live_disks()
            .expect("disks")
            .iter()
            .any(|l| l.domain == "hv-probe" && l.target == "vda"));
        hv.start("hv-probe").expect("start");
        assert_eq!(
            hv.lookup("hv-probe").expect("lookup").map(|i| i.state),
            Some(DomainState::Running)
        );
        assert!(hv.checkpoints("hv-probe").expect("checkpoints").is_empty());
        hv.destroy("hv-probe").expect("destroy");
        hv.undefine("hv-probe").expect("undefine");
        assert_eq!(hv.lookup("hv-probe").expect("lookup"), None);
        assert!(hv
            .active_pools()
            .expect("pools")
            .iter()
            .any(|p| p.name == "default-pool"));
    }
}
