#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time each, starting from the committed seeds.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes nightly-only
# sanitizer flags; RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them. A crash stops the run
# with a non-zero exit and leaves its input in fuzz/artifacts/<target>/; replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>` from the root.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(topic pattern envelope config)
fi

export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  # -max_len bounds inputs (8 KiB: the embedded default config, a seed, is over 5 KiB and must
  # not be cut); new corpus entries stay in fuzz/corpus.
  if ! cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=8192 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "fuzz: $target: $(grep -E '^Done ' "$log" | tail -n 1)"
done
