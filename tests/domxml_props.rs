//! Property check for `domain::rewrite`: the invariants of the `domxml` fuzz target,
//! with roxmltree as the oracle, over every `vmconfig*.xml` under
//! `tests/fixtures/real-chains/backups`, as is and mutated (fixed-seed generator;
//! `DOMXML_PROPS_ITERS=n` for more mutations), each with rewrites drawn like the fuzz
//! target draws them. Checks:
//! - refused ⇔ roxmltree refuses the input; the error offset is inside the input;
//! - an accepted rewrite is well-formed and idempotent;
//! - a new name / uuid / nvram is the whole content of every element it replaces; a
//!   clone keeps no `<uuid>` and no interface `<mac>`, a DR rewrite keeps them all;
//! - every remaining disk is a file disk of a restored target with one
//!   `<source file>` (its image under the restore directory), no `<backingStore>`,
//!   every `<driver type>` the restored format;
//! - everything outside the elements a rewrite may change is byte-identical, in order.

use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};
use vmrestore::domain::rewrite::{rewrite, DiskRewrite, Rewrite};

const TARGETS: [&str; 8] = ["vda", "vdb", "vdc", "sda", "sdb", "hda", "fda", "a&b'\"<"];
const NAMES: [&str; 4] = ["vm1-clone", "a&b<c>'\"]]>", "", "клон ü"];
const UUIDS: [&str; 2] = ["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "<&'\">"];
const NVRAMS: [&str; 2] = ["/var/lib/libvirt/qemu/nvram/c_VARS.fd", "/n v&r<a>m'\""];
const RESTORE_DIRS: [&str; 2] = ["/restore/dir", "/r e&s<t>'\"/d"];
const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// Inserted by the mutator: libvirt syntax, whole elements, and what the parsers
/// disagree on.
const TOKENS: &[&str] = &[
    "<disk type='file' device='disk'><target dev='vda'/></disk>",
    "<disk type='block' device='disk'><driver type='raw'/><target dev='vdb'/></disk>",
    "<disk type='network' device='disk'><target dev='vdc'/></disk>",
    "<disk device='cdrom'><target dev='sda'/></disk>",
    "<disk/>",
    "<driver name='qemu' type='qcow2'/>",
    "<driver/>",
    "<source file='/a'/>",
    "<source file='/a'><seclabel model='dac'/></source>",
    "<backingStore type='file'><source file='/b'/><backingStore/></backingStore>",
    "<target dev='vdb'/>",
    "<target/>",
    "<name>n</name>",
    "<name/>",
    "<uuid>u</uuid>",
    "<uuid/>",
    "<os><nvram>/n</nvram></os>",
    "<nvram/>",
    "<mac address='52:54:00:aa:bb:cc'/>",
    "<interface type='network'><mac/></interface>",
    "<devices><disk type='volume'><target dev='hda'/></disk></devices>",
    "<x:disk xmlns:x='u' type='block'><target dev='vda'/></x:disk>",
    "<!-- c -->",
    "<![CDATA[x]]>",
    "<?pi x?>",
    "<!DOCTYPE domain>",
    " xmlns:x='a>b'",
    " type = \"raw\" ",
    "&amp;",
    "&foo;",
    "&#10;",
    "\u{feff}",
    "\r\n",
    "</disk>",
    "<source file='/a'>",
    "'",
    "<",
];

fn decode(params: [u8; 3]) -> (Rewrite, PathBuf) {
    let [flags, mask, variant] = params;
    let v = usize::from(variant);
    let dir = PathBuf::from(RESTORE_DIRS[v % 2]);
    let disks = TARGETS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(i, t)| DiskRewrite {
            target: (*t).to_owned(),
            path: dir.join(format!("{t}-{i}.img")),
            format: FORMATS[((v >> 1) ^ i) % 2].to_owned(),
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
    (rw, dir)
}

fn escaped(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// An element's name as written.
fn qname<'x>(xml: &'x str, n: Node<'_, '_>) -> &'x str {
    let s = &xml[n.range().start + 1..];
    let end = s
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .unwrap_or(s.len());
    &s[..end]
}

/// The elements at `path` (names as written) below the root `<domain>`.
fn at<'a, 'i>(xml: &str, doc: &'a Document<'i>, path: &[&str]) -> Vec<Node<'a, 'i>> {
    let root = doc.root_element();
    let mut nodes = if qname(xml, root) == "domain" {
        vec![root]
    } else {
        vec![]
    };
    for name in path {
        nodes = nodes
            .iter()
            .flat_map(|n| n.children().filter(|c| c.is_element()))
            .filter(|c| qname(xml, *c) == *name)
            .collect();
    }
    nodes
}

/// The raw content of a non-empty element.
fn inner<'x>(xml: &'x str, n: Node<'_, '_>) -> Option<&'x str> {
    let whole = &xml[n.range()];
    if whole.ends_with("/>") {
        return None;
    }
    // the start tag ends at the first `>` outside quotes
    let mut quote = None;
    let open = whole.char_indices().find_map(|(i, c)| {
        match (quote, c) {
            (None, '>') => return Some(i),
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if q == c => quote = None,
            _ => {}
        }
        None
    })?;
    whole.get(open + 1..whole.rfind("</")?)
}

