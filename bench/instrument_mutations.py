"""The positive control's own check: does tests/pipeline/test_positive_control.py fail when the
instrument breaks? Applies one deliberate defect at a time to the working tree, runs that test file,
and restores the file (also on Ctrl-C). Every defect must make the test fail (pytest exit 1).

    python bench/instrument_mutations.py                      # all four, about 1-6 min each on 2 cores
    python bench/instrument_mutations.py prune-neighbour      # one

The defects: forget and retain streams swapped (extract.build_streams); the released score negated
(importance); prune zeroing each unit's neighbour instead of the unit (prune.pruned_slices); the
evaluate task's cache key ignoring the model, so an unlearned model is handed the vanilla's answers
(tasks/stages.py). Presets train once into /tmp/manu-test-models-mutations (pytest -n 1 with a fixed
--testrunuid), so reruns reuse `tiny-planted`. Run it on a clean working tree: it rewrites files in place.
"""

import subprocess
import sys
from pathlib import Path

MUTATIONS = {
    "streams-swapped": ("manu_core/extract.py",
        'for split, ids in (("forget", dataset.split.forget_ids), ("retain", dataset.split.retain_ids)):',
        'for split, ids in (("forget", dataset.split.retain_ids), ("retain", dataset.split.forget_ids)):'),
    "score-inverted": ("manu_core/importance.py",
        "        score=score,\n    )\n    if opts[\"pool_layers\"]:",
        "        score=-score,\n    )\n    if opts[\"pool_layers\"]:"),
    "prune-neighbour": ("manu_core/prune.py",
        "        out += [PrunedSlice(w.param, w.dim, idx) for w in unit_weights(model, site)]",
        "        out += [PrunedSlice(w.param, w.dim, (idx + 1) % w.param.shape[w.dim])"
        " for w in unit_weights(model, site)]"),
    "eval-reads-vanilla": ("tasks/stages.py",
        '@manu_task(name="evaluate", paths=("model_dir", "data_dir"), ignore=("device", "label"),',
        '@manu_task(name="evaluate", paths=("data_dir",), ignore=("device", "label", "model_dir"),'),
}

ROOT = Path(__file__).resolve().parent.parent


def run(name: str) -> int:
    """Apply defect `name`, run the positive-control test, restore the file; pytest's exit code."""
    path, old, new = MUTATIONS[name]
    p = ROOT / path
    src = p.read_text()
    if src.count(old) != 1:
        raise SystemExit(f"{name}: the line to break is not in {path} exactly once (found {src.count(old)}); "
                         "update MUTATIONS to the current code.")
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "1", "--testrunuid=mutations",
                            "tests/pipeline/test_positive_control.py"], capture_output=True, text=True, cwd=ROOT)
    finally:
        p.write_text(src)
    tail = [line for line in r.stdout.splitlines()
            if line.startswith(("FAILED", "ERROR")) or " passed" in line or " failed" in line]
    print(f"== {name}: pytest exit {r.returncode}" + (" (the test caught it)" if r.returncode == 1 else
                                                       " (NOT caught)"), *tail, sep="\n  ", flush=True)
    return r.returncode


def main() -> None:
    unknown = [n for n in sys.argv[1:] if n not in MUTATIONS]
    if unknown:
        raise SystemExit(f"unknown defect(s) {unknown}; choose from {', '.join(MUTATIONS)}.")
    codes = [run(name) for name in sys.argv[1:] or list(MUTATIONS)]
    sys.exit(0 if all(c == 1 for c in codes) else 1)


if __name__ == "__main__":
    main()
