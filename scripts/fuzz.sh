#!/usr/bin/env bash
# Coverage-guided fuzzing of every file reader with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET ...]     (default: 600 s, every target)
#
# Needs a nightly toolchain and `cargo install cargo-fuzz`. Each target starts from the
# committed seeds (fuzz/seeds/<target>, written by the crate's own writers) plus real files of
# the repository, runs with a 2 GiB allocation cap and a 10 s per-input timeout, and prints
# libFuzzer's final statistics. A crash leaves its input in fuzz/artifacts/<target>/: fix the
# cause, then keep the input in fuzz/regressions/<target>/ (tests/hostile_files.rs replays
# every file there on the stable toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nnq nndc safetensors idx digits onnx)

# Real files as extra seeds, behind the harness's mode byte 0 (a whole file).
real_seed() { # target file
  local dir=fuzz/corpus/$1
  mkdir -p "$dir"
  { printf '\0'; cat "$2"; } > "$dir/real-$(basename "$2")"
}
real_seed nndc tests/fixtures/lenet5.nndc
real_seed safetensors tests/fixtures/lenet_300_100.safetensors
real_seed digits data/digits/digits.csv.gz
real_seed idx data/mnist/t10k-labels-idx1-ubyte.gz

mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t: ${seconds} s"
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -malloc_limit_mb=2048 -rss_limit_mb=4096 -timeout=10 \
    -print_final_stats=1 2>&1 | tee "fuzz/logs/$t.log" | grep -E "^(stat::|==|SUMMARY|Done)|DEATH|ERROR" || true
done
