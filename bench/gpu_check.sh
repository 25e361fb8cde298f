#!/usr/bin/env bash
# GPU check: LLaVA-1.5-7B- and Idefics2-8B-shaped models (random bf16 weights, built from their
# configs, no download) through extraction, batched evaluation and a pruned save/reload; prints the
# figures side by side (bench/gpu_check.py says what each one is).
#
#   bash bench/gpu_check.sh            # one GPU, full size (under 8 minutes; ~40 GB of free disk in $TMPDIR)
#   bash bench/gpu_check.sh --cpu      # the same code at tiny shapes on a CPU (~30 s; the test suite runs it)
#   bash bench/gpu_check.sh --shapes llava7b --eval-batch-size 16   # any gpu_check.py option passes through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = "--cpu" ]; then
    shift
    set -- --device cpu --scale 0.02 --batch-size 2 --n-batches 2 --repeats 1 --n-questions 4 \
        --eval-batch-size 2 --max-new-tokens 3 "$@"
fi
exec "$PY" bench/gpu_check.py "$@"
