#!/usr/bin/env bash
# The fleet benchmark in one command (not part of CI: it measures, it does not test).
#   scripts/bench-fleet.sh                         # N = 100, 16 MiB: mesh and hub-only (~3.5 min once built)
#   scripts/bench-fleet.sh --devices 1000 --sizes 1
#   scripts/bench-fleet.sh --help                  # caps, sizes, modes
# Results: bench-results/fleet-n<N>.{md,csv,png}. Needs what scripts/setup.sh installs,
# plus matplotlib for the chart (installed here with pip if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  python3 -m pip install --quiet matplotlib || echo "matplotlib unavailable: no chart" >&2
fi
cargo build --release --workspace --bins --quiet
exec ./target/release/bench_fleet "$@"
