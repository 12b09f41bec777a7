#!/usr/bin/env bash
# Builds the vmrestore Debian package, lints it and installs it into a minimal
# bookworm chroot, where it runs vmrestore --version, --help, the man page and
# --list on a copy of the bundled real backup tree, then installs it again beside a
# stand-in for vmbackup's bash vmrestore (/usr/local/bin/vmrestore).
#
#   scripts/check-deb.sh            (as root, on Debian 12; cargo on PATH)
#
# Fails on: a build failure, any lintian E: or W: tag, a crate linked into the
# binary that debian/copyright does not name, generated completions that do not
# parse, a failing install, or a failing --version/--help/man in the chroot.
# `vmrestore --list` and `--verify` on the bundled backup tree must succeed too,
# and the verify run must leave its 0600 log in /var/log/vmrestore
# (CHECK_DEB_STRICT=0 only reports these failures).
#
# It builds the work tree as it is (committed or not); CHECK_DEB_REV=HEAD builds
# the last commit instead (what CI, on a clean clone, builds anyway).
#
# Everything it keeps lives under $CHECK_DEB_CACHE (default /var/cache/vmrestore-ci):
#   build/            copy of the source tree that is built, and the .deb files
#   target/           cargo target dir (warm cache for the release build)
#   bookworm-minbase/ debootstrap --variant=minbase root (made once, reused)
#   apt-archives/     .deb files downloaded inside the chroot (reused)
#   chroot/           throwaway copy of bookworm-minbase for this run (removed
#                     at the end unless KEEP_CHROOT=1)
# The repository itself is not written to.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CHECK_DEB_CACHE:-/var/cache/vmrestore-ci}
SUITE=bookworm
BUILD=$CACHE/build
BASE=$CACHE/$SUITE-minbase
ROOT=$CACHE/chroot
ARCHIVES=$CACHE/apt-archives
export CARGO_TARGET_DIR=$CACHE/target

