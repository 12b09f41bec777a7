#!/usr/bin/env python3
"""Regenerates seeds/<target>/ of the vmrestore crate's fuzz targets (domxml, config,
catalogue) from the repository's fixtures (run from anywhere).

The seeds are committed; this script documents where each came from: a few real
vmconfig.*.xml and the catalogue of tests/fixtures/real-chains/backups, plus synthetic
inputs. Each seed starts with the parameter bytes its target reads first (see the
targets' doc comments). The nbdfmt targets' seeds: nbdfmt/fuzz/make_seeds.py.
"""
import sqlite3
import tempfile
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
CHAINS = ROOT / "tests/fixtures/real-chains/backups"
SEEDS = FUZZ / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# Distinct real domain XMLs: one disk, several disks, a cdrom, UEFI + TPM, raw.
REAL_DOMAINS = [
    "rc-acc-files/vmconfig.virtnbdbackup.0.xml",
    "rc-multi-sql/2026-W08/vmconfig.virtnbdbackup.0.xml",
    "rc-shrink/202606/vmconfig.virtnbdbackup.0.xml",
    "rc-shrink/202606/vmconfig.virtnbdbackup.3.xml",
    "rc-uefi-tpm/2026-W25/vmconfig.virtnbdbackup.0.xml",
    "rc-tiny-raw/chain/vmconfig.virtnbdbackup.0.xml",
    "rc-v247-chk/202603/vmconfig.virtnbdbackup.0.xml",
]
# domxml parameter bytes: flags (1 name, 2 drop uuid, 4 set uuid, 8 drop macs,
# 16 nvram), restored-target mask (bit i = TARGETS[i]: vda vdb vdc sda sdb hda fda
# and an escaped one), variant (escaping-heavy parameters when odd bits are set).
DOMXML_MODES = {
    "clone": bytes([1 | 2 | 8 | 16, 0b1011, 0]),
    "dr": bytes([1, 0b1011, 0]),
    "dr-uuid": bytes([1 | 4, 0b0001, 0]),
    "escapes": bytes([1 | 4 | 8 | 16, 0xFF, 0xFF]),
}
# A live domain XML with a two-level backing chain, a network disk, a volume disk,
# a LUN, a floppy and an interface with a child element.
DOMXML_SYNTH = """<domain type='kvm'>
  <name>vm&amp;1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/top.qcow2' index='3'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/images/mid.qcow2'/>
        <backingStore type='file' index='1'>
          <format type='qcow2'/>
          <source file='/images/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type="raw" cache="none"/>
      <source pool='default' volume='data.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='block' device='lun'>
      <source dev='/dev/sdz'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='/f.img'/>
      <target dev='fda' bus='fdc'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'></mac>
      <source bridge='br0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:00:00:02'/>
    </interface>
  </devices>
</domain>
"""

CONFIGS = {
    "statement-21": 'BACKUP_PATH="/srv/bk/"\n',
    "sample": "# vmbackup configuration\n#BACKUP_PATH=/old\nexport BACKUP_PATH='/mnt/backup/vms'  # where\n"
              "RETENTION_DAYS=7\nLOG_DIR=/var/log/vmbackup\n",
    "last-wins": "BACKUP_PATH=/a\nBACKUP_PATH=/b;\n",
    "crlf": "BACKUP_PATH=/a\r\n",
    "single-dollar": "  export BACKUP_PATH = '/m n/$x'  # c\n",
    "cmd-subst": '# x\nBACKUP_PATH="$(cat /etc/bk)"\n',
    "var": "BACKUP_PATH=$HOME/bk\n",
    "braces": 'BACKUP_PATH="${BASE}/bk"\n',
    "backticks": "BACKUP_PATH=`cat /x`\n",
    "unterminated": 'BACKUP_PATH="/a\n',
    "tilde": "BACKUP_PATH=~/bk\n",
    "operators": "BACKUP_PATH=/a|b\nBACKUP_PATH=/a&\n",
    "joined-quotes": "BACKUP_PATH='/a'$(id)\nBACKUP_PATH=\"/a\"b\n",
    "command-after": "BACKUP_PATH=/a cmd\n",
    "empty": 'BACKUP_PATH=""\n',
}

CAT_VOCAB = ["vm1", "vm2", "my-vm", "active", "broken", "deleted", "purged", "archived",
             "success", "failed", "2026-03-08 22:00:01", "2026-03-08T22:00:01.5Z",
             "2026-03-09 00:00:00.123456", "", " ", "a b%?#", "Active",
             "2026-13-45 99:99:99", "+10000-01-01 00:00:00", " 2026-01-02 03:04:05 "]


