#!/usr/bin/env bash
# Installs what building and testing vmrestore needs on Debian 12 (as root, or via sudo).
# Idempotent: skips apt when everything is already there.
set -euo pipefail
need=(build-essential pkg-config libvirt-dev libvirt0 qemu-utils)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust toolchain) not found on PATH" >&2; exit 1; }
