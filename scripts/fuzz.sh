#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600), one after another,
# on the corpus in fuzz/corpus/<target> (committed; seeded from proto's golden vectors and
# fwtool test images), then minimises each corpus. A crash stops the run and leaves its
# input in fuzz/artifacts/<target>/; make it a regression test.
#
#   scripts/fuzz.sh            # 10 minutes per target
#   scripts/fuzz.sh 60         # a quick pass
#   scripts/fuzz.sh 600 decode_blob inspect_elf
#
# Needs cargo-fuzz (installed if missing). It builds on the stable toolchain with
# RUSTC_BOOTSTRAP=1 (sanitizer flags are nightly-only). Prints executions and coverage
# per target, and writes them to fuzz/last-run.txt.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
targets=("$@")
all=${#targets[@]}
if [ "$all" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
seed() {
  local t=$1 dir=corpus/$1
  mkdir -p "$dir"
  [ -n "$(ls -A "$dir")" ] && return 0
  case $t in
    decode_*|verify_*) cp ../proto/tests/golden/*.bin "$dir"/ ;;
    inspect_*) for f in ../proto/tests/golden/*.bin; do cp "$f" "$dir"/; done
               if [ -x ../target/debug/fwtool ]; then
                 ../target/debug/fwtool testimage --app hello --version 1.0.0 --out "$dir/hello.elf" >/dev/null 2>&1 || true
               fi ;;
    device_state) printf '{"apps":{"hello":{"current":{"release":1,"version":"1.0.0","manifest":"%064d","slot":"/s/hello-1.img"},"pending":null,"previous":null,"failed":[2],"highest_seen":2}},"report_seq":3}' 0 > "$dir/state.json" ;;
    device_config) printf 'name = "d1"\nfleet = "home"\nchannel = "stable"\napps = ["hello"]\nroot = "root.bin"\nkey = "device.key"\nstate_dir = "state"\nbroker = "mqtt://127.0.0.1:1883"\n[[ondemand]]\napp = "hello"\nlisten = "127.0.0.1:8080"\n' > "$dir/device.toml" ;;
  esac
}
# A run of every target starts the record afresh; a run of some adds to it.
if [ "$all" -eq 0 ]; then : > last-run.txt; fi
for t in "${targets[@]}"; do
  seed "$t"
  echo "fuzz: $t for ${secs}s"
  log=$(mktemp)
  if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  cargo fuzz cmin "$t" "corpus/$t" >/dev/null 2>&1 || true
  files=$(ls "corpus/$t" | wc -l)
  line="$t: ${secs}s, ${execs:-?} executions, cov ${cov:-?}, features ${ft:-?}, 0 crashes, corpus ${files} files"
  echo "$line" | tee -a last-run.txt
  rm -f "$log"
done
