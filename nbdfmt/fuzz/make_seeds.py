#!/usr/bin/env python3
"""Regenerates seeds/<target>/ from the repository's fixtures (run from anywhere).

The seeds are committed; this script documents where each came from. Only small
files (< 100 KB) are taken from tests/fixtures/real-chains, plus every file of
tests/fixtures/format-examples. The vmrestore crate's targets (domxml, config,
catalogue) have their own: fuzz/make_seeds.py at the repository root.
"""
import json
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent.parent
EXAMPLES = ROOT / "tests/fixtures/format-examples"
CHAINS = ROOT / "tests/fixtures/real-chains/backups"
SEEDS = FUZZ / "seeds"

# Small real streams (bytes): empty inc, compressed incs and fulls with zero frames,
# a copy, an uncompressed inc with data, a 1.9.15 compressed full.
REAL_STREAMS = [
    "rc-multi-sql/2026-W08/sda.inc.virtnbdbackup.1.data",  # 414, uncompressed, dataSize 0
    "rc-acc-files/vda.inc.virtnbdbackup.1.data",  # 801, -z 2, one 64 KiB frame
    "rc-damage/20260513/vda.inc.virtnbdbackup.1.data",  # 1076, -z 3
    "rc-uefi-tpm/2026-W25/vdb.full.data",  # 1141, -z 6, zero + data frames
    "rc-damage/20260514/vda.inc.virtnbdbackup.2.data",  # 1147
    "rc-mon-db/202601/.archives/chain-2026-01-27/vda.copy.data",  # 4066, copy
    "rc-acc-files/vda.full.data",  # 9324, compressed full
    "rc-long/.archives/chain-2026-07-03/vda.inc.virtnbdbackup.1.data",  # 12831, uncompressed with data
    "rc-mon-db/202602/vda.full.data",  # 70931, compressed full
]
REAL_SIDECARS = [
    "rc-long/.archives/chain-2026-07-03/vda.virtnbdbackup.0.qcow.json",
    "rc-shrink/202606/vda.virtnbdbackup.4.qcow.json",
    "rc-dly-web/20260204/rc-dly-web.cpt",
    "rc-long/rc-long.cpt",
    "rc-long/checkpoints/virtnbdbackup.0.xml",
    "rc-long/.archives/chain-2026-07-03/vmconfig.virtnbdbackup.0.xml",
    "rc-uefi-tpm/2026-W25/vmconfig.virtnbdbackup.1.xml",
    "rc-uefi-tpm/2026-W25/vda.full.data.chksum",
]
FILE_NAMES = [
    "vda.full.data", "vda.copy.data", "sdaa.full.data.partial", "vda.inc.virtnbdbackup.12.data",
    "vdb.diff.1795665952.data", "vda.full.data.chksum", "vda.inc.virtnbdbackup.1.data.chksum",
    "vda.virtnbdbackup.3.qcow.json", "vda.copy.qcow.json", "vdb.1795665952.qcow.json",
    "vmconfig.virtnbdbackup.0.xml", "vmconfig.copy.xml", "vmconfig.1795665952.xml",
    "rc-uefi-tpm_VARS.fd.virtnbdbackup.1", "OVMF_CODE.fd.virtnbdbackup.0", "rc-acc-files.cpt",
    "autostart.virtnbdbackup.1", "backup.full.11262026052002.log",
]


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def split_stream(b):
    """(headers, meta json, trailer json or None) of a stream file."""
    headers = []
    hdr = b[:40]
    n = int(hdr[22:38], 16)
    meta = b[40:40 + n]
    headers.append(hdr)
    pos = 40 + n + 2
    m = json.loads(meta)
    compressed = m.get("stream-version", m.get("streamVersion")) == 2 and m.get("compressed") is not False
    trailer = None
    sizes = []
    if compressed:
        comp = b[-40:]
        t = int(comp[22:38], 16)
        trailer = b[-42 - t:-42]
        headers.append(comp)
        for e in json.loads(trailer):
            sizes.append(e if isinstance(e, int) else sum(next(iter(e.values()))))
    i = 0
    while pos + 40 <= len(b):
        h = b[pos:pos + 40]
        headers.append(h)
        kind = h[:4]
        if kind == b"stop":
            break
        if kind == b"data":
            stored = sizes[i] if compressed else int(h[22:38], 16)
            i += 1
            pos += 40 + stored + 2
        else:
            pos += 40
    return headers, meta, trailer


def main():
    streams = sorted(p for p in EXAMPLES.glob("*.data"))
    streams += [CHAINS / s for s in REAL_STREAMS]
    headers = {}
    for p in streams:
        b = p.read_bytes()
        assert len(b) < 200_000, p
        tag = p.name if p.parent == EXAMPLES else "real-" + str(p.relative_to(CHAINS)).replace("/", "_")
        write("stream_reader", tag, b)
        hs, meta, trailer = split_stream(b)
        for h in hs:
            headers.setdefault(h[:4].decode() + "-" + ("nonzero" if h[5:38].strip(b"0 ") else "zero"), h)
        write("meta_json", "meta-" + tag + ".json", meta)
        if trailer is not None:
            write("meta_json", "trailer-" + tag + ".json", trailer)
    for k, h in sorted(headers.items()):
        write("frame_header", k, h)
    write("frame_header", "data-uppercase-hex", b"data 00000000028000AB 000000000001FFFF\r\n")
    write("frame_header", "truncated", b"zero 0000000000100000 00000000007000")
    write("frame_header", "unknown-kind", b"DATA 0000000000000000 0000000000000000\r\n")

    # Older meta shapes (spec 2.3, 8.12): stream-version 1, compressed true, no diskFormat.
    old = ('{"virtualSize": 41943040, "dataSize": 0, "date": "2021-06-01T10:00:00", "diskName": "sda", '
           '"checkpointName": "virtnbdbackup.0", "compressed": true, "parentCheckpoint": false, '
           '"incremental": false, "stream-version": 1}')
    write("meta_json", "meta-old-v1.json", old)
    write("meta_json", "meta-compressed-true.json", old.replace('"stream-version": 1', '"streamVersion": 2'))
    write("meta_json", "trailer-chunked.json", '[4410, 298, {"149104": [140312, 8792]}, 572]')
    write("meta_json", "trailer-empty.json", "[]")

    for p in EXAMPLES.iterdir():
        if p.suffix in (".json", ".cpt", ".chksum"):
            write("sidecars", p.name, p.read_bytes())
    for s in REAL_SIDECARS:
        p = CHAINS / s
        write("sidecars", "real-" + s.replace("/", "_"), p.read_bytes())
    for n in FILE_NAMES:
        write("sidecars", "name-" + n, n)
    write("sidecars", "chksum-newline", "3124225129\n")
    write("sidecars", "chksum-none", "None")


if __name__ == "__main__":
    main()
