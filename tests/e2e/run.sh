#!/usr/bin/env bash
# End-to-end tier: real VMs idling in their firmware, real virtnbdbackup chains laid
# out as vmbackup does, restored by vmrestore in every mode, checked against the true
# disk content, the domain identity, NVRAM and TPM state; restored domains must start.
# Scenario boot: a real guest (tests/guest) restored in every mode must boot and report
# the restore point's data on its console.
#
#   tests/e2e/run.sh            (root, Debian 12; installs and starts what it needs)
#   E2E_SCENARIOS="multi long" tests/e2e/run.sh
set -euo pipefail
ROOT_DIR=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=lib.sh
source "$ROOT_DIR/tests/e2e/lib.sh"
# shellcheck source=testboot.sh
source "$ROOT_DIR/tests/e2e/testboot.sh"
# shellcheck source=all.sh
source "$ROOT_DIR/tests/e2e/all.sh"
BIN=${VMRESTORE_BIN:-$ROOT_DIR/target/debug/vmrestore}
WORK=$(mktemp -d /var/tmp/vmrestore-e2e.XXXXXX)
chmod 755 "$WORK"   # qemu (libvirt-qemu) must reach restored images
BK=$WORK/backups
export LOG_DIR=$WORK/logs
SCENARIOS=${E2E_SCENARIOS:-"all fixtures instant testboot multi uefi long shrink copy diff boot"}
EXTRA_DOMAINS=()
EXTRA_PIDS=()   # background vmrestore runs (instant boot): SIGINT, then SIGKILL
EXTRA_PREFIXES=()   # domains named by vmrestore (test boots): every one starting so
PASSED=()
START=$SECONDS

