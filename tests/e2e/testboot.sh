# shellcheck shell=bash
# Scenario `testboot` (sourced by run.sh): --test-boot of a restore point whose disks
# hold no operating system fails (exit 5) with a screenshot of the firmware's
# "No bootable device", a report page naming it, and nothing left behind; SIGINT
# mid-wait leaves nothing either. (The bootable guest's passing test boot is in the
# `boot` scenario.)

tb_leftovers() {
    local vm=$1
    virsh -c qemu:///system list --all --name | grep -q "^$vm-testboot-" && die "a test-boot domain is left"
    ls /var/lib/vmrestore/testboot/ 2>/dev/null | grep -q "^$vm-testboot-" && die "test-boot overlays are left"
    ls /var/lib/libvirt/qemu/nvram/ 2>/dev/null | grep -q "^$vm-testboot-" && die "a test-boot NVRAM copy is left"
    ls "$2/_state/locks" 2>/dev/null | grep -q "$vm" && die "the VM lock is left"
    return 0
}

scenario_testboot() {
    local fx=$WORK/testboot-backups report=$WORK/tb-report
    mkdir -p "$fx"
    cp -a "$ROOT_DIR/tests/fixtures/real-chains/backups/rc-multi-sql" "$ROOT_DIR/tests/fixtures/real-chains/backups/_state" "$fx/"
    local before; before=$(treehash "$fx")
    local rc=0
    vmr --vm rc-multi-sql --backup-path "$fx" --test-boot --test-boot-timeout 20 --report "$report" --json \
        >"$WORK/tb.json" || rc=$?
    [ $rc = 5 ] || die "test boot of a VM without an OS: exit $rc, expected 5"
    python3 - "$WORK/tb.json" "$report" <<'PY' || die "test-boot JSON / report"
import json, sys, os, html.parser
doc = json.load(open(sys.argv[1]))
tb = doc["test_boot"]
assert doc["exit_code"] == 5 and tb["outcome"] == "no-sign-of-life", doc
shot = tb["screenshot"]
assert shot and open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n", shot
rows = []
class P(html.parser.HTMLParser):
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-vm" in a:
            rows.append((a["data-vm"], a["data-outcome"]))
P().feed(open(os.path.join(sys.argv[2], "index.html")).read())
assert ("rc-multi-sql", "no-sign-of-life") in rows, rows
PY
    tb_leftovers rc-multi-sql "$fx"
    ok "testboot: a point without an OS fails (exit 5) with a PNG screenshot and a report row; nothing left"
    # SIGINT while waiting: exit 130, the clone and its overlays gone
    "$BIN" --connect qemu:///system --vm rc-multi-sql --backup-path "$fx" --test-boot \
        --test-boot-timeout 120 >"$WORK/tb2.log" 2>&1 &
    local pid=$! i
    for i in $(seq 60); do
        grep -q "Waiting up to" "$WORK/tb2.log" && break
        sleep 0.5
    done
    kill -INT $pid
    rc=0; wait $pid || rc=$?
    [ $rc = 130 ] || { cat "$WORK/tb2.log" >&2; die "test boot after SIGINT: exit $rc, expected 130"; }
    tb_leftovers rc-multi-sql "$fx"
    [ "$(treehash "$fx")" = "$before" ] || die "the backup tree changed"
    ok "testboot: SIGINT mid-wait exits 130 and leaves nothing behind"
}
