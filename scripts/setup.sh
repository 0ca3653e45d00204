#!/usr/bin/env bash
# Installs and starts what unifleet's demo and tests need on a Debian/Ubuntu machine:
# a C toolchain and binutils, libvirt (library, daemon, QEMU driver, client), QEMU for
# x86, iptables and dnsmasq (libvirt's guest networks: firewall rules and DHCP), bubblewrap (the
# sandbox pushed code builds in), mosquitto and its clients (the broker tests' outsiders), Chromium and Node.js with playwright-core (the dashboard's browser
# test), python3-matplotlib, python3-libtorrent and opentracker (the fleet benchmark's
# chart and BitTorrent baseline), and cargo-nextest if missing. Idempotent: re-running only starts what
# is not running. Needs root (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(build-essential pkg-config libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu
          libvirt-clients qemu-system-x86 mosquitto mosquitto-clients python3 iproute2 procps
          qemu-system-arm qemu-user-static binutils-aarch64-linux-gnu libxml2-utils adduser nftables iptables dnsmasq-base
          chromium python3-matplotlib python3-libtorrent opentracker bubblewrap faketime
          openssl util-linux)

missing=()
arch=$(dpkg --print-architecture)
for p in "${PACKAGES[@]}"; do
  # With the cross builds' arm64 and armhf libvirt-dev beside it, a bare name is
  # ambiguous to dpkg: then ask for the native one (an Architecture: all package
  # answers only to its bare name).
  dpkg -s "$p" >/dev/null 2>&1 || dpkg -s "$p:$arch" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node.js for the dashboard's browser test (a machine may have a newer one of its own).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "setup: installing nodejs and npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "setup: warning: Node.js $(node --version 2>/dev/null) is older than the 20 playwright-core needs; the dashboard test will say so" >&2
fi
dash="$(dirname "$0")/../tests/dashboard"
if [ ! -d "$dash/node_modules/playwright-core" ]; then
  echo "setup: installing playwright-core for the dashboard test (npm ci in tests/dashboard)"
  (cd "$dash" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml")
have=$(rustc --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
  echo "setup: rustc $have is older than the $need this workspace needs; rustup update" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi

# libvirtd in a container: no systemd, so run the daemons directly, and let QEMU run as
# root (there is no libvirt-qemu user with access to our temp dirs). Loopback only.
$SUDO mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu
QEMU_CONF=/etc/libvirt/qemu.conf
config_changed=0
if ! grep -qs '^user = "root"' "$QEMU_CONF"; then
  # Debian ships qemu.conf with libvirt-daemon-system, which we do not install (it wants
  # systemd); without it, libvirt would probe QEMU as an unprivileged user and re-probe
  # its capabilities on every domain start (~40 s each).
  $SUDO mkdir -p /etc/libvirt
  printf '\n# unifleet: run QEMU as root inside this container\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n' | $SUDO tee -a "$QEMU_CONF" >/dev/null
  config_changed=1
fi
getent group libvirt-qemu >/dev/null || $SUDO groupadd -r libvirt-qemu 2>/dev/null || true
getent passwd libvirt-qemu >/dev/null || $SUDO useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu 2>/dev/null || true

if ! pgrep -x virtlogd >/dev/null; then
  $SUDO virtlogd -d
fi
if [ "$config_changed" = 1 ] && pgrep -x libvirtd >/dev/null; then
  echo "setup: restarting libvirtd to apply $QEMU_CONF"
  $SUDO pkill -x libvirtd || true
  for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
fi
if ! pgrep -x libvirtd >/dev/null; then
  $SUDO libvirtd -d
fi
# Wait for the daemon's socket (bounded).
for _ in $(seq 1 50); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then break; fi
  sleep 0.2
done
if virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "setup: libvirtd ready ($(virsh -c qemu:///system version 2>/dev/null | grep -i 'running hypervisor' | sed 's/.*: //'))"
else
  echo "setup: libvirtd did not come up on qemu:///system" >&2
  exit 1
fi