fn attr<'a>(xml: &str, n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.attributes()
        .find(|a| xml[a.range()].split(['=', ' ', '\t', '\n', '\r']).next() == Some(name))
        .map(|a| a.value())
}

fn check_identity(xml: &str, before: &Document, out: &str, after: &Document, rw: &Rewrite) {
    let replaced = |path: &[&str], value: &Option<String>| {
        let Some(v) = value else { return };
        for n in at(out, after, path) {
            if let Some(got) = inner(out, n) {
                assert_eq!(
                    got,
                    escaped(v),
                    "<{}> content in\n{out}",
                    path[path.len() - 1]
                );
            }
        }
    };
    replaced(&["name"], &rw.name);
    replaced(&["os", "nvram"], &rw.nvram);
    let uuids = |x, d| at(x, d, &["uuid"]).len();
    if rw.drop_uuid {
        assert_eq!(uuids(out, after), 0, "clone kept a <uuid>:\n{out}");
    } else if rw.uuid.is_some() {
        replaced(&["uuid"], &rw.uuid);
        let empty = at(out, after, &["uuid"])
            .iter()
            .any(|u| inner(out, *u).is_none());
        assert!(!empty, "empty <uuid/>:\n{out}");
    } else {
        assert_eq!(uuids(out, after), uuids(xml, before));
    }
    let macs = |x, d| at(x, d, &["devices", "interface", "mac"]).len();
    if rw.drop_macs {
        assert_eq!(macs(out, after), 0, "clone kept a <mac>:\n{out}");
    } else {
        assert_eq!(macs(out, after), macs(xml, before));
    }
}

fn check_disks(out: &str, after: &Document, rw: &Rewrite, dir: &Path) {
    for disk in at(out, after, &["devices", "disk"]) {
        let kids = |name: &'static str| {
            disk.children()
                .filter(move |c| c.is_element() && qname(out, *c) == name)
        };
        assert_eq!(attr(out, disk, "device").unwrap_or("disk"), "disk", "{out}");
        assert_eq!(attr(out, disk, "type").unwrap_or("file"), "file", "{out}");
        let target = kids("target").next_back().and_then(|t| attr(out, t, "dev"));
        let target = target.expect("a kept disk has a target");
        let r = rw.disks.iter().find(|r| r.target == target);
        let r = r.expect("a kept disk was restored");
        let sources: Vec<Node> = kids("source").collect();
        assert_eq!(sources.len(), 1, "one <source> per disk:\n{out}");
        let file = attr(out, sources[0], "file").expect("source file");
        assert_eq!(Path::new(file), r.path.as_path());
        assert!(Path::new(file).starts_with(dir), "{file} outside {dir:?}");
        assert_eq!(kids("backingStore").count(), 0, "{out}");
        for drv in kids("driver") {
            assert_eq!(attr(out, drv, "type"), Some(r.format.as_str()), "{out}");
        }
    }
}

/// The ranges of the input a rewrite may change: the domain's `<name>`, `<uuid>`,
/// `<os><nvram>`, `<devices><disk>`, `<devices><interface><mac>`.
fn changeable(xml: &str, doc: &Document) -> Vec<Range<usize>> {
    let paths: [&[&str]; 5] = [
        &["name"],
        &["uuid"],
        &["os", "nvram"],
        &["devices", "disk"],
        &["devices", "interface", "mac"],
    ];
    let mut r: Vec<Range<usize>> = paths
        .iter()
        .flat_map(|p| at(xml, doc, p))
        .map(|n| n.range())
        .collect();
    r.sort_by_key(|r| r.start);
    r
}

