#!/usr/bin/env bash
# Restore-speed comparison on generated virtnbdbackup chains (engine/examples/genchain.rs):
#   virtnbdrestore (Debian 12's virtnbdbackup: Python + a qemu-nbd child)
#   cp --sparse=always of the final raw image         (the copy floor)
#   qemu-img convert -O qcow2 of the final raw image
#   restore_chain (engine/examples/restore_chain.rs, release build) into qcow2
# For every case and variant: N alternating runs per tool (default 3), median wall time.
# Every timed region ends with the output durable: restore_chain fsyncs itself; the
# others get `sync <output> <dir>` (an fsync of the output) inside the timed region,
# and virtnbdrestore's region also waits for its qemu-nbd server to exit.
# Peak RSS and CPU (user+sys) come from GNU time; for virtnbdrestore the qemu-nbd server
# is measured separately (a PATH wrapper runs it under GNU time without --fork, then
# returns once its socket exists, as --fork does) and its CPU is added.
# Inputs are read from the page cache (generated just before); an untimed global `sync`
# precedes each run so no run pays for the previous run's writeback.
#
# Environment:
#   N=3                      runs per tool
#   N_D=3*N                  runs per tool for case d (2 MiB: milliseconds, noisier)
#   CASES="a b c c1 d e"     genchain cases (c1 = c' = one file with c's final content;
#                            e = a 3-disk VM, restored in one run by every tool)
#   VARIANTS="plain lz4"     uncompressed / LZ4-compressed chains
#   WORK=/var/tmp/vmrestore-bench   data directory (removed at the end unless KEEP=1)
#   KEEP=0
#   TOOLS="virtnbdrestore cp qemu-img ours"
#   OURS_EXTRA="--no-readback;--no-verify"   extra restore_chain rows, ';'-separated arg sets
#   CARGO_TARGET_DIR         where cargo builds (default: <repo>/target)
#   NO_INSTALL=1             do not apt-get anything
#   COLD=1                   evict the chain files and final.raw from the page cache before
#                            every run (posix_fadvise DONTNEED on those files only), so
#                            every tool reads its input from disk as in a real restore
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-3}
CASES=${CASES:-"a b c c1 d e"}
VARIANTS=${VARIANTS:-"plain lz4"}
WORK=${WORK:-/var/tmp/vmrestore-bench}
KEEP=${KEEP:-0}
COLD=${COLD:-0}
TOOLS=${TOOLS:-"virtnbdrestore cp qemu-img ours"}
OURS_EXTRA=${OURS_EXTRA:-}

