#!/usr/bin/env bash
# Many frames, many extents: time and peak RSS of restore_chain (qcow2 output, .chksum
# verification and read-back included) against the copy floor, on genchain's
# f1m/f4m (1M/4M one-byte frames), x16m (16M-extent chain) and s100k (100,000 4 KiB
# extents 64 KiB apart) — optionally against an older restore_chain (BEFORE=path),
# in alternating runs: before, after, cp --sparse=always of the final raw image, and
# `cat` of the chain's data files (the read floor).
# Every timed region ends with the output durable (restore_chain fsyncs; cp is
# followed by `sync <file>`), after an untimed global `sync`.
#
# Environment:
#   N=3                  runs per tool (median reported)
#   CASES="f1m f4m x16m s100k"   (any genchain case: a b c c1 d e too, to check the
#                        usual chains did not get slower)
#   GENFLAGS=            extra genchain flags (--compress: the LZ4 variant)
#   BEFORE=              an older restore_chain binary (rows "before")
#   WORK=/var/tmp/vmrestore-bench-extents   (removed at the end unless KEEP=1)
#   CARGO_TARGET_DIR     where cargo builds (default: <repo>/target)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
CASES=${CASES:-"f1m f4m x16m s100k"}
BEFORE=${BEFORE:-}
WORK=${WORK:-/var/tmp/vmrestore-bench-extents}
KEEP=${KEEP:-0}
case "$WORK" in
    "$repo"|"$repo"/*) echo "WORK=$WORK must be outside the repository" >&2; exit 1 ;;
esac
(cd "$repo" && cargo build --release --locked -q -p engine --example genchain --example restore_chain)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/examples
mkdir -p "$WORK"
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
results=$WORK/results.tsv
: >"$results"

# run <case> <tool> <out> <cmd...>: one timed run, a row in results.tsv
run() {
    local case=$1 tool=$2 out=$3; shift 3
    rm -rf "$out"
    sync
    local t0 t1
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M %U %S" -o "$WORK/stats" "$@" >"$WORK/tool.log" 2>&1 \
        || { cat "$WORK/tool.log" >&2; exit 1; }
    if [ "$tool" = cp ] && [ -f "$out" ]; then sync "$out"; fi
    t1=$(date +%s.%N)
    local rss u s alloc
    read -r rss u s <"$WORK/stats"
    alloc=$(du -sk "$out" | cut -f1)
    printf '%s\t%s\t%.3f\t%s\t%.2f\t%s\n' "$case" "$tool" "$(echo "$t1 - $t0" | bc -l)" \
        "$rss" "$(echo "$u + $s" | bc -l)" "$alloc" >>"$results"
    tail -1 "$results"
}

for case in $CASES; do
    chain=$WORK/chain-$case
    rm -rf "$chain"
    # shellcheck disable=SC2086
    "$bin/genchain" "$case" "$chain" ${GENFLAGS:-}
    disks=vda
    [ "$case" = e ] && disks=vda,vdb,vdc
    IFS=, read -r -a dlist <<<"$disks"
    rm -rf "$WORK/final.raw" "$WORK/final"
    "$bin/restore_chain" "$chain" "$disks" "$WORK/final.raw" --force >/dev/null
    if [ "${#dlist[@]}" = 1 ]; then finals=("$WORK/final.raw"); else finals=("$WORK"/final/*.raw); fi
    for _ in $(seq 1 "$N"); do
        [ -n "$BEFORE" ] && run "$case" before "$WORK/out.qcow2" "$BEFORE" "$chain" "$disks" "$WORK/out.qcow2"
        run "$case" after "$WORK/out.qcow2" "$bin/restore_chain" "$chain" "$disks" "$WORK/out.qcow2"
        for i in "${!dlist[@]}"; do
            o=$WORK/out.qcow2
            [ "${#dlist[@]}" = 1 ] || o=$WORK/out.qcow2/${dlist[$i]}.qcow2
            qemu-img compare -q "$o" "${finals[$i]}" || { echo "$case: content differs" >&2; exit 1; }
        done
        if [ "${#dlist[@]}" = 1 ]; then
            run "$case" cp "$WORK/cp.raw" cp --sparse=always "$WORK/final.raw" "$WORK/cp.raw"
        else
            # shellcheck disable=SC2016
            run "$case" cp "$WORK/cp" bash -c 'mkdir "$0" && cp --sparse=always "$@" "$0"/ && sync "$0"/*' "$WORK/cp" "${finals[@]}"
        fi
        # the read floor: the chain files themselves, read once (what a restore of
        # millions of tiny frames must at least do)
        # shellcheck disable=SC2016
        run "$case" read "$WORK/read.out" bash -c 'cat "$0"/*.data >/dev/null && : >"$1"' "$chain" "$WORK/read.out"
    done
    rm -rf "$chain" "$WORK/final.raw" "$WORK/final" "$WORK/out.qcow2" "$WORK/cp.raw" "$WORK/cp"
done

python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.OrderedDict()
for l in open(sys.argv[1]):
    case, tool, t, rss, cpu, alloc = l.split("\t")
    rows.setdefault(case, collections.OrderedDict()).setdefault(tool, []).append(
        (float(t), int(rss), float(cpu), int(alloc)))
print("\n| case | tool | median s (min–max) | vs cp | peak RSS MiB | CPU s | output KiB allocated |")
print("|---|---|---|---|---:|---:|---:|")
for case, tools in rows.items():
    floor = statistics.median(r[0] for r in tools["cp"])
    for tool, rs in tools.items():
        m = statistics.median(r[0] for r in rs)
        print(f"| {case} | {tool} | {m:.2f} ({min(r[0] for r in rs):.2f}–{max(r[0] for r in rs):.2f}) "
              f"| {m / floor:.2f}× | {max(r[1] for r in rs) / 1024:.1f} | "
              f"{statistics.median(r[2] for r in rs):.2f} | {max(r[3] for r in rs)} |")
PY
