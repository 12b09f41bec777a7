# shellcheck shell=bash
# Helpers for the end-to-end tier: throwaway libvirt domains that idle in their
# firmware, disk changes through QEMU's own qemu-io (so dirty bitmaps see them),
# real virtnbdbackup runs laid out as vmbackup does, and the true disk content.
# Test-only: the product never runs virsh, qemu-img or virtnbdbackup.

E2E_PREFIX=${E2E_PREFIX:-e2e$$}
IMAGES=${E2E_IMAGES:-/var/lib/libvirt/images}
VIRSH=(virsh -q -c qemu:///system)

log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

e2e_setup() {
    local need=(libvirt-daemon-system qemu-system-x86 qemu-utils virtnbdbackup ovmf swtpm swtpm-tools)
    local missing=()
    for p in "${need[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        # qemu-system-x86 can replace the backported qemu-utils: keep qemu-img/qemu-nbd
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
    fi
    if ! virsh -c qemu:///system version >/dev/null 2>&1; then
        log "starting virtlogd and libvirtd"
        pgrep -x virtlogd >/dev/null || virtlogd -d
        pgrep -x libvirtd >/dev/null || libvirtd -d
        for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
        virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer"
    fi
    mkdir -p "$IMAGES"
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then DOMTYPE=kvm; else DOMTYPE=qemu; fi
    log "domain type: $DOMTYPE"
}

e2e_cleanup() {
    local d
    for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep "^$E2E_PREFIX" || true); do
        virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
        virsh -c qemu:///system undefine "$d" --nvram --checkpoints-metadata >/dev/null 2>&1 \
            || virsh -c qemu:///system undefine "$d" --nvram >/dev/null 2>&1 \
            || virsh -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
    done
    rm -f "$IMAGES/$E2E_PREFIX"-* /var/lib/libvirt/qemu/nvram/"$E2E_PREFIX"* 2>/dev/null || true
}

# mkvm NAME [--uefi] [--tpm] [--cdrom] DEV:SIZE:BUS ...   (BUS virtio|sata)
mkvm() {
    local name=$1; shift
    local uefi=0 tpm=0 cdrom=0 disks=() type=$DOMTYPE
    while [ $# -gt 0 ]; do
        case $1 in --uefi) uefi=1 ;; --tpm) tpm=1 ;; --cdrom) cdrom=1 ;; *) disks+=("$1") ;; esac
        shift
    done
    # OVMF crashes under nested KVM here: UEFI domains run under TCG
    [ $uefi = 1 ] && type=qemu
    local devs="" overrides="" spec dev size bus img
    for spec in "${disks[@]}"; do
        IFS=: read -r dev size bus <<<"$spec"
        img="$IMAGES/$name-$dev.qcow2"
        qemu-img create -q -f qcow2 "$img" "$size"
        devs+="<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/><source file='$img'/><target dev='$dev' bus='$bus'/><alias name='ua-$dev'/></disk>"
        overrides+="<qemu:device alias='ua-$dev'><qemu:frontend><qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend></qemu:device>"
    done
    [ $cdrom = 1 ] && devs+="<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sdz' bus='sata'/><readonly/></disk>"
    [ $tpm = 1 ] && devs+="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
    local os="<type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/>"
    [ $uefi = 1 ] && os="<type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' secure='no' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/${name}_VARS.fd</nvram><boot dev='hd'/>"
    cat >"$WORK/$name.xml" <<XML
<domain type='$type' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$name</name>
  <memory unit='MiB'>96</memory>
  <vcpu>1</vcpu>
  <os>$os</os>
  <features><acpi/></features>
  <devices>
    $devs
    <interface type='user'><model type='virtio'/></interface>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
  </devices>
  <qemu:override>$overrides</qemu:override>
</domain>
XML
    "${VIRSH[@]}" define "$WORK/$name.xml" >/dev/null
    "${VIRSH[@]}" start "$name" >/dev/null
}

# node NAME DEV: the qemu block node of a disk (from HMP 'info block')
node() {
    virsh -c qemu:///system qemu-monitor-command "$1" --hmp 'info block' |
        awk -v dev="$2" '{sub(/\r$/, "")} /^[a-z]/ {n=$1; sub(":", "", n)} /Attached to:/ && $0 ~ ("(: +|/)ua-" dev "(/|$)") {print n; exit}'
}

# io NAME DEV 'write -P 0x55 0 1M'   (also 'write -z ...', 'discard ...')
io() {
    local n
    n=$(node "$1" "$2")
    [ -n "$n" ] || die "no block node for $1/$2"
    local out
    out=$(virsh -c qemu:///system qemu-monitor-command "$1" --hmp "qemu-io $n \"$3\"")
    case $out in *rror*) die "qemu-io $1/$2 '$3': $out" ;; esac
}

