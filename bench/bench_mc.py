"""Benchmark: likelihood multiple choice before and after reading each question once (its KV cache
serving all the options), on the same items of the same model, in one process.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_mc.py                 # lite, 8 profiles a set
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_mc.py --model tiny --profiles 0
    python bench/bench_mc.py --model artifacts/models/lite-without-forget_15-<key> --forget forget_15 \
        --sets forget --profiles 15 --repeats 1    # a sweep's reference unit, scored both ways

`before` is `evaluate.option_logprobs` as it was (git dca43aa, copied below verbatim): every option
row is the whole prompt, image included, + the option's answer, so a question with four options is
read four times, and its image encoded four times. `cached` is the function now. Both run over every
(set, form) unit's multiple-choice items of the preset (capped at `--profiles` seeded profiles a set)
in the pipeline's batches (eight questions), interleaved over `--repeats` rounds (order rotating);
medians are compared, wall and process CPU time. The bench then checks the scores: the largest
absolute difference, how many picked options (argmax) differ, and each path's accuracy.

Measured (2 shared cores, one torch thread, defaults: lite, 8 profiles a set, 423 questions a form, medians
of 3 rounds): image+text 7.29 s before, 2.84 s cached (2.57x); text only 4.00 s, 2.12 s (1.89x); largest
score difference 6.7e-6, the same option picked in all 846 questions. With 16 questions a batch instead of
the pipeline's 8: 2.37x and 1.72x (not taken). Every question of a unit is read with its image once now,
not four times; what is left is mostly the answers' forward and the log-softmax over the vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import manu_core.evaluate as ev  # noqa: E402
from bench.bench_eval import find_model  # noqa: E402
from manu_core import data as mdata  # noqa: E402
from manu_core.portraits import image_for  # noqa: E402
from manu_core.progress import progress as progress_bar  # noqa: E402
from manu_core.prompts import build_prompt, encode, model_inputs  # noqa: E402


@torch.no_grad()
def option_logprobs_before(model, processor, items, *, batch_size=8, device="cpu", system=None, images=image_for,
                           progress=True):
    """`evaluate.option_logprobs` before the prompt's KV cache (git dca43aa), verbatim."""
    scores: dict[str, list[float]] = {}
    bar = progress_bar(total=len(items), desc="multiple choice", disable=not progress, unit="q")
    for group in ev._by_form(items):
        for chunk in ev._chunks(group, batch_size):
            prompts, ims, answers = [], [], []
            for it in chunk:
                p = build_prompt(processor, it.question, image=it.image is not None, system=system)
                im = images(it.image) if it.image else None
                for opt in it.options:
                    prompts.append(p)
                    ims.append(im)
                    answers.append(it.cloze_answer.replace("__", opt) if "__" in it.cloze_answer else opt)
            enc = encode(processor, prompts, ims, answers)
            logits = model(**model_inputs(enc, device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = enc["input_ids"][:, 1:].to(device)
            tok_lp = logp.gather(-1, target[..., None])[..., 0]  # (B*4, T-1)
            mask = enc["answer_mask"][:, 1:].to(device)
            start_row = 0
            for it in chunk:
                rows = slice(start_row, start_row + len(it.options))
                start_row += len(it.options)
                scores[it.item_id] = ev.span_mean_logprobs(target[rows], mask[rows], tok_lp[rows])
            bar.update(len(chunk))
    bar.close()
    return scores


MODES = {"before": option_logprobs_before, "cached": ev.option_logprobs}
BEFORE_BATCH = ev.EvalConfig().batch_size // 4  # the pipeline's multiple-choice batch before (questions)


def score_all(model, processor, units, fn, batch_size: int) -> tuple[float, float, dict]:
    """(wall, CPU, scores) of scoring every unit's items with `fn`, `batch_size` questions a batch."""
    t0, c0 = time.perf_counter(), time.process_time()
    scores = {}
    for _, items in sorted(units.items()):
        scores |= fn(model, processor, items, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite", help="an embedded preset (its trained model) or a model folder")
    ap.add_argument("--preset", default=None, help="whose items to score (default: --model, else the folder's)")
    ap.add_argument("--profiles", type=int, default=8, help="seeded profiles a set (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="questions a batch of `cached` (default: the pipeline's)")
    ap.add_argument("--forget", default=None, help="the forget split whose items to score (default: the preset's)")
    ap.add_argument("--sets", default="forget,test,retain,celebrity", help="comma-separated evaluation sets")
    args = ap.parse_args()

    from manu_core.models import load_model
    from manu_core.presets import get_preset, preset_dataset, preset_of

    model_dir = find_model(args.model)
    preset = get_preset(args.preset) if args.preset else preset_of(model_dir)
    if preset is None:
        raise SystemExit(f"{model_dir} is not a model trained here: say whose items to use with --preset.")
    sets = set(args.sets.split(","))
    items = [it for it in mdata.eval_items(preset_dataset(preset, args.forget)) if it.task == "mc" and it.set in sets]
    units = ev.units_of(ev.cap_profiles(items, args.profiles, seed=0))
    n = {form: sum(len(v) for (_, f), v in units.items() if f == form) for form in ("multimodal", "text")}
    model, processor = load_model(model_dir)
    model.eval()
    print(f"model: {model_dir} (preset {preset.name}); {len(units)} units, {sum(n.values())} questions "
          f"({n}; {args.profiles or 'all'} profiles a set); torch threads {torch.get_num_threads()}; "
          f"{args.repeats} rounds")
    batch = args.batch or ev.mc_batch_size(ev.EvalConfig())
    for form in ("multimodal", "text"):
        sub = {k: v for k, v in units.items() if k[1] == form}
        warm = dict([min(sub.items())])
        for fn in MODES.values():  # untimed: allocations, caches
            score_all(model, processor, {k: v[:8] for k, v in warm.items()}, fn, 8)
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        scores = {}
        names = list(MODES)
        for r in range(args.repeats):
            for m in names[r % 2:] + names[: r % 2]:
                wall, cpu, scores[m] = score_all(model, processor, sub, MODES[m], BEFORE_BATCH if m == "before" else batch)
                times[m].append((wall, cpu))
        med = {m: statistics.median(w for w, _ in t) for m, t in times.items()}
        cpu = {m: statistics.median(c for _, c in t) for m, t in times.items()}
        a, b = scores["before"], scores["cached"]
        diff = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))
        picks = sum(max(range(len(a[k])), key=a[k].__getitem__) != max(range(len(b[k])), key=b[k].__getitem__)
                    for k in a)
        print(f"\n== {form}: {n[form]} questions")
        for m in MODES:
            print(f"{m:<7} wall {med[m]:7.2f} s ({1000 * med[m] / n[form]:6.2f} ms/q), CPU {cpu[m]:7.2f} s   "
                  f"runs (wall) {[round(w, 2) for w, _ in times[m]]}")
        print(f"ratio before/cached: wall {med['before'] / med['cached']:.2f}x, CPU {cpu['before'] / cpu['cached']:.2f}x")
        print(f"scores: largest |difference| {diff:.2e}; picked option differs in {picks}/{len(a)} questions")
        right = {it.item_id: it.correct for v in sub.values() for it in v}
        print("accuracy: " + ", ".join(
            f"{m} {100 * sum(max(range(len(sc[k])), key=sc[k].__getitem__) == right[k] for k in sc) / len(sc):.1f} %"
            for m, sc in scores.items()))


if __name__ == "__main__":
    main()
