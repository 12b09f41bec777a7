#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target of the two fuzz crates, one after the other,
# each for the given number of seconds, starting from the committed seeds
# (<crate>/seeds/<target>) and the live corpus (<crate>/corpus/<target>, not in git):
#   nbdfmt/fuzz  the nbdfmt formats: frame_header stream_reader meta_json sidecars
#   fuzz         the vmrestore crate's domain XML rewriting, vmbackup.conf and
#                catalogue readers, name validator and path resolver: domxml
#                config catalogue names paths
#
#   scripts/fuzz.sh [seconds-per-target] [target...]   default: 600 s, all targets
#   scripts/fuzz.sh smoke                              CI smoke run: 20 s per target
#
# Prints executions and findings per target; exits 1 when any target found a crash,
# timeout or OOM (input saved under <crate>/artifacts/<target>/), 2 on setup or
# build failure (or an unknown target). Installs cargo-fuzz when it is missing. Only the
# crates of the targets asked for are built.
#
# Toolchain: cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sancov passes).
# Only a stable toolchain is available, so RUSTC_BOOTSTRAP=1 unlocks them. AddressSanitizer
# is used when it builds (stable ships its runtime for x86_64 Linux); otherwise, or with
# FUZZ_SANITIZER=none, the targets run without a sanitizer: nbdfmt and vmrestore have
# no unsafe code, so panics and the targets' own assertions are what catch bugs (the
# bundled SQLite C code is not instrumented either way).
#
# Environment: CARGO_TARGET_DIR (builds of both crates go to $CARGO_TARGET_DIR/fuzz,
# else <crate>/target), FUZZ_SANITIZER (address|none), FUZZ_TIMEOUT (seconds one input
# may take, default 10), FUZZ_RSS_LIMIT_MB (default 2048).
set -uo pipefail

secs=${1:-600}
[[ $# -gt 0 ]] && shift
if [[ $secs == smoke ]]; then
    secs=20
fi
if ! [[ $secs =~ ^[0-9]+$ ]] || [[ $secs -lt 1 ]]; then
    echo "usage: $0 [seconds-per-target|smoke] [target...]" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The fuzz crates (paths relative to the repository) and, in the default order, every
# target with the crate it belongs to.
crates=(nbdfmt/fuzz fuzz)
all_targets=(frame_header stream_reader meta_json sidecars domxml config catalogue names paths)
declare -A crate_of=(
    [frame_header]=nbdfmt/fuzz [stream_reader]=nbdfmt/fuzz [meta_json]=nbdfmt/fuzz
    [sidecars]=nbdfmt/fuzz [domxml]=fuzz [config]=fuzz [catalogue]=fuzz [names]=fuzz
    [paths]=fuzz
)
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
    if [[ -z ${crate_of[$t]:-} ]]; then
        echo "error: unknown target '$t' (targets: ${all_targets[*]})" >&2
        exit 2
    fi
done

export RUSTC_BOOTSTRAP=1
timeout=${FUZZ_TIMEOUT:-10}
rss_limit=${FUZZ_RSS_LIMIT_MB:-2048}

# Where a crate's build goes.
target_dir() {
    if [[ -n ${CARGO_TARGET_DIR:-} ]]; then
        echo "$CARGO_TARGET_DIR/fuzz"
    else
        echo "$repo/$1/target"
    fi
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --version '^0.13' --locked || { echo "error: cannot install cargo-fuzz" >&2; exit 2; }
fi

# Build every crate that has a target to run (all its targets at once).
declare -A sanitizer_of=()
for c in "${crates[@]}"; do
    need=0
    for t in "${targets[@]}"; do
        [[ ${crate_of[$t]} == "$c" ]] && need=1
    done
    [[ $need -eq 1 ]] || continue
    cd "$repo/$c" || exit 2
    mkdir -p artifacts/logs
    build_log=artifacts/logs/build.log
    sanitizer=${FUZZ_SANITIZER:-address}
    target_dir=$(target_dir "$c")
    echo "== building $c (sanitizer: $sanitizer, target dir: $target_dir)"
    ok=0
    cargo fuzz build -s "$sanitizer" --target-dir "$target_dir" >"$build_log" 2>&1 && ok=1
    if [[ $ok -eq 0 && $sanitizer == address && -z ${FUZZ_SANITIZER:-} ]]; then
        echo "   the AddressSanitizer build failed (see $c/$build_log); retrying with -s none"
        tail -n 5 "$build_log" | sed 's/^/   /'
        sanitizer=none
        cargo fuzz build -s none --target-dir "$target_dir" >"$build_log" 2>&1 && ok=1
    fi
    if [[ $ok -eq 0 ]]; then
        tail -n 30 "$build_log" >&2
        echo "error: fuzz build of $c failed (log: $c/$build_log)" >&2
        exit 2
    fi
    sanitizer_of[$c]=$sanitizer
done

summary=()
failed=0
for t in "${targets[@]}"; do
    c=${crate_of[$t]}
    sanitizer=${sanitizer_of[$c]}
    target_dir=$(target_dir "$c")
    cd "$repo/$c" || exit 2
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | sort)
    log=artifacts/logs/$t.log
    echo "== $t: ${secs}s (log: $c/$log)"
    dict=()
    [[ -f dicts/$t.dict ]] && dict=(-dict="dicts/$t.dict")
    start=$(date +%s)
    cargo fuzz run -s "$sanitizer" --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss_limit" \
        "${dict[@]}" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -n 1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    found=$(comm -13 <(echo "$before") <(find "artifacts/$t" -type f | sort) | sed '/^$/d')
    nfound=$(echo -n "$found" | grep -c . || true)
    if [[ $rc -ne 0 || $nfound -gt 0 ]]; then
        failed=1
        echo "   FINDING (exit $rc):"
        grep -a -m 3 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY" "$log" |
            cut -c 1-300 | sed 's/^/   /'
        grep -a -m 1 -A 3 "panicked at" "$log" | tail -n +2 | cut -c 1-300 | sed 's/^/   /'
        for f in $found; do
            echo "   input: $c/$f"
            echo "   reproduce: (cd $c && RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $t $f)"
            echo "   minimize:  (cd $c && RUSTC_BOOTSTRAP=1 cargo fuzz tmin -s $sanitizer $t $f)"
        done
        [[ $nfound -eq 0 ]] && nfound="exit $rc"
    fi
    summary+=("$(printf '%-14s %8ss %12s %8s %8s %8s  %s' "$t" "$elapsed" "${execs:-?}" "${rate:-?}" "${new:-?}" "$corpus" "$nfound")")
done

# One sanitizer, or each crate's when a fallback made them differ.
used=$(printf '%s\n' "${sanitizer_of[@]}" | sort -u)
if [[ $(echo "$used" | wc -l) -gt 1 ]]; then
    used=$(for c in "${crates[@]}"; do
        [[ -n ${sanitizer_of[$c]:-} ]] && echo -n "$c: ${sanitizer_of[$c]}; "
    done)
    used=${used%; }
fi
echo
echo "== summary (sanitizer: $used)"
printf '%-14s %9s %12s %8s %8s %8s  %s\n' target time executions exec/s new corpus findings
printf '%s\n' "${summary[@]}"
exit "$failed"
