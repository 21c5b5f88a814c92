#!/usr/bin/env bash
# Fuzz each target for a bounded time: `fuzz/run.sh [seconds per target]` (default 60).
# Needs cargo-fuzz (installed here if missing) and a nightly compiler for the sanitizer flags:
# the nightly toolchain when rustup has one, else the installed one with RUSTC_BOOTSTRAP=1.
# A crash stops the run (exit 1) and leaves the input in fuzz/artifacts/TARGET/; turn it into a
# regression input in fuzz/regressions/TARGET/ (replayed by protocol/tests/fuzz_regressions.rs and
# backends/verda/tests/fuzz_regressions.rs in every cargo test) before fixing it.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
for target in request image answer; do
  corpus="$(mktemp -d)"
  cp seeds/"$target"/* "$corpus"/
  echo "== fuzzing $target for ${secs}s"
  "${fuzz[@]}" run "$target" "$corpus" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1 \
    2>&1 | grep -E '^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Test unit written)|panicked' || true
  if ls artifacts/"$target"/crash-* artifacts/"$target"/oom-* artifacts/"$target"/timeout-* >/dev/null 2>&1; then
    echo "fuzz target $target found a failing input: see fuzz/artifacts/$target/" >&2
    exit 1
  fi
  rm -rf "$corpus"
done
