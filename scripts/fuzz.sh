#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target of nbdfmt/fuzz (the nbdfmt formats, and the
# vmrestore crate's domain XML rewriting, vmbackup.conf and catalogue readers), one
# after the other, each for the given number of seconds, starting from the committed
# seeds (nbdfmt/fuzz/seeds/<target>) and the live corpus (nbdfmt/fuzz/corpus/<target>,
# not in git).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]   default: 600 s, all targets
#   scripts/fuzz.sh smoke                              CI smoke run: 20 s per target
#
# Prints executions and findings per target; exits 1 when any target found a crash,
# timeout or OOM (input saved under nbdfmt/fuzz/artifacts/<target>/), 2 on setup or
# build failure. Installs cargo-fuzz when it is missing.
#
# Toolchain: cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sancov passes).
# Only a stable toolchain is available, so RUSTC_BOOTSTRAP=1 unlocks them. AddressSanitizer
# is used when it builds (stable ships its runtime for x86_64 Linux); otherwise, or with
# FUZZ_SANITIZER=none, the targets run without a sanitizer: nbdfmt and vmrestore have
# no unsafe code, so panics and the targets' own assertions are what catch bugs (the
# bundled SQLite C code is not instrumented either way).
#
# Environment: CARGO_TARGET_DIR (builds go to $CARGO_TARGET_DIR/fuzz, else
# nbdfmt/fuzz/target), FUZZ_SANITIZER (address|none), FUZZ_TIMEOUT (seconds one input
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
fuzz_dir=$repo/nbdfmt/fuzz
all_targets=(frame_header stream_reader meta_json sidecars domxml config catalogue)
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")

export RUSTC_BOOTSTRAP=1
target_dir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
target_dir=${target_dir:-$fuzz_dir/target}
timeout=${FUZZ_TIMEOUT:-10}
rss_limit=${FUZZ_RSS_LIMIT_MB:-2048}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --version '^0.13' --locked || { echo "error: cannot install cargo-fuzz" >&2; exit 2; }
fi

cd "$fuzz_dir" || exit 2
mkdir -p artifacts/logs
build_log=artifacts/logs/build.log
sanitizer=${FUZZ_SANITIZER:-address}
echo "== building all targets (sanitizer: $sanitizer, target dir: $target_dir)"
ok=0
cargo fuzz build -s "$sanitizer" --target-dir "$target_dir" >"$build_log" 2>&1 && ok=1
if [[ $ok -eq 0 && $sanitizer == address && -z ${FUZZ_SANITIZER:-} ]]; then
    echo "   the AddressSanitizer build failed (see nbdfmt/fuzz/$build_log); retrying with -s none"
    tail -n 5 "$build_log" | sed 's/^/   /'
    sanitizer=none
    cargo fuzz build -s none --target-dir "$target_dir" >"$build_log" 2>&1 && ok=1
fi
if [[ $ok -eq 0 ]]; then
    tail -n 30 "$build_log" >&2
    echo "error: fuzz build failed" >&2
    exit 2
fi

summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | sort)
    log=artifacts/logs/$t.log
    echo "== $t: ${secs}s (log: nbdfmt/fuzz/$log)"
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
            echo "   input: nbdfmt/fuzz/$f"
            echo "   reproduce: (cd nbdfmt/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $t $f)"
            echo "   minimize:  (cd nbdfmt/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin -s $sanitizer $t $f)"
        done
        [[ $nfound -eq 0 ]] && nfound="exit $rc"
    fi
    summary+=("$(printf '%-14s %8ss %12s %8s %8s %8s  %s' "$t" "$elapsed" "${execs:-?}" "${rate:-?}" "${new:-?}" "$corpus" "$nfound")")
done

echo
echo "== summary (sanitizer: $sanitizer)"
printf '%-14s %9s %12s %8s %8s %8s  %s\n' target time executions exec/s new corpus findings
printf '%s\n' "${summary[@]}"
exit "$failed"