# rnd NAME DEV OFFSET LEN SEED: random data written through a staging file of the guest? No:
# qemu-io has no random pattern; write several short patterns instead.
mixed() {
    local name=$1 dev=$2 off=$3 i
    for i in 0 1 2 3; do io "$name" "$dev" "write -P $((0x30 + (off / 65536 + i) % 200)) $((off + i * 65536)) 64k"; done
}

# truth NAME DEV FILE: the disk's true content as raw (VM paused while reading)
truth() {
    "${VIRSH[@]}" suspend "$1" >/dev/null
    qemu-img convert -U -f qcow2 -O raw "$IMAGES/$1-$2.qcow2" "$3"
    "${VIRSH[@]}" resume "$1" >/dev/null
}

# backup NAME LEVEL DIR [virtnbdbackup options]
backup() {
    local name=$1 level=$2 dir=$3; shift 3
    mkdir -p "$dir"
    virtnbdbackup -d "$name" -l "$level" -o "$dir" "$@" >"$WORK/backup.log" 2>&1 || { cat "$WORK/backup.log" >&2; die "virtnbdbackup $name $level"; }
}

# treehash DIR: a hash of every file (content + name) under DIR, _state excluded
treehash() {
    (cd "$1" && find . -path ./_state -prune -o -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# same_content IMG RAW: guest content of a restored image equals RAW
same_content() {
    qemu-img compare -q "$1" "$2" || die "content of $1 differs from $2"
}

# --- the bootable test guest (tests/guest/build.sh) ---

# mkguest NAME DIR SERIAL: defines and starts the test guest under TCG: vda a qcow2
# copy of the cached FAT boot disk, vdb a blank 8 MiB data disk (both in DIR, both
# writable through qemu-io like mkvm's), ttyS0 into the file SERIAL
mkguest() {
    local name=$1 dir=$2 serial=$3 devs="" overrides="" dev
    mkdir -p "$dir"
    qemu-img convert -q -f raw -O qcow2 "$GUEST/boot.img" "$dir/$name-vda.qcow2"
    qemu-img create -q -f qcow2 "$dir/$name-vdb.qcow2" 8M
    for dev in vda vdb; do
        devs+="<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/><source file='$dir/$name-$dev.qcow2'/><target dev='$dev' bus='virtio'/><alias name='ua-$dev'/></disk>"
        overrides+="<qemu:device alias='ua-$dev'><qemu:frontend><qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend></qemu:device>"
    done
    cat >"$WORK/$name.xml" <<XML
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$name</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    $devs
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='$serial'/><target port='0'/></serial>
  </devices>
  <qemu:override>$overrides</qemu:override>
</domain>
XML
    "${VIRSH[@]}" define "$WORK/$name.xml" >/dev/null
    rm -f "$serial"
    "${VIRSH[@]}" start "$name" >/dev/null
}

# guest_line SERIAL [SECONDS]: the guest's GUEST-OK / GUEST-FAIL line, once it is there
guest_line() {
    local serial=$1 deadline=$((SECONDS + ${2:-240})) line
    while [ $SECONDS -lt $deadline ]; do
        line=$(grep -a -m1 '^GUEST-' "$serial" 2>/dev/null | tr -d '\r') && [ -n "$line" ] && { echo "$line"; return 0; }
        sleep 0.5
    done
    echo "no GUEST- line in $serial after ${2:-240}s"
    return 1
}

# guest_ok NAME SERIAL BOOTS SHA: the guest printed exactly what this point must show
guest_ok() {
    local line want="GUEST-OK boots=$3 data=$4"
    line=$(guest_line "$2") || die "$1: $line"
    [ "$line" = "$want" ] || die "$1: console says '$line', expected '$want'"
}

# guest_boots IMG: the boot counter in the header of a data disk image
guest_boots() {
    local t=$WORK/guest-boots.raw
    qemu-img convert -U -O raw "$1" "$t"
    head -c 512 "$t" | tr -d '\000' | sed -n 's/^VMRGUEST boots=\([0-9]*\)$/\1/p'
    rm -f "$t"
}

# serial_of NAME: the file a domain's serial port writes into
serial_of() {
    virsh -c qemu:///system dumpxml "$1" | sed -n "/<serial type='file'>/,/<\/serial>/s:.*<source path='\([^']*\)'.*:\1:p" | head -1
}

# serial_to NAME FILE: point a defined (shut off) domain's file serial elsewhere
serial_to() {
    local old x=$WORK/serial-to.$1.xml
    old=$(serial_of "$1")
    virsh -c qemu:///system dumpxml --inactive --security-info "$1" | sed "s:<source path='$old':<source path='$2':" >"$x"
    "${VIRSH[@]}" define "$x" >/dev/null
}
