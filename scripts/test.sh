#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs and starts what the
# tests need (scripts/setup.sh), builds the binaries the end-to-end tests run, and runs
# every test of the workspace with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
