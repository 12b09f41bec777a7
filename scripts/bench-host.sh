#!/usr/bin/env bash
# Whole-host restore (`vmrestore --all`) against the device floor and against one
# restore per VM, in one interleaved run (issue 20).
#
# The host: VMS generated VMs (genchain case `h`: vda 2 GiB with a 256 MiB full, vdb
# 1 GiB with a 128 MiB full, each with 3 incrementals of 1/8 of its full), laid out
# as a vmbackup tree $WORK/backups/vmI/2026-W01/. Per round, in this order:
#   all      vmrestore --all --skip-config (default --jobs, chosen from the device)
#   all-jN   the same with --jobs N, for every N in $JOBS (e.g. JOBS="1 4")
#   singles  vmrestore --vm vmI --skip-config, one after the other (the shell loop
#            vmrestore 0.6.0 users run)
#   floor    cp --sparse=always of every final raw image, then sync of the copies
#   write    dd of as many bytes as each final image has allocated, conv=fsync: the
#            device's sequential write of the same bytes, without reading anything
# Every timed region ends with its output durable (vmrestore fsyncs the images and
# their directory before it renames them into place; cp is followed by `sync`), and
# starts after an untimed global `sync`. vmrestore runs verify (.chksum) and read
# back, as by default. Inputs come from the page cache (generated just before);
# COLD=1 drops the whole page cache before every run instead (echo 3 >
# /proc/sys/vm/drop_caches), so every tool reads its input from disk.
#
# Environment:
#   VMS=8        number of VMs      N=3   rounds (median reported)
#   JOBS=        extra --jobs values to time
#   WORK=/var/tmp/vmrestore-bench-host   (removed at the end unless KEEP=1)
#   CARGO_TARGET_DIR   where cargo builds (default: <repo>/target)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
VMS=${VMS:-8}
N=${N:-3}
JOBS=${JOBS:-}
COLD=${COLD:-0}
WORK=${WORK:-/var/tmp/vmrestore-bench-host}
KEEP=${KEEP:-0}
case "$WORK" in
    "$repo"|"$repo"/*) echo "WORK=$WORK must be outside the repository" >&2; exit 1 ;;
esac
command -v qemu-img >/dev/null || { echo "qemu-img is needed to check the restored images" >&2; exit 1; }
(cd "$repo" && cargo build --release --locked -q -p engine --example genchain --example restore_chain &&
    cargo build --release --locked -q --bin vmrestore)
target=${CARGO_TARGET_DIR:-$repo/target}/release
vmrestore=$target/vmrestore
mkdir -p "$WORK"
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
rm -rf "$WORK/backups" "$WORK/finals" "$WORK/gen"
results=$WORK/results.tsv
: >"$results"

# --- the host's backup tree and the final images --------------------------------------
for i in $(seq 1 "$VMS"); do
    gen=$WORK/gen/vm$i
    "$target/examples/genchain" h "$gen" --seed "$i" >/dev/null
    sed -i "s|<name>bench</name>|<name>vm$i</name>|; s|/bench-|/vm$i-|g" "$gen"/vmconfig.*.xml
    mv "$gen/bench.cpt" "$gen/vm$i.cpt"
    mkdir -p "$WORK/backups/vm$i"
    mv "$gen" "$WORK/backups/vm$i/2026-W01"
    "$target/examples/restore_chain" "$WORK/backups/vm$i/2026-W01" vda,vdb "$WORK/finals/vm$i.raw" --force >/dev/null
done
rmdir "$WORK/gen"
finals=("$WORK"/finals/vm*/*.raw)
data=$(du -ck "${finals[@]}" | tail -1 | cut -f1)
echo "host: $VMS VMs x 2 disks, $((data / 1024)) MiB of data in the final images"

