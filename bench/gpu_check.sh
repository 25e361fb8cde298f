#!/usr/bin/env bash
# GPU check: LLaVA-1.5-7B- and Idefics2-8B-shaped models (random bf16 weights, built from their
# configs, no download) through extraction (the default, with token statistics, and means only), one NPO
# step, batched evaluation and a pruned save/reload; each figure printed as it is measured, then side by
# side (bench/gpu_check.py says what each one is).
#
#   make install-gpu                   # once: a CUDA torch in .venv (make install's may be the CPU build)
#   bash bench/gpu_check.sh            # one GPU, full size (under 8 minutes; ~40 GB of free disk in $TMPDIR)
#   bash bench/gpu_check.sh --cpu      # the same code at tiny shapes on a CPU (~30-45 s; the test suite runs it)
#   bash bench/gpu_check.sh --shapes llava7b --eval-batch-size 16   # any gpu_check.py option passes through
#
# Without a GPU that torch can use it refuses within seconds (exit 2) and says the fix, unless --cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
cpu=0
rest=()
for a in "$@"; do
    if [ "$a" = "--cpu" ]; then cpu=1; else rest+=("$a"); fi
done
if [ "$cpu" = 1 ]; then  # the tiny plumbing run; later options (e.g. --threads 1) still apply
    set -- --device cpu --scale 0.02 --batch-size 2 --n-batches 2 --repeats 1 --n-questions 4 \
        --eval-batch-size 2 --max-new-tokens 3 ${rest[@]+"${rest[@]}"}
else
    set -- ${rest[@]+"${rest[@]}"}
fi
exec "$PY" bench/gpu_check.py "$@"
