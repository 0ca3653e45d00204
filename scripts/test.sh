#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs and starts what the
# tests need (scripts/setup.sh), builds the binaries the end-to-end tests run (and the
# arm64 agent, which one test runs under qemu-aarch64-static, and the Rust unikernel the
# NIC tests boot), and runs every test of the workspace with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
scripts/cross.sh aarch64-unknown-linux-gnu
scripts/build-unikernel.sh
cargo nextest run --workspace --no-fail-fast --config-file tests/nextest.toml "$@"
# The device package alone, built as a product is (in the workspace the tests package turns
# on its test hooks): the crash hook is refused there.
cargo nextest run -p device --lib --config-file tests/nextest.toml -E 'test(a_product_build)'
