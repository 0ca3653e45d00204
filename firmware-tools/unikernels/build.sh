#!/bin/sh
# Builds the unikernel for each architecture into out/ — what unifleet.toml's [build]
# images name:
#   out/hello-http-x86_64.elf   multiboot ELF  (qemu-system-x86_64 -M pc -kernel ...)
#   out/hello-http-aarch64.img  arm64 Image    (qemu-system-aarch64 -M virt -kernel ...)
# The hub runs it in its build sandbox with no network (cargo fetch --locked ran before
# it), so it builds --offline and never installs anything: a missing rustup target is
# named, to be added on the hub. ARCHES="x86_64" builds one.
set -eu
cd "$(dirname "$0")"
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p out

# An objcopy that understands aarch64 ELF and runs: LLVM's, the cross binutils, or the
# toolchain's rust-objcopy (which needs the llvm-tools component's libLLVM).
objcopy_tool() {
  sysroot="$(rustc --print sysroot)"
  host="$(rustc -vV | sed -n 's/^host: //p')"
  for tool in "$(command -v llvm-objcopy || true)" \
              "$(command -v aarch64-linux-gnu-objcopy || true)" \
              "$sysroot/lib/rustlib/$host/bin/rust-objcopy"; do
    if [ -n "$tool" ] && "$tool" --version >/dev/null 2>&1; then echo "$tool"; return 0; fi
  done
  echo "build.sh: no objcopy for aarch64 (apt-get install llvm or binutils-aarch64-linux-gnu)" >&2
  return 1
}

for arch in ${ARCHES:-x86_64 aarch64}; do
  target="$arch-unknown-none"
  if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]; then
    echo "build.sh: the Rust target $target is not installed: rustup target add $target" >&2
    exit 1
  fi
  cargo build --release --locked --offline --target "$target" -p hello-http
  elf="$target_dir/$target/release/hello-http"
  case "$arch" in
    x86_64) cp "$elf" out/hello-http-x86_64.elf.tmp; mv out/hello-http-x86_64.elf.tmp out/hello-http-x86_64.elf ;;
    # The Image is the loaded sections as one flat file (bss excluded; the header's
    # image_size covers it).
    aarch64) "$(objcopy_tool)" -O binary "$elf" out/hello-http-aarch64.img.tmp
             mv out/hello-http-aarch64.img.tmp out/hello-http-aarch64.img ;;
    *) echo "build.sh: ARCHES may name x86_64 and aarch64, not $arch" >&2; exit 2 ;;
  esac
done
