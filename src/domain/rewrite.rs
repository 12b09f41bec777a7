//! Domain XML rewriting for DR, clone and instant boot. roxmltree (which reads domain
//! XML everywhere else too) locates what to change, and only those byte ranges are
//! replaced: an attribute value, an element's content, a whole element, or an
//! insertion. Everything else (namespaces, `<qemu:commandline>`, metadata, comments,
//! quoting, the other attributes of an edited tag) stays byte-identical.
//!
//! Elements and attributes are matched by their name as written (`disk`, not
//! `x:disk`); attribute values are compared as parsed (references resolved,
//! whitespace normalized, as XML defines them). New values are escaped for either
//! quote. A byte-order mark stays (roxmltree's positions count it).
//!
//! What cannot be rewritten faithfully is an error, never changed silently: anything
//! roxmltree rejects, which includes a DTD (its entities could hide or rename
//! elements), an undefined entity, an undeclared namespace prefix, a document without
//! exactly one root element.
//!
//! Pure `&str -> String`; no I/O, no libvirt.

use std::ops::Range;
use std::path::PathBuf;

use roxmltree::{Attribute, Document, Node, TextPos};

/// A rewrite failure (malformed XML), with the byte offset.
#[derive(Debug, thiserror::Error)]
#[error("domain XML is malformed at byte {offset}: {message}")]
pub struct DomXmlError {
    /// Byte offset in the input: the start of the tag (comment, CDATA section,
    /// processing instruction, DOCTYPE) the parser stopped in, else where it stopped
    /// in text, or the end of the input when it ended early.
    pub offset: u64,
    /// Parser message (its `row:col`, if any, is the exact place).
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
    /// Test boot: every interface's link down, and no device that reaches into the
    /// host (shared filesystems, host devices, USB redirection, shared memory).
    pub isolate: bool,
    /// Test boot: the serial console is logged to this file (each `<serial>` gets a
    /// `<log>`; a domain without one gets a pty serial port).
    pub serial_log: Option<PathBuf>,
}

/// Devices a test boot removes: they share host files or hardware with the guest.
const HOST_DEVICES: [&str; 5] = ["filesystem", "hostdev", "redirdev", "smartcard", "shmem"];

/// Replace `[.0, .1)` of the input by `.2` (an empty range inserts).
type Edit = (usize, usize, String);

/// Applies `rw` to `xml`.
pub fn rewrite(xml: &str, rw: &Rewrite) -> Result<String, DomXmlError> {
    // Default options: a DTD is an error, so every node is real input text (no
    // entity expansions) and its range can be edited.
    let doc = Document::parse(xml).map_err(|e| parse_error(xml, &e))?;
    let root = doc.root_element();
    let mut edits = Vec::new();
    if qname(xml, root) == "domain" {
        domain_edits(xml, root, rw, &mut edits);
    }
    Ok(apply(xml, edits))
}

fn domain_edits(xml: &str, domain: Node<'_, '_>, rw: &Rewrite, edits: &mut Vec<Edit>) {
    let mut uuid_seen = false;
    // end of the last non-empty <name>
    let mut name_end = None;
    for child in elements(domain) {
        match qname(xml, child) {
            "name" => {
                if let Some(inner) = content(xml, child) {
                    name_end = Some(child.range().end);
                    edits.extend(rw.name.as_ref().map(|n| replace(inner, n)));
                }
            }
            "uuid" => {
                uuid_seen = true;
                edits.extend(uuid_edit(xml, child, rw));
            }
            "os" => {
                let nvram = elements(child).filter(|n| qname(xml, *n) == "nvram");
                for inner in nvram.filter_map(|n| content(xml, n)) {
                    edits.extend(rw.nvram.as_ref().map(|p| replace(inner.clone(), p)));
                }
            }
            "devices" => device_edits(xml, child, rw, edits),
            _ => {}
        }
    }
    // A UUID to re-inject into a domain that had none goes right after <name>
    // (instant boot places the TPM state under it before the domain starts).
    if let (false, false, Some(u), Some(at)) = (uuid_seen, rw.drop_uuid, &rw.uuid, name_end) {
        edits.push((at, at, format!("\n  <uuid>{}</uuid>", escape(u))));
    }
}

