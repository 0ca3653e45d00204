#!/usr/bin/env bash
# Builds `device` and `fwtool` for the ARM boards: aarch64 (arm64) and armv7 (armhf), with
# Debian's cross compilers and multiarch libvirt-dev. Installs what it needs on a fresh
# Debian 12 machine (root or sudo). Binaries land in target/<triple>/<profile>/.
#
#   scripts/cross.sh [--release] [TRIPLE...]     (default: both triples, debug profile)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PROFILE=()
TRIPLES=()
for a in "$@"; do
  case "$a" in
    --release) PROFILE=(--release) ;;
    *) TRIPLES+=("$a") ;;
  esac
done
[ ${#TRIPLES[@]} -gt 0 ] || TRIPLES=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

deb_arch() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    *) echo "cross.sh: no Debian architecture known for $1" >&2; exit 2 ;;
  esac
}
gnu_triple() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
  esac
}

need=()
for t in "${TRIPLES[@]}"; do
  arch=$(deb_arch "$t")
  gnu=$(gnu_triple "$t")
  dpkg --print-foreign-architectures | grep -qx "$arch" || { $SUDO dpkg --add-architecture "$arch"; UPDATE=1; }
  dpkg -s "gcc-$gnu" >/dev/null 2>&1 || need+=("gcc-$gnu" "libc6-dev-$arch-cross")
  dpkg -s "libvirt-dev:$arch" >/dev/null 2>&1 || need+=("libvirt-dev:$arch")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "cross: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

for t in "${TRIPLES[@]}"; do
  gnu=$(gnu_triple "$t")
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
  upper=$(echo "$t" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
  export "CC_$(echo "$t" | tr '-' '_')=$gnu-gcc"
  # pkg-config finds the target's libvirt, never the build machine's.
  export PKG_CONFIG_ALLOW_CROSS=1
  export PKG_CONFIG_LIBDIR="/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
  export PKG_CONFIG_SYSROOT_DIR=/
  echo "cross: building device and fwtool for $t"
  cargo build "${PROFILE[@]}" --target "$t" -p device -p firmware-tools --bins
  unset PKG_CONFIG_LIBDIR
done