# a clean environment for vmrestore: its own log dir and (empty) config root
env_run=(env -i PATH="$PATH" TZ=UTC LOG_DIR="$WORK/log" VMRESTORE_CONFIG_ROOT="$WORK/config")
# check <out-dir>: every restored image equals its final raw image
check() {
    local i d img
    for i in $(seq 1 "$VMS"); do
        for d in vda vdb; do
            img=$(find "$1" -name "vm$i-$d.*" -o -name "vm$i*-$d.qcow2" | head -1)
            [ -n "$img" ] || { echo "vm$i/$d: no image under $1" >&2; ls -R "$1" >&2; exit 1; }
            qemu-img compare -q "$img" "$WORK/finals/vm$i/$d.raw" ||
                { echo "vm$i/$d: $img differs from the final image" >&2; exit 1; }
        done
    done
}
# timed <tool> <out> <cmd...>: one timed run, a row in results.tsv
timed() {
    local tool=$1 out=$2; shift 2
    rm -rf "$out" "$WORK/log" "$WORK/config"
    mkdir -p "$WORK/log" "$WORK/config"
    sync
    [ "$COLD" = 1 ] && echo 3 >/proc/sys/vm/drop_caches
    local t0 t1 rss u s
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M %U %S" -o "$WORK/stats" "$@" >"$WORK/tool.log" 2>&1 ||
        { cat "$WORK/tool.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    read -r rss u s <"$WORK/stats"
    printf '%s\t%.3f\t%s\t%.2f\t%s\n' "$tool" "$(echo "$t1 - $t0" | bc -l)" "$rss" \
        "$(echo "$u + $s" | bc -l)" "$(du -sk "$out" | cut -f1)" >>"$results"
    tail -1 "$results"
}
all_args=(--all --skip-config --backup-path "$WORK/backups" --connect test:///default)
for _ in $(seq 1 "$N"); do
    timed all "$WORK/out" "${env_run[@]}" "$vmrestore" "${all_args[@]}" --restore-path "$WORK/out"
    check "$WORK/out"
    for j in $JOBS; do
        timed "all-j$j" "$WORK/out" "${env_run[@]}" "$vmrestore" "${all_args[@]}" --jobs "$j" --restore-path "$WORK/out"
    done
    # shellcheck disable=SC2016
    timed singles "$WORK/out" "${env_run[@]}" vmrestore="$vmrestore" VMS="$VMS" WORK="$WORK" bash -c 'for i in $(seq 1 "$VMS"); do
        "$vmrestore" --vm "vm$i" --skip-config --backup-path "$WORK/backups" --connect test:///default \
            --restore-path "$WORK/out/vm$i" || exit 1; done'
    check "$WORK/out"
    # shellcheck disable=SC2016
    timed floor "$WORK/cp" bash -c 'mkdir -p "$0" && for f in "$@"; do
        v=$(basename "$(dirname "$f")"); cp --sparse=always "$f" "$0/$v-$(basename "$f")"; done && sync "$0"/* "$0"' \
        "$WORK/cp" "${finals[@]}"
    # shellcheck disable=SC2016
    timed write "$WORK/cp" bash -c 'mkdir -p "$0" && for f in "$@"; do
        k=$(du -k "$f" | cut -f1); dd if=/dev/zero of="$0/$(basename "$(dirname "$f")")-$(basename "$f")" \
            bs=1M count=$(((k + 1023) / 1024)) conv=fsync status=none || exit 1; done && sync "$0"' \
        "$WORK/cp" "${finals[@]}"
done

# --- the table: median per tool, ratios to the floor -------------------------------------
echo
echo "| tool | median s (min-max) | x floor (cp) | x write | peak RSS MiB (max) | CPU s | output KiB |"
echo "|---|---:|---:|---:|---:|---:|---:|"
python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.OrderedDict()
for l in open(sys.argv[1]):
    tool, t, rss, cpu, out = l.split("\t")
    rows.setdefault(tool, []).append((float(t), int(rss), float(cpu), int(out)))
med = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
for tool, rs in rows.items():
    m = med[tool]
    print(f"| {tool} | {m:.2f} ({min(r[0] for r in rs):.2f}-{max(r[0] for r in rs):.2f}) "
          f"| {m / med['floor']:.2f} | {m / med['write']:.2f} | {max(r[1] for r in rs) / 1024:.1f} "
          f"| {statistics.median(r[2] for r in rs):.2f} | {max(r[3] for r in rs)} |")
PY
echo
echo "raw rows (tool, wall s, peak RSS KiB, CPU s, output KiB): $results"
[ "$KEEP" = 1 ] || cp "$results" "/var/tmp/bench-host-$(date +%F).tsv"
