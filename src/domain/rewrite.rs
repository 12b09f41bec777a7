//! Domain XML rewriting for DR and clone: quick-xml locates the elements to change,
//! and only those byte ranges are replaced, so everything else (namespaces,
//! `<qemu:commandline>`, metadata, comments, quoting) stays byte-identical.
//!
//! Pure `&str -> String`; no I/O, no libvirt.

use std::path::PathBuf;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// A rewrite failure (malformed XML), with the byte offset.
#[derive(Debug, thiserror::Error)]
#[error("domain XML is malformed at byte {offset}: {message}")]
pub struct DomXmlError {
    /// Byte offset in the input.
    pub offset: u64,
    /// Parser message.
    pub message: String,
}

/// Where a restored disk now lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRewrite {
    /// `<target dev>`.
    pub target: String,
    /// The restored image.
    pub path: PathBuf,
    /// Its format (`qcow2` or `raw`).
    pub format: String,
}

/// What to change.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// New domain `<name>` (clone).
    pub name: Option<String>,
    /// Remove `<uuid>` so libvirt assigns a new one (clone).
    pub drop_uuid: bool,
    /// Replace the domain `<uuid>` (DR re-injection).
    pub uuid: Option<String>,
    /// Remove every interface `<mac>` so libvirt generates new ones (clone).
    pub drop_macs: bool,
    /// Restored disks. Real disks (`device='disk'`) not listed here had no backup
    /// data and are removed, like optical drives, floppies, LUNs and network disks.
    pub disks: Vec<DiskRewrite>,
    /// New `<nvram>` path (clone).
    pub nvram: Option<String>,
}

/// One element: its byte range, and for start tags the range of the tag itself.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: usize,
    end: usize,
}

#[derive(Debug, Default)]
struct Disk {
    whole: Span,
    tag: Span,
    attrs: Vec<(String, String)>,
    target: Option<String>,
    sources: Vec<Span>,
    drivers: Vec<(Span, Vec<(String, String)>)>,
    backing: Vec<Span>,
}

/// The attributes of a tag that may be written again. Anything that would not come
/// back the same (a malformed attribute, a key that is not an XML name, an entity
/// other than the predefined ones) is an error at `offset`.
fn attrs(e: &BytesStart<'_>, offset: usize) -> Result<Vec<(String, String)>, DomXmlError> {
    let err = |message: String| DomXmlError {
        offset: offset as u64,
        message,
    };
    let is_name = |k: &str| {
        k.chars()
            .next()
            .is_some_and(|c| !c.is_ascii_digit() && !"-.".contains(c))
            && k.chars()
                .all(|c| c.is_alphanumeric() || "_:-.".contains(c) || !c.is_ascii())
    };
    e.attributes()
        .map(|a| {
            let a = a.map_err(|e| err(e.to_string()))?;
            let k = a.key.as_ref().to_owned();
            if !is_name(&k) {
                return Err(err(format!("attribute name {k:?}")));
            }
            #[allow(deprecated)]
            let v = a.unescape_value().map_err(|e| err(e.to_string()))?;
            Ok((k, v.into_owned()))
        })
        .collect()
}

/// Escapes text and attribute values. Tab, CR and LF become character references:
/// raw in an attribute value, a parser would read them back as spaces.
fn escape(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
}

fn tag(name: &str, attrs: &[(String, String)], empty: bool) -> String {
    let mut s = format!("<{name}");
    for (k, v) in attrs {
        s.push_str(&format!(" {k}='{}'", escape(v)));
    }
    s.push_str(if empty { "/>" } else { ">" });
    s
}

fn set_attr(attrs: &mut Vec<(String, String)>, key: &str, value: &str) {
    match attrs.iter_mut().find(|(k, _)| k == key) {
        Some(a) => a.1 = value.to_owned(),
        None => attrs.push((key.to_owned(), value.to_owned())),
    }
}

