"""Benchmark: the evaluation engine before and after batching by prompt length and the "auto"
generation budget, on the same units of the same models, in one process.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_eval.py            # lite preset, 4 profiles a set
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_eval.py --model tiny --profiles 0
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_eval.py --model artifacts/models/lite-49f5b34ec337

Every (set, form) unit of the preset's embedded items, capped at `--profiles` seeded profiles a set
(`cap_profiles`), is evaluated by `evaluate_unit` (the pipeline's path: chunks of 64, batches of 32,
bare questions, as the embedded models are evaluated) in three modes:

- `before`: `generate_texts` as it was before this change (copied below, verbatim), fixed budget;
- `sorted`: the engine now (batches by prompt length, the KV cache on), the same fixed budget: its
  answers.parquet must be byte for byte those of `before`;
- `auto`: the engine now with `max_new_tokens="auto"` (`evaluate.answer_token_cap`): answers may be
  cut where a model writes more than the cap; the bench counts them and the scores that moved.

Two models: the preset's vanilla model, and the same weights with `--damage` of its language MLP
units zeroed (seeded), which stands in for an unlearned model: it rambles, so its batches run to
the budget, which is where a smaller budget saves time. Modes are interleaved in each of
`--repeats` rounds (the order rotates) and the medians are compared, so a busy machine slows all
modes alike; the process's CPU time is printed beside the wall time (one torch thread: it is what a
shared machine's load disturbs least). Multiple choice is left out by default (`--tasks`): its
likelihood path is unchanged.

Measured (2 shared cores, one torch thread, defaults: lite, 844 questions, medians of 5 rounds):
vanilla before 6.31 s CPU, sorted 6.59 s (0.96x), auto 6.05 s (1.04x; 10 answers cut, 1 score
moved); damaged 0.2 before 10.28 s, sorted 10.61 s (0.97x), auto 7.79 s (1.32x; 116 cut, 1 moved);
sorted answers.parquet byte-identical to before in 8/8 units of both models. `--model tiny
--profiles 0 --tasks mc,cloze,gen` (1,842 questions): byte-identical in 8/8 units of both models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import manu_core.evaluate as ev  # noqa: E402
from manu_core import data as mdata  # noqa: E402
from manu_core.prompts import encode, model_inputs  # noqa: E402

MODES = ("before", "sorted", "auto")
REAL_GENERATE = ev.generate_texts


@torch.no_grad()
def generate_texts_before(model, processor, requests, *, batch_size=16, max_new_tokens=50, device="cpu"):
    """`evaluate.generate_texts` before batching by prompt length (git 36bcb9b), verbatim."""
    out: list[str] = []
    tok = processor.tokenizer
    for chunk in ev._chunks(requests, batch_size):
        enc = encode(processor, [r.prompt for r in chunk], [r.images or None for r in chunk], padding_side="left")
        ids = model.generate(**model_inputs(enc, device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def find_model(name: str) -> Path:
    """A preset's trained model (any key: both paths run on the same weights), or a folder."""
    from manu_core.models import ModelError
    from manu_core.presets import PRESETS, resolve_model
    from tasks.cache import models_dir

    if name not in PRESETS:
        return resolve_model(name)
    try:
        return resolve_model(name, models=models_dir(), train=name == "tiny")
    except ModelError:  # trained under another thread count or source (another key): the newest such model
        found = sorted((p.parent for p in models_dir().glob(f"{name}-*/manu_preset.json")
                        if p.parent.name.rsplit("-", 1)[0] == name), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit(f"no trained model of preset {name!r} under {models_dir()}: "
                             f"train it first (`manu train {name}`) or pass a model folder.")
        return found[-1]


def damaged(model, fraction: float, seed: int = 0):
    """The model with a seeded `fraction` of each language MLP layer's units zeroed (in place)."""
    from manu_core.arch import mlp_sites
    from manu_core.prune import prune_units

    rng = random.Random(f"bench-eval/{seed}")
    rows = [(s.tower, s.layer, u) for s in mlp_sites(model, towers=("language",))
            for u in rng.sample(range(s.width), int(fraction * s.width))]
    prune_units(model, rows)
    return model


def evaluate_all(model, processor, units, root: Path, mode: str, args) -> tuple[float, float]:
    """(wall, CPU) seconds to evaluate every unit into `root` in `mode`."""
    ev.generate_texts = generate_texts_before if mode == "before" else REAL_GENERATE
    cfg = ev.EvalConfig(mc_scorer="likelihood", instructions=False, batch_size=args.batch_size,
                        max_new_tokens="auto" if mode == "auto" else args.max_new_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for (set_, form), items in sorted(units.items()):
            ev.evaluate_unit(model, processor, items, ev.unit_dir(root, set_, form), cfg, progress=False)
    finally:
        ev.generate_texts = REAL_GENERATE
    return time.perf_counter() - t0, time.process_time() - c0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(units, roots: dict[str, Path]) -> dict:
    """`sorted` vs `before`: byte-identical files; `auto` vs `before`: answers cut, scores moved."""
    out = {"identical_files": 0, "identical_frames": 0, "units": len(units), "auto_cut": 0, "auto_score_moved": 0,
           "answers": 0, "caps": {}, "metric_moves": []}
    for set_, form in sorted(units):
        files = {m: ev.unit_dir(roots[m], set_, form) / "answers.parquet" for m in MODES}
        frames = {m: pl.read_parquet(f) for m, f in files.items()}
        out["identical_files"] += sha(files["before"]) == sha(files["sorted"])
        out["identical_frames"] += frames["before"].equals(frames["sorted"])
        a, b = frames["before"], frames["auto"]
        assert a["item_id"].to_list() == b["item_id"].to_list()
        out["answers"] += a.height
        out["auto_cut"] += int((a["prediction"] != b["prediction"]).sum())
        out["auto_score_moved"] += int(((a["score"] - b["score"]).abs() > 1e-12).sum())
        manifest = json.loads((files["auto"].parent / "manifest.json").read_text())
        out["caps"][f"{set_}/{form}"] = manifest["max_new_tokens"]
        sa, sb = (ev.summarize(f) for f in (a, b))
        for x, y in zip(sa, sb):
            if abs(x.value - y.value) > 1e-12:
                out["metric_moves"].append(f"{set_}/{form} {x.task} {x.metric}: {x.value:.4f} -> {y.value:.4f}")
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite", help="an embedded preset (its trained model) or a model folder")
    ap.add_argument("--preset", default=None, help="whose items to evaluate (default: --model, else the folder's)")
    ap.add_argument("--profiles", type=int, default=4, help="seeded profiles a set (0: all)")
    ap.add_argument("--tasks", default="cloze,gen", help="comma-separated subset of mc,cloze,gen")
    ap.add_argument("--damage", type=float, default=0.2, help="fraction of language MLP units zeroed in the "
                    "second model (0: vanilla only)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=ev.MAX_NEW_TOKENS, help="the fixed budget")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from manu_core.models import load_model
    from manu_core.presets import get_preset, preset_dataset, preset_of

    model_dir = find_model(args.model)
    preset = get_preset(args.preset) if args.preset else preset_of(model_dir)
    if preset is None:
        raise SystemExit(f"{model_dir} is not a model trained here: say whose items to use with --preset.")
    tasks = set(args.tasks.split(","))
    items = [it for it in mdata.eval_items(preset_dataset(preset)) if it.task in tasks]
    units = ev.units_of(ev.cap_profiles(items, args.profiles, seed=0))
    n = sum(len(v) for v in units.values())
    models = {"vanilla": load_model(model_dir)}
    if args.damage:
        models[f"damaged {args.damage:g}"] = damaged(load_model(model_dir)[0], args.damage), models["vanilla"][1]
    print(f"model: {model_dir} (preset {preset.name}); {len(units)} units, {n} questions "
          f"({', '.join(sorted(tasks))}; {args.profiles or 'all'} profiles a set); batch {args.batch_size}, "
          f"fixed budget {args.max_new_tokens}; torch threads {torch.get_num_threads()}; {args.repeats} rounds")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        for name, (model, processor) in models.items():
            model.eval()
            warm = dict([min(units.items())])  # one unit in every mode, untimed: allocations, caches
            for mode in MODES:
                evaluate_all(model, processor, warm, Path(tmp) / f"{name}-warm-{mode}", mode, args)
            times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
            roots: dict[str, Path] = {}
            for r in range(args.repeats):
                for mode in MODES[r % 3:] + MODES[: r % 3]:
                    roots[mode] = Path(tmp) / f"{name}-{mode}-{r}"
                    times[mode].append(evaluate_all(model, processor, units, roots[mode], mode, args))
            med = {m: statistics.median(w for w, _ in t) for m, t in times.items()}
            cpu = {m: statistics.median(c for _, c in t) for m, t in times.items()}
            cmp = compare(units, roots)
            print(f"\n== {name}")
            for m in MODES:
                print(f"{m:<7} wall {med[m]:7.2f} s ({n / med[m]:6.1f} q/s), CPU {cpu[m]:7.2f} s   runs (wall) "
                      f"{[round(w, 2) for w, _ in times[m]]}")
            for what, t in (("wall", med), ("CPU", cpu)):
                print(f"ratio {what:<4} before/sorted: {t['before'] / t['sorted']:.2f}x   before/auto: "
                      f"{t['before'] / t['auto']:.2f}x")
            print(f"sorted vs before: answers.parquet byte-identical in {cmp['identical_files']}/{cmp['units']} units "
                  f"(frames equal in {cmp['identical_frames']}/{cmp['units']})")
            print(f"auto vs before: {cmp['auto_cut']}/{cmp['answers']} answers cut, {cmp['auto_score_moved']} scores "
                  f"moved; caps per unit {cmp['caps']}")
            for line in cmp["metric_moves"]:
                print(f"  metric moved: {line}")


if __name__ == "__main__":
    main()
