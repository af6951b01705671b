#!/usr/bin/env bash
# Builds Vessel's QEMU: Debian's source of the qemu-system-x86 package
# installed on this host (same version, Debian's patches), plus the patches
# in guest/qemu/patches (applied in name order), configured for what a
# container VM uses and nothing else:
#   - one target (x86_64), KVM and TCG, the microvm machine and the devices
#     listed in guest/qemu/vessel.mak;
#   - linked statically and not position-independent, without capstone or
#     the crypto libraries: every QEMU process maps the same read-only
#     pages instead of a private, relocated copy of each library's data.
# Why: under TCG an idle container VM's QEMU is most of its host memory,
# and Debian's build (every device, PIE, a dozen shared libraries) costs
# each VM ~8 MiB more (docs/measurements.md).
#
# The source comes from Debian's archive through apt with a private source
# list and state (the host's apt configuration is not touched), so apt
# verifies it. The result is cached under $VESSEL_CACHE (default
# /var/cache/vessel), keyed by the source version, the patches, the device
# list and this script; a second run is instant. Prints the path of the
# cached binary on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VESSEL_CACHE:-/var/cache/vessel}
devices="$here/guest/qemu/vessel.mak"
patches=("$here"/guest/qemu/patches/*.patch)

srcver=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
key=$( (cat "$0" "$devices" "${patches[@]}"; echo "$srcver") | sha256sum | cut -c1-16)
out="$cache/qemu/$key"
if [ -x "$out/qemu-system-x86_64" ]; then
    echo "$out/qemu-system-x86_64"
    exit 0
fi

work="$cache/qemu/build-$key"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/src"
echo "building QEMU $key (Debian source $srcver); this takes a while" >&2
. /etc/os-release
mirror=${VESSEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${VESSEL_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
cat > "$work/apt/sources.list" <<LIST
deb-src $mirror $VERSION_CODENAME main
deb-src $mirror $VERSION_CODENAME-updates main
deb-src $security $VERSION_CODENAME-security main
LIST
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::Archives=$work/apt/archives"
          -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Sandbox::User=root")
apt-get -qq "${apt_opts[@]}" update >&2
(cd "$work/src" && apt-get -qq "${apt_opts[@]}" source "qemu=$srcver" >&2) || {
    echo "cannot fetch Debian's source of qemu $srcver (the installed qemu-system-x86);" \
         "if the archive has moved on, upgrade it (apt-get install --only-upgrade qemu-system-x86) and run again" >&2
    exit 1
}
src=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)
[ -n "$src" ] || { echo "apt did not unpack the QEMU source" >&2; exit 1; }
cd "$src"
for p in "${patches[@]}"; do
    patch -s -p1 --forward < "$p" >&2 || { echo "QEMU patch does not apply: $p" >&2; exit 1; }
done
cp "$devices" configs/devices/x86_64-softmmu/vessel.mak
mkdir build
cd build
../configure --target-list=x86_64-softmmu --with-devices-x86_64=vessel \
    --without-default-features --without-default-devices \
    --enable-kvm --enable-tcg --enable-virtfs --enable-attr --enable-cap-ng --enable-fdt=system \
    --enable-malloc-trim --disable-capstone --disable-docs --disable-werror --disable-install-blobs \
    --static --disable-pie --firmwarepath=/usr/share/qemu \
    --with-pkgversion="vessel $key" >&2
nice ninja -j"$(nproc)" qemu-system-x86_64 >&2
mkdir -p "$out.tmp"
strip -o "$out.tmp/qemu-system-x86_64" qemu-system-x86_64
"$out.tmp/qemu-system-x86_64" --version | head -n1 > "$out.tmp/version"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "$out/qemu-system-x86_64"
