#!/usr/bin/env bash
# Installs everything Vessel needs on a Debian 12 host and builds it:
#   - Debian packages (QEMU, e2fsprogs, the kernel source and its build tools,
#     QEMU's build tools, busybox-static for the demo and test images, the
#     local registry, iproute2 and nftables for container networks,
#     docker-compose for tests);
#   - the guest kernel and Vessel's build of QEMU (each built once, cached
#     under $VESSEL_CACHE);
#   - the release daemon and the static guest agent;
#   - the guest files installed into $VESSEL_GUEST_DIR (default /usr/local/lib/vessel).
# Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
guest_dir=${VESSEL_GUEST_DIR:-/usr/local/lib/vessel}

packages=(qemu-system-x86 qemu-utils e2fsprogs linux-source-6.1 build-essential patch flex bison bc
          libelf-dev libssl-dev busybox-static python3 docker-registry
          iproute2 nftables docker-compose
          dpkg-dev meson ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev libcap-ng-dev
          libattr1-dev zlib1g-dev)
missing_packages() {
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
}
# Two passes: installing one package can remove another of the list (the
# release's qemu-system-x86 removes a newer qemu-utils from backports), and
# the second pass installs the release's version of what went.
updated=0
for pass in 1 2; do
    missing_packages
    [ ${#missing[@]} -gt 0 ] || break
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    [ "$updated" = 1 ] || { apt-get update -qq; updated=1; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
done
missing_packages
[ ${#missing[@]} -eq 0 ] || { echo "Debian packages still not installed: ${missing[*]}" >&2; exit 1; }
# The registry package starts a system service on install; tests run their own.
systemctl disable --now docker-registry >/dev/null 2>&1 || true

kernel=$("$here/scripts/build-kernel.sh")
qemu=$("$here/scripts/build-qemu.sh")

cd "$here"
echo "building vessel (release)" >&2
cargo build --release --locked -p vessel >&2
echo "building the guest agent (static)" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p vessel-agent \
    --target x86_64-unknown-linux-gnu >&2

mkdir -p "$guest_dir"
install -m 0644 "$kernel" "$guest_dir/vmlinux.new" && mv "$guest_dir/vmlinux.new" "$guest_dir/vmlinux"
install -m 0644 "$(dirname "$kernel")/release" "$guest_dir/release"
install -m 0755 target/x86_64-unknown-linux-gnu/release/vessel-init "$guest_dir/vessel-init.new"
mv "$guest_dir/vessel-init.new" "$guest_dir/vessel-init"
# Renamed into place: running VMs keep the binary they started with.
install -m 0755 "$qemu" "$guest_dir/qemu-system-x86_64.new"
mv "$guest_dir/qemu-system-x86_64.new" "$guest_dir/qemu-system-x86_64"
echo "guest kernel $(cat "$guest_dir/release"), agent and $(cat "$(dirname "$qemu")/version") installed in $guest_dir" >&2