def cat_rows(rows):
    """catalogue rows mode: per row a table byte (0 chain_health, 1 vm_backups) and
    three values (kind byte % 6: 0 NULL, 1 int, 2 vocabulary text, 3 text, 4 raw
    TEXT bytes, 5 blob)."""
    out = b""
    for table, vals in rows:
        out += bytes([table])
        for v in vals:
            if v is None:
                out += b"\0"
            elif isinstance(v, int):
                out += bytes([1, v])
            elif isinstance(v, bytes):
                out += bytes([4, len(v)]) + v
            elif v in CAT_VOCAB:
                out += bytes([2, CAT_VOCAB.index(v)])
            else:
                b = v.encode()
                out += bytes([3, len(b)]) + b
    return out


def real_catalogue():
    """A small catalogue file with vmbackup's real chain_health / vm_backups schema."""
    src = sqlite3.connect(f"file:{CHAINS / '_state/vmbackup.db'}?immutable=1", uri=True)
    ddl = [r[0] for r in src.execute(
        "SELECT sql FROM sqlite_master WHERE name IN ('chain_health', 'vm_backups')")]
    health = src.execute("SELECT * FROM chain_health WHERE vm_name IN ('rc-wk-app', 'rc-dly-web')").fetchall()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.db"
        c = sqlite3.connect(p)
        c.execute("PRAGMA page_size=512")
        for q in ddl:
            c.execute(q.replace("REFERENCES sessions(id)", ""))
        c.executemany(f"INSERT INTO chain_health VALUES ({','.join('?' * len(health[0]))})", health)
        c.execute("INSERT INTO vm_backups (session_id, vm_name, status, created_at) VALUES (1, 'rc-wk-app', 'success', '2026-02-10 01:00:00')")
        c.commit()
        c.execute("VACUUM")
        c.close()
        return p.read_bytes()


def more_seeds():
    for i, rel in enumerate(REAL_DOMAINS):
        xml = (CHAINS / rel).read_bytes()
        mode = list(DOMXML_MODES)[i % len(DOMXML_MODES)]
        write("domxml", f"real-{mode}-" + rel.replace("/", "_"), DOMXML_MODES[mode] + xml)
    for mode, prefix in DOMXML_MODES.items():
        write("domxml", f"synth-{mode}.xml", prefix + DOMXML_SYNTH.encode())

    for name, text in CONFIGS.items():
        write("config", name, b"\0\0" + text.encode())
    write("config", "long-first-line", bytes([1, 64]) + b"X=\nBACKUP_PATH=/a\n")
    write("config", "long-value", bytes([1, 63]) + b"BACKUP_PATH=/a\n")

    # flags: 1 no vm_backups, 2 no chain_health, 4 WAL with the writer open,
    # 8/16/32 untyped name/status/time columns, 128 the rest is a database file.
    st38 = cat_rows([
        (0, ["my-vm", "active", "2026-03-08 22:00:01"]),
        (0, ["my-vm", "active", "2026-03-01 22:00:01"]),
        (0, ["my-vm", "broken", "2026-02-20 22:00:01"]),
        (0, ["my-vm", "deleted", "2026-09-09 22:00:01"]),
        (0, ["other", "archived", None]),
        (1, ["other", "success", "2026-01-02 03:04:05"]),
        (1, ["other", "failed", "2026-05-02 03:04:05"]),
    ])
    write("catalogue", "statement-38", b"\0" + st38)
    write("catalogue", "statement-38-wal", b"\x04" + st38)
    write("catalogue", "untyped-ints", bytes([8 | 16 | 32]) + cat_rows([
        (0, ["vm1", 1, 3]), (0, ["vm1", "active", "2026-03-08 22:00:01"]), (1, ["vm1", "success", 2])]))
    write("catalogue", "blank-times", b"\0" + cat_rows([
        (0, ["vm1", "active", " "]), (0, ["vm2", "active", ""]),
        (1, ["vm1", "success", ""]), (1, ["vm2", "success", " 2026-01-02 03:04:05 "])]))
    write("catalogue", "non-utf8", b"\x01" + cat_rows([
        (0, [b"vm\xff", "active", None]), (0, ["vm1", b"active", b"\xc3("])]))
    write("catalogue", "file-real-schema", b"\x80" + real_catalogue())


if __name__ == "__main__":
    more_seeds()
