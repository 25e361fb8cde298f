"""Every scoring mode vs random pruning of as many units, on an embedded preset.

    python bench/bench_unlearning.py [--preset lite] [--modes paper,released,selective]
        [--alphas 0.02,0.05,0.1,0.2] [--random-seeds 0,1,2]
    python bench/bench_unlearning.py --modes released/linear_outputs    # a mode with options set true

A mode may name options after slashes, each set to true (released/linear_outputs/pool_layers); the
extraction records what the modes read (Linear outputs, position statistics).

One extraction and one pass of the sums on the vanilla model serve every mode and α; then, per mode
and α, the mode's selection and random selections of as many units per tower (seeded), each applied
to a fresh copy of the vanilla model and evaluated on Forget, Retain and Celebrity in both forms
(multiple choice by likelihood, answer recall by key-fact containment). Prints the drops in points
(image+text / text only) for each mode and, for its random control, the mean and the sample standard
deviation over seeds.

The α grid is fixed before looking at results and every point is printed; nothing is chosen here.
Forget and Retain are the sets the selection was computed on (there is no held-out split in this bench).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from manu_core.evaluate import evaluate_basic
from manu_core.extract import extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums
from manu_core.models import load_model
from manu_core.presets import eval_subset, get_preset, preset_dataset, resolve_model
from tasks.cache import models_dir
from manu_core.prune import prune_units
from manu_core.store import OUTPUTS_DIR
from manu_core.unlearn import random_selection

SETS = ("forget", "retain", "celebrity")
METRICS = ("accuracy", "recall")  # multiple choice (likelihood), answer recall


def scores(model, processor, items) -> dict[tuple[str, str, str], float]:
    summaries, _ = evaluate_basic(model, processor, items, progress=False)
    return {(s.set, s.form, s.metric): s.value for s in summaries}


def drops(vanilla: dict, after: dict) -> dict:
    return {k: 100 * (vanilla[k] - after[k]) for k in vanilla}


def fmt(d: dict, sd: dict | None = None) -> str:
    cells = []
    for set_ in SETS:
        for metric in METRICS:
            mm, tx = (set_, "multimodal", metric), (set_, "text", metric)
            cell = f"{d[mm]:5.1f}/{d[tx]:5.1f}"
            if sd is not None:
                cell += f" ±{sd[mm]:.1f}/{sd[tx]:.1f}"
            cells.append(cell)
    width = 24 if sd is not None else 12
    return " ".join(f"{c:>{width}}" for c in cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--alphas", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--modes", default="paper,released,selective")
    ap.add_argument("--random-seeds", default="0,1,2")
    ap.add_argument("--aggregation", default="mean")
    args = ap.parse_args()
    preset = get_preset(args.preset)
    model_dir = resolve_model(preset.name, models=models_dir(), progress=False)
    ds = preset_dataset(preset)
    items = [it for it in eval_subset(ds, preset) if it.set in SETS]
    model, processor = load_model(model_dir)
    t0 = time.perf_counter()
    vanilla = scores(model, processor, items)
    t_eval = time.perf_counter() - t0
    modes = [(m.split("/")[0], {o: True for o in m.split("/")[1:]}) for m in args.modes.split(",")]
    params = [ImportanceParams(mode=m, options=o or None) for m, o in modes]  # checks names before any work
    needs = {k: any(p.extraction()[k] for p in params) for k in ("position_stats", "linear_outputs")}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        acts = extract_activations(model, processor, ds, Path(tmp) / "acts", aggregation=args.aggregation,
                                   seed=preset.seed, progress=False, **needs)
        sums = {False: neuron_sums(acts, ImportanceParams().tau)}
        if needs["linear_outputs"]:
            sums[True] = neuron_sums(acts / OUTPUTS_DIR, ImportanceParams().tau)
        t_manu = time.perf_counter() - t0
    print(f"preset {preset.name}, model {model_dir.name}, split {ds.split.name}; "
          f"extraction + sums {t_manu:.1f} s (once, for every mode), one evaluation {t_eval:.1f} s")
    header = " ".join(f"{f'{s[:6]} {m[:6]}':>12}" for s in SETS for m in METRICS)
    print(f"{'drop in points (image+text/text)':<44} {header}")
    print(f"{'vanilla (absolute, %)':<44} {fmt({k: 100 * v for k, v in vanilla.items()})}")
    seeds = [int(s) for s in args.random_seeds.split(",") if s]
    for (mode, options), given in zip(modes, params):
        for alpha in (float(a) for a in args.alphas.split(",")):
            table = importance_table(sums[given.extraction()["linear_outputs"]],
                                     ImportanceParams(alpha=alpha, mode=mode, options=options or None))
            per_tower = dict(table.filter("selected").group_by("tower").len().sort("tower").rows())
            m, _ = load_model(model_dir)
            prune_units(m, table)
            manu = drops(vanilla, scores(m, processor, items))
            label = "/".join([mode, *options]) + f" α={alpha:g} (" + ", ".join(f"{t[0]} {n}" for t, n in per_tower.items()) + ")"
            print(f"{label:<44} {fmt(manu)}")
            rand = []
            for seed in seeds:
                m, _ = load_model(model_dir)
                prune_units(m, random_selection(table, seed))
                rand.append(drops(vanilla, scores(m, processor, items)))
            mean = {key: statistics.fmean(r[key] for r in rand) for key in manu}
            sd = {key: statistics.stdev(r[key] for r in rand) if len(rand) > 1 else 0.0 for key in manu}
            print(f"{f'  random, as many per tower ({len(seeds)} seeds)':<44} {fmt(mean, sd)}", flush=True)


if __name__ == "__main__":
    main()
