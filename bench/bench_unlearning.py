"""MANU vs random pruning on an embedded preset (issue 3, "Must show").

    python bench/bench_unlearning.py [--preset lite] [--alphas 0.02,0.05,0.1] [--random-seeds 0,1,2]

One extraction and one pass of the five sums on the vanilla model; then, per α, MANU's selection and
random selections of the same number of units (same neurons, seeded), each applied to a fresh copy
of the vanilla model and evaluated on Forget, Retain and Celebrity in both forms (multiple choice
by likelihood, answer recall by key-fact containment). Prints the drops in points and checks the
issue's criteria: Forget drops >= 20 points in each form, Retain and Celebrity drop at most half of
the Forget drop, and MANU's Forget drop >= 1.5x the mean random drop.

Note: α is chosen by looking at these numbers on the same Forget/Retain data: there is no held-out
split for tuning it in the tiny regime, so the chosen α is tuned on the data it is reported on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from manu_core.demo import demo_items
from manu_core.evaluate import evaluate_basic
from manu_core.extract import extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums
from manu_core.models import load_model
from manu_core.presets import get_preset, preset_dataset, resolve_model
from manu_core.prune import prune_units
from manu_core.unlearn import random_selection

SETS = ("forget", "retain", "celebrity")
METRICS = ("accuracy", "recall")  # multiple choice (likelihood), answer recall


def scores(model, processor, items) -> dict[tuple[str, str, str], float]:
    summaries, _ = evaluate_basic(model, processor, items, progress=False)
    return {(s.set, s.form, s.metric): s.value for s in summaries}


def drops(vanilla: dict, after: dict) -> dict:
    return {k: 100 * (vanilla[k] - after[k]) for k in vanilla}


def fmt(d: dict) -> str:
    cells = []
    for set_ in SETS:
        for metric in METRICS:
            cells.append(f"{d[(set_, 'multimodal', metric)]:6.1f}/{d[(set_, 'text', metric)]:6.1f}")
    return " ".join(f"{c:>14}" for c in cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--alphas", default="0.02,0.05,0.1")
    ap.add_argument("--random-seeds", default="0,1,2")
    ap.add_argument("--scope", default="global")
    ap.add_argument("--aggregation", default="mean")
    args = ap.parse_args()
    preset = get_preset(args.preset)
    model_dir = resolve_model(preset.name, progress=False)
    ds = preset_dataset(preset)
    items = [it for it in demo_items(ds, preset) if it.set in SETS]
    model, processor = load_model(model_dir)
    t0 = time.perf_counter()
    vanilla = scores(model, processor, items)
    t_eval = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        acts = extract_activations(model, processor, ds, Path(tmp) / "acts", aggregation=args.aggregation,
                                   seed=preset.seed, progress=False)
        sums = neuron_sums(acts, ImportanceParams().tau)
        t_manu = time.perf_counter() - t0
    print(f"preset {preset.name}, model {model_dir.name}, split {ds.split.name}; "
          f"extraction + sums {t_manu:.1f} s, one evaluation {t_eval:.1f} s")
    header = " ".join(f"{f'{s[:6]} {m[:6]}':>14}" for s in SETS for m in METRICS)
    print(f"{'drop in points (image+text/text)':<34} {header}")
    print(f"{'vanilla (absolute, %)':<34} {fmt({k: 100 * v for k, v in vanilla.items()})}")
    seeds = [int(s) for s in args.random_seeds.split(",") if s]
    for alpha in (float(a) for a in args.alphas.split(",")):
        params = ImportanceParams(alpha=alpha, scope=args.scope)
        table = importance_table(sums, params)
        k = int(table["selected"].sum())
        m, _ = load_model(model_dir)
        prune_units(m, table)
        manu = drops(vanilla, scores(m, processor, items))
        print(f"{f'MANU α={alpha:g} (k={k})':<34} {fmt(manu)}")
        rand = []
        for seed in seeds:
            m, _ = load_model(model_dir)
            prune_units(m, random_selection(table, seed))
            rand.append(drops(vanilla, scores(m, processor, items)))
        mean_rand = {key: statistics.fmean(r[key] for r in rand) for key in manu}
        print(f"{f'random α={alpha:g} (mean of {len(seeds)})':<34} {fmt(mean_rand)}")
        for form in ("multimodal", "text"):
            for metric in METRICS:
                f_drop = manu[("forget", form, metric)]
                worst_keep = max(manu[("retain", form, metric)], manu[("celebrity", form, metric)])
                r_drop = mean_rand[("forget", form, metric)]
                ok = f_drop >= 20 and worst_keep <= f_drop / 2 and f_drop >= 1.5 * r_drop
                print(f"    {form:<10} {metric:<11} forget drop {f_drop:5.1f} (>=20), retain/celebrity drop "
                      f"{worst_keep:5.1f} (<= {f_drop / 2:.1f}), random forget drop {r_drop:5.1f} "
                      f"(MANU >= {1.5 * r_drop:.1f}): {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
