#!/usr/bin/env bash
# Cold start as a new user: a fresh clone in a new folder, no .venv, no artifacts.
#   bash bench/bench_cold.sh [demo|test|both]   (default: both)
# Prints the wall time of `make demo` (install + training + MANU + evaluation; target <= 20 min on
# 2 cores) and of `make test` (the suite alone, install already done; target <= 10 min).
set -euo pipefail
what=${1:-both}
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=$(mktemp -d /tmp/manu-cold-XXXX)
git clone -q "$src" "$dir/manu"
cd "$dir/manu"
echo "fresh clone of $(git rev-parse --short HEAD) in $dir/manu; $(nproc) cores"
if [[ $what == demo || $what == both ]]; then
  start=$(date +%s)
  make demo > "$dir/demo.log" 2>&1 || { tail -30 "$dir/demo.log"; exit 1; }
  demo=$(( $(date +%s) - start ))
  tail -25 "$dir/demo.log"
  echo "make demo (cold, install included): ${demo} s (target <= 1200 s): $([[ $demo -le 1200 ]] && echo PASS || echo FAIL)"
fi
if [[ $what == test || $what == both ]]; then
  make install > /dev/null 2>&1
  start=$(date +%s)
  make test > "$dir/test.log" 2>&1 || { tail -30 "$dir/test.log"; exit 1; }
  t=$(( $(date +%s) - start ))
  tail -3 "$dir/test.log"
  echo "make test (install done): ${t} s (target <= 600 s): $([[ $t -le 600 ]] && echo PASS || echo FAIL)"
fi
echo "logs: $dir/demo.log $dir/test.log"
