#!/usr/bin/env bash
# The main job on an embedded default, end to end on this machine:
# keys and a trust root, two versions of a test unikernel, pack, sign, verify,
# the delta between them, a tampered chunk refused, and v1 booted under QEMU through
# libvirt (qemu:///system) — or under plain QEMU if libvirtd is unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins --quiet
FW="$PWD/target/debug/fwtool"
OUT="$PWD/demo-out"
rm -rf "$OUT" && mkdir -p "$OUT" && cd "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "keys: one offline root key, one release key"
"$FW" keygen --out keys/root
"$FW" keygen --out keys/release

step "trust root v1 (1-of-1 root, 1-of-1 release), signed by the root key"
"$FW" root init --fleet home --root-key keys/root.pub --release-key keys/release.pub \
  --sign-with keys/root.key --out root.bin
"$FW" root verify root.bin

step "two versions of a test unikernel (16 MiB each, same app)"
"$FW" testimage --app hello --version 1.0.0 --pad-mib 16 --out hello-1.0.0.elf
"$FW" testimage --app hello --version 1.0.1 --pad-mib 16 --out hello-1.0.1.elf
"$FW" inspect hello-1.0.0.elf

step "pack and sign both as releases 1 and 2 of hello on stable"
"$FW" pack hello-1.0.0.elf --app hello --version 1.0.0 --channel stable --release 1 --no-staging --out rel-1
"$FW" sign rel-1 --key keys/release.key
"$FW" pack hello-1.0.1.elf --app hello --version 1.0.1 --channel stable --release 2 --no-staging \
  --previous "$("$FW" inspect rel-1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')" \
  --out rel-2
"$FW" sign rel-2 --key keys/release.key

step "verify both against the root"
"$FW" verify rel-1 --root root.bin
"$FW" verify rel-2 --root root.bin --installed-release 1

step "what a device on 1.0.0 fetches for 1.0.1"
"$FW" diff rel-1 rel-2

step "attacks are refused"
cp -r rel-2 tampered
chunks=(tampered/chunks/*)
printf '\xff' | dd of="${chunks[0]}" bs=1 seek=100 conv=notrunc status=none
refused() { if "$@"; then echo "expected a refusal" >&2; exit 1; fi; }
echo "-- one flipped byte in a chunk:"
refused "$FW" verify tampered --root root.bin
echo "-- replaying release 1 to a device that has release 2:"
refused "$FW" verify rel-1 --root root.bin --installed-release 2
echo "-- a stable release offered to a beta device:"
refused "$FW" verify rel-2 --root root.bin --channel beta

step "boot hello 1.0.0"
LOG="$OUT/console.log"
if virsh -c qemu:///system version >/dev/null 2>&1; then
  NAME="unifleet-demo-$$"
  cat > domain.xml <<XML
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>$OUT/hello-1.0.0.elf</kernel></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='$LOG'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  virsh -c qemu:///system create domain.xml >/dev/null
  trap 'virsh -c qemu:///system destroy "$NAME" >/dev/null 2>&1 || true' EXIT
  how="libvirt (qemu:///system)"
else
  qemu-system-x86_64 -display none -monitor none -no-reboot -m 32 -serial "file:$LOG" \
    -kernel hello-1.0.0.elf &
  QPID=$!
  trap 'kill $QPID 2>/dev/null || true' EXIT
  how="plain QEMU (libvirtd unavailable)"
fi
for _ in $(seq 1 100); do
  grep -q READY "$LOG" 2>/dev/null && break
  sleep 0.1
done
if grep -q "READY hello 1.0.0" "$LOG"; then
  echo "booted through $how; console says: $(tr -d '\r' < "$LOG")"
else
  echo "no READY line within 10 s through $how" >&2
  exit 1
fi
