# shellcheck shell=bash
# Scenario `all` (sourced by run.sh): a whole-host DR of three VMs into the real
# libvirtd defines them all with their identity, and each starts.

scenario_all() {
    local fx=$WORK/all-backups vm
    mkdir -p "$fx"
    for vm in rc-multi-sql rc-uefi-tpm rc-acc-files; do
        if virsh -c qemu:///system dominfo "$vm" >/dev/null 2>&1; then
            log "SKIP all: a domain named $vm already exists on this host"
            return 0
        fi
        cp -a "$ROOT_DIR/tests/fixtures/real-chains/backups/$vm" "$fx/"
    done
    cp -a "$ROOT_DIR/tests/fixtures/real-chains/backups/_state" "$fx/"
    EXTRA_DOMAINS+=(rc-multi-sql rc-uefi-tpm rc-acc-files)
    vmr --all --backup-path "$fx" --restore-path "$WORK/all-dr" --jobs 2 --json >"$WORK/all.json" \
        || die "whole-host DR failed"
    for vm in rc-multi-sql rc-uefi-tpm rc-acc-files; do
        virsh -c qemu:///system dominfo "$vm" >/dev/null || die "$vm not defined"
        starts "$vm"
    done
    python3 - "$WORK/all.json" <<'PY' || die "whole-host JSON"
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc["ok"] and len(doc["vms"]) == 3 and all(v["exit_code"] == 0 for v in doc["vms"]), doc
PY
    for vm in rc-multi-sql rc-uefi-tpm rc-acc-files; do
        virsh -c qemu:///system undefine "$vm" --nvram >/dev/null 2>&1 || virsh -c qemu:///system undefine "$vm" >/dev/null
    done
    rm -rf /var/lib/libvirt/swtpm/88551b77-adbf-56aa-950b-b773d24f7f3f
    ok "all: whole-host DR of 3 VMs defines them all; each starts"
}
