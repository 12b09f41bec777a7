#!/usr/bin/env bash
# Builds the vmrestore test guest from Debian 12 packages alone (no mounts, no network
# beyond the Debian mirror): a FAT boot disk with syslinux, the Debian kernel and a
# busybox-static initramfs whose init (tests/guest/init) keeps a boot counter and a
# known pattern on the data disk and prints one GUEST-OK line on ttyS0. See README.md.
#
#   tests/guest/build.sh           prints the cache directory holding the result
#   tests/guest/build.sh --check   also boots it twice under plain QEMU (TCG)
#
# Idempotent: the result is cached under $VMR_GUEST_CACHE (default
# /var/cache/vmrestore-test-guest), keyed by a hash of tests/guest/* and the package
# versions used; a new key replaces the older builds. Root (installs packages).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT=${VMR_GUEST_CACHE:-/var/cache/vmrestore-test-guest}
# Debian's cloud kernel: LZ4-compressed (the generic amd64 one is XZ, whose
# decompression alone takes ~10 s under TCG) and fewer built-in drivers to start
FLAVOUR=${VMR_GUEST_KERNEL:-cloud-amd64}
BOOT_MIB=24          # FAT boot disk (kernel ~14 MiB, initramfs ~1 MiB)
CHECK=0
[ "${1:-}" = --check ] && CHECK=1

