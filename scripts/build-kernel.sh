#!/usr/bin/env bash
# Builds the Vessel guest kernel (an uncompressed vmlinux with a PVH entry
# point) from Debian's linux-source-6.1, guest/kernel/vessel.config and the
# patches in guest/kernel/patches (applied in name order).
#
# The result is cached under $VESSEL_CACHE (default /var/cache/vessel), keyed
# by the hash of the config, the patches and the source package version, so a
# second run is instant. Prints the path of the cached vmlinux on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VESSEL_CACHE:-/var/cache/vessel}
config="$here/guest/kernel/vessel.config"
patches=("$here"/guest/kernel/patches/*.patch)

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (cat "$config" "${patches[@]}"; echo "$srcver") | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -s "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

work="$cache/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
echo "building guest kernel $key (linux-source-6.1 $srcver); this takes a while" >&2
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
src="$work/linux-source-6.1"
cd "$src"
for p in "${patches[@]}"; do
    patch -s -p1 --forward < "$p" >&2 || { echo "kernel patch does not apply: $p" >&2; exit 1; }
done
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$config" >&2
make -s olddefconfig >&2
# Every requested option must have survived olddefconfig (a dependency that
# is off silently drops an option otherwise).
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=y) ;; *) continue ;; esac
    if ! grep -qx "$line" .config; then echo "kernel option not set: $line" >&2; missing=1; fi
done < "$config"
[ "$missing" = 0 ] || { echo "kernel config incomplete" >&2; exit 1; }
make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
make -s kernelrelease > "$out.tmp/release"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "$out/vmlinux"
