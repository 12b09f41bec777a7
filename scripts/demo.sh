#!/usr/bin/env bash
# The demo: from the bundled real backup tree to a checked restore, in six narrated
# steps (list, restore points, verify, point-in-time restore, content check,
# disaster recovery). Runs scripts/setup.sh and the release build first; the steps
# themselves take a few seconds.
#
#   scripts/demo.sh            KEEP=1 scripts/demo.sh keeps the demo directory
#
# Works on a copy of tests/fixtures/real-chains/backups in a temporary directory
# (a restore takes the VM's lock and writes a catalogue row under the backup root,
# as vmbackup's vmrestore does), removed on exit. Nothing outside it is written:
# logs go to $DEMO/logs, disaster recovery goes into libvirt's in-process test
# driver (no daemon, no root, no real VM touched).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

scripts/setup.sh
echo "demo: building target/release/vmrestore (the first build takes several minutes)"
t0=$SECONDS
cargo build --release --locked --quiet --bin vmrestore
echo "demo: built in $((SECONDS - t0))s"
bin=$repo/target/release/vmrestore

demo=$(mktemp -d /tmp/vmrestore-demo.XXXXXX)
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        echo "demo: kept $demo"
    else
        rm -rf "$demo"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp -a tests/fixtures/real-chains/backups "$demo/backups"
export LOG_DIR=$demo/logs
B=$demo/backups
VM=rc-v247-chk # a real virtnbdbackup 2.47 chain: a full backup and 3 incrementals, with checksums
T1=$SECONDS

n=0
bold='' plain=''
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi
step() {
    n=$((n + 1))
    printf '\n%s── %d/6  %s%s\n' "$bold" "$n" "$1" "$plain"
    shift
    printf '%s\n' "$@" | fold -s -w 88
}
# The command line the way a reader would type it ($DEMO for the demo directory).
say_cmd() {
    local shown="vmrestore $*"
    printf '\n$ %s\n' "${shown//$demo/\$DEMO}"
}
# Shows the command, then runs it: its log lines (stderr) and output (stdout)
# appear as they come.
show() {
    say_cmd "$@"
    "$bin" "$@"
}

echo
echo "DEMO=$demo (a copy of the bundled backup tree; removed at the end)"

step "What is backed up" \
    "vmrestore reads the tree vmbackup writes: one directory per VM, inside it one directory per period. vmbackup starts a new chain every period of the VM's policy: 20260204 is a day, 2026-W08 an ISO week, 202603 a month; an 'accumulate' VM has a single chain that is never rotated. The catalogue lines come from vmbackup's SQLite catalogue under _state/. Two of the bundled VMs:"
printf '\n$ vmrestore --list --backup-path $DEMO/backups\n'
"$bin" --list --backup-path "$B" | awk -v vm="$VM" '
    /^Available VMs in:/ { sub(/in: .*/, "in: $DEMO/backups") }
    NR <= 3 || /^═/ { print; next }
    /^  [^ ]/ { keep = ($1 == vm || $1 == "rc-multi-sql") }
    keep'

step "Restore points" \
    "A restore point is a moment a VM can be restored to. Point 0, 'FULL (base)', is the full backup a chain starts with; every later point is an incremental holding only the blocks that changed since the point before it, so restoring point N reads the full backup and incrementals 1..N. The dates are when virtnbdbackup took each backup, read from the backup's own metadata (copying the tree does not change them). The bundled catalogue that --list read was written with simulated dates, so its 'last backup' differs from these."
show --list-restore-points "$VM" --backup-path "$B"

step "Are the backup files intact?" \
    "virtnbdbackup stores an adler32 checksum (.chksum) next to every data file. --verify reads every data file as a restore would (its structure), recomputes the checksums and says which restore points are restorable; it writes nothing (exit 6 when something is damaged)."
show --verify "$VM" --backup-path "$B"

step "Point-in-time restore" \
    "Restore point 1 of $VM as a qcow2 image, data only (--skip-config: no VM is defined). In the line 'N checksum(s) verified', N is the number of backup files read for this point (here the full backup and incremental 1) whose stored checksum matched while they were read: the same pass that restores verifies. 'read-back ✓' means every byte written was read back from the image and compared; the image only gets its final name after that."
show --vm "$VM" --restore-point 1 --restore-path "$demo/point-1" --skip-config --backup-path "$B"

step "Is it the right data?" \
    "When the fixture's backups were taken, the sha256 of the VM's disk at each restore point was recorded (tests/fixtures/real-chains/expected). The restored image, converted to raw, must hash the same:"
img=$demo/point-1/$VM-vda.qcow2
expected=$(awk '{ print $1 }' "tests/fixtures/real-chains/expected/$VM/202603/virtnbdbackup.1/vda.sha256")
printf '\n$ qemu-img convert -O raw $DEMO/point-1/%s-vda.qcow2 vda.raw && sha256sum vda.raw\n' "$VM"
qemu-img convert -O raw "$img" "$demo/vda.raw"
got=$(sha256sum "$demo/vda.raw" | awk '{ print $1 }')
rm -f "$demo/vda.raw"
echo "restored: $got"
echo "recorded: $expected"
if [ "$got" = "$expected" ]; then
    echo "→ identical: restore point 1 is the disk as it was at that backup"
else
    echo "→ DIFFERENT: this restore is wrong; please report it" >&2
    exit 1
fi

step "Disaster recovery" \
    "The VM is gone: restore its disks (latest point) and define it again with its original name, UUID and MAC addresses. On a real host vmrestore talks to qemu:///system; here it talks to libvirt's test driver through \$DEMO/host.xml, a host with no VMs that this demo writes (no daemon or root needed). The test driver keeps what is defined in the memory of the vmrestore process only, so what was done is shown from vmrestore's --json document (on stdout; log lines stay on stderr)."
cat >"$demo/host.xml" <<'EOF'
<node>
  <cpu>
    <mode>fixed</mode><nodes>1</nodes><sockets>1</sockets><cores>2</cores>
    <threads>1</threads><active>2</active><mhz>2000</mhz><model>x86_64</model>
  </cpu>
  <memory>4194304</memory>
</node>
EOF
dr=(--connect "test://$demo/host.xml" --vm "$VM" --restore-path "$demo/dr" --backup-path "$B" --json)
say_cmd "${dr[@]}"
"$bin" "${dr[@]}" >"$demo/dr.json"
printf '\nFrom the --json document (%s):\n' "docs/json-output.md"
python3 - "$demo/dr.json" "$demo" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
demo = sys.argv[2]
short = lambda s: s.replace(demo, "$DEMO") if isinstance(s, str) else s
print(f"  ok: {d['ok']}   exit_code: {d['exit_code']}   outcome: {d['outcome']}")
print(f"  vm: {d['vm']}   mode: {d['mode']}   restore point: {d['restore_point']} (checkpoint {d['checkpoint']})")
print(f"  summary: {d['summary']}")
print("  what it did:")
for e in d["effects"]:
    print(f"    {e['action']:<13} {short(e['object'])}")
for w in d.get("warnings", []):
    print(f"  warning: {w}")
EOF

echo
echo "── done in $((SECONDS - T1))s. The bundled tree was not touched; the run logs were in \$DEMO/logs:"
ls "$LOG_DIR"
echo "Next: README.md (\"Quick start\", flags, exit codes) and vmrestore --help."
