#!/usr/bin/env bash
# The arm64 agent's footprint beside the x86 one, in one run: binary sizes (stripped, as
# the .deb installs them) and resident memory once each has installed a 1 MiB release and
# sits idle. The arm64 agent runs under qemu-aarch64-static, whose RSS includes the
# emulator and its translation cache: an upper bound for a real arm64 board.
#
#   scripts/bench-arm64-agent.sh      (after scripts/cross.sh --release aarch64-unknown-linux-gnu
#                                      and cargo build --release -p device -p hub -p firmware-tools)
set -euo pipefail
cd "$(dirname "$0")/.."
ARM=target/aarch64-unknown-linux-gnu/release/device
X86=target/release/device
HUB=target/release/hub
FW=target/release/fwtool
for f in "$ARM" "$X86" "$HUB" "$FW"; do
  [ -x "$f" ] || { echo "bench-arm64-agent: $f missing (see the header of this script)" >&2; exit 2; }
done
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MQTT=$(port); P2P=$(port)
"$HUB" --dir "$W/hub" init --mqtt-listen "127.0.0.1:$MQTT" --p2p-listen "/ip4/127.0.0.1/tcp/$P2P" >/dev/null 2>&1
RUST_LOG=warn "$HUB" --dir "$W/hub" serve >"$W/hub.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -s "$W/hub/hub.addr" ] && break; sleep 0.1; done
for d in x86 arm; do
  "$X86" enroll --dir "$W/$d" --name "bench-$d" --app hello --root "$W/hub/root.bin" \
    --hub "$(cat "$W/hub/hub.addr")" --broker "mqtt://127.0.0.1:$MQTT" \
    --listen "/ip4/127.0.0.1/tcp/$(port)" >/dev/null
  "$HUB" --dir "$W/hub" enroll "$W/$d/device.pub" --name "bench-$d" >/dev/null
done
RUST_LOG=warn "$X86" run --config "$W/x86/device.toml" >"$W/x86.log" 2>&1 & pids+=($!); xpid=$!
RUST_LOG=warn qemu-aarch64-static "$ARM" run --config "$W/arm/device.toml" >"$W/arm.log" 2>&1 & pids+=($!); apid=$!
"$FW" testimage --app hello --version 1.0.0 --pad-mib 1 --out "$W/hello.elf" >/dev/null
"$HUB" --dir "$W/hub" publish "$W/hello.elf" --app hello --version 1.0.0 --no-staging >/dev/null 2>&1
active() { grep -q '"state": "Active"' "$W/$1/state/status.json" 2>/dev/null; }
for _ in $(seq 600); do active x86 && active arm && break; sleep 0.1; done
active x86 && active arm || { echo "bench-arm64-agent: agents did not become active" >&2; tail "$W"/*.log >&2; exit 1; }
sleep 10
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
size() { "$1" -o "$W/stripped" "$2" && stat -c %s "$W/stripped"; }
echo "x86_64 agent:  binary $(size strip "$X86") bytes stripped, RSS $(rss $xpid) KiB idle"
echo "arm64 agent:   binary $(size aarch64-linux-gnu-strip "$ARM") bytes stripped, RSS $(rss $apid) KiB idle (under qemu-aarch64-static)"