log() { printf '[guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs packages)"

TOOLS=(busybox-static syslinux syslinux-common mtools dosfstools cpio)
[ $CHECK = 1 ] && TOOLS+=(qemu-system-x86)
missing=()
for p in "${TOOLS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
fi

# the kernel linux-image-$FLAVOUR points at (downloaded, never installed)
kernel_pkg() { apt-cache depends --important "linux-image-$FLAVOUR" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'; }
KPKG=$(kernel_pkg)
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(kernel_pkg); }
[ -n "$KPKG" ] || die "no linux-image-$FLAVOUR in the apt sources"
KVER=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" {print $2}')

versions="$KPKG=$KVER"
for p in busybox-static syslinux syslinux-common mtools dosfstools cpio; do
    versions+=" $p=$(dpkg-query -W -f='${Version}' "$p")"
done
KEY=$( (cat "$HERE/build.sh" "$HERE/init" "$HERE/pattern.awk"; echo "$versions") | sha256sum | cut -c1-16)
OUT=$CACHE_ROOT/$KEY

mkdir -p "$CACHE_ROOT"
chmod 755 "$CACHE_ROOT"   # qemu (libvirt-qemu) may boot the image from here
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [ ! -f "$OUT/boot.img" ]; then
    log "building $KEY ($versions)"
    T=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
    trap 'rm -rf "$T"' EXIT
    # fixed times (2000-01-01: FAT cannot hold 1970) and ids: the same packages give the
    # same bytes
    export SOURCE_DATE_EPOCH=946684800 TZ=UTC LC_ALL=C MTOOLS_SKIP_CHECK=1

    # kernel image and the virtio block modules, straight out of the .deb
    # (root downloads into a directory _apt cannot write: apt warns, and that is fine)
    if ! (cd "$T" && apt-get download -qq "$KPKG=$KVER" 2>"$T/download.err"); then
        if [ -z "${VMR_GUEST_UPDATED:-}" ]; then
            log "apt-get download $KPKG=$KVER failed: updating the package lists once"
            apt-get update -qq
            rm -rf "$T"
            flock -u 9
            VMR_GUEST_UPDATED=1 exec bash "$HERE/build.sh" "$@"
        fi
        cat "$T/download.err" >&2
        die "apt-get download $KPKG=$KVER"
    fi
    mkdir "$T/k"
    dpkg-deb --fsys-tarfile "$T"/"$KPKG"_*.deb | tar -x -C "$T/k" --wildcards \
        './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/drivers/block/virtio_blk.ko'
    rm -f "$T"/*.deb
    kdir=$(echo "$T"/k/lib/modules/*/kernel)

    # initramfs: busybox, init, pattern, the module closure of virtio_pci + virtio_blk
    R=$T/root
    mkdir -p "$R/bin" "$R/dev" "$R/modules" "$R/proc" "$R/sys" "$R/tmp"
    cp /bin/busybox "$R/bin/busybox"
    cp "$HERE/init" "$R/init"
    cp "$HERE/pattern.awk" "$R/pattern.awk"
    chmod 755 "$R/init" "$R/bin/busybox"
    mknod "$R/dev/console" c 5 1
    order=()
    add_module() {
        local m=$1 f d deps
        case " ${order[*]} " in *" $m "*) return 0 ;; esac
        f=$(find "$kdir" -name "$m.ko" | head -1)
        [ -n "$f" ] || die "module $m not in $KPKG"
        deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
        for d in $deps; do add_module "$d"; done
        cp "$f" "$R/modules/$m.ko"
        order+=("$m")
    }
    add_module virtio_pci
    add_module virtio_blk
    printf '%s\n' "${order[@]}" >"$R/modules.order"
    find "$R" -exec touch -h -d @$SOURCE_DATE_EPOCH {} +
    (cd "$R" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$T/initrd.gz"

    cat >"$T/syslinux.cfg" <<'CFG'
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 quiet
CFG
    cp "$T"/k/boot/vmlinuz-* "$T/vmlinuz"
    touch -d @$SOURCE_DATE_EPOCH "$T/vmlinuz" "$T/initrd.gz" "$T/syslinux.cfg"

    # the FAT boot disk: no partition table (syslinux boots the volume's boot sector)
    truncate -s ${BOOT_MIB}M "$T/boot.img"
    mkfs.vfat --invariant -i 564d5247 -n VMRGUEST "$T/boot.img" >/dev/null
    syslinux --install "$T/boot.img"
    mcopy -m -i "$T/boot.img" "$T/syslinux.cfg" "$T/vmlinuz" "$T/initrd.gz" ::/

    mkdir "$T/out"
    mv "$T/boot.img" "$T/vmlinuz" "$T/initrd.gz" "$T/out/"
    busybox awk -f "$HERE/pattern.awk" >"$T/out/pattern.bin"
    {
        echo "KEY=$KEY"
        echo "KERNEL=$(basename "$T"/k/boot/vmlinuz-* | sed 's/^vmlinuz-//')"
        echo "PACKAGES='$versions'"
        echo "DATA_OFFSET=1048576"     # the pattern region on the data disk (init)
        echo "DATA_LEN=4194304"
        echo "PATTERN_SHA256=$(sha256sum <"$T/out/pattern.bin" | cut -d' ' -f1)"
        echo "BOOT_IMG_SHA256=$(sha256sum <"$T/out/boot.img" | cut -d' ' -f1)"
    } >"$T/out/guest.env"
    chmod -R a+rX "$T/out"
    rm -rf "$OUT"
    mv "$T/out" "$OUT"
    # only the newest build is kept
    find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" -exec rm -rf {} +
    log "built $OUT: boot.img $(du -k --apparent-size "$OUT/boot.img" | cut -f1) KiB (kernel $(du -k "$OUT/vmlinuz" | cut -f1) KiB, initramfs $(du -k "$OUT/initrd.gz" | cut -f1) KiB)"
fi
flock -u 9

if [ $CHECK = 1 ]; then
    # boot the disk twice under TCG: the first boot writes the pattern (boots=1), the
    # second finds it (boots=2); the first with guest.poweroff=1 through a direct
    # kernel boot of the same kernel and initramfs, the second through syslinux
    C=$(mktemp -d /var/tmp/vmr-guest-check.XXXXXX)
    trap 'rm -rf "$C"' EXIT
    # shellcheck source=/dev/null
    . "$OUT/guest.env"
    truncate -s 8M "$C/data.raw"
    qemu() {
        timeout 180 qemu-system-x86_64 -machine q35,accel=tcg -m 256 -nodefaults -display none \
            -drive "file=$OUT/boot.img,format=raw,if=virtio,readonly=on" \
            -drive "file=$C/data.raw,format=raw,if=virtio" -serial "file:$C/serial.log" "$@"
    }
    t0=$SECONDS
    qemu -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.gz" -append "console=ttyS0 quiet guest.poweroff=1" || true
    grep -q "^GUEST-OK boots=1 data=$PATTERN_SHA256" "$C/serial.log" || { cat "$C/serial.log" >&2; die "first boot"; }
    log "check: first boot (direct kernel, guest.poweroff=1) wrote the pattern and powered off in $((SECONDS - t0))s"
    t0=$SECONDS
    rm -f "$C/serial.log"
    qemu &
    pid=$!
    for _ in $(seq 240); do
        grep -q "^GUEST-" "$C/serial.log" 2>/dev/null && break
        sleep 0.5
    done
    kill $pid; wait $pid 2>/dev/null || true
    grep -q "^GUEST-OK boots=2 data=$PATTERN_SHA256" "$C/serial.log" || { cat "$C/serial.log" >&2; die "second boot"; }
    log "check: second boot (syslinux from the FAT disk) found the pattern: GUEST-OK in $((SECONDS - t0))s"
fi
echo "$OUT"