/// Drops or replaces a domain `<uuid>`; an empty `<uuid/>` gets content.
fn uuid_edit(xml: &str, uuid: Node<'_, '_>, rw: &Rewrite) -> Option<Edit> {
    if rw.drop_uuid {
        return Some(removal(xml, uuid.range()));
    }
    let u = rw.uuid.as_ref()?;
    Some(match content(xml, uuid) {
        Some(inner) => replace(inner, u),
        None => {
            let r = uuid.range();
            (r.start, r.end, format!("<uuid>{}</uuid>", escape(u)))
        }
    })
}

fn device_edits(xml: &str, devices: Node<'_, '_>, rw: &Rewrite, edits: &mut Vec<Edit>) {
    let mut serials = 0;
    for device in elements(devices) {
        match qname(xml, device) {
            "disk" => edits.extend(disk_edits(xml, device, rw)),
            "interface" => {
                if rw.drop_macs {
                    let macs = elements(device).filter(|m| qname(xml, *m) == "mac");
                    edits.extend(macs.map(|m| removal(xml, m.range())));
                }
                if rw.isolate {
                    edits.extend(child_replaced(xml, device, "link", "<link state='down'/>"));
                }
            }
            // a test boot's console is its own: a pty logged to our file (a serial
            // `file` or socket of the original would be shared with it, or busy)
            "serial" => {
                serials += 1;
                if let Some(log) = &rw.serial_log {
                    let r = device.range();
                    edits.push(if serials == 1 {
                        (r.start, r.end, pty_serial(log))
                    } else {
                        removal(xml, r)
                    });
                }
            }
            "console"
                if rw.serial_log.is_some()
                    && attr(xml, device, "type").is_some_and(|t| t.value() != "pty") =>
            {
                edits.push(removal(xml, device.range()));
            }
            d if rw.isolate && HOST_DEVICES.contains(&d) => {
                edits.push(removal(xml, device.range()));
            }
            _ => {}
        }
    }
    if let (0, Some(log)) = (serials, &rw.serial_log) {
        edits.extend(before_close(
            xml,
            devices,
            &format!("  {}\n  ", pty_serial(log)),
        ));
    }
}

/// A pty serial port 0 whose output is logged to `log`.
fn pty_serial(log: &std::path::Path) -> String {
    format!(
        "<serial type='pty'><log file='{}' append='off'/><target port='0'/></serial>",
        escape(&log.to_string_lossy())
    )
}

/// Every `<name>` child of `n` removed and `markup` inserted as its first child
/// (an empty-element tag `<x .../>` is opened for it).
fn child_replaced(xml: &str, n: Node<'_, '_>, name: &str, markup: &str) -> Vec<Edit> {
    let mut edits: Vec<Edit> = children(xml, n, name)
        .map(|c| removal(xml, c.range()))
        .collect();
    let r = n.range();
    if xml[..r.end].ends_with("/>") {
        let close = format!(">{markup}</{}>", qname(xml, n));
        edits.push((r.end - 2, r.end, close));
    } else {
        let at = start_tag_end(xml, n);
        edits.push((at, at, markup.to_owned()));
    }
    edits
}

/// `markup` inserted right before the end tag of `n` (none for `<n/>`).
fn before_close(xml: &str, n: Node<'_, '_>, markup: &str) -> Option<Edit> {
    let r = n.range();
    let close = format!("</{}>", qname(xml, n));
    xml[..r.end]
        .ends_with(&close)
        .then(|| (r.end - close.len(), r.end - close.len(), markup.to_owned()))
}

