#!/usr/bin/env bash
# Prepares a Debian 12 machine to build, test and package vmrestore (as root, or
# through sudo). Idempotent: apt runs only when something is missing.
#
#   scripts/setup.sh        (scripts/demo.sh and scripts/test.sh run it first)
#
# 1. The Rust toolchain, checked first: cargo and rustc >= 1.85 on PATH (the
#    version rust-toolchain.toml selects in this tree). Nothing is installed here:
#    when it is missing or too old, the message says which rustup command fixes it.
# 2. Build and test packages: build-essential, pkg-config, libvirt-dev, libvirt0
#    (libvirt's test driver, used by the tests and the demo), qemu-utils (qemu-img,
#    for the tests' image checks).
# 3. The Debian package's Build-Depends, read from debian/control (debhelper-compat,
#    help2man, ...): afterwards `dpkg-buildpackage -us -uc -b` has what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_RUST=1.85
say() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: %s\n' "$@" >&2; exit 1; }

# ---------------------------------------------------------------- 1. Rust
# Checked before anything is installed: without it nothing else is worth doing.
rustup_hint=(
    "Install Rust with rustup (https://rustup.rs), as the user who builds:"
    "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal"
    "    . \"\$HOME/.cargo/env\""
    "then run $0 again. (Debian 12's own rustc, 1.63, is too old for this crate.)"
)
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        fail "cargo/rustc not found on PATH, but rustup is: install a toolchain with" \
            "    rustup toolchain install stable --profile minimal && rustup default stable" \
            "then run $0 again."
    fi
    fail "no Rust toolchain: cargo and rustc >= $MIN_RUST are needed on PATH." "${rustup_hint[@]}"
fi
# Run from the repository so that rust-toolchain.toml picks the toolchain; a rustup
# that cannot provide the channel fails here, with its own message shown.
if ! rustc_v=$(rustc --version 2>&1); then
    fail "rustc does not run: $rustc_v" \
        "rust-toolchain.toml asks rustup for the \"stable\" channel; install it with" \
        "    rustup toolchain install stable --profile minimal"
fi
ver=$(sed -n 's/^rustc \([0-9][0-9]*\.[0-9][0-9]*\)\..*/\1/p' <<<"$rustc_v")
[ -n "$ver" ] || fail "cannot read the version from '$rustc_v'"
if [ "$(printf '%s\n%s\n' "$MIN_RUST" "$ver" | sort -V | head -1)" != "$MIN_RUST" ]; then
    where=$(command -v rustc)
    if command -v rustup >/dev/null 2>&1 && [ "$where" != /usr/bin/rustc ]; then
        fail "$rustc_v ($where) is too old: vmrestore needs Rust >= $MIN_RUST (Cargo.lock v4, edition 2021 with 1.85 APIs)." \
            "Update it with:" "    rustup update stable && rustup default stable"
    fi
    fail "$rustc_v ($where) is too old: vmrestore needs Rust >= $MIN_RUST (Cargo.lock v4, edition 2021 with 1.85 APIs)." \
        "${rustup_hint[@]}" \
        "If $where comes from apt (Debian's rustc), rustup's ~/.cargo/bin must come first on PATH."
fi
say "Rust: $rustc_v ($(command -v cargo)); minimum $MIN_RUST"

# ---------------------------------------------------------------- 2. and 3. apt
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo: run $0 as root to install packages"
    SUDO=sudo
fi
updated=0
apt_install() {
    if [ $updated -eq 0 ]; then
        $SUDO apt-get update -qq
        updated=1
    fi
    say "installing: $*"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=(build-essential dpkg-dev pkg-config libvirt-dev libvirt0 qemu-utils)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# The package's Build-Depends, as dpkg-buildpackage checks them. `apt-get build-dep
# ./` reads debian/control of this tree (no deb-src line needed) and resolves
# virtual names such as debhelper-compat (= 13) to the package that provides them.
if ! unmet=$(dpkg-checkbuilddeps 2>&1); then
    say "${unmet#dpkg-checkbuilddeps: error: }"
    if [ $updated -eq 0 ]; then
        $SUDO apt-get update -qq
        updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null
    unmet=$(dpkg-checkbuilddeps 2>&1) || fail "still unmet after apt-get build-dep: $unmet"
fi
say "packages: ${need[*]} and debian/control's Build-Depends are installed"