T0=$SECONDS
TIMINGS=()
STEP_NAME=""
STEP_T=$SECONDS
step() {
    local now=$SECONDS
    [ -n "$STEP_NAME" ] && TIMINGS+=("$(printf '%5ds  %s' $((now - STEP_T)) "$STEP_NAME")")
    STEP_NAME=$1
    STEP_T=$now
    [ -n "$STEP_NAME" ] && printf '\n=== check-deb: %s\n' "$STEP_NAME"
    return 0
}
die() { echo "check-deb: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and mount need it)"
command -v cargo >/dev/null || die "cargo not found on PATH (the package builds with the Rust toolchain on PATH)"

# ---------------------------------------------------------------- cleanup
MOUNTS=()
cleanup() {
    local rc=$? m i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${MOUNTS[i]}
        mountpoint -q "$m" && { umount "$m" || umount -l "$m" || true; }
    done
    if [ -d "$ROOT" ] && [ "${KEEP_CHROOT:-0}" != 1 ]; then
        # never delete through a mount that is still there
        if grep -q " $ROOT/" /proc/mounts; then
            echo "check-deb: not removing $ROOT: still has mounts" >&2
        else
            rm -rf --one-file-system "$ROOT"
        fi
    fi
    exec 9>&- 2>/dev/null || true
    [ $rc -eq 0 ] || echo "check-deb: failed (exit $rc) after $((SECONDS - T0))s" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -n 9 || { echo "check-deb: waiting for another check-deb run to finish"; flock 9; }

# ---------------------------------------------------------------- host tools
step "host packages"
need=(build-essential dpkg-dev debhelper pkg-config libvirt-dev help2man python3
      lintian debootstrap man-db zsh fish)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "all present: ${need[*]}"

# The Debian mirror apt on this machine already uses (for debootstrap and the
# chroot's sources.list): "URI SUITE COMPONENTS" lines for $SUITE*, read from
# /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}.
apt_sources() {
    /usr/bin/python3 - "$SUITE" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
out = []
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for f in files:
    try:
        lines = open(f, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for l in lines:
        l = re.sub(r"\[[^]]*\]", "", l.split("#", 1)[0]).split()
        if len(l) >= 4 and l[0] == "deb" and re.fullmatch(suite + r"(-[a-z]+)?", l[2]):
            out.append((l[1], l[2], l[3:]))
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(f, encoding="utf-8").read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for l in stanza.splitlines():
            if l.startswith("#") or not l.strip():
                continue
            m = re.match(r"([A-Za-z-]+):\s*(.*)", l)
            if m:
                fields[m.group(1).lower()] = m.group(2).split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
            continue
        for uri in fields.get("uris", []):
            for s in fields.get("suites", []):
                if re.fullmatch(suite + r"(-[a-z]+)?", s):
                    out.append((uri, s, fields.get("components", ["main"])))
seen = set()
for uri, s, comps in out:
    if (uri, s) not in seen:
        seen.add((uri, s))
        print(uri.rstrip("/"), s, " ".join(comps))
EOF
}
SOURCES=$(apt_sources)
MIRROR=$(awk -v s="$SUITE" '$2 == s { print $1; exit }' <<<"$SOURCES")
echo "mirror for $SUITE: ${MIRROR:-none configured, debootstrap default}"

# ---------------------------------------------------------------- build
step "build (dpkg-buildpackage -us -uc -b)"
VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$REPO/Cargo.toml")
# A copy of the tree as it is (tracked and untracked files, not ignored ones),
# with mtimes kept so that cargo only rebuilds what changed since the last run;
# or, with CHECK_DEB_REV=<rev> (e.g. HEAD), that commit as git archive gives it.
rm -rf "$BUILD"
mkdir -p "$BUILD/vmrestore"
if [ -n "${CHECK_DEB_REV:-}" ]; then
    echo "building commit $(git -C "$REPO" rev-parse --short "$CHECK_DEB_REV") ($CHECK_DEB_REV)"
    git -C "$REPO" archive --format=tar "$CHECK_DEB_REV" | tar -xf - -C "$BUILD/vmrestore"
elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    echo "building the work tree of $REPO"
    (cd "$REPO" && git ls-files -z -co --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$BUILD/vmrestore"
else
    tar -C "$REPO" --exclude=./target --exclude=./.git -cf - . | tar -xf - -C "$BUILD/vmrestore"
fi
# the source package too (before the build, from the pristine copy), for lintian
(cd "$BUILD" && dpkg-source -b vmrestore) >"$BUILD/source.log" 2>&1 ||
    { cat "$BUILD/source.log" >&2; die "dpkg-source -b failed"; }
grep -h '^dpkg-source: info: building' "$BUILD/source.log" || true
build_rc=0
(cd "$BUILD/vmrestore" && dpkg-buildpackage -us -uc -b) >"$BUILD/build.log" 2>&1 || build_rc=$?
grep -v '^ *Compiling ' "$BUILD/build.log" || true
[ $build_rc -eq 0 ] || die "dpkg-buildpackage exited $build_rc (log: $BUILD/build.log)"
DEB_VERSION=$(cd "$BUILD/vmrestore" && dpkg-parsechangelog -S Version)
ARCH=$(dpkg --print-architecture)
DEB=$BUILD/vmrestore_${DEB_VERSION}_${ARCH}.deb
CHANGES=$BUILD/vmrestore_${DEB_VERSION}_${ARCH}.changes
DSC=$BUILD/vmrestore_${DEB_VERSION}.dsc
if [ ! -f "$DEB" ] || [ ! -f "$CHANGES" ]; then
    die "dpkg-buildpackage made no $DEB (log: $BUILD/build.log)"
fi
echo "built:" "$BUILD"/*.deb
dpkg-deb -c "$DEB" | awk '{ print "  " $1, $2, $6 }'
dpkg-deb -f "$DEB" Package Version Depends Recommends Suggests Breaks Replaces

# ---------------------------------------------------------------- static checks
step "lintian (source and binary packages)"
# lintian warns on stderr that it runs as root; tags go to stdout
lintian -i --display-info --fail-on error,warning "$DSC" "$CHANGES" 2>&1 | tee "$BUILD/lintian.txt" | grep -v '^N:' || true
if grep -q '^[EW]: ' "$BUILD/lintian.txt"; then
    die "lintian reported errors or warnings (full text: $BUILD/lintian.txt)"
fi
echo "lintian: no E: or W: tags ($(grep -c '^[IP]: ' "$BUILD/lintian.txt" || true) info/pedantic)"

step "debian/copyright names every linked crate"
# "name license" of every crate linked into the binary (not build-only ones)
crates=$(cd "$BUILD/vmrestore" && cargo tree --locked -p vmrestore -e normal,no-proc-macro --prefix none --format '{p} {l}' |
    sed 's/ (\*)$//' | awk '{ n = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); print n " (" $0 ")" }' |
    sort -u | grep -v -e '^vmrestore ' -e '^engine ' -e '^nbdfmt ')
unnamed=()
while read -r c license; do
    grep -qE "(^|[ ,:])$c([ ,.;)]|$)" "$BUILD/vmrestore/debian/copyright" || unnamed+=("$c $license")
done <<<"$crates"
if [ ${#unnamed[@]} -gt 0 ]; then
    printf '  %s\n' "${unnamed[@]}" >&2
    die "debian/copyright does not name the linked crates above: add each to the list of its license"
fi
echo "$(wc -l <<<"$crates") crates, all named in debian/copyright"

step "completions parse"
gen=$BUILD/vmrestore/debian/generated
ex=$(mktemp -d)
dpkg-deb -x "$DEB" "$ex"
bash -n "$ex/usr/share/bash-completion/completions/vmrestore" && echo "bash: ok"
if command -v zsh >/dev/null; then zsh -n "$ex/usr/share/zsh/vendor-completions/_vmrestore" && echo "zsh: ok"; else echo "zsh: not installed, skipped"; fi
if command -v fish >/dev/null; then fish -n "$ex/usr/share/fish/vendor_completions.d/vmrestore.fish" && echo "fish: ok"; else echo "fish: not installed, skipped"; fi
echo "flags completed: $(tr '\n' ' ' <"$gen/flags.txt")"
rm -rf "$ex"

# ---------------------------------------------------------------- chroot
step "debootstrap $SUITE minbase (cached)"
if [ -f "$BASE/.check-deb-ok" ]; then
    echo "reusing $BASE (made $(cat "$BASE/.check-deb-ok"))"
else
    rm -rf "$BASE.tmp"
    debootstrap --variant=minbase --include=man-db "$SUITE" "$BASE.tmp" ${MIRROR:+"$MIRROR"} >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    date -u +%FT%TZ >"$BASE.tmp/.check-deb-ok"
    rm -rf "$BASE"
    mv "$BASE.tmp" "$BASE"
    echo "made $BASE"
fi

step "install the .deb in a throwaway chroot"
if [ -d "$ROOT" ]; then
    grep -q " $ROOT/" /proc/mounts && die "$ROOT has mounts left from an earlier run; unmount them first"
    rm -rf --one-file-system "$ROOT"
fi
cp -a "$BASE" "$ROOT"
# same mirror(s) as the host, for $SUITE and its -updates/-security suites
if [ -n "$SOURCES" ]; then
    awk '{ printf "deb %s %s", $1, $2; for (i = 3; i <= NF; i++) printf " %s", $i; print "" }' <<<"$SOURCES" >"$ROOT/etc/apt/sources.list"
fi
echo "chroot sources.list:"; sed 's/^/  /' "$ROOT/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ARCHIVES/partial" "$ROOT/var/cache/apt/archives"
mount -t proc proc "$ROOT/proc"
MOUNTS+=("$ROOT/proc")
mount --bind "$ARCHIVES" "$ROOT/var/cache/apt/archives"
MOUNTS+=("$ROOT/var/cache/apt/archives")
cp "$DEB" "$ROOT/tmp/"
in_chroot() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive "$@"
}
# apt downloads as _apt into the (bind-mounted) cache
in_chroot chown _apt:root /var/cache/apt/archives/partial
in_chroot apt-get update -qq >"$CACHE/chroot-apt.log" 2>&1 ||
    { cat "$CACHE/chroot-apt.log" >&2; die "apt-get update failed in the chroot"; }
# Depends only (--no-install-recommends: libvirt-daemon-system would bring a
# whole hypervisor stack); bash-completion to load the installed completion below
in_chroot apt-get install -y --no-install-recommends "/tmp/$(basename "$DEB")" bash-completion >>"$CACHE/chroot-apt.log" 2>&1 ||
    { tail -30 "$CACHE/chroot-apt.log" >&2; die "apt-get install of the .deb failed in the chroot (log: $CACHE/chroot-apt.log)"; }
grep -E 'newly installed|^Need to get|^Setting up vmrestore' "$CACHE/chroot-apt.log" || true
# shellcheck disable=SC2016 # dpkg-query format, not shell
in_chroot dpkg-query -W -f='${Status} ${Version}\n' vmrestore | grep -q '^install ok installed' ||
    die "vmrestore did not install in the chroot"
# shellcheck disable=SC2016
echo "installed: $(in_chroot dpkg-query -W -f='${Package} ${Version}' vmrestore)"
echo "/var/log/vmrestore: $(in_chroot stat -c '%U:%G %a' /var/log/vmrestore)"
[ "$(in_chroot stat -c '%U:%G %a' /var/log/vmrestore)" = "root:adm 750" ] || die "/var/log/vmrestore is not root:adm 0750"

step "run vmrestore inside the chroot"
run() {
    printf '\n$ %s\n' "$*"
    local rc=0
    in_chroot "$@" || rc=$?
    echo "[exit $rc]"
    return $rc
}
run vmrestore --version || die "vmrestore --version failed in the chroot"
case "$(in_chroot vmrestore --version)" in
    "vmrestore $VERSION (vmbackup "*" compatible)") ;;
    *) die "--version does not print 'vmrestore $VERSION (vmbackup <version> compatible)'" ;;
esac
run vmrestore --help || die "vmrestore --help failed in the chroot"
man_err=$(in_chroot sh -c 'MANWIDTH=80 man --warnings -P cat -l /usr/share/man/man1/vmrestore.1.gz 2>&1 >/tmp/man.txt')
run cat /tmp/man.txt || die "man page could not be shown"
[ -z "$man_err" ] || die "man reported: $man_err"
grep -q '^EXIT STATUS' "$ROOT/tmp/man.txt" || die "man page has no EXIT STATUS section"

mkdir -p "$ROOT/srv"
cp -a "$REPO/tests/fixtures/real-chains/backups" "$ROOT/srv/backups"
soft_fail() {
    if [ "${CHECK_DEB_STRICT:-1}" != 0 ]; then die "$*"; fi
    echo "check-deb: NOTE: $* (not fatal: CHECK_DEB_STRICT=0)"
}
run vmrestore --list --backup-path /srv/backups || soft_fail "vmrestore --list exited $?"
run vmrestore --verify rc-wk-app --backup-path /srv/backups || soft_fail "vmrestore --verify exited $?"
run ls -l /var/log/vmrestore
# shellcheck disable=SC2016 # expanded by the chroot's sh
in_chroot sh -c 'ls /var/log/vmrestore/rc-wk-app-*.log >/dev/null 2>&1 &&
    [ "$(stat -c %a /var/log/vmrestore/rc-wk-app-*.log | sort -u)" = 600 ]' ||
    soft_fail "no 0600 log of the --verify run in /var/log/vmrestore"
# bash completion of VM names, through the installed completion file
printf '\n$ (bash completion) vmrestore --backup-path /srv/backups --vm <TAB>\n'
# shellcheck disable=SC2016 # expanded by the chroot's bash
in_chroot bash -c 'source /usr/share/bash-completion/bash_completion
    source /usr/share/bash-completion/completions/vmrestore
    COMP_WORDS=(vmrestore --backup-path /srv/backups --vm "")
    COMP_CWORD=4 COMP_LINE="${COMP_WORDS[*]}" COMP_POINT=${#COMP_LINE}
    _vmrestore vmrestore "" --vm
    echo "${COMPREPLY[*]:-(no VM names: --list printed none)}"' || die "bash completion failed to run"

step "beside vmbackup's bash vmrestore; reinstall keeps /var/log/vmrestore, purge removes it"
# vmbackup 0.6.0 installs /opt/vmbackup/vmrestore.sh and the symlink
# /usr/local/bin/vmrestore: the reinstall's postinst and --version must name it,
# and purging this package must leave it alone.
mkdir -p "$ROOT/opt/vmbackup"
printf '#!/bin/bash\necho "vmrestore 0.6.0"\n' >"$ROOT/opt/vmbackup/vmrestore.sh"
chmod 0755 "$ROOT/opt/vmbackup/vmrestore.sh"
ln -sf /opt/vmbackup/vmrestore.sh "$ROOT/usr/local/bin/vmrestore"
postinst_out=$(in_chroot dpkg -i "/tmp/$(basename "$DEB")" 2>&1) || { echo "$postinst_out" >&2; die "reinstall (dpkg -i) failed"; }
echo "$postinst_out" >>"$CACHE/chroot-apt.log"
grep 'WARN' <<<"$postinst_out" || true
grep -q 'WARN: /usr/local/bin/vmrestore (/opt/vmbackup/vmrestore.sh) comes before /usr/bin/vmrestore' <<<"$postinst_out" ||
    die "postinst did not name vmbackup's /usr/local/bin/vmrestore"
printf '\n$ vmrestore --version            (PATH: /usr/local/bin first)\n'
in_chroot vmrestore --version
printf '$ /usr/bin/vmrestore --version\n'
version_err=$(in_chroot /usr/bin/vmrestore --version 2>&1 >/dev/null)
echo "$version_err"
grep -q "runs /usr/local/bin/vmrestore → /opt/vmbackup/vmrestore.sh, a shell script (/bin/bash)" <<<"$version_err" ||
    die "/usr/bin/vmrestore --version did not WARN about /usr/local/bin/vmrestore"
[ "$(in_chroot stat -c '%U:%G %a' /var/log/vmrestore)" = "root:adm 750" ] || die "/var/log/vmrestore changed on reinstall"
echo "after reinstall: /var/log/vmrestore $(in_chroot stat -c '%U:%G %a' /var/log/vmrestore)"
in_chroot apt-get purge -y -q vmrestore >>"$CACHE/chroot-apt.log" 2>&1 || die "apt-get purge vmrestore failed"
[ ! -e "$ROOT/var/log/vmrestore" ] || die "/var/log/vmrestore is still there after purge"
[ ! -e "$ROOT/usr/bin/vmrestore" ] || die "/usr/bin/vmrestore is still there after purge"
[ -x "$ROOT/opt/vmbackup/vmrestore.sh" ] && [ -L "$ROOT/usr/local/bin/vmrestore" ] ||
    die "purge touched vmbackup's /usr/local/bin/vmrestore or /opt/vmbackup/vmrestore.sh"
echo "after purge: /usr/bin/vmrestore and /var/log/vmrestore gone; vmbackup's /usr/local/bin/vmrestore untouched"

step ""
printf '\n=== check-deb: timings\n'
printf '%s\n' "${TIMINGS[@]}"
printf '%5ds  total\n' $((SECONDS - T0))
echo "check-deb: OK: $DEB"