fn disk_edits(xml: &str, disk: Node<'_, '_>, rw: &Rewrite) -> Vec<Edit> {
    let device = attr(xml, disk, "device").map_or("disk", |a| a.value());
    let kind = attr(xml, disk, "type");
    let network = kind.is_some_and(|k| k.value() == "network");
    // the last <target> counts
    let target = children(xml, disk, "target")
        .last()
        .and_then(|t| attr(xml, t, "dev"));
    let restored = target.and_then(|t| rw.disks.iter().find(|r| r.target == t.value()));
    let Some(r) = restored.filter(|_| device == "disk" && !network) else {
        // Optical drives, floppies, LUNs, network disks and disks without backup
        // data cannot be restored: drop them (the VM boots without them).
        return vec![removal(xml, disk.range())];
    };
    let mut edits: Vec<Edit> = kind
        .and_then(|k| set_value(xml, k, "file"))
        .into_iter()
        .collect();
    for driver in children(xml, disk, "driver") {
        edits.extend(match attr(xml, driver, "type") {
            Some(t) => set_value(xml, t, &r.format),
            None => {
                let at = attrs_end(xml, driver);
                Some((at, at, format!(" type='{}'", escape(&r.format))))
            }
        });
    }
    let src = format!("<source file='{}'/>", escape(&r.path.to_string_lossy()));
    // One <source>: the first is replaced, any other removed.
    let mut sources = children(xml, disk, "source");
    match sources.next() {
        Some(s) => edits.push((s.range().start, s.range().end, src)),
        None => {
            let at = start_tag_end(xml, disk);
            edits.push((at, at, src));
        }
    }
    edits.extend(sources.map(|s| removal(xml, s.range())));
    edits.extend(children(xml, disk, "backingStore").map(|b| removal(xml, b.range())));
    edits
}

/// Applies `edits` (each once, in input order) to `xml`.
fn apply(xml: &str, mut edits: Vec<Edit>) -> String {
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
    out
}

/// Removes `range` together with the indentation before it and its line break.
fn removal(xml: &str, range: Range<usize>) -> Edit {
    let before = &xml[..range.start];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let s = if before[line_start..].chars().all(|c| c == ' ' || c == '\t') {
        line_start
    } else {
        range.start
    };
    let e = if xml[range.end..].starts_with('\n') {
        range.end + 1
    } else {
        range.end
    };
    (s, e, String::new())
}

/// Replaces an element's content.
fn replace(inner: Range<usize>, value: &str) -> Edit {
    (inner.start, inner.end, escape(value))
}

/// Sets an attribute's value (between its quotes), unless it already has it.
fn set_value(xml: &str, a: Attribute<'_, '_>, value: &str) -> Option<Edit> {
    if a.value() == value {
        return None;
    }
    // Not `range_value()`: it saturates for over 255 spaces around the `=`. The
    // name and the `=` contain no quote, so the value starts after the first one.
    let r = a.range();
    let quote = xml[..r.end].chars().next_back()?;
    let start = r.start + xml[r.clone()].find(quote)? + 1;
    Some((start, r.end - 1, escape(value)))
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

/// The child elements of `n`.
fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(Node::is_element)
}

/// The child elements of `n` named `name` as written.
fn children<'a, 'i: 'a>(
    xml: &'a str,
    n: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    elements(n).filter(move |c| qname(xml, *c) == name)
}

/// An element's name as written (`qemu:arg`), from its start tag.
fn qname<'x>(xml: &'x str, n: Node<'_, '_>) -> &'x str {
    let s = &xml[n.range().start + 1..];
    let end = s
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .unwrap_or(s.len());
    &s[..end]
}

/// The attribute of `n` named `name` as written (`type`, not `x:type`; namespace
/// declarations are not attributes for roxmltree and never match).
fn attr<'a, 'i>(xml: &str, n: Node<'a, 'i>, name: &str) -> Option<Attribute<'a, 'i>> {
    n.attributes().find(|a| {
        let s = &xml[a.range()];
        s.split(|c: char| c == '=' || c.is_ascii_whitespace())
            .next()
            == Some(name)
    })
}

/// The end of an element's start tag (after its `>`).
fn start_tag_end(xml: &str, n: Node<'_, '_>) -> usize {
    let start = n.range().start;
    // roxmltree accepted the tag, so it ends; the fallback is never taken
    start + tag_len(&xml[start..]).unwrap_or(0)
}

/// Where an attribute appended to an element's start tag goes: after the last
/// attribute or namespace declaration, before any space and `/>` or `>`.
fn attrs_end(xml: &str, n: Node<'_, '_>) -> usize {
    let tag = &xml[n.range().start..start_tag_end(xml, n)];
    let body = tag.strip_suffix('>').unwrap_or(tag);
    let body = body.strip_suffix('/').unwrap_or(body);
    n.range().start + body.trim_end().len()
}

