#!/usr/bin/env bash
# The fleet benchmark in one command (not part of CI: it measures, it does not test).
#   scripts/bench-fleet.sh                         # N = 100, 16 MiB: mesh and hub-only (~3.5 min once built)
#   scripts/bench-fleet.sh --devices 1000 --sizes 1
#   scripts/bench-fleet.sh --help                  # caps, sizes, modes
#   scripts/bench-fleet.sh --modes mesh,hub-only,bittorrent --runs 3
# Results: bench-results/fleet-n<N>.{md,csv,png}. Installs what it needs first
# (scripts/setup.sh: libvirt, matplotlib for the chart, libtorrent and opentracker).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins --quiet
exec ./target/release/bench_fleet "$@"
