//! Read-only views of the XML side files: `vmconfig.<ident>.xml` (the domain as
//! libvirt returned it) and `checkpoints/virtnbdbackup.N.xml`.

use crate::error::{Error, ErrorKind, Result};

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// `device` attribute (`disk` when absent; `cdrom`, `floppy`, `lun`).
    pub device: String,
    /// `type` attribute (`file`, `block`, `volume`, `network`).
    pub kind: String,
    /// `<target dev>`.
    pub target: String,
    /// `<target bus>`.
    pub bus: Option<String>,
    /// `<driver type>` (`qcow2`, `raw`).
    pub driver_type: Option<String>,
    /// `<source file>` or `<source dev>`.
    pub source: Option<String>,
    /// `<source pool>` / `<source volume>` for volume disks.
    pub pool: Option<String>,
    /// Volume name.
    pub volume: Option<String>,
}

impl DiskConfig {
    /// True for a real disk (not an optical drive, floppy or passthrough LUN).
    pub fn is_disk(&self) -> bool {
        self.device == "disk"
    }
}

/// What vmrestore needs from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainConfig {
    /// Domain `<name>`.
    pub name: Option<String>,
    /// Domain `<uuid>`.
    pub uuid: Option<String>,
    /// Disks in document order.
    pub disks: Vec<DiskConfig>,
    /// `<os><nvram>` path.
    pub nvram: Option<String>,
    /// True when `<nvram>` holds elements (libvirt's `<source file=…/>` form) rather
    /// than its path as text.
    pub nvram_elements: bool,
    /// `<os><loader>` path.
    pub loader: Option<String>,
    /// MAC addresses of the interfaces.
    pub macs: Vec<String>,
    /// True when the domain has a `<tpm>` device.
    pub has_tpm: bool,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn xml_error(e: &roxmltree::Error) -> Error {
    let pos = e.pos();
    Error::new(ErrorKind::BadSidecar {
        offset: 0,
        reason: format!("XML error at line {} column {}: {e}", pos.row, pos.col),
    })
}

impl DomainConfig {
    /// Parses domain XML text.
    pub fn parse(xml: &str) -> Result<Self> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| xml_error(&e))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(Error::new(ErrorKind::BadSidecar {
                offset: 0,
                reason: format!(
                    "root element is <{}>, expected <domain>",
                    root.tag_name().name()
                ),
            }));
        }
        let text = |n: Option<roxmltree::Node<'_, '_>>| {
            n.and_then(|n| n.text())
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        };
        let mut cfg = Self {
            name: text(child(root, "name")),
            uuid: text(child(root, "uuid")),
            ..Self::default()
        };
        if let Some(os) = child(root, "os") {
            cfg.nvram = text(child(os, "nvram"));
            cfg.nvram_elements =
                child(os, "nvram").is_some_and(|n| n.children().any(|c| c.is_element()));
            cfg.loader = text(child(os, "loader"));
        }
        if let Some(devices) = child(root, "devices") {
            for dev in devices.children().filter(roxmltree::Node::is_element) {
                match dev.tag_name().name() {
                    "disk" => {
                        let target = child(dev, "target");
                        let source = child(dev, "source");
                        let Some(t) = target.and_then(|t| t.attribute("dev")) else {
                            continue;
                        };
                        cfg.disks.push(DiskConfig {
                            device: dev.attribute("device").unwrap_or("disk").to_owned(),
                            kind: dev.attribute("type").unwrap_or("file").to_owned(),
                            target: t.to_owned(),
                            bus: target.and_then(|t| t.attribute("bus")).map(str::to_owned),
                            driver_type: child(dev, "driver")
                                .and_then(|d| d.attribute("type"))
                                .map(str::to_owned),
                            source: source
                                .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                                .map(str::to_owned),
                            pool: source.and_then(|s| s.attribute("pool")).map(str::to_owned),
                            volume: source
                                .and_then(|s| s.attribute("volume"))
                                .map(str::to_owned),
                        });
                    }
                    "interface" => {
                        if let Some(m) = child(dev, "mac").and_then(|m| m.attribute("address")) {
                            cfg.macs.push(m.to_owned());
                        }
                    }
                    "tpm" => cfg.has_tpm = true,
                    _ => {}
                }
            }
        }
        Ok(cfg)
    }

    /// Targets of real disks (`device='disk'`), in document order.
    pub fn disk_targets(&self) -> Vec<&str> {
        self.disks
            .iter()
            .filter(|d| d.is_disk())
            .map(|d| d.target.as_str())
            .collect()
    }

    /// The disk with this target.
    pub fn disk(&self, target: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|d| d.target == target)
    }
}

/// What a libvirt checkpoint XML says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointConfig {
    /// `<name>`.
    pub name: Option<String>,
    /// `<parent><name>`.
    pub parent: Option<String>,
    /// `<creationTime>` (epoch seconds).
    pub creation_time: Option<u64>,
    /// Disks with `checkpoint='bitmap'`.
    pub disks: Vec<String>,
}

impl CheckpointConfig {
    /// Parses checkpoint XML text.
    pub fn parse(xml: &str) -> Result<Self> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| xml_error(&e))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domaincheckpoint" {
            return Err(Error::new(ErrorKind::BadSidecar {
                offset: 0,
                reason: format!(
                    "root element is <{}>, expected <domaincheckpoint>",
                    root.tag_name().name()
                ),
            }));
        }
        let text = |n: Option<roxmltree::Node<'_, '_>>| {
            n.and_then(|n| n.text()).map(|t| t.trim().to_owned())
        };
        let disks = child(root, "disks")
            .map(|d| {
                d.children()
                    .filter(|c| c.is_element() && c.attribute("checkpoint") == Some("bitmap"))
                    .filter_map(|c| c.attribute("name").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            name: text(child(root, "name")),
            parent: child(root, "parent").and_then(|p| text(child(p, "name"))),
            creation_time: text(child(root, "creationTime")).and_then(|t| t.parse().ok()),
            disks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_disks_and_identity() {
        let xml = r#"<domain type='kvm' id='3'><name>vm1</name><uuid>1234</uuid>
          <os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram></os>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/vm1-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sdb' bus='sata'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vdc' bus='virtio'/></disk>
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/></interface>
            <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
          </devices></domain>"#;
        let d = DomainConfig::parse(xml).expect("valid");
        assert_eq!(d.name.as_deref(), Some("vm1"));
        assert_eq!(d.disk_targets(), vec!["vda", "vdc"]);
        assert_eq!(
            d.disk("vdc").and_then(|x| x.source.as_deref()),
            Some("/dev/vg/lv")
        );
        assert_eq!(
            d.nvram.as_deref(),
            Some("/var/lib/libvirt/qemu/nvram/vm1_VARS.fd")
        );
        assert_eq!(d.macs, vec!["52:54:00:aa:bb:cc"]);
        assert!(d.has_tpm);
        assert!(DomainConfig::parse("<domain>").is_err());
        assert!(DomainConfig::parse("<pool/>").is_err());
    }

    #[test]
    fn checkpoint_xml() {
        let xml = "<domaincheckpoint><name>virtnbdbackup.1</name><parent><name>virtnbdbackup.0</name></parent>\
                   <creationTime>1795665952</creationTime><disks><disk name='vda' checkpoint='bitmap'/><disk name='sdb' checkpoint='no'/></disks></domaincheckpoint>";
        let c = CheckpointConfig::parse(xml).expect("valid");
        assert_eq!(c.parent.as_deref(), Some("virtnbdbackup.0"));
        assert_eq!(c.creation_time, Some(1_795_665_952));
        assert_eq!(c.disks, vec!["vda"]);
    }
}
