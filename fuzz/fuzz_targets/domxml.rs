//! Domain XML rewriting for DR and clone (`vmrestore::domain::rewrite::rewrite`).
//!
//! Input: 3 bytes that pick the rewrite (flags, which disk targets were restored,
//! parameter variant), then the domain XML. Checks on an accepted rewrite:
//! - the output parses again with quick-xml (and with roxmltree when the input did);
//! - it is idempotent: rewriting the output again gives the output;
//! - a new name / uuid / nvram is the whole content of every `<name>` / `<uuid>` /
//!   `<nvram>` it replaces; a clone keeps no `<uuid>` and no interface `<mac>`;
//!   a DR rewrite keeps as many as it had;
//! - every remaining disk is a file disk (`device='disk'`) of a restored target, with
//!   exactly one `<source file>`, the restored image under the restore directory, no
//!   `<backingStore>`, and its `<driver type>` the restored format;
//! - the output and the heap stay within a small multiple of the input.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use nbdfmt_fuzz::{heap_use, reset, CountingAlloc};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use vmrestore::domain::rewrite::{rewrite, DiskRewrite, Rewrite};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const TARGETS: [&str; 8] = ["vda", "vdb", "vdc", "sda", "sdb", "hda", "fda", "a&b'\"<"];
const NAMES: [&str; 4] = ["vm1-clone", "a&b<c>'\"]]>", "", "клон ü"];
const UUIDS: [&str; 2] = ["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "<&'\">"];
const NVRAMS: [&str; 2] = ["/var/lib/libvirt/qemu/nvram/c_VARS.fd", "/n v&r<a>m'\""];
const RESTORE_DIRS: [&str; 2] = ["/restore/dir", "/r e&s<t>'\"/d"];
const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// What `rewrite` writes for a text value (the product's escaping is part of the
/// contract checked here: it must give back the same value when parsed).
fn escaped(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// One parsed element: qualified name, attributes (as the product reads them), raw
/// content bytes between its tags (`None` for `<x/>`), children.
#[derive(Debug)]
struct Node {
    name: String,
    attrs: Vec<(String, String)>,
    inner: Option<(usize, usize)>,
    children: Vec<Node>,
}

impl Node {
    fn new(e: &BytesStart<'_>) -> Self {
        Node {
            name: e.name().as_ref().to_owned(),
            attrs: e
                .attributes()
                .flatten()
                .map(|a| {
                    let k = a.key.as_ref().to_owned();
                    #[allow(deprecated)]
                    let v = a
                        .unescape_value()
                        .map(|v| v.into_owned())
                        .unwrap_or_default();
                    (k, v)
                })
                .collect(),
            inner: None,
            children: Vec::new(),
        }
    }

    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    fn kids<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// The top-level elements of `xml`, or `None` when quick-xml rejects it (an error or
/// an unclosed element).
fn parse(xml: &str) -> Option<Vec<Node>> {
    // quick-xml skips a byte-order mark without counting it in its positions
    let body = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let bom = xml.len() - body.len();
    let mut reader = Reader::from_str(body);
    let mut stack: Vec<Node> = Vec::new();
    let mut top = Vec::new();
    loop {
        let start = reader.buffer_position() as usize + bom;
        let ev = reader.read_event().ok()?;
        let end = reader.buffer_position() as usize + bom;
        match ev {
            Event::Eof => break,
            Event::Start(ref e) => {
                let mut n = Node::new(e);
                n.inner = Some((end, end));
                stack.push(n);
            }
            Event::Empty(ref e) => {
                let n = Node::new(e);
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => top.push(n),
                }
            }
            Event::End(_) => {
                let mut n = stack.pop()?;
                if let Some((s, _)) = n.inner {
                    n.inner = Some((s, start));
                }
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => top.push(n),
                }
            }
            _ => {}
        }
    }
    stack.is_empty().then_some(top)
}

fn domains(top: &[Node]) -> impl Iterator<Item = &Node> {
    top.iter().filter(|n| n.name == "domain")
}

/// `(domain, child name, grandchild name)` elements, counted.
fn count(top: &[Node], path: &[&str]) -> usize {
    fn walk(n: &Node, path: &[&str]) -> usize {
        match path.split_first() {
            None => 1,
            Some((first, rest)) => n.kids(first).map(|c| walk(c, rest)).sum(),
        }
    }
    domains(top).map(|d| walk(d, path)).sum()
}

fn decode(data: &[u8]) -> Option<(Rewrite, PathBuf, String)> {
    let (&[flags, mask, variant], rest) = data.split_first_chunk::<3>()?;
    let xml = String::from_utf8_lossy(rest).into_owned();
    let v = usize::from(variant);
    let dir = PathBuf::from(RESTORE_DIRS[v % 2]);
    let disks = TARGETS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(i, t)| DiskRewrite {
            target: (*t).to_owned(),
            path: dir.join(format!("{t}-{i}.img")),
            format: FORMATS[(v >> 1 ^ i) % 2].to_owned(),
        })
        .collect();
    let rw = Rewrite {
        name: (flags & 1 != 0).then(|| NAMES[(v >> 2) % NAMES.len()].to_owned()),
        drop_uuid: flags & 2 != 0,
        uuid: (flags & 4 != 0).then(|| UUIDS[(v >> 4) % 2].to_owned()),
        drop_macs: flags & 8 != 0,
        disks,
        nvram: (flags & 16 != 0).then(|| NVRAMS[(v >> 5) % 2].to_owned()),
        ..Rewrite::default()
    };
    Some((rw, dir, xml))
}

