#!/usr/bin/env bash
# Many frames, many extents: time and peak RSS of restore_chain (qcow2 output, .chksum
# verification and read-back included) against the copy floor, on genchain's
# f1m/f4m (1M/4M one-byte frames), x16m (16M-extent chain) and s100k (100,000 4 KiB
# extents 64 KiB apart) — optionally against an older restore_chain (BEFORE=path),
# in alternating runs: before, after, cp --sparse=always of the final raw image.
# Every timed region ends with the output durable (restore_chain fsyncs; cp is
# followed by `sync <file>`), after an untimed global `sync`.
#
# Environment:
#   N=3                  runs per tool (median reported)
#   CASES="f1m f4m x16m s100k"
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
    rm -f "$out"
    sync
    local t0 t1
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M %U %S" -o "$WORK/stats" "$@" >"$WORK/tool.log" 2>&1 \
        || { cat "$WORK/tool.log" >&2; exit 1; }
    [ "$tool" = cp ] && sync "$out"
    t1=$(date +%s.%N)
    local rss u s alloc
    read -r rss u s <"$WORK/stats"
    alloc=$(du -k "$out" | cut -f1)
    printf '%s\t%s\t%.3f\t%s\t%.2f\t%s\n' "$case" "$tool" "$(echo "$t1 - $t0" | bc -l)" \
        "$rss" "$(echo "$u + $s" | bc -l)" "$alloc" >>"$results"
    tail -1 "$results"
}

for case in $CASES; do
    chain=$WORK/chain-$case
    rm -rf "$chain"
    "$bin/genchain" "$case" "$chain"
    "$bin/restore_chain" "$chain" vda "$WORK/final.raw" --force >/dev/null
    for _ in $(seq 1 "$N"); do
        [ -n "$BEFORE" ] && run "$case" before "$WORK/out.qcow2" "$BEFORE" "$chain" vda "$WORK/out.qcow2"
        run "$case" after "$WORK/out.qcow2" "$bin/restore_chain" "$chain" vda "$WORK/out.qcow2"
        qemu-img compare -q "$WORK/out.qcow2" "$WORK/final.raw" || { echo "$case: content differs" >&2; exit 1; }
        run "$case" cp "$WORK/cp.raw" cp --sparse=always "$WORK/final.raw" "$WORK/cp.raw"
    done
    rm -rf "$chain" "$WORK/final.raw" "$WORK/out.qcow2" "$WORK/cp.raw"
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
