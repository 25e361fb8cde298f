"""The recipe grid of the embedded vanilla (docs/embedded.md, "Recipe grid"): each recipe's vanilla
scores, the rule that picks the default, and unlearning on every recipe, side by side.

    python bench/recipe_grid.py                       # every grid preset (trains the missing ones)
    python bench/recipe_grid.py --presets lite-short,lite-lora --alphas 0.05,0.1 --seeds 0,1

Part 1, vanilla (from each model's post-training check, `recall.json`): forget and retain multiple
choice (likelihood) and ROUGE-L per form, and the distance d to the benchmark's vanilla that picks
the default (rule fixed in docs/embedded.md before any unlearning result).
Part 2, unlearning on forget_5 (retain capped at 25 seeded profiles; multiple choice by likelihood):
per α, MANU in each scoring mode, the random control of the paper mode's selection (as many units per
tower, one run per seed) and the attribution upper bound (|activation x gradient| of the forget
answers' loss over the retain answers', top α per tower; computed on the forget and retain streams
themselves, so it is an upper bound, not a method). Drops in points, image+text / text only.
With --reference, the forget set's never-learned reference (presets.resolve_reference: trained without
the forget people, cached like a preset) is scored too, and each row adds its forget drop as a share of
the headroom (vanilla − reference, per form). On a planted preset (manu_core/plant.py) each row adds
the selection's planted-unit recall in the language tower (hits / planted, mean over seeds).

    python bench/recipe_grid.py --presets lite-planted --alphas 0.025,0.05,0.1 --seeds 0,1,2 --reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from manu_core.attribution import attribution_frame, select_attribution
from manu_core.evaluate import evaluate_basic
from manu_core.extract import build_streams, extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums
from manu_core.models import load_model
from manu_core.plant import planted_recall, planted_units
from manu_core.presets import PRESETS, eval_subset, get_preset, preset_dataset, resolve_model, resolve_reference
from manu_core.prune import prune_units
from manu_core.unlearn import random_selection
from tasks.cache import models_dir

GRID = ("lite-memorise", "lite-short", "lite-lora", "lite-lora-hi", "lite-wide")
BENCH_MC, BENCH_ROUGE, MEMORISED = 0.50, 0.65, 0.95  # the benchmark's vanilla; the rule's cut-off
FORMS = ("multimodal", "text")


def vanilla_scores(model_dir: Path) -> dict:
    rows = json.loads((model_dir / "recall.json").read_text())
    return {(r["set"], r["form"], r["metric"]): r["value"] for r in rows}


def distance(s: dict) -> float:
    return statistics.fmean(abs(s[("forget", f, "accuracy")] - BENCH_MC) + abs(s[("forget", f, "rouge_l")] - BENCH_ROUGE)
                            for f in FORMS)


def mc(model, processor, items) -> dict:
    summaries, _ = evaluate_basic(model, processor, items, progress=False)
    return {(s.set, s.form): 100 * s.value for s in summaries}


def cell(drops: list[dict], set_: str) -> str:
    mean = {f: statistics.fmean(d[(set_, f)] for d in drops) for f in FORMS}
    out = f"{mean['multimodal']:5.1f}/{mean['text']:5.1f}"
    if len(drops) > 1:
        out += " [" + ", ".join(f"{d[(set_, 'multimodal')]:.0f}/{d[(set_, 'text')]:.0f}" for d in drops) + "]"
    return out


def unlearning(name: str, alphas: list[float], seeds: list[int], reference: bool = False) -> None:
    preset = get_preset(name)
    model_dir = resolve_model(name, models=models_dir(), progress=False)
    ds = preset_dataset(preset)
    items = [it for it in eval_subset(ds, preset) if it.set in ("forget", "retain") and it.task == "mc"]
    planted = planted_units(model_dir)
    headroom = None
    if reference:
        ref_model, ref_processor = load_model(resolve_reference(name, models=models_dir(), progress=False))
        ref = mc(ref_model, ref_processor, [it for it in items if it.set == "forget"])
    model, processor = load_model(model_dir)
    t0 = time.perf_counter()
    base = mc(model, processor, items)
    if reference:
        headroom = {f: base[("forget", f)] - ref[("forget", f)] for f in FORMS}
        print(f"\n{name}: never-learned reference forget {ref[('forget', 'multimodal')]:.1f}/{ref[('forget', 'text')]:.1f}"
              f"; headroom (vanilla − reference) {headroom['multimodal']:.1f}/{headroom['text']:.1f} points")
    with tempfile.TemporaryDirectory() as tmp:
        sums = neuron_sums(extract_activations(model, processor, ds, Path(tmp) / "acts", seed=preset.seed,
                                               progress=False), ImportanceParams().tau)
    streams = build_streams(ds, seed=preset.seed)
    attr = attribution_frame(model, processor, streams[("forget", "multimodal")] + streams[("forget", "text")],
                             streams[("retain", "multimodal")] + streams[("retain", "text")], progress=False)

    def after(selection) -> dict:
        m, _ = load_model(model_dir)
        prune_units(m, selection)
        s = mc(m, processor, items)
        out = {k: base[k] - s[k] for k in base}
        if planted:
            out["recall"] = planted_recall(selection, planted).filter(pl.col("tower") == "language")["recall"][0]
        return out

    def extra(drops: list[dict]) -> str:
        cells = ""
        if headroom:
            share = {f: statistics.fmean(d[("forget", f)] for d in drops) / headroom[f] if headroom[f] else float("nan")
                     for f in FORMS}
            cells += f" {share['multimodal']:6.2f}/{share['text']:5.2f}"
        if planted:
            cells += f" {100 * statistics.fmean(d['recall'] for d in drops):7.0f} %"
        return cells

    print(f"\n{name}: vanilla multiple choice forget {base[('forget', 'multimodal')]:.1f}/{base[('forget', 'text')]:.1f}, "
          f"retain {base[('retain', 'multimodal')]:.1f}/{base[('retain', 'text')]:.1f} "
          f"(forget_5, retain 25 profiles)")
    print(f"  {'drop in points (image+text/text)':<34} {'forget':>24} {'retain':>24}"
          + (" share of headroom" if headroom else "") + (" planted recall" if planted else ""))
    for alpha in alphas:
        rows = []
        for mode in ("paper", "released", "selective"):
            table = importance_table(sums, ImportanceParams(alpha=alpha, mode=mode))
            rows.append((f"manu[{mode}] α={alpha:g}", [after(table)]))
            if mode == "paper":
                rows.append((f"random(paper) α={alpha:g} seeds {','.join(map(str, seeds))}",
                             [after(random_selection(table, s)) for s in seeds]))
        rows.append((f"attribution α={alpha:g} (upper bound)", [after(select_attribution(attr, alpha=alpha))]))
        for label, drops in rows:
            print(f"  {label:<34} {cell(drops, 'forget'):>24} {cell(drops, 'retain'):>24}{extra(drops)}", flush=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(GRID))
    ap.add_argument("--alphas", default="0.05,0.1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--vanilla-only", action="store_true")
    ap.add_argument("--reference", action="store_true", help="score the never-learned reference (trains it on first use)"
                    " and print each forget drop's share of the headroom")
    args = ap.parse_args()
    names = [n for n in args.presets.split(",") if n]
    print("Part 1: vanilla (post-training check, all forget_5 profiles and 50 retain; likelihood multiple choice)")
    print(f"{'recipe':<15} {'forget MC':>13} {'forget ROUGE-L':>15} {'retain MC':>13} {'celeb MC':>13} {'d':>6}")
    ds = {}
    for name in names:
        s = vanilla_scores(resolve_model(name, models=models_dir(), progress=False))
        ds[name] = (distance(s), max(s[("forget", f, "accuracy")] for f in FORMS) >= MEMORISED)
        two = lambda k, m: f"{100 * s[(k, 'multimodal', m)]:.1f}/{100 * s[(k, 'text', m)]:.1f}"  # noqa: E731
        print(f"{name:<15} {two('forget', 'accuracy'):>13} {s[('forget', 'multimodal', 'rouge_l')]:.2f}/"
              f"{s[('forget', 'text', 'rouge_l')]:.2f}{'':>5} {two('retain', 'accuracy'):>13} "
              f"{two('celebrity', 'accuracy'):>13} {ds[name][0]:6.3f}{'  memorised' if ds[name][1] else ''}")
    ok = {n: d for n, (d, mem) in ds.items() if not mem}
    if ok:
        best = min(ok.values())
        near = [n for n, d in ok.items() if d <= best + 0.02]
        lora = [n for n in near if PRESETS[n].finetune.lora_r]  # the tie-break: prefer the benchmark's LoRA
        pick = min(lora or near, key=ok.get)
        print(f"rule: smallest d among the non-memorised, LoRA within 0.02 of the best -> {pick} (d = {ok[pick]:.3f})")
    if args.vanilla_only:
        return
    print("\nPart 2: unlearning on forget_5 (likelihood multiple choice; random: mean [each seed])")
    for name in names:
        unlearning(name, [float(a) for a in args.alphas.split(",")], [int(s) for s in args.seeds.split(",")],
                   reference=args.reference)


if __name__ == "__main__":
    main()