/// Everything else is in the output unchanged and in order (up to the indentation and
/// line break around a removed element).
fn check_unchanged(xml: &str, doc: &Document, out: &str) {
    let cuts = changeable(xml, doc);
    let first = cuts.first().map_or(xml.len(), |r| r.start);
    let last = cuts.last().map_or(0, |r| r.end);
    assert!(
        out.starts_with(xml[..first].trim_end()),
        "prefix changed:\n{out}"
    );
    assert!(
        out.ends_with(xml[last..].trim_start()),
        "suffix changed:\n{out}"
    );
    let mut found = 0;
    let mut from = 0;
    for cut in cuts.iter().chain([&(xml.len()..xml.len())]) {
        let segment = xml[from..cut.start].trim_matches(|c: char| c.is_ascii_whitespace());
        let Some(i) = out[found..].find(segment) else {
            panic!(
                "{segment:?} (input {from}..{}) not kept in order:\n{out}",
                cut.start
            );
        };
        found += i + segment.len();
        from = cut.end;
    }
}

fn check(xml: &str, params: [u8; 3]) -> bool {
    let (rw, dir) = decode(params);
    let parsed = Document::parse(xml);
    let out = match rewrite(xml, &rw) {
        Err(e) => {
            assert!(parsed.is_err(), "refused well-formed XML: {e}\n{xml}");
            assert!(e.offset <= xml.len() as u64, "{e}");
            return false;
        }
        Ok(out) => out,
    };
    let before = parsed.expect("accepted what roxmltree rejects");
    let after = match Document::parse(&out) {
        Ok(d) => d,
        Err(e) => panic!("malformed output ({e}) for {params:?}:\n{out}"),
    };
    check_identity(xml, &before, &out, &after, &rw);
    check_disks(&out, &after, &rw, &dir);
    check_unchanged(xml, &before, &out);
    let again = rewrite(&out, &rw).expect("the output is accepted again");
    assert_eq!(again, out, "not idempotent for {params:?}");
    true
}

fn fixtures() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-chains/backups");
    let mut dirs = vec![root];
    let mut out = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("fixtures").flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                dirs.push(p);
            } else if name.starts_with("vmconfig") && name.ends_with(".xml") {
                out.push(std::fs::read_to_string(&p).expect("UTF-8 fixture"));
            }
        }
    }
    out.sort();
    out
}

/// xorshift64: a fixed sequence, no dependency.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// A random element's range, when `s` parses.
fn element(s: &str, r: &mut u64) -> Option<Range<usize>> {
    let doc = Document::parse(s).ok()?;
    let all: Vec<Range<usize>> = doc
        .descendants()
        .filter(|n| n.is_element())
        .map(|n| n.range())
        .collect();
    Some(all[(next(r) as usize) % all.len()].clone())
}

/// Mostly whole-element edits at tag boundaries (they keep the input well-formed
/// often enough to reach the rewrite), sometimes raw text edits.
fn mutate(base: &str, r: &mut u64) -> String {
    let mut s = base.to_owned();
    for _ in 0..1 + next(r) % 3 {
        let a = boundary(&s, (next(r) as usize) % (s.len() + 1));
        let tag = s[a..].find('<').map_or(a, |i| a + i);
        match (next(r) % 6, element(&s, r)) {
            (0 | 1, _) => s.insert_str(tag, TOKENS[(next(r) as usize) % TOKENS.len()]),
            (2, Some(e)) => s.replace_range(e, ""),
            (3, Some(e)) => {
                let copy = s[e].to_owned();
                s.insert_str(tag, &copy);
            }
            (4, _) => s.insert_str(a, TOKENS[(next(r) as usize) % TOKENS.len()]),
            _ => {
                let b = boundary(&s, a + (next(r) % 48) as usize);
                s.replace_range(a..b, "");
            }
        }
    }
    s
}

#[test]
fn rewrite_properties() {
    let files = fixtures();
    assert!(files.len() >= 100, "{} fixtures", files.len());
    let mut r = 0x2545_f491_4f6c_dd1d_u64;
    let mut params = || {
        let x = next(&mut r).to_le_bytes();
        [x[0], x[1], x[2]]
    };
    for xml in &files {
        for flags in [0, 0b1_1111, 0b0_0101, 0b1_1011] {
            let [_, mask, variant] = params();
            assert!(check(xml, [flags, mask, variant]), "fixture refused");
        }
        // every real disk target restored, both formats
        assert!(check(xml, [0b1_1111, 0xff, 0]) && check(xml, [0, 0x7f, 2]));
    }
    let iters: usize = std::env::var("DOMXML_PROPS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut accepted = 0;
    for _ in 0..iters {
        let base = &files[(next(&mut seed) as usize) % files.len()];
        let xml = mutate(base, &mut seed);
        accepted += usize::from(check(&xml, params()));
    }
    // the mutations must also reach the rewrite, not only the parser's errors
    assert!(
        accepted * 4 >= iters,
        "{accepted} of {iters} mutations accepted"
    );
}