case "$WORK" in
    "$repo"|"$repo"/*) echo "WORK=$WORK must be outside the repository" >&2; exit 1 ;;
esac

# --- dependencies (fresh Debian 12) ---------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
apt_install() {
    [ "${NO_INSTALL:-0}" = 1 ] && { echo "missing: $* (NO_INSTALL=1)" >&2; exit 1; }
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
[ "${NO_INSTALL:-0}" = 1 ] || "$repo/scripts/setup.sh"
command -v virtnbdrestore >/dev/null || apt_install virtnbdbackup
# virtnbdbackup pulls qemu-system-x86, which can replace a newer qemu-utils by nothing:
# make sure qemu-img/qemu-nbd are there afterwards.
command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null || apt_install qemu-utils
[ -x /usr/bin/time ] || apt_install time
QEMU_NBD=$(command -v qemu-nbd)

# --- build ------------------------------------------------------------------------------
(cd "$repo" && cargo build --release --locked -q -p engine --example genchain --example restore_chain)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/examples
GEN=$bin/genchain
OURS=$bin/restore_chain

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# qemu-nbd wrapper for virtnbdrestore (see the header).
mkdir -p "$WORK/bin" "$WORK/tmp"   # tmp: virtnbdrestore leaves a qemu-*.log per child there
cat >"$WORK/bin/qemu-nbd" <<EOF
#!/usr/bin/env bash
args=(); sock=; prev=
for a in "\$@"; do
    [ "\$a" = --fork ] && continue
    [ "\$prev" = -k ] && sock=\$a
    args+=("\$a"); prev=\$a
done
setsid /usr/bin/time -f "%e %M %U %S" -o "\$QNBD_STATS" $QEMU_NBD "\${args[@]}" </dev/null >/dev/null 2>&1 &
for _ in \$(seq 1 1000); do [ -S "\$sock" ] && exit 0; sleep 0.005; done
echo "qemu-nbd wrapper: no socket \$sock" >&2; exit 1
EOF
chmod +x "$WORK/bin/qemu-nbd"

now() { date +%s.%N; }
# Drops the (clean) page-cache pages of the given files/directories, nothing else.
evict() {
    python3 - "$@" <<'PY'
import os, sys
for top in sys.argv[1:]:
    paths = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
load() { cut -d' ' -f1 /proc/loadavg; }
results=$WORK/results.tsv
: >"$results"

# run_timed <tool> <case> <variant> <out> <cmd...>: one timed run; appends a result row.
run_timed() {
    local tool=$1 case=$2 variant=$3 out=$4; shift 4
    local stats=$WORK/stats.$$ qstats=$WORK/qstats.$$ l0 t0 t1 rc=0
    rm -rf "$out" "$stats" "$qstats" "$WORK/nbd.sock"
    sync
    [ "$COLD" = 1 ] && evict "$chain" "$finalpath"
    l0=$(load)
    t0=$(now)
    QNBD_STATS=$qstats PATH="$WORK/bin:$PATH" /usr/bin/time -f "%e %M %U %S" -o "$stats" "$@" >>"$WORK/tool.log" 2>&1 || rc=$?
    if [ "$tool" = virtnbdrestore ]; then
        # Wait for the server to exit (it has written everything by then).
        for _ in $(seq 1 3000); do [ -s "$qstats" ] && break; sleep 0.01; done
    fi
    case "$tool" in
        ours*) ;;                                              # fsyncs itself
        virtnbdrestore) sync "$out"/*.qcow2 "$out" ;;
        *) if [ -d "$out" ]; then sync "$out"/* "$out"; else sync "$out" "$(dirname "$out")"; fi ;;
    esac
    t1=$(now)
    if [ "$rc" != 0 ]; then
        echo "FAILED ($rc): $tool $case $variant; see $WORK/tool.log" >&2
        tail -20 "$WORK/tool.log" >&2
        exit 1
    fi
    local rss cpu qrss=0 qcpu=0
    read -r _ rss u s <"$stats" || true
    cpu=$(echo "$u + $s" | bc -l)
    if [ -s "$qstats" ]; then
        read -r _ qrss qu qs <"$qstats"
        qcpu=$(echo "$qu + $qs" | bc -l)
    fi
    printf '%s\t%s\t%s\t%.4f\t%s\t%s\t%s\t%s\t%s\n' "$case" "$variant" "$tool" \
        "$(echo "$t1 - $t0" | bc -l)" "$rss" "$cpu" "$qrss" "$qcpu" "$l0" >>"$results"
    printf '  %-28s %8.4f s  rss %6d KiB  cpu %s s  load %s\n' "$tool" "$(echo "$t1 - $t0" | bc -l)" "$rss" "$cpu" "$l0"
}

command -v bc >/dev/null || apt_install bc

echo "machine: $(nproc) cores, $(uname -r), load $(cat /proc/loadavg), page cache: $([ "$COLD" = 1 ] && echo cold || echo warm)"
echo "work dir: $WORK (free: $(df -h --output=avail "$WORK" | tail -1 | tr -d ' '))"
for variant in $VARIANTS; do
    for case in $CASES; do
        chain=$WORK/chain-$case-$variant
        flags=()
        [ "$variant" = lz4 ] && flags+=(--compress)
        echo "== case $case ($variant) =="
        "$GEN" "$case" "$chain" "${flags[@]}"
        disks=vda
        [ "$case" = e ] && disks=vda,vdb,vdc
        IFS=, read -r -a dlist <<<"$disks"
        # The final raw images for cp / qemu-img (untimed) — also a correctness reference:
        # final.raw, or final/<disk>.raw for a multi-disk VM.
        "$OURS" "$chain" "$disks" "$WORK/final.raw" --force >/dev/null
        if [ "${#dlist[@]}" = 1 ]; then
            finalpath=$WORK/final.raw
            finals=("$finalpath")
        else
            finalpath=$WORK/final
            finals=()
            for d in "${dlist[@]}"; do finals+=("$finalpath/$d.raw"); done
        fi
        out=$WORK/out
        mkdir -p "$out"
        checked=0
        runs=$N
        # The 2 MiB case takes milliseconds: more runs for a stable median.
        [ "$case" = d ] && runs=${N_D:-$((N * 3))}
        for run in $(seq 1 "$runs"); do
            for tool in $TOOLS; do
                case "$tool" in
                    virtnbdrestore)
                        run_timed virtnbdrestore "$case" "$variant" "$out/vnr" \
                            env TMPDIR="$WORK/tmp" virtnbdrestore -U test:///default -n -L "$WORK/virtnbdrestore.log" \
                            -f "$WORK/nbd.sock" -i "$chain" -o "$out/vnr"
                        if [ "$checked" = 0 ]; then
                            for i in "${!dlist[@]}"; do
                                qemu-img compare -q "$out/vnr/bench-${dlist[$i]}.qcow2" "${finals[$i]}" \
                                    || { echo "virtnbdrestore's ${dlist[$i]} differs from restore_chain's" >&2; exit 1; }
                            done
                            checked=1
                        fi
                        rm -rf "$out/vnr" ;;
                    cp)
                        if [ "${#dlist[@]}" = 1 ]; then
                            run_timed cp "$case" "$variant" "$out/cp.raw" cp --sparse=always "$WORK/final.raw" "$out/cp.raw"
                        else
                            # shellcheck disable=SC2016
                            run_timed cp "$case" "$variant" "$out/cp" \
                                bash -c 'mkdir "$0" && cp --sparse=always "$@" "$0"/' "$out/cp" "${finals[@]}"
                        fi
                        rm -rf "$out/cp.raw" "$out/cp" ;;
                    qemu-img)
                        if [ "${#dlist[@]}" = 1 ]; then
                            run_timed qemu-img "$case" "$variant" "$out/conv.qcow2" \
                                qemu-img convert -O qcow2 "$WORK/final.raw" "$out/conv.qcow2"
                        else
                            # shellcheck disable=SC2016
                            run_timed qemu-img "$case" "$variant" "$out/conv" \
                                bash -c 'mkdir "$0" && for f; do qemu-img convert -O qcow2 "$f" "$0/$(basename "$f" .raw).qcow2" || exit 1; done' \
                                "$out/conv" "${finals[@]}"
                        fi
                        rm -rf "$out/conv.qcow2" "$out/conv" ;;
                    ours)
                        # One disk: <out>/ours.qcow2; several: <out>/ours/<disk>.qcow2.
                        o=$out/ours.qcow2
                        [ "${#dlist[@]}" = 1 ] || o=$out/ours
                        run_timed ours "$case" "$variant" "$o" "$OURS" "$chain" "$disks" "$o"
                        rm -rf "$o"
                        IFS=';' read -r -a extras <<<"$OURS_EXTRA"
                        for x in "${extras[@]}"; do
                            [ -n "$x" ] || continue
                            # shellcheck disable=SC2086
                            run_timed "ours $x" "$case" "$variant" "$o" "$OURS" "$chain" "$disks" "$o" $x
                            rm -rf "$o"
                        done ;;
                    *) echo "unknown tool $tool" >&2; exit 2 ;;
                esac
            done
        done
        # c' must restore to exactly c's final content.
        if [ "$case" = c ] && [[ " $CASES " == *" c1 "* ]]; then
            mv "$WORK/final.raw" "$WORK/final-c-$variant.raw"
        elif [ "$case" = c1 ] && [ -f "$WORK/final-c-$variant.raw" ]; then
            qemu-img compare -q -f raw -F raw "$WORK/final-c-$variant.raw" "$WORK/final.raw" \
                || { echo "c1 does not hold c's final content" >&2; exit 1; }
            echo "  (c1 and c restore to identical content)"
            rm -f "$WORK/final-c-$variant.raw"
        fi
        [ "$KEEP" = 1 ] || rm -rf "$chain" "$WORK/final.raw" "$WORK/final"
    done
done

# --- table ------------------------------------------------------------------------------
python3 - "$results" "$N" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
n = sys.argv[2]
runs = collections.OrderedDict()
for case, var, tool, t, rss, cpu, qrss, qcpu, load in rows:
    runs.setdefault((case, var), collections.OrderedDict()).setdefault(tool, []).append(
        (float(t), int(rss), float(cpu), int(qrss), float(qcpu), float(load)))
med = {}
print(f"\n| case | variant | tool | median s (min–max, N={n}; d: N_D) | vs virtnbdrestore | vs cp floor | peak RSS MiB | CPU s | load |")
print("|---|---|---|---|---|---|---|---|---|")
for (case, var), tools in runs.items():
    base = statistics.median(r[0] for r in tools.get("virtnbdrestore", [(float("nan"),)*6]))
    floor = statistics.median(r[0] for r in tools.get("cp", [(float("nan"),)*6]))
    for tool, rs in tools.items():
        m = statistics.median(r[0] for r in rs)
        med[(case, var, tool)] = (m, max(r[1] for r in rs) / 1024)
        rss = max(r[1] for r in rs) / 1024
        qrss = max(r[3] for r in rs) / 1024
        cpu = statistics.median(r[2] + r[4] for r in rs)
        rss_s = f"{rss:.0f}" + (f" (+qemu-nbd {qrss:.0f})" if qrss else "")
        loads = f"{min(r[5] for r in rs):.2f}–{max(r[5] for r in rs):.2f}"
        d = 4 if m < 0.1 else 3   # sub-millisecond resolution for the 2 MiB case
        print(f"| {case} | {var} | {tool} | {m:.{d}f} ({min(r[0] for r in rs):.{d}f}–{max(r[0] for r in rs):.{d}f}) "
              f"| {base / m:.1f}× faster | {m / floor:.2f}× | {rss_s} | {cpu:.2f} | {loads} |")

print("\nTargets (restore_chain = 'ours'):")
def g(case, var, tool="ours"):
    return med.get((case, var, tool), (float("nan"), float("nan")))
for var in dict.fromkeys(v for (_, v) in runs):
    for case, want in (("a", 4), ("b", 10), ("d", 50)):
        o, v = g(case, var)[0], g(case, var, "virtnbdrestore")[0]
        if o == o and v == v:
            print(f"  {var} ({case}) >= {want}x faster than virtnbdrestore: {v / o:.1f}x  {'MET' if v / o >= want else 'MISSED'}")
    c, c1 = g("c", var)[0], g("c1", var)[0]
    if c == c and c1 == c1:
        print(f"  {var} (c) 365-point chain <= 1.5x one-file chain: {c / c1:.2f}x  {'MET' if c / c1 <= 1.5 else 'MISSED'}")
    for case in ("a", "b", "c", "c1", "d", "e"):
        o, f = g(case, var)[0], g(case, var, "cp")[0]
        if o == o and f == f:
            print(f"  {var} ({case}) within 1.25x of the cp floor: {o / f:.2f}x  {'MET' if o / f <= 1.25 else 'MISSED'}")
    rss = max((g(c, var)[1] for c in ("a", "b", "c", "c1", "d", "e") if g(c, var)[1] == g(c, var)[1]), default=float("nan"))
    print(f"  {var} peak RSS <= 64 MiB: {rss:.0f} MiB  {'MET' if rss <= 64 else 'MISSED'}")
PY
cp "$results" "${TMPDIR:-/tmp}/vmrestore-bench-results.tsv"
echo "raw results: ${TMPDIR:-/tmp}/vmrestore-bench-results.tsv"