/// Applies `rw` to `xml`.
pub fn rewrite(xml: &str, rw: &Rewrite) -> Result<String, DomXmlError> {
    // quick-xml skips a byte-order mark without counting it in its positions.
    if let Some(rest) = xml.strip_prefix('\u{feff}') {
        let bom = xml.len() - rest.len();
        return match rewrite(rest, rw) {
            Ok(out) => Ok(format!("\u{feff}{out}")),
            Err(e) => Err(DomXmlError {
                offset: e.offset + bom as u64,
                ..e
            }),
        };
    }
    let mut reader = Reader::from_str(xml);
    // open elements: name, start of the start tag, start of the content
    let mut stack: Vec<(String, usize, usize)> = Vec::new();
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let mut disk: Option<Disk> = None;
    // source/backingStore inside a disk, or an interface mac: name, start, depth
    let mut open_child: Option<(String, usize, usize)> = None;
    let mut uuid_seen = false;
    let mut name_end: Option<usize> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let ev = reader.read_event().map_err(|e| DomXmlError {
            offset: reader.error_position(),
            message: e.to_string(),
        })?;
        let end = reader.buffer_position() as usize;
        let path: Vec<&str> = stack.iter().map(|(n, _, _)| n.as_str()).collect();
        match ev {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                let name = e.name().as_ref().to_owned();
                if let Some(d) = disk.as_mut() {
                    if path.len() == 3 {
                        match name.as_str() {
                            "target" => {
                                d.target = attrs(e, start)?
                                    .into_iter()
                                    .find(|(k, _)| k == "dev")
                                    .map(|(_, v)| v)
                            }
                            "driver" => d.drivers.push((Span { start, end }, attrs(e, start)?)),
                            "source" | "backingStore" => {
                                if empty {
                                    let s = Span { start, end };
                                    if name == "source" {
                                        d.sources.push(s)
                                    } else {
                                        d.backing.push(s)
                                    }
                                } else {
                                    open_child = Some((name.clone(), start, stack.len()));
                                }
                            }
                            _ => {}
                        }
                    }
                } else if path == ["domain", "devices"] && name == "disk" {
                    disk = Some(Disk {
                        whole: Span { start, end },
                        tag: Span { start, end },
                        attrs: attrs(e, start)?,
                        ..Disk::default()
                    });
                    if empty {
                        // <disk/> without children: nothing to restore into, drop it.
                        edits.push(removal(xml, start, end));
                        disk = None;
                    }
                } else if path == ["domain", "devices", "interface"]
                    && name == "mac"
                    && rw.drop_macs
                {
                    if empty {
                        edits.push(removal(xml, start, end));
                    } else {
                        open_child = Some(("mac".into(), start, stack.len()));
                    }
                } else if path == ["domain"] && name == "uuid" {
                    uuid_seen = true;
                    if empty && rw.drop_uuid {
                        edits.push(removal(xml, start, end));
                    } else if let (true, Some(u)) = (empty, &rw.uuid) {
                        edits.push((start, end, format!("<uuid>{}</uuid>", escape(u))));
                    }
                }
                if !empty {
                    stack.push((name, start, end));
                }
            }
            Event::End(ref e) => {
                let name = e.name().as_ref().to_owned();
                let Some((open, open_start, text_start)) = stack.pop() else {
                    return Err(DomXmlError {
                        offset: start as u64,
                        message: format!("unexpected </{name}>"),
                    });
                };
                let parent: Vec<&str> = stack.iter().map(|(n, _, _)| n.as_str()).collect();
                // Closes the open child itself, not a same-named element inside it
                // (a nested <backingStore> chain).
                if let Some((child, cs, depth)) = open_child.take() {
                    if stack.len() == depth {
                        let s = Span { start: cs, end };
                        match (child.as_str(), disk.as_mut()) {
                            ("source", Some(d)) => d.sources.push(s),
                            ("backingStore", Some(d)) => d.backing.push(s),
                            ("mac", _) => edits.push(removal(xml, cs, end)),
                            _ => {}
                        }
                    } else {
                        open_child = Some((child, cs, depth));
                    }
                }
                if open == "disk" && parent == ["domain", "devices"] {
                    if let Some(mut d) = disk.take() {
                        d.whole = Span {
                            start: d.whole.start,
                            end,
                        };
                        edits.extend(disk_edits(xml, &d, rw));
                    }
                } else if parent == ["domain"] && open == "name" {
                    name_end = Some(end);
                    if let Some(n) = &rw.name {
                        edits.push((text_start, start, escape(n)));
                    }
                } else if parent == ["domain"] && open == "uuid" {
                    if rw.drop_uuid {
                        edits.push(removal(xml, open_start, end));
                    } else if let Some(u) = &rw.uuid {
                        edits.push((text_start, start, escape(u)));
                    }
                } else if parent == ["domain", "os"] && open == "nvram" {
                    if let Some(n) = &rw.nvram {
                        edits.push((text_start, start, escape(n)));
                    }
                }
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(DomXmlError {
            offset: xml.len() as u64,
            message: format!("<{}> is not closed", stack[stack.len() - 1].0),
        });
    }
    // A UUID to re-inject into a domain that had none goes right after <name>
    // (instant boot places the TPM state under it before the domain starts).
    if let (false, false, Some(u), Some(at)) = (uuid_seen, rw.drop_uuid, &rw.uuid, name_end) {
        edits.push((at, at, format!("\n  <uuid>{}</uuid>", escape(u))));
    }
    // Insertions (empty ranges) before a replacement starting at the same byte.
    edits.sort_by_key(|e| (e.0, e.1));
    let mut out = String::with_capacity(xml.len());
    let mut pos = 0;
    for (s, e, r) in edits {
        if s < pos {
            continue; // inside a range already replaced (a removed disk)
        }
        out.push_str(&xml[pos..s]);
        out.push_str(&r);
        pos = e;
    }
    out.push_str(&xml[pos..]);
    Ok(out)
}