fn check_output(xml: &str, out: &str, rw: &Rewrite, dir: &Path) {
    // quick-xml accepted the input (rewrite did), so it must accept the output.
    let Some(before) = parse(xml) else {
        panic!("rewrite accepted what quick-xml rejects")
    };
    let Some(after) = parse(out) else {
        panic!("output is not well-formed for quick-xml:\n{out}")
    };
    if roxmltree::Document::parse(xml).is_ok() {
        if let Err(e) = roxmltree::Document::parse(out) {
            panic!("well-formed input, malformed output ({e}):\n{out}");
        }
    }

    let inner = |n: &Node| n.inner.map(|(s, e)| &out[s..e]);
    let replaced = |path: &[&str], value: &Option<String>| {
        let Some(v) = value else { return };
        let want = escaped(v);
        let (parent, leaf) = path.split_at(path.len() - 1);
        let mut nodes: Vec<&Node> = domains(&after).collect();
        for p in parent {
            nodes = nodes.iter().flat_map(|n| n.kids(p)).collect();
        }
        for n in nodes.iter().flat_map(|n| n.kids(leaf[0])) {
            if let Some(got) = inner(n) {
                assert_eq!(got, want, "<{}> content", leaf[0]);
            }
        }
    };
    replaced(&["name"], &rw.name);
    replaced(&["os", "nvram"], &rw.nvram);
    if rw.drop_uuid {
        assert_eq!(count(&after, &["uuid"]), 0, "clone kept a <uuid>:\n{out}");
    } else if rw.uuid.is_some() {
        replaced(&["uuid"], &rw.uuid);
        for d in domains(&after) {
            assert!(d.kids("uuid").all(|u| u.inner.is_some()), "empty <uuid/>");
        }
    } else {
        assert_eq!(count(&after, &["uuid"]), count(&before, &["uuid"]));
    }
    let macs = ["devices", "interface", "mac"];
    if rw.drop_macs {
        assert_eq!(count(&after, &macs), 0, "clone kept a <mac>:\n{out}");
    } else {
        assert_eq!(count(&after, &macs), count(&before, &macs));
    }

    assert!(count(&after, &["devices", "disk"]) <= count(&before, &["devices", "disk"]));
    for d in domains(&after).flat_map(|d| d.kids("devices")) {
        for disk in d.kids("disk") {
            assert_eq!(disk.attr("device").unwrap_or("disk"), "disk", "{out}");
            assert_eq!(disk.attr("type").unwrap_or("file"), "file", "{out}");
            let target = disk
                .kids("target")
                .filter_map(|t| t.attr("dev"))
                .last()
                .expect("a kept disk has a target");
            let r = rw
                .disks
                .iter()
                .find(|r| r.target == target)
                .expect("a kept disk was restored");
            let sources: Vec<&Node> = disk.kids("source").collect();
            assert_eq!(sources.len(), 1, "one <source> per disk:\n{out}");
            let file = sources[0].attr("file").expect("source file");
            assert_eq!(Path::new(file), r.path.as_path());
            assert!(Path::new(file).starts_with(dir), "{file} outside {dir:?}");
            assert_eq!(disk.kids("backingStore").count(), 0, "{out}");
            for drv in disk.kids("driver") {
                assert_eq!(drv.attr("type"), Some(r.format.as_str()), "{out}");
            }
        }
    }

    let again = rewrite(out, rw).expect("the output is accepted again");
    assert_eq!(again, out, "rewrite is not idempotent");
}

fuzz_target!(|data: &[u8]| {
    let Some((rw, dir, xml)) = decode(data) else {
        return;
    };
    reset();
    let res = rewrite(&xml, &rw);
    let used = heap_use();
    // Each replacement needs an element of the input (at least `<a/>`) and writes at
    // most a tag with one escaped parameter (< 6 × 64 bytes) or an escaped copy of
    // that element's start tag (< 6 × its length). roxmltree keeps ~80 bytes per
    // attribute in one array that doubles as it grows (a tag of 2,049 one-letter
    // attributes, 12 KB of input, needs one 320 KiB block): up to 2 × 80 bytes per `=`.
    let tags = xml.bytes().filter(|&b| b == b'<').count();
    let attrs = xml.bytes().filter(|&b| b == b'=').count();
    let bound = 6 * xml.len() + 512 * tags + 160 * attrs + 4096;
    assert!(
        used.largest <= 4 * bound && used.peak_above_start <= 16 * bound,
        "heap {used:?} for {} input bytes",
        xml.len()
    );
    match res {
        Ok(out) => {
            assert!(out.len() <= bound, "{} -> {} bytes", xml.len(), out.len());
            check_output(&xml, &out, &rw, &dir);
        }
        Err(e) => {
            assert!(e.offset <= xml.len() as u64, "{e}");
            // Well-formed for both parsers (quick-xml and roxmltree disagree on some
            // corner cases) and without DTD entities: the rewrite may not refuse it.
            if parse(&xml).is_some() && !xml.contains("<!DOCTYPE") {
                assert!(
                    roxmltree::Document::parse(&xml).is_err(),
                    "rewrite rejected well-formed XML: {e}"
                );
            }
        }
    }
});