finish() {
    local rc=$?
    local d p
    for p in "${EXTRA_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || continue
        kill -INT "$p" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$p" 2>/dev/null || true
    done
    for p in "${EXTRA_PREFIXES[@]}"; do
        EXTRA_DOMAINS+=($(virsh -c qemu:///system list --all --name 2>/dev/null | grep -- "^$p" || true))
    done
    for d in "${EXTRA_DOMAINS[@]}"; do
        virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
        virsh -c qemu:///system undefine "$d" --nvram --checkpoints-metadata >/dev/null 2>&1 \
            || virsh -c qemu:///system undefine "$d" --nvram >/dev/null 2>&1 \
            || virsh -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
    done
    e2e_cleanup
    [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
    if [ $rc -eq 0 ]; then
        log "e2e: ${#PASSED[@]} scenario checks passed in $((SECONDS - START))s"
        echo "${#PASSED[@]} passed, 0 failed"
    else
        log "e2e: FAILED after $((SECONDS - START))s (checks passed before: ${PASSED[*]:-none})"
    fi
}
trap finish EXIT

ok() { PASSED+=("$1"); log "ok: $1"; }

vmr() {
    log "vmrestore $*"
    "$BIN" --connect qemu:///system "$@"
}

uuid_of() { virsh -c qemu:///system domuuid "$1" | tr -d '[:space:]'; }
macs_of() { virsh -c qemu:///system domiflist "$1" | awk 'NR>2 && $5 {print $5}' | sort | tr '\n' ' '; }
source_of() { virsh -c qemu:///system domblklist "$1" | awk -v d="$2" '$1==d {print $2}'; }
starts() {
    "${VIRSH[@]}" start "$1" >/dev/null || die "$1 does not start"
    sleep 1
    [ "$(virsh -c qemu:///system domstate "$1" | head -1)" = running ] || die "$1 is not running after start"
    "${VIRSH[@]}" destroy "$1" >/dev/null
}

scenario_fixtures() {
    # the bundled real backups of a three-disk VM and of a UEFI + TPM VM: DR and clone
    # into the real libvirtd; identity, NVRAM and TPM state checked; the domains start
    local fx=$WORK/fixture-backups
    mkdir -p "$fx"
    cp -a "$ROOT_DIR/tests/fixtures/real-chains/backups/rc-multi-sql" "$ROOT_DIR/tests/fixtures/real-chains/backups/rc-uefi-tpm" "$ROOT_DIR/tests/fixtures/real-chains/backups/_state" "$fx/"
    local vm
    for vm in rc-multi-sql rc-uefi-tpm; do
        if virsh -c qemu:///system dominfo "$vm" >/dev/null 2>&1; then
            log "SKIP fixtures: a domain named $vm already exists on this host"
            return 0
        fi
    done
    EXTRA_DOMAINS+=(rc-multi-sql rc-multi-sql-clone rc-uefi-tpm rc-uefi-tpm-clone)
    local swtpm=/var/lib/libvirt/swtpm
    for vm in rc-multi-sql rc-uefi-tpm; do
        local cfg uuid
        cfg=$(ls "$fx/$vm"/*/vmconfig.virtnbdbackup.*.xml | sort -V | tail -1)
        uuid=$(sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' "$cfg" | head -1)
        vmr --vm "$vm" --backup-path "$fx" --restore-path "$WORK/fx-dr"
        [ "$(uuid_of "$vm")" = "$uuid" ] || die "$vm: UUID not preserved"
        local want got
        want=$(sed -n "s:.*<mac address='\([^']*\)'.*:\1:p" "$cfg" | sort | tr '\n' ' ')
        got=$(virsh -c qemu:///system dumpxml "$vm" | sed -n "s:.*<mac address='\([^']*\)'.*:\1:p" | sort | tr '\n' ' ')
        [ "$want" = "$got" ] || die "$vm: MACs $got, expected $want"
        starts "$vm"; ok "fixtures: DR of $vm into qemu:///system (UUID, MACs, starts)"
        vmr --vm "$vm" --backup-path "$fx" --name "$vm-clone" --restore-path "$WORK/fx-clone"
        [ "$(uuid_of "$vm-clone")" != "$uuid" ] || die "$vm-clone kept the UUID"
        starts "$vm-clone"; ok "fixtures: clone of $vm (new identity, starts)"
    done
    # UEFI + TPM: the NVRAM of the restored checkpoint and vmbackup's TPM copy
    local period; period=$(dirname "$(ls "$fx"/rc-uefi-tpm/*/vmconfig.virtnbdbackup.*.xml | sort -V | tail -1)")
    local n; n=$(ls "$period"/rc-uefi-tpm_VARS.fd.virtnbdbackup.* | sed 's/.*\.//' | sort -n | tail -1)
    cmp -s "$period/rc-uefi-tpm_VARS.fd.virtnbdbackup.$n" /var/lib/libvirt/qemu/nvram/rc-uefi-tpm_VARS.fd || die "NVRAM is not the checkpoint's copy"
    [ -d "$swtpm/88551b77-adbf-56aa-950b-b773d24f7f3f/tpm2" ] || die "TPM state not restored"
    local clone_uuid; clone_uuid=$(uuid_of rc-uefi-tpm-clone)
    [ -d "$swtpm/$clone_uuid/tpm2" ] || die "clone TPM state not under the clone's UUID"
    [ -f /var/lib/libvirt/qemu/nvram/rc-uefi-tpm-clone_VARS.fd ] || die "clone NVRAM"
    ok "fixtures: rc-uefi-tpm NVRAM (checkpoint $n) and TPM state for DR and clone"
    # DR --force over the defined VM: its TPM state is kept aside, never deleted with
    # the undefine (libvirt removes swtpm state unless told to keep it)
    local tpm=$swtpm/88551b77-adbf-56aa-950b-b773d24f7f3f
    echo "state before --force" > "$tpm/tpm2/marker-before-force"
    vmr --vm rc-uefi-tpm --backup-path "$fx" --restore-path "$WORK/fx-dr" --force
    local kept; kept=$(ls -d "$tpm".pre-restore-* 2>/dev/null | tail -1)
    [ -n "$kept" ] && [ -f "$kept/tpm2/marker-before-force" ] || die "DR --force did not keep the old TPM state aside"
    [ -d "$tpm/tpm2" ] && [ ! -e "$tpm/tpm2/marker-before-force" ] || die "DR --force: TPM state not restored from the backup"
    rm -rf "$tpm".pre-restore-*
    starts rc-uefi-tpm
    ok "fixtures: DR --force keeps the old TPM state aside ($kept)"
}

# msha CHAIN-DIR POINT DISK: expected sha256 of a fixture disk (tests/fixtures manifest)
msha() {
    python3 - "$ROOT_DIR/tests/fixtures/real-chains/expected/manifest.json" "$@" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for vm in m["vms"].values():
    for c in vm["chains"]:
        if c["dir"] == sys.argv[2]:
            for rp in c["restore_points"]:
                if rp["name"] == "virtnbdbackup." + sys.argv[3]:
                    print(rp["disks"][sys.argv[4]]["sha256"])
PY
}

# raw_sha IMG: sha256 of the guest content of an image (read while it may be in use)
raw_sha() {
    local t="$WORK/raw-sha.$$.raw"
    qemu-img convert -U -O raw "$1" "$t"
    sha256sum "$t" | cut -d' ' -f1
    rm -f "$t"
}

scenario_instant() {
    # --instant-boot: the fixture chains served over NBD, a transient clone booted on
    # qcow2 overlays backed by the exports; Ctrl-C ends it; --pull makes it permanent
    local fx=$WORK/instant-backups
    mkdir -p "$fx"
    cp -a "$ROOT_DIR/tests/fixtures/real-chains/backups/rc-multi-sql" "$ROOT_DIR/tests/fixtures/real-chains/backups/rc-uefi-tpm" "$fx/"
    local before; before=$(treehash "$fx")
    local name=vmr-e2e-ib-multi dir=$WORK/ib
    EXTRA_DOMAINS+=("$name" vmr-e2e-ib-uefi)
    log "vmrestore --vm rc-multi-sql --instant-boot --name $name (background)"
    "$BIN" --connect qemu:///system --vm rc-multi-sql --backup-path "$fx" --restore-path "$dir" \
        --instant-boot --name "$name" >"$WORK/ib.log" 2>&1 &
    local pid=$! i
    for i in $(seq 60); do
        grep -q "Started transient VM" "$WORK/ib.log" && break
        kill -0 $pid 2>/dev/null || { cat "$WORK/ib.log" >&2; die "instant boot exited early"; }
        sleep 0.5
    done
    [ "$(virsh -c qemu:///system domstate "$name" | head -1)" = running ] || die "$name is not running"
    [[ $(virsh -c qemu:///system dominfo "$name") =~ Persistent:\ *no ]] || die "$name is not transient"
    local d
    for d in vda vdb sda; do
        local ov=$dir/$name-$d.qcow2
        [[ $(qemu-img info -U "$ov") == *"backing file: nbd://127.0.0.1:"* ]] || die "$ov: no NBD backing"
        [ "$(raw_sha "$ov")" = "$(msha backups/rc-multi-sql/2026-W08 3 $d)" ] || die "$name/$d: content is not restore point 3"
    done
    # the guest writes into its overlay, never into the backup
    io "$name" vdb "write -P 0x77 1M 64k"
    ok "instant: rc-multi-sql booted as a transient clone in $(grep -c . "$WORK/ib.log") log lines; every disk reads as point 3"
    kill -INT $pid
    wait $pid || die "instant boot ended with exit $?"
    virsh -c qemu:///system dominfo "$name" >/dev/null 2>&1 && die "$name still exists after Ctrl-C"
    ls "$dir"/"$name"-* >/dev/null 2>&1 && die "overlays left after Ctrl-C"
    ok "instant: Ctrl-C stops the temporary clone and removes its overlays"

    # kill -9 mid-boot: the clone is left running on a dead server; the rerun names it
    # (exit 5), and --force stops it, removes its overlays and boots again (stale lock)
    ib_start() {
        "$BIN" --connect qemu:///system --vm rc-multi-sql --backup-path "$fx" --restore-path "$dir" \
            --instant-boot --name "$name" "$@" >"$WORK/ib.log" 2>&1 &
        pid=$!
        for i in $(seq 60); do
            grep -q "Started transient VM" "$WORK/ib.log" && return 0
            kill -0 $pid 2>/dev/null || { cat "$WORK/ib.log" >&2; die "instant boot exited early"; }
            sleep 0.5
        done
        die "instant boot did not start"
    }
    ib_start
    kill -9 $pid; wait $pid 2>/dev/null || true
    local rc=0
    "$BIN" --connect qemu:///system --vm rc-multi-sql --backup-path "$fx" --restore-path "$dir" \
        --instant-boot --name "$name" >"$WORK/ib2.log" 2>&1 || rc=$?
    [ $rc = 5 ] || { cat "$WORK/ib2.log" >&2; die "rerun after kill -9: exit $rc, expected 5"; }
    grep -q "left over from an interrupted instant boot" "$WORK/ib2.log" || die "no leftover message"
    ib_start --force
    grep -q "Stopping the leftover instant-boot VM" "$WORK/ib.log" || die "--force did not clear the leftover"
    kill -TERM $pid
    wait $pid || die "instant boot ended with exit $?"
    virsh -c qemu:///system dominfo "$name" >/dev/null 2>&1 && die "$name still exists after SIGTERM"
    ls "$dir"/"$name"-* >/dev/null 2>&1 && die "overlays left after SIGTERM"
    ok "instant: kill -9 leaves a named leftover; --force clears it and boots again (stale lock recovered)"

    # UEFI + TPM, point 0 of the period, made permanent by block pull
    name=vmr-e2e-ib-uefi
    vmr --vm rc-uefi-tpm --backup-path "$fx" --restore-path "$dir" --instant-boot --pull \
        --name "$name" --restore-point 0
    [[ $(virsh -c qemu:///system dominfo "$name") =~ Persistent:\ *yes ]] || die "$name is not persistent after --pull"
    [ "$(virsh -c qemu:///system domstate "$name" | head -1)" = running ] || die "$name is not running"
    local uuid; uuid=$(uuid_of "$name")
    [ -d "/var/lib/libvirt/swtpm/$uuid/tpm2" ] || die "$name: TPM state not under its UUID"
    [ -f "/var/lib/libvirt/qemu/nvram/${name}_VARS.fd" ] || die "$name: NVRAM"
    # durable when the command returns: the files alone are the disks, read while
    # the clone still runs (QEMU flushed its caches, the files were fsynced)
    for d in vda vdb; do
        local ov=$dir/$name-$d.qcow2
        [[ $(qemu-img info -U "$ov") == *"backing file"* ]] && die "$ov still names a backing file when --pull returned"
        [ "$(raw_sha "$ov")" = "$(msha backups/rc-uefi-tpm/2026-W26 0 $d)" ] || die "$name/$d: not point 0 on disk when --pull returned"
    done
    grep -q "pulled data flushed and synced" "$LOG_DIR"/rc-uefi-tpm-*.log || die "--pull did not flush"
    "${VIRSH[@]}" destroy "$name" >/dev/null
    for d in vda vdb; do
        local ov=$dir/$name-$d.qcow2
        [[ $(qemu-img info "$ov") == *"backing file"* ]] && die "$ov still has a backing file after the pull"
        qemu-img check -q "$ov" || die "$ov: qemu-img check"
        [ "$(raw_sha "$ov")" = "$(msha backups/rc-uefi-tpm/2026-W26 0 $d)" ] || die "$name/$d: content is not point 0"
    done
    starts "$name"
    ok "instant: --pull made rc-uefi-tpm permanent (persistent, standalone overlays = point 0, NVRAM, TPM, starts)"
    [ "$(treehash "$fx")" = "$before" ] || die "the backup tree changed"
}

scenario_multi() {
    # weekly layout, 3 disks (virtio + SATA) and a CD-ROM, compressed chain, an archived chain
    local vm=$E2E_PREFIX-multi
    local period=$BK/$vm/2026-W10 arch=$BK/$vm/2026-W10/.archives/chain-2026-03-02
    mkvm "$vm" --cdrom vda:24M:virtio vdb:16M:virtio sda:16M:sata
    io "$vm" vda "write -P 0x11 0 2M"; io "$vm" sda "write -P 0x12 1M 128k"
    backup "$vm" full "$arch" --compress
    io "$vm" vdb "write -P 0x13 3M 64k"
    backup "$vm" inc "$arch" --compress
    truth "$vm" vdb "$WORK/multi-arch-vdb.raw"
    # the chain breaks (vmbackup archives it); a new full starts the period's chain
    # (virtnbdbackup's full removes the old checkpoints itself)
    io "$vm" vda "write -P 0x21 4M 1M"; io "$vm" vdb "write -z 3M 64k"
    backup "$vm" full "$period" --compress
    for d in vda vdb sda; do truth "$vm" $d "$WORK/multi-0-$d.raw"; done
    mixed "$vm" vda 8388608; io "$vm" sda "write -P 0x22 0 64k"; io "$vm" vdb "discard 0 1M"
    backup "$vm" inc "$period" --compress
    for d in vda vdb sda; do truth "$vm" $d "$WORK/multi-1-$d.raw"; done
    io "$vm" vdb "write -P 0x23 5M 192k"; io "$vm" vda "write -P 0x24 20M 64k"
    backup "$vm" inc "$period"
    for d in vda vdb sda; do truth "$vm" $d "$WORK/multi-2-$d.raw"; done
    local before uuid macs
    before=$(treehash "$BK"); uuid=$(uuid_of "$vm"); macs=$(macs_of "$vm")

    # extract sda at the latest point while the VM runs
    vmr --vm "$vm" --backup-path "$BK" --disk sda --restore-path "$WORK/extract"
    same_content "$WORK/extract/$vm-sda.qcow2" "$WORK/multi-2-sda.raw"; ok "multi: extract sda latest, VM running"

    # clone at restore point 1 next to the running original
    vmr --vm "$vm" --backup-path "$BK" --name "$vm-clone" --restore-path "$WORK/clone" --restore-point 1
    for d in vda vdb sda; do same_content "$WORK/clone/$vm-clone-$d.qcow2" "$WORK/multi-1-$d.raw"; done
    [ "$(uuid_of "$vm-clone")" != "$uuid" ] || die "clone kept the UUID"
    [ -z "$(comm -12 <(echo "$macs" | tr ' ' '\n' | sort) <(macs_of "$vm-clone" | tr ' ' '\n' | sort) | grep .)" ] || die "clone kept a MAC"
    virsh -c qemu:///system dumpxml "$vm-clone" | grep -q "device='cdrom'" && die "clone kept the CD-ROM"
    starts "$vm-clone"; ok "multi: clone at point 1 (content, new UUID and MACs, starts)"

    # disk in place: vdb back to point 1 (VM shut off), keeping .pre-restore
    "${VIRSH[@]}" destroy "$vm" >/dev/null
    local vdb; vdb=$(source_of "$vm" vdb)
    cp --sparse=always "$vdb" "$WORK/vdb-before.qcow2"
    vmr --vm "$vm" --backup-path "$BK" --disk vdb --restore-point 1
    same_content "$vdb" "$WORK/multi-1-vdb.raw"
    qemu-img compare -q "$vdb.pre-restore" "$WORK/vdb-before.qcow2" || die ".pre-restore is not the original"
    rm -f "$vdb.pre-restore"; ok "multi: disk in place vdb at point 1 (.pre-restore kept)"

    # DR over the (shut off) VM at the latest point
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/dr" --force
    for d in vda vdb sda; do same_content "$WORK/dr/$vm-$d.qcow2" "$WORK/multi-2-$d.raw"; done
    [ "$(uuid_of "$vm")" = "$uuid" ] || die "DR changed the UUID"
    [ "$(macs_of "$vm")" = "$macs" ] || die "DR changed the MACs"
    [ "$(source_of "$vm" vda)" = "$WORK/dr/$vm-vda.qcow2" ] || die "DR disk path"
    starts "$vm"; ok "multi: DR --force latest (content, UUID, MACs, starts)"

    # the archived chain, by path, data only
    vmr --vm "$arch" --restore-path "$WORK/arch" --skip-config
    same_content "$WORK/arch/$vm-vdb.qcow2" "$WORK/multi-arch-vdb.raw"; ok "multi: archived chain by path (data-only)"

    [ "$(treehash "$BK")" = "$before" ] || die "the backup tree changed"
    ok "multi: backup tree byte-identical"
}

scenario_uefi() {
    # UEFI (TCG) with an emulated TPM 2.0; NVRAM per checkpoint; vmbackup's tpm-state copy
    local vm=$E2E_PREFIX-uefi
    local period=$BK/$vm/2026-W11
    mkvm "$vm" --uefi --tpm vda:16M:virtio
    sleep 3
    io "$vm" vda "write -P 0x31 0 1M"
    backup "$vm" full "$period"
    io "$vm" vda "write -P 0x32 2M 64k"
    backup "$vm" inc "$period"
    truth "$vm" vda "$WORK/uefi-1-vda.raw"
    local uuid; uuid=$(uuid_of "$vm")
    # vmbackup copies swtpm's state next to the chain
    mkdir -p "$period/tpm-state"
    cp -a "/var/lib/libvirt/swtpm/$uuid/tpm2" "$period/tpm-state/"
    printf 'VM Name:            %s\nVM UUID:            %s\n' "$vm" "$uuid" >"$period/tpm-state/BACKUP_METADATA.txt"
    date +%s >"$period/.tpm-backup-marker"
    local nv_backup; nv_backup=$(ls "$period"/*_VARS*.fd.virtnbdbackup.1 | head -1)
    [ -n "$nv_backup" ] || die "virtnbdbackup saved no NVRAM copy"
    "${VIRSH[@]}" destroy "$vm" >/dev/null
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/uefi-dr" --force | tee "$WORK/uefi.out"
    same_content "$WORK/uefi-dr/$vm-vda.qcow2" "$WORK/uefi-1-vda.raw"
    [ "$(uuid_of "$vm")" = "$uuid" ] || die "UUID"
    cmp -s "$nv_backup" "/var/lib/libvirt/qemu/nvram/${vm}_VARS.fd" || die "NVRAM is not the checkpoint's copy"
    [ -d "/var/lib/libvirt/swtpm/$uuid/tpm2" ] || die "TPM state missing"
    grep -q "TPM ✓" "$LOG_DIR"/*.log || die "summary has no TPM ✓"
    starts "$vm"; ok "uefi: DR with NVRAM of checkpoint 1 and TPM state, starts"
}

scenario_long() {
    # accumulate layout (chain at the VM root), 31 points, small scattered writes
    local vm=$E2E_PREFIX-long
    local dir=$BK/$vm
    mkvm "$vm" vda:8M:virtio
    backup "$vm" full "$dir"
    local i
    for i in $(seq 1 30); do
        io "$vm" vda "write -P $((i + 64)) $(( (i * 7919 % 120) * 65536 )) $(( (i % 3 + 1) * 4096 ))"
        backup "$vm" inc "$dir"
        [ "$i" = 17 ] && truth "$vm" vda "$WORK/long-17.raw"
    done
    truth "$vm" vda "$WORK/long-30.raw"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/long-latest" --skip-config
    same_content "$WORK/long-latest/$vm-vda.qcow2" "$WORK/long-30.raw"; ok "long: 31-point accumulate chain, latest"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/long-17" --skip-config --restore-point 17
    same_content "$WORK/long-17/$vm-vda.qcow2" "$WORK/long-17.raw"; ok "long: point 17"
}

scenario_shrink() {
    # a disk detached mid-chain: earlier points restore both disks
    local vm=$E2E_PREFIX-shrink
    local period=$BK/$vm/202603
    mkvm "$vm" vda:16M:virtio vdb:8M:virtio
    io "$vm" vda "write -P 0x41 0 1M"; io "$vm" vdb "write -P 0x42 0 1M"
    backup "$vm" full "$period"
    io "$vm" vdb "write -P 0x43 2M 64k"
    backup "$vm" inc "$period"
    for d in vda vdb; do truth "$vm" $d "$WORK/shrink-1-$d.raw"; done
    "${VIRSH[@]}" detach-disk "$vm" vdb --config >/dev/null
    "${VIRSH[@]}" destroy "$vm" >/dev/null; "${VIRSH[@]}" start "$vm" >/dev/null
    io "$vm" vda "write -P 0x44 4M 64k"
    backup "$vm" inc "$period"
    truth "$vm" vda "$WORK/shrink-2-vda.raw"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/shrink-1" --skip-config --restore-point 1
    for d in vda vdb; do same_content "$WORK/shrink-1/$vm-$d.qcow2" "$WORK/shrink-1-$d.raw"; done
    ok "shrink: point 1 restores the later-detached disk"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/shrink-2" --skip-config
    same_content "$WORK/shrink-2/$vm-vda.qcow2" "$WORK/shrink-2-vda.raw"
    [ ! -e "$WORK/shrink-2/$vm-vdb.qcow2" ] || die "latest point restored the detached disk"
    ok "shrink: latest restores only the remaining disk"
}

scenario_copy() {
    # daily layout with an offline copy backup
    local vm=$E2E_PREFIX-copy
    local period=$BK/$vm/20260305
    mkvm "$vm" vda:8M:virtio
    io "$vm" vda "write -P 0x51 1M 1M"
    "${VIRSH[@]}" destroy "$vm" >/dev/null
    truth_off() { qemu-img convert -U -f qcow2 -O raw "$IMAGES/$vm-vda.qcow2" "$1"; }
    truth_off "$WORK/copy-vda.raw"
    backup "$vm" copy "$period"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/copy" --skip-config
    same_content "$WORK/copy/$vm-vda.qcow2" "$WORK/copy-vda.raw"; ok "copy: offline copy backup"
}

scenario_diff() {
    # full, inc, then two differentials: "latest" is the newest differential's state,
    # restore point 1 ignores them
    local vm=$E2E_PREFIX-diff
    local dir=$BK/$vm/20260310
    mkvm "$vm" vda:8M:virtio
    io "$vm" vda "write -P 0x61 0 1M"
    backup "$vm" full "$dir" --compress
    io "$vm" vda "write -P 0x62 1M 64k"
    backup "$vm" inc "$dir" --compress
    truth "$vm" vda "$WORK/diff-1.raw"
    io "$vm" vda "write -P 0x63 2M 64k"
    backup "$vm" diff "$dir"
    sleep 1
    io "$vm" vda "write -P 0x64 3M 64k"
    backup "$vm" diff "$dir"
    truth "$vm" vda "$WORK/diff-latest.raw"
    ls "$dir"/vda.diff.*.data >/dev/null || die "no differential written"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/diff-latest" --skip-config
    same_content "$WORK/diff-latest/$vm-vda.qcow2" "$WORK/diff-latest.raw"; ok "diff: latest includes the newest differential"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/diff-1" --skip-config --restore-point 1
    same_content "$WORK/diff-1/$vm-vda.qcow2" "$WORK/diff-1.raw"; ok "diff: restore point 1 ignores the differentials"
}

scenario_boot() {
    # the test guest (tests/guest) restored in every mode boots from its restored boot
    # disk and prints GUEST-OK boots=N data=SHA on ttyS0 (a file): N=2 proves the boot
    # counter came back from the backup (1) and the guest writes its restored disk; SHA
    # is the pattern region of the data disk, which must be the restore point's.
    # Every restored domain keeps the backup's serial file S0 (a test boot's gets its
    # own): the domains vmrestore starts itself (instant boot) use it, one at a time;
    # the ones the test starts get their own, so several boot side by side (TCG: 5-15 s
    # a boot)
    local t0=$SECONDS
    GUEST=$("$ROOT_DIR/tests/guest/build.sh")
    # shellcheck source=/dev/null
    . "$GUEST/guest.env"
    local vm=vmr-guest-$$
    local period=$BK/$vm/2026-W19 sd=$WORK/serial
    local s0=$sd/$vm.log
    mkdir -p "$sd"
    EXTRA_DOMAINS+=("$vm" "$vm-clone" "$vm-pit" "$vm-ib" "$vm-pull")
    # point 0: the pattern as the guest wrote it; point 1: qemu-io overwrote 192 KiB of it
    local p0=$PATTERN_SHA256 p1 off=$((2 * 1048576)) len=$((192 * 1024))
    cp "$GUEST/pattern.bin" "$WORK/pattern-1.bin"
    head -c $len /dev/zero | tr '\0' '\245' |
        dd of="$WORK/pattern-1.bin" bs=64k seek=$((off - DATA_OFFSET)) oflag=seek_bytes iflag=fullblock conv=notrunc status=none
    p1=$(sha256sum <"$WORK/pattern-1.bin" | cut -d' ' -f1)
    [ "$p1" != "$p0" ] || die "point 1 pattern"

    local t1=$SECONDS
    mkguest "$vm" "$WORK/guest" "$s0"
    guest_ok "$vm" "$s0" 1 "$p0"
    ok "boot: test guest (kernel $KERNEL) up in $((SECONDS - t1))s: GUEST-OK boots=1, pattern written"
    backup "$vm" full "$period"
    io "$vm" vdb "write -P 0xa5 $off $len"
    backup "$vm" inc "$period"
    local before uuid
    before=$(treehash "$BK/$vm"); uuid=$(uuid_of "$vm")

    # --test-boot of the latest point next to the running original: the isolated
    # throwaway clone must print GUEST-OK with point 1's data on its own console, and
    # vmrestore must remove everything it made
    local t2=$SECONDS
    EXTRA_PREFIXES+=("$vm-testboot-")
    log "vmrestore --vm $vm --test-boot --test-boot-expect 'GUEST-OK boots=2 data=$p1'"
    VMRESTORE_TESTBOOT_DIR=$WORK/testboot "$BIN" --connect qemu:///system --vm "$vm" --backup-path "$BK" \
        --test-boot --test-boot-timeout 240 --test-boot-expect "(?m)^GUEST-OK boots=2 data=$p1" \
        --report "$WORK/tb-guest" --json >"$WORK/tb-guest.json" || die "--test-boot of the bootable guest: exit $?"
    python3 - "$WORK/tb-guest.json" <<'PY' || die "--test-boot JSON"
import json, sys
tb = json.load(open(sys.argv[1]))["test_boot"]
assert tb["outcome"] == "alive" and any(s.startswith("console") for s in tb["signs"]), tb
PY
    virsh -c qemu:///system list --all --name | grep -q "^$vm-testboot-" && die "a test-boot domain is left"
    [ -z "$(ls -A "$WORK/testboot" 2>/dev/null)" ] || die "test-boot overlays are left: $(ls "$WORK/testboot")"
    ok "boot: --test-boot (latest) of the running VM sees GUEST-OK with point 1's data in $((SECONDS - t2))s; nothing left"

    # a clone (latest) and a point-in-time clone (point 0) next to the running original
    vmr --vm "$vm" --backup-path "$BK" --name "$vm-clone" --restore-path "$WORK/clone"
    vmr --vm "$vm" --backup-path "$BK" --name "$vm-pit" --restore-path "$WORK/pit" --restore-point 0
    local c
    for c in "$vm-clone" "$vm-pit"; do
        [ "$(uuid_of "$c")" != "$uuid" ] || die "$c kept the UUID"
        # vmrestore, like virt-clone, gives a clone new disks, NVRAM, name, UUID and MACs
        # but leaves its serial file where the original's is
        [ "$(serial_of "$c")" = "$s0" ] || die "$c: serial file $(serial_of "$c"), not the backup's"
        serial_to "$c" "$sd/$c.log"
    done
    # the original, shut off, with vdb restored in place to point 0
    "${VIRSH[@]}" destroy "$vm" >/dev/null
    local vdb; vdb=$(source_of "$vm" vdb)
    vmr --vm "$vm" --backup-path "$BK" --disk vdb --restore-point 0
    rm -f "$vdb.pre-restore"
    [ "$(serial_of "$vm")" = "$s0" ] || die "$vm: serial file changed by the in-place restore"
    serial_to "$vm" "$sd/$vm-inplace.log"

    # round 1, four guests side by side: the clones, the original, and an instant boot
    # (latest) from the backup over NBD, stopped by Ctrl-C after the check
    t2=$SECONDS
    for c in "$vm-clone" "$vm-pit" "$vm"; do "${VIRSH[@]}" start "$c" >/dev/null; done
    rm -f "$s0"
    log "vmrestore --vm $vm --instant-boot --name $vm-ib (background)"
    "$BIN" --connect qemu:///system --vm "$vm" --backup-path "$BK" --restore-path "$WORK/ib" \
        --instant-boot --name "$vm-ib" >"$WORK/guest-ib.log" 2>&1 &
    local pid=$! i
    EXTRA_PIDS+=("$pid")
    for i in $(seq 120); do
        grep -q "Started transient VM" "$WORK/guest-ib.log" && break
        kill -0 $pid 2>/dev/null || { cat "$WORK/guest-ib.log" >&2; die "instant boot exited early"; }
        sleep 0.5
    done
    grep -q "Started transient VM" "$WORK/guest-ib.log" || die "instant boot did not start"
    guest_ok "$vm-clone" "$sd/$vm-clone.log" 2 "$p1"
    ok "boot: clone (latest) boots and reads point 1 (new UUID; boots=2, data $p1)"
    guest_ok "$vm-pit" "$sd/$vm-pit.log" 2 "$p0"
    ok "boot: point-in-time clone (point 0) boots and reads point 0 (boots=2, data $p0)"
    guest_ok "$vm" "$sd/$vm-inplace.log" 2 "$p0"
    ok "boot: disk in place (vdb at point 0, VM shut off): the original boots and reads point 0"
    guest_ok "$vm-ib" "$s0" 2 "$p1"
    kill -INT $pid
    wait $pid || die "instant boot ended with exit $?"
    virsh -c qemu:///system dominfo "$vm-ib" >/dev/null 2>&1 && die "$vm-ib still exists after Ctrl-C"
    ls "$WORK/ib/$vm-ib"-* >/dev/null 2>&1 && die "overlays left after Ctrl-C"
    [ "$(treehash "$BK/$vm")" = "$before" ] || die "the instant-boot guest wrote into the backup"
    ok "boot: --instant-boot (latest) boots from the backup and reads point 1; Ctrl-C cleans up, backup untouched"
    for c in "$vm-clone" "$vm-pit" "$vm"; do "${VIRSH[@]}" destroy "$c" >/dev/null; done
    [ "$(guest_boots "$WORK/clone/$vm-clone-vdb.qcow2")" = 2 ] || die "$vm-clone: the boot counter is not on the restored disk"
    log "boot: round 1 (4 guests) took $((SECONDS - t2))s"

    # round 2, side by side: DR --force (latest) over the original, which booted since,
    # and instant boot --pull (point 0), a standalone persistent clone when it returns
    t2=$SECONDS
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/dr" --force
    [ "$(uuid_of "$vm")" = "$uuid" ] || die "DR changed the UUID"
    [ "$(serial_of "$vm")" = "$s0" ] || die "DR changed the serial file"
    serial_to "$vm" "$sd/$vm-dr.log"
    "${VIRSH[@]}" start "$vm" >/dev/null
    rm -f "$s0"
    vmr --vm "$vm" --backup-path "$BK" --restore-path "$WORK/pull" --instant-boot --pull \
        --name "$vm-pull" --restore-point 0
    [[ $(virsh -c qemu:///system dominfo "$vm-pull") =~ Persistent:\ *yes ]] || die "$vm-pull is not persistent after --pull"
    local d
    for d in vda vdb; do
        [[ $(qemu-img info -U "$WORK/pull/$vm-pull-$d.qcow2") == *"backing file"* ]] && die "$vm-pull/$d still has a backing file"
    done
    guest_ok "$vm" "$sd/$vm-dr.log" 2 "$p1"
    "${VIRSH[@]}" destroy "$vm" >/dev/null
    [ "$(guest_boots "$WORK/dr/$vm-vdb.qcow2")" = 2 ] || die "$vm: the boot counter is not on the DR disk"
    ok "boot: DR --force (latest) boots with its UUID and reads point 1; its writes land in the restored disk"
    guest_ok "$vm-pull" "$s0" 2 "$p0"
    "${VIRSH[@]}" destroy "$vm-pull" >/dev/null
    [ "$(guest_boots "$WORK/pull/$vm-pull-vdb.qcow2")" = 2 ] || die "$vm-pull: the boot counter is not on the pulled disk"
    ok "boot: --instant-boot --pull (point 0) boots and reads point 0; pulled disks standalone with the guest's writes"
    [ "$(treehash "$BK/$vm")" = "$before" ] || die "the backup tree changed"
    log "boot: round 2 (2 guests) took $((SECONDS - t2))s; scenario $((SECONDS - t0))s"
}

e2e_setup
[ -x "$BIN" ] || (cd "$ROOT_DIR" && cargo build --locked --bin vmrestore)
for s in $SCENARIOS; do
    log "=== scenario $s"
    "scenario_$s"
done
