#!/usr/bin/env bash
# Builds the hello-http unikernel (firmware-tools/unikernels/hello-http) for x86_64 and/or
# aarch64 and copies the bootable files to one directory:
#   hello-http-x86_64.elf   multiboot ELF  (qemu-system-x86_64 -M pc -kernel ...)
#   hello-http-aarch64.img  arm64 Image    (qemu-system-aarch64 -M virt -kernel ...)
# Installs the rustup targets if missing. Idempotent: a rebuild with nothing changed only
# copies the files again.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/build-unikernel.sh [--arch x86_64|aarch64|all] [--out DIR]

  --arch   which image to build (default: all)
  --out    where to put the images (default: target/unikernels/ in the repository)
  --help   this text
EOF
}

arch=all
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="${2:?--arch needs a value}"; shift 2 ;;
    --arch=*) arch="${1#--arch=}"; shift ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-unikernel: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$arch" in
  x86_64|aarch64) arches=("$arch") ;;
  all) arches=(x86_64 aarch64) ;;
  *) echo "build-unikernel: --arch must be x86_64, aarch64 or all, not '$arch'" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
workspace="$root/firmware-tools/unikernels"
out="${out:-$root/target/unikernels}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# An objcopy that understands aarch64 ELF and runs: LLVM's, the cross binutils, or the
# toolchain's rust-objcopy (which needs the llvm-tools component's libLLVM).
objcopy_tool() {
  local sysroot host
  sysroot="$(rustc --print sysroot)"
  host="$(rustc -vV | sed -n 's/^host: //p')"
  for tool in "$(command -v llvm-objcopy || true)" \
              "$(command -v aarch64-linux-gnu-objcopy || true)" \
              "$sysroot/lib/rustlib/$host/bin/rust-objcopy"; do
    if [ -n "$tool" ] && "$tool" --version >/dev/null 2>&1; then echo "$tool"; return 0; fi
  done
  echo "build-unikernel: no objcopy for aarch64 (apt-get install llvm or binutils-aarch64-linux-gnu)" >&2
  return 1
}

for a in "${arches[@]}"; do
  target="$a-unknown-none"
  if ! rustup target list --installed | grep -qx "$target"; then
    echo "build-unikernel: rustup target add $target"
    rustup target add "$target"
  fi
  echo "build-unikernel: building $target"
  (cd "$workspace" && cargo build --release --locked --target "$target" -p hello-http)
  elf="$workspace/target/$target/release/hello-http"
  case "$a" in
    x86_64)
      dest="$out/hello-http-x86_64.elf"
      cp "$elf" "$dest.tmp"
      ;;
    aarch64)
      dest="$out/hello-http-aarch64.img"
      # The Image is the loaded sections as one flat file (bss excluded; the header's
      # image_size covers it).
      "$(objcopy_tool)" -O binary "$elf" "$dest.tmp"
      ;;
  esac
  mv "$dest.tmp" "$dest"
done

echo "build-unikernel: images in $out"
for a in "${arches[@]}"; do
  for f in "$out/hello-http-$a".*; do
    printf '  %-28s %8d bytes\n' "$(basename "$f")" "$(stat -c %s "$f")"
  done
done
