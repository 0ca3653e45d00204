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

for a in "${arches[@]}"; do
  target="$a-unknown-none"
  if ! rustup target list --installed | grep -qx "$target"; then
    echo "build-unikernel: rustup target add $target"
    rustup target add "$target"
  fi
done
# The template's own build script (what the hub runs for a push of it), then its images
# copied out.
(cd "$workspace" && cargo fetch --locked && ARCHES="${arches[*]}" ./build.sh)
for a in "${arches[@]}"; do
  for f in "$workspace/out/hello-http-$a".*; do
    cp "$f" "$out/$(basename "$f").tmp"
    mv "$out/$(basename "$f").tmp" "$out/$(basename "$f")"
  done
done

echo "build-unikernel: images in $out"
for a in "${arches[@]}"; do
  for f in "$out/hello-http-$a".*; do
    printf '  %-28s %8d bytes\n' "$(basename "$f")" "$(stat -c %s "$f")"
  done
done
