#!/usr/bin/env bash
# Builds the .deb packages with cargo-deb: unifleet-hub (amd64) and unifleet-device (amd64,
# and arm64/armhf from the cross builds of scripts/cross.sh), each with its systemd unit,
# a dedicated `unifleet` user and state in /var/lib/unifleet. Packages land in
# target/debian/ (amd64) and target/<triple>/debian/.
#
#   scripts/packages.sh [--profile dev|release] [--check] [TRIPLE...]
#
# --profile dev packages the debug binaries the tests built (no new build: CI); release
#   (the default) builds optimised ones.
# --check also installs the amd64 packages on this machine (apt resolves their
#   dependencies), verifies the units with `systemd-analyze verify` and checks the user, the
#   state directory and the binaries; it removes them again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PROFILE=release
CHECK=0
TRIPLES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift ;;
    --check) CHECK=1 ;;
    *) TRIPLES+=("$1") ;;
  esac
  shift
done

# Pinned: cargo-deb says packaging a dev profile will become an error in a later release.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "packages: installing cargo-deb"
  cargo install cargo-deb --locked --version 3.8.0 >/dev/null 2>&1 \
    || cargo install cargo-deb --locked >/dev/null
fi
dir=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
build=()
if [ "$PROFILE" = dev ]; then build=(--no-build); fi

cargo deb -p hub --profile "$PROFILE" "${build[@]}"
cargo deb -p device --profile "$PROFILE" "${build[@]}"
for t in "${TRIPLES[@]}"; do
  if [ "$PROFILE" != dev ]; then scripts/cross.sh --release "$t"; fi
  cargo deb -p device --profile "$PROFILE" --target "$t" --no-build
done
ls -l target/debian/*.deb target/*/debian/*.deb 2>/dev/null || true

if [ "$CHECK" = 1 ]; then
  debs=(target/debian/unifleet-hub_*_amd64.deb target/debian/unifleet-device_*_amd64.deb)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${debs[@]/#/./}" >/dev/null
  trap 'DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq unifleet-hub unifleet-device >/dev/null || true' EXIT
  getent passwd unifleet >/dev/null || { echo "packages: no unifleet user" >&2; exit 1; }
  [ "$(stat -c %U /var/lib/unifleet)" = unifleet ] || { echo "packages: /var/lib/unifleet not owned by unifleet" >&2; exit 1; }
  unifleet-device --help >/dev/null
  unifleet-hub --help >/dev/null
  for unit in unifleet-device unifleet-hub; do
    path=$(find /lib/systemd/system /usr/lib/systemd/system -name "$unit.service" 2>/dev/null | head -1)
    [ -n "$path" ] || { echo "packages: $unit.service not installed" >&2; exit 1; }
    out=$(systemd-analyze verify "$path" 2>&1 || true)
    # Units this machine lacks (libvirtd in a container) are named in After=, never errors.
    if echo "$out" | grep -v -e "libvirtd.service" -e "virtqemud.service" -e "xen.service" | grep -q .; then
      echo "packages: systemd-analyze verify $path:"; echo "$out"; exit 1
    fi
  done
  echo "packages: installed, verified and removed unifleet-hub and unifleet-device (amd64)"
fi