/// An element's content range; `None` for `<x/>`.
fn content(xml: &str, n: Node<'_, '_>) -> Option<Range<usize>> {
    let start = start_tag_end(xml, n);
    if xml[..start].ends_with("/>") {
        return None;
    }
    // An end tag contains no `<`, so the last `</` of the element starts it.
    let end = xml[..n.range().end].rfind("</")?;
    Some(start..end)
}

/// The length of the tag starting `s`, up to and including its `>` (quoted
/// attribute values skipped); `None` when it does not end.
fn tag_len(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, b) in s.bytes().enumerate() {
        match (quote, b) {
            (None, b'>') => return Some(i + 1),
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), _) if q == b => quote = None,
            _ => {}
        }
    }
    None
}

/// The markup of `xml` (tags, comments, CDATA sections, processing instructions,
/// DOCTYPE) in order, as `(start, end)`; `end` is `None` for markup left open, which
/// ends the iteration.
fn markup(xml: &str) -> impl Iterator<Item = (usize, Option<usize>)> + '_ {
    const DELIMITED: [(&str, &str); 3] = [("<!--", "-->"), ("<![CDATA[", "]]>"), ("<?", "?>")];
    let mut from = Some(0);
    std::iter::from_fn(move || {
        let start = from? + xml[from?..].find('<')?;
        let rest = &xml[start..];
        let len = match DELIMITED.iter().find(|(open, _)| rest.starts_with(open)) {
            Some((open, close)) => rest[open.len()..]
                .find(close)
                .map(|i| open.len() + i + close.len()),
            None => tag_len(rest),
        };
        from = len.map(|l| start + l);
        Some((start, from))
    })
}

/// The error at the start of the markup the parser stopped in, like quick-xml (which
/// this module used before) reported it: a tag with a bad attribute is reported at
/// its `<`.
fn parse_error(xml: &str, e: &roxmltree::Error) -> DomXmlError {
    use roxmltree::Error as E;
    let offset = match e {
        // reported at 1:1
        E::NoRootNode | E::UnclosedRootNode | E::UnexpectedEndOfStream => xml.len(),
        E::DtdDetected => markup(xml)
            .find(|(s, _)| xml[*s..].starts_with("<!DOCTYPE"))
            .map_or(0, |(s, _)| s),
        _ => {
            let at = byte_offset(xml, e.pos());
            markup(xml)
                .take_while(|(s, _)| *s <= at)
                .find(|(_, end)| end.is_none_or(|end| at < end))
                .map_or(at, |(s, _)| s)
        }
    };
    DomXmlError {
        offset: offset as u64,
        message: e.to_string(),
    }
}

