#!/usr/bin/env bash
# The main job on the bundled real backup tree: list it, show restore points, and
# restore a VM's disks from a real virtnbdbackup chain.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin vmrestore
bin=target/release/vmrestore
out=$(mktemp -d /tmp/vmrestore-demo.XXXXXX)
# A restore takes the VM's lock and records a catalogue row under the backup root's
# _state/ (as vmrestore 0.6.0 did): work on a copy, so the bundled tree stays pristine.
root=$out/backups
cp -a tests/fixtures/real-chains/backups "$root"
set -x
"$bin" --list --backup-path "$root"
"$bin" --list-restore-points rc-shrink --backup-path "$root"
# data-only restore of restore point 2 (three disks; one was removed later in the chain)
LOG_DIR="$out/logs" "$bin" --vm rc-shrink --backup-path "$root" --restore-path "$out/rc-shrink" --restore-point 2 --skip-config
# disaster recovery of a three-disk VM into libvirt's in-process test driver
LOG_DIR="$out/logs" "$bin" --connect test:///default --vm rc-multi-sql --backup-path "$root" --restore-path "$out/rc-multi-sql"
ls -ls "$out/rc-shrink" "$out/rc-multi-sql"
