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
#   state directory and the binaries; then it boots a release with the packaged agent,
#   running as `unifleet`, under a stock libvirt (scripts/stock-libvirt.sh: QEMU as
#   libvirt-qemu, dynamic ownership) and a packaged hub; it removes them again at the end.
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

# The packaged agent, enrolled as README says and run as its user, boots a release from a
# packaged hub under libvirt's stock QEMU settings (issue 32): QEMU, as libvirt-qemu, must
# reach the image in /var/lib/unifleet, and the agent must read the console log it probes.
boot_on_stock_libvirt() {
  local fwtool="$1" w uri mqtt p2p hub
  STOCK=$(mktemp -d /tmp/unifleet-stock.XXXXXX)
  chmod 0755 "$STOCK"  # the agent, as unifleet, reaches the daemon's socket in it
  w="$STOCK"
  uri="qemu+unix:///system?socket=$w/libvirt/run/libvirt-sock"
  scripts/stock-libvirt.sh start "$w/libvirt" >/dev/null
  read -r mqtt p2p < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
  unifleet-hub --dir "$w/hub" init --mqtt-listen "127.0.0.1:$mqtt" --mqtt-tls --p2p-listen "/ip4/127.0.0.1/tcp/$p2p" >/dev/null
  unifleet-hub --dir "$w/hub" serve >"$w/hub.out" 2>"$w/hub.log" &
  for _ in $(seq 100); do [ -s "$w/hub/hub.addr" ] && break; sleep 0.1; done
  [ -s "$w/hub/hub.addr" ] || { echo "packages: the packaged hub did not start:" >&2; tail -20 "$w/hub.log" >&2; exit 1; }
  hub=$(cat "$w/hub/hub.addr")
  unifleet-device enroll --dir /etc/unifleet --state-dir /var/lib/unifleet --name stock-1 \
    --root "$w/hub/root.bin" --app hello --hub "$hub" --broker "mqtts://127.0.0.1:$mqtt" --broker-ca "$w/hub/broker-ca.pem" \
    --libvirt "$uri" --listen /ip4/127.0.0.1/tcp/0 --no-mdns >/dev/null
  chown unifleet:unifleet /etc/unifleet/device.key /etc/unifleet/device.toml
  unifleet-hub --dir "$w/hub" enroll /etc/unifleet/device.pub --name stock-1 >/dev/null
  setpriv --reuid unifleet --regid unifleet --init-groups \
    unifleet-device run --config /etc/unifleet/device.toml 2>"$w/device.log" &
  "$fwtool" testimage --app hello --version 1.0.0 --out "$w/hello.elf" >/dev/null
  unifleet-hub --dir "$w/hub" publish "$w/hello.elf" --app hello --version 1.0.0 \
    --memory-mib 64 --no-staging >/dev/null
  for _ in $(seq 60); do
    # Reported through the broker, over TLS with the certificate the hub issued it.
    if unifleet-hub --dir "$w/hub" devices 2>/dev/null | grep "^stock-1 hello release 1 active" >/dev/null &&
      grep "connected to MQTT broker" "$w/device.log" >/dev/null; then
      echo "packages: the packaged agent (user unifleet) booted hello 1.0.0 under a stock libvirt (QEMU as libvirt-qemu) and reported over TLS"
      return 0
    fi
    sleep 1
  done
  echo "packages: the packaged agent did not boot its release under a stock libvirt within 60 s:" >&2
  unifleet-hub --dir "$w/hub" devices >&2 || true
  tail -20 "$w/device.log" >&2
  tail -20 "$w/hub.log" >&2
  exit 1
}

STOCK=""  # the boot check's directory, while it runs
cleanup() {
  if [ -n "$STOCK" ]; then
    # shellcheck disable=SC2046
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    scripts/stock-libvirt.sh stop "$STOCK/libvirt" >/dev/null || true
    rm -rf "$STOCK" /etc/unifleet/device.* /etc/unifleet/root.bin /etc/unifleet/broker-ca.pem || true
    find /var/lib/unifleet -mindepth 1 -delete 2>/dev/null || true
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq unifleet-hub unifleet-device >/dev/null || true
}

if [ "$CHECK" = 1 ]; then
  if [ -e /etc/unifleet/device.toml ]; then
    echo "packages: --check enrolls a test device in /etc/unifleet and removes it; this machine has one enrolled already (/etc/unifleet/device.toml): not touching it" >&2
    exit 1
  fi
  # As Debian's libvirt-daemon-system would (this machine's libvirt may come without
  # it): the group whose members reach libvirtd's socket, there before the package is
  # configured so that its postinst puts `unifleet` in it.
  getent group libvirt >/dev/null || $SUDO groupadd -r libvirt
  debs=(target/debian/unifleet-hub_*_amd64.deb target/debian/unifleet-device_*_amd64.deb)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${debs[@]/#/./}" >/dev/null
  trap cleanup EXIT
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
  boot_on_stock_libvirt "target/$dir/fwtool"
  echo "packages: installed, verified, booted a release under a stock libvirt and removed unifleet-hub and unifleet-device (amd64)"
fi