/// The byte offset of roxmltree's `row:col` (1-based; rows end at `\n`, columns
/// count characters, a byte-order mark included).
fn byte_offset(xml: &str, pos: TextPos) -> usize {
    let rows = pos.row.saturating_sub(1) as usize;
    let line: usize = xml.split_inclusive('\n').take(rows).map(str::len).sum();
    let rest = &xml[line..];
    let col = pos.col.saturating_sub(1) as usize;
    line + rest.char_indices().nth(col).map_or(rest.len(), |(i, _)| i)
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
    fn test_boot_isolates_and_logs_the_console() {
        let xml = "<domain type='kvm'><name>v</name><devices>\n\
            <interface type='network'><mac address='52:54:00:00:00:01'/><link state='up'/><source network='default'/></interface>\n\
            <filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>\n\
            <hostdev mode='subsystem' type='usb'/>\n\
            <serial type='pty'/>\n\
            </devices></domain>";
        let rw = Rewrite {
            isolate: true,
            serial_log: Some("/var/tmp/t/console.log".into()),
            ..Rewrite::default()
        };
        let out = rewrite(xml, &rw).expect("ok");
        let doc = roxmltree::Document::parse(&out).expect("well-formed");
        let links: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("link"))
            .collect();
        assert_eq!(links.len(), 1, "{out}");
        assert_eq!(links[0].attribute("state"), Some("down"));
        assert!(
            !out.contains("<filesystem") && !out.contains("<hostdev"),
            "{out}"
        );
        let log = doc
            .descendants()
            .find(|n| n.has_tag_name("log"))
            .expect("log");
        assert_eq!(log.attribute("file"), Some("/var/tmp/t/console.log"));
        assert_eq!(log.parent().map(|p| p.tag_name().name()), Some("serial"));
        // no serial port at all: one is added, with the log
        let bare = "<domain><name>v</name><devices>\n  <disk type='file' device='cdrom'/>\n</devices></domain>";
        let out = rewrite(bare, &rw).expect("ok");
        let doc = roxmltree::Document::parse(&out).expect("well-formed");
        let serial = doc
            .descendants()
            .find(|n| n.has_tag_name("serial"))
            .expect("serial");
        assert_eq!(serial.attribute("type"), Some("pty"));
        assert!(serial.children().any(|c| c.has_tag_name("log")), "{out}");
    }

    #[test]
    fn clone_gets_new_identity() {
        let rw = Rewrite {
            name: Some("vm1-clone".into()),
            drop_uuid: true,
            drop_macs: true,
            disks: disks(),
            nvram: Some("/var/lib/libvirt/qemu/nvram/vm1-clone_VARS.fd".into()),
            ..Rewrite::default()
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

    // Only the changed bytes are replaced: the other attributes of an edited tag keep
    // their quoting and spacing (quick-xml wrote the whole tag again), and a namespace
    // declaration with a `>` in it does not end the tag.
    #[test]
    fn edits_keep_the_rest_of_a_tag() {
        let xml = "<domain><devices>\n    <disk type=\"block\"  device='disk' xmlns:x='a>b'>\
                   <driver name=\"qemu\"\tcache='none' /><driver type = \"raw\"/>\
                   <target dev='vda'/></disk>\n  </devices></domain>";
        let out = rewrite(
            xml,
            &Rewrite {
                disks: disks(),
                ..Rewrite::default()
            },
        )
        .expect("ok");
        assert_eq!(
            out,
            "<domain><devices>\n    <disk type=\"file\"  device='disk' xmlns:x='a>b'>\
             <source file='/r/vm1-vda.qcow2'/>\
             <driver name=\"qemu\"\tcache='none' type='qcow2' /><driver type = \"qcow2\"/>\
             <target dev='vda'/></disk>\n  </devices></domain>"
        );
        // more than 255 spaces around `=` (roxmltree's `range_value` saturates there)
        let pad = " ".repeat(300);
        let xml = format!(
            "<domain><devices><disk type{pad}={pad}'block'><target dev='vdb'/></disk></devices></domain>"
        );
        let out = rewrite(
            &xml,
            &Rewrite {
                disks: disks(),
                ..Rewrite::default()
            },
        )
        .expect("ok");
        assert_eq!(
            out,
            xml.replace("'block'>", "'file'><source file='/r/data'/>")
        );
    }

    // roxmltree is stricter than quick-xml was. What it rejects is an error, never
    // rewritten: a DTD (quick-xml skipped it, and an element hidden in an entity was
    // left alone), an undefined entity or a bad character reference anywhere
    // (quick-xml checked only the attributes it wrote again), an undeclared namespace
    // prefix, a bad attribute on any tag, a second root, input without an element
    // (quick-xml returned it unchanged). The offset is the start of the markup the
    // parser stopped in, the place in text, or the end of the input.
    #[test]
    fn rejected_input_and_offsets() {
        for (xml, offset) in [
            (
                "<!DOCTYPE domain [<!ENTITY d '<disk/>'>]>\n<domain>&d;</domain>",
                0,
            ),
            ("<!-- <!DOCTYPE x> -->\n<!DOCTYPE domain>\n<domain/>", 22),
            ("<domain>\n  <name>&unknown;</name>\n</domain>", 17),
            ("<domain><name>&#0;</name></domain>", 14),
            ("<domain><qemu:commandline/></domain>", 8),
            ("<domain>\n  <é>ü</é><x a='1' a='2'/>\n</domain>", 22),
            ("<domain>\n  <é>ü</é><!-- a -- b -->\n</domain>", 22),
            ("<domain/>\n<domain/>", 10),
            ("<domain><disk", 13),
            ("", 0),
            ("<!-- only -->", 13),
        ] {
            let e = rewrite(xml, &Rewrite::default()).expect_err(xml);
            assert_eq!(e.offset, offset, "{xml:?}: {e}");
        }
    }
}