/// Removes `[start, end)` together with the indentation before it and its line break.
fn removal(xml: &str, start: usize, end: usize) -> (usize, usize, String) {
    let before = &xml[..start];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let s = if before[line_start..].chars().all(|c| c == ' ' || c == '\t') {
        line_start
    } else {
        start
    };
    let e = if xml[end..].starts_with('\n') {
        end + 1
    } else {
        end
    };
    (s, e, String::new())
}

fn disk_edits(xml: &str, d: &Disk, rw: &Rewrite) -> Vec<(usize, usize, String)> {
    let device = d
        .attrs
        .iter()
        .find(|(k, _)| k == "device")
        .map_or("disk", |(_, v)| v.as_str());
    let kind = d
        .attrs
        .iter()
        .find(|(k, _)| k == "type")
        .map_or("file", |(_, v)| v.as_str());
    let restored = d
        .target
        .as_deref()
        .and_then(|t| rw.disks.iter().find(|r| r.target == t));
    let Some(r) = restored.filter(|_| device == "disk" && kind != "network") else {
        // Optical drives, floppies, LUNs, network disks and disks without backup
        // data cannot be restored: drop them (the VM boots without them).
        return vec![removal(xml, d.whole.start, d.whole.end)];
    };
    let mut edits = Vec::new();
    if kind != "file" {
        let mut a = d.attrs.clone();
        set_attr(&mut a, "type", "file");
        edits.push((d.tag.start, d.tag.end, tag("disk", &a, false)));
    }
    for (span, attrs) in &d.drivers {
        let mut a = attrs.clone();
        set_attr(&mut a, "type", &r.format);
        let empty = xml[span.start..span.end].ends_with("/>");
        edits.push((span.start, span.end, tag("driver", &a, empty)));
    }
    let src = tag(
        "source",
        &[("file".to_owned(), r.path.to_string_lossy().into_owned())],
        true,
    );
    // One <source>: the first is replaced, any other removed.
    match d.sources.split_first() {
        Some((s, rest)) => {
            edits.push((s.start, s.end, src));
            edits.extend(rest.iter().map(|r| removal(xml, r.start, r.end)));
        }
        None => edits.push((d.tag.end, d.tag.end, src)),
    }
    for b in &d.backing {
        edits.push(removal(xml, b.start, b.end));
    }
    edits
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <description>a &lt;b&gt; &amp; &apos;c&apos;</description>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
  </os>
  <devices>
    <!-- keep me -->
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/vm1-vda.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/excluded.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-set'/>
    <qemu:arg value='a&amp;b'/>
  </qemu:commandline>
</domain>"#;

    fn disks() -> Vec<DiskRewrite> {
        vec![
            DiskRewrite {
                target: "vda".into(),
                path: "/r/vm1-vda.qcow2".into(),
                format: "qcow2".into(),
            },
            DiskRewrite {
                target: "vdb".into(),
                path: "/r/data".into(),
                format: "qcow2".into(),
            },
        ]
    }

    #[test]
    fn dr_keeps_identity_and_everything_else() {
        let out = rewrite(
            XML,
            &Rewrite {
                disks: disks(),
                ..Rewrite::default()
            },
        )
        .expect("ok");
        assert!(
            out.contains("<name>vm1</name>")
                && out.contains("<uuid>11111111-2222-3333-4444-555555555555</uuid>")
        );
        assert!(out.contains("<mac address='52:54:00:aa:bb:cc'/>"));
        assert!(out.contains("<source file='/r/vm1-vda.qcow2'/>"));
        assert!(out.contains("<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='/r/data'/>"));
        assert!(
            !out.contains("backingStore")
                && !out.contains("x.iso")
                && !out.contains("excluded.img")
        );
        // untouched parts are byte-identical
        for keep in [
            "<description>a &lt;b&gt; &amp; &apos;c&apos;</description>",
            "<!-- keep me -->",
            "<qemu:arg value='a&amp;b'/>",
            "<alias name='virtio-disk0'/>",
        ] {
            assert!(out.contains(keep), "{keep}");
        }
        roxmltree::Document::parse(&out).expect("well-formed");
        assert_eq!(
            rewrite(
                XML,
                &Rewrite {
                    disks: disks(),
                    ..Rewrite::default()
                }
            )
            .expect("ok"),
            out,
            "deterministic"
        );
    }

    #[test]
    fn clone_gets_new_identity() {
        let rw = Rewrite {
            name: Some("vm1-clone".into()),
            drop_uuid: true,
            drop_macs: true,
            disks: disks(),
            nvram: Some("/var/lib/libvirt/qemu/nvram/vm1-clone_VARS.fd".into()),
            uuid: None,
        };
        let out = rewrite(XML, &rw).expect("ok");
        assert!(out.contains("<name>vm1-clone</name>"));
        assert!(!out.contains("<uuid>") && !out.contains("52:54:00:aa:bb:cc"));
        assert!(out.contains("<nvram>/var/lib/libvirt/qemu/nvram/vm1-clone_VARS.fd</nvram>"));
        let doc = roxmltree::Document::parse(&out).expect("well-formed");
        assert_eq!(
            doc.descendants().filter(|n| n.has_tag_name("disk")).count(),
            2
        );
    }

    #[test]
    fn uuid_reinjection_and_errors() {
        let out = rewrite(
            XML,
            &Rewrite {
                uuid: Some("aaaa".into()),
                disks: disks(),
                ..Rewrite::default()
            },
        )
        .expect("ok");
        assert!(out.contains("<uuid>aaaa</uuid>"));
        // a domain without <uuid>, or with an empty one, gets the re-injected UUID
        let rw = Rewrite {
            uuid: Some("bbbb".into()),
            ..Rewrite::default()
        };
        let out = rewrite("<domain>\n  <name>x</name>\n</domain>", &rw).expect("ok");
        assert_eq!(
            out,
            "<domain>\n  <name>x</name>\n  <uuid>bbbb</uuid>\n</domain>"
        );
        let out = rewrite("<domain><name>x</name><uuid/></domain>", &rw).expect("ok");
        assert_eq!(out, "<domain><name>x</name><uuid>bbbb</uuid></domain>");
        assert!(rewrite("<domain><name>x</domain>", &Rewrite::default()).is_err());
        assert!(rewrite("<domain><name>x</name>", &Rewrite::default()).is_err());
    }

    // Found by the domxml fuzz target: a nested <backingStore> chain closed the outer
    // one early (malformed output); with two <source> children the other kept its old
    // path, and so did a second <driver> its format; a source inserted right before
    // <driver> was dropped; `&#10;` in a rewritten attribute came back as a space on
    // the next parse.
    #[test]
    fn nested_children_extra_sources_and_char_refs() {
        let xml = "<domain><devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/top.qcow2'><seclabel model='dac'/></source>
      <source file='/second.qcow2'/>
      <backingStore type='file' index='2'><source file='/mid'/>
        <backingStore type='file' index='1'><source file='/base'/><backingStore/></backingStore>
      </backingStore>
      <target dev='vda'/>
    </disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw' x='a&#10;b'/><driver/><target dev='vdb'/></disk>
  </devices></domain>";
        let rw = Rewrite {
            disks: disks(),
            ..Rewrite::default()
        };
        let out = rewrite(xml, &rw).expect("ok");
        let doc = roxmltree::Document::parse(&out).expect("well-formed");
        let files: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("source"))
            .filter_map(|n| n.attribute("file"))
            .collect();
        assert_eq!(files, ["/r/vm1-vda.qcow2", "/r/data"], "{out}");
        assert!(!out.contains("backingStore"), "{out}");
        assert!(
            out.contains("<driver name='qemu' type='qcow2' x='a&#10;b'/><driver type='qcow2'/>"),
            "{out}"
        );
        assert_eq!(rewrite(&out, &rw).expect("again"), out, "idempotent");
    }

    // Found by the domxml fuzz target: with a byte-order mark every edit landed three
    // bytes early; a child element in <uuid> (or <name>, <nvram>) made the replaced
    // content start after the child's start tag.
    #[test]
    fn byte_order_mark() {
        let rw = Rewrite {
            name: Some("new".into()),
            ..Rewrite::default()
        };
        let out = rewrite("\u{feff}<domain>\n  <name>old</name>\n</domain>", &rw).expect("ok");
        assert_eq!(out, "\u{feff}<domain>\n  <name>new</name>\n</domain>");
        let e = rewrite("\u{feff}<domain><name>x</domain>", &rw).expect_err("malformed");
        assert!(e.offset >= 3, "{e}");
        let out = rewrite("<domain><name><x></x>old</name></domain>", &rw).expect("ok");
        assert_eq!(out, "<domain><name>new</name></domain>");
        // a disk tag that is written again must have attributes that come back
        for bad in [
            "type='''=''' ",
            "type='block' a",
            "type='&x;'",
            "type='block' 1a='b'",
        ] {
            let xml = format!(
                "<domain><devices><disk {bad}><target dev='vda'/></disk></devices></domain>"
            );
            let e = rewrite(&xml, &Rewrite::default()).expect_err(bad);
            assert_eq!(e.offset, 17, "{e}");
        }
    }
}
