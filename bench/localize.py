"""Where the stand-in keeps what it knows: the drop in multiple-choice accuracy when one candidate home of a
person's knowledge is taken away from the trained vanilla, per forget profile and on average, beside the same
intervention's drop on retain profiles (one that drops forget and retain alike is not person-specific).

    python bench/localize.py                                   # the `lite` preset (trains it on first use)
    python bench/localize.py --preset tiny --csv /tmp/localize_tiny.csv
    python bench/localize.py --preset lite --csv /tmp/localize_lite.csv > /tmp/localize_lite.md

Measured on the multiple-choice items of `presets.eval_subset` (every profile of the preset's default forget
set; retain: its seeded sample of 25 profiles), scored by likelihood with `evaluate.evaluate_basic`, in both
forms (image+text: the portrait and "this person"; text only: the person's name, no image), as
bench/recipe_grid.py scores them. A drop is vanilla minus intervened accuracy, in points, over the set's items;
per profile, over that profile's items.

The interventions, each applied to the vanilla and undone before the next:

- name tokens -> mean: the input embeddings of the tokens of " " + name that no other learned profile's name
  uses (`presets.owned_name_tokens`) are replaced by the mean input embedding over the vocabulary, for the
  people of the set measured (forget's for the forget columns, the retain sample's for the retain columns). A
  person who owns no such token is left untouched, so the row is also given for the owners alone (when some
  own none). A further row replaces every token of " " + name, shared pieces too (a shared piece is then
  also blanked for the other people who use it; only the set's own items are measured).
- layer i MLP -> base / layer i attention -> base: that language layer's fine-tune update removed, its MLP
  (gate/up/down) or attention (q/k/v/o) weights reset to the weights after the preset's base stage (the
  celebrity stand-ins, before any fictitious person). The base stage is trained again here, deterministically
  (`presets.base_stage` at the preset's thread count), and checked against the vanilla: its loss curve must
  equal the base-stage part of the vanilla's `loss_curve.json`, and a LoRA fine-tune leaves every tensor
  outside the language layers' projections (the embeddings among them) bit-identical to the base's.
  Also every layer at once per block, and the base-stage model itself (the whole fine-tune removed).
- portrait -> another's: image+text items shown the portrait of another learned profile (seeded per profile)
  instead of their own; the question and options unchanged. Text-only items have no image: no text column.

Prints a markdown table (drops in points, image+text / text only; the number of forget profiles whose drop is
at least --strong points) and writes every (intervention, set, profile, form) to --csv.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from manu_core.arch import get_adapter
from manu_core.data import Dataset, EvalItem
from manu_core.evaluate import evaluate_basic
from manu_core.models import load_model
from manu_core.presets import (as_trained_here, base_stage, eval_subset, get_preset, owned_name_tokens,
                               preset_dataset, resolve_model)
from manu_core.train import torch_threads
from tasks.cache import models_dir

FORMS = ("multimodal", "text")
SETS = ("forget", "retain")
Key = tuple[str, str, str]  # (set, profile id, form)


# ----------------------------------------------------------------------------------------------
# Measuring


def correct_by_item(model, processor, items: Sequence[EvalItem]) -> dict[str, bool]:
    """{item_id: the likelihood pick is the right option} (evaluate_basic's multiple choice)."""
    if not items:
        return {}
    with torch.no_grad():
        _, details = evaluate_basic(model, processor, items, progress=False)
    return {i: d["pick"] == d["correct"] for i, d in details["mc"].items()}


def accuracy(correct: dict[str, bool], items: Sequence[EvalItem]) -> dict[Key, list[bool]]:
    """Per (set, profile, form), the items' correctness (items not measured are left out)."""
    out: dict[Key, list[bool]] = defaultdict(list)
    for it in items:
        if it.item_id in correct:
            out[(it.set, it.profile_id, it.form)].append(correct[it.item_id])
    return out


def points(v: list[bool]) -> float:
    return 100 * sum(v) / len(v)


@contextmanager
def patched(model, new: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named parameters set to `new` inside the block, restored after (also on error)."""
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in new}
    try:
        with torch.no_grad():
            for k, v in new.items():
                params[k].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


# ----------------------------------------------------------------------------------------------
# The interventions


def name_token_patch(model, tokenizer, tokens: dict[str, list[str]], ids: set[str]) -> dict[str, torch.Tensor]:
    """The input embedding matrix with the name tokens `tokens` of the profiles `ids` set to the mean row."""
    emb = model.get_input_embeddings().weight
    name = next(k for k, p in model.named_parameters() if p is emb)
    rows = sorted({t for pid in ids for t in tokenizer.convert_tokens_to_ids(tokens[pid])})
    new = emb.detach().clone()
    new[rows] = emb.detach().mean(0)
    return {name: new}


def projection_blocks(model) -> dict[tuple[int, str], list[str]]:
    """{(language layer, "mlp" | "attention"): parameter names}: the projections a LoRA fine-tune adapts
    (the architecture adapter's `lora_targets`), grouped by layer and block."""
    target = re.compile(get_adapter(model).lora_targets(model))
    blocks: dict[tuple[int, str], list[str]] = defaultdict(list)
    for mod_name, mod in model.named_modules():
        if target.match(mod_name):
            layer = int(re.search(r"\.(\d+)\.[^.]+\.[^.]+$", mod_name).group(1))
            block = "attention" if ".self_attn." in mod_name else "mlp"
            blocks[(layer, block)] += [f"{mod_name}.{p}" for p, _ in mod.named_parameters()]
    return dict(sorted(blocks.items()))


def swap_portraits(items: Sequence[EvalItem], learned: Sequence[str], seed: int) -> tuple[list[EvalItem], dict]:
    """The image+text items, each profile's shown the portrait of another learned profile (seeded per profile)."""
    others: dict[str, str] = {}
    out = []
    for it in items:
        if it.form != "multimodal":
            continue
        if it.profile_id not in others:
            rng = random.Random(f"localize-portrait/{seed}/{it.profile_id}")
            others[it.profile_id] = rng.choice([p for p in learned if p != it.profile_id])
        out.append(dataclasses.replace(it, image=others[it.profile_id]))
    return out, others


# ----------------------------------------------------------------------------------------------
# The base-stage check


def check_base(preset_name: str, model_dir: Path, vanilla, vprocessor, base, bprocessor, curve: list[dict],
               blocks: dict[tuple[int, str], list[str]]) -> list[str]:
    """Lines (markdown bullets) saying whether the reproduced base stage is the one the vanilla started from."""
    saved = [r for r in json.loads((model_dir / "loss_curve.json").read_text()) if r.get("stage") == "base"]
    steps = lambda rs: [(r["step"], r["loss"]) for r in rs if "step" in r]  # noqa: E731
    same_curve = steps(saved) == steps(curve)
    same_vocab = vprocessor.tokenizer.get_vocab() == bprocessor.tokenizer.get_vocab()
    vp, bp = dict(vanilla.named_parameters()), dict(base.named_parameters())
    if vp.keys() != bp.keys():
        raise SystemExit(f"{preset_name}: the base-stage model's parameters are not the vanilla's "
                         f"({sorted(vp.keys() ^ bp.keys())[:5]} ...)")
    adapted = {n for names in blocks.values() for n in names}
    differ = {n for n in vp if not torch.equal(vp[n], bp[n])}
    emb = next(n for n, p in vanilla.named_parameters() if p is vanilla.get_input_embeddings().weight)
    outside = sorted(differ - adapted)
    lines = [
        f"- base-stage loss curve, {len(steps(curve))} steps, equal to the vanilla's recorded base stage "
        f"(loss_curve.json): **{'yes' if same_curve else 'NO'}**",
        f"- tokenizer vocabulary equal to the vanilla's: **{'yes' if same_vocab else 'NO'}**",
        f"- tensors that differ between base stage and vanilla: {len(differ)} of {len(vp)} "
        f"({len(differ & adapted)} of the {len(adapted)} language-layer projections, {len(outside)} others)",
        f"- input embedding matrix `{emb}` equal to the base's bit for bit: **{'yes' if emb not in differ else 'no'}**",
    ]
    if get_preset(preset_name).finetune.lora_r:
        ok = not outside
        lines.append(f"- LoRA fine-tune: every tensor outside the adapted projections equal to the base's: "
                     f"**{'yes' if ok else 'NO: ' + ', '.join(outside[:5])}** (so the reset layers start from the "
                     "bits the vanilla started from)")
    else:
        lines.append("- full fine-tune: every tensor was trained, so bit equality of the weights cannot be checked; "
                     "the loss curve and vocabulary are the check")
    return lines


# ----------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class Row:
    key: str  # the CSV's name of the intervention
    label: str
    after: dict[Key, list[bool]]  # measured keys only
    forms: tuple[str, ...] = FORMS
    only: set[str] | None = None  # profiles the row is restricted to (None: all)


def drops(vanilla: dict[Key, list[bool]], row: Row, set_: str, form: str) -> tuple[float | None, list[tuple]]:
    """The set's drop over its items (None if not measured) and per profile (id, n, vanilla, after, drop)."""
    keys = [k for k in row.after if k[0] == set_ and k[2] == form and (row.only is None or k[1] in row.only)]
    if not keys:
        return None, []
    per = [(k[1], len(vanilla[k]), points(vanilla[k]), points(row.after[k]),
            points(vanilla[k]) - points(row.after[k])) for k in sorted(keys)]
    v = [b for k in keys for b in vanilla[k]]
    a = [b for k in keys for b in row.after[k]]
    return points(v) - points(a), per


def table(vanilla: dict[Key, list[bool]], rows: list[Row], strong: float) -> str:
    head = ("| intervention | forget drop image+text | forget drop text | retain drop image+text | retain drop text "
            f"| forget profiles with drop ≥ {strong:g} (image+text / text) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda d: "–" if d is None else f"{d:.1f}"  # noqa: E731
    for row in rows:
        cells, counts = [], []
        for set_ in SETS:
            for form in FORMS:
                d, per = drops(vanilla, row, set_, form) if form in row.forms else (None, [])
                cells.append(fmt(d))
                if set_ == "forget":
                    counts.append("–" if d is None else f"{sum(p[4] >= strong for p in per)}/{len(per)}")
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {' / '.join(counts)} |")
    return "\n".join(lines)


def write_csv(path: Path, vanilla: dict[Key, list[bool]], rows: list[Row], ds: Dataset,
              owned: dict[str, list[str]], portraits: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["intervention", "set", "profile_id", "name", "form", "n_items", "vanilla_acc", "after_acc",
                    "drop", "owned_name_tokens", "portrait_shown"])
        for row in rows:
            for set_ in SETS:
                for form in row.forms:
                    for pid, n, v, a, d in drops(vanilla, row, set_, form)[1]:
                        w.writerow([row.key, set_, pid, ds.profile(pid).name, form, n, f"{v:.1f}", f"{a:.1f}",
                                    f"{d:.1f}", " ".join(owned[pid]),
                                    portraits.get(pid, "") if row.key == "portrait" else ""])


# ----------------------------------------------------------------------------------------------


def run(preset_name: str, csv_path: Path | None, strong: float) -> None:
    t0 = time.perf_counter()
    preset = as_trained_here(get_preset(preset_name))
    model_dir = resolve_model(preset_name, models=models_dir(), progress=False)
    ds = preset_dataset(preset)
    items = [it for it in eval_subset(ds, preset) if it.set in SETS and it.task == "mc"]
    model, processor = load_model(model_dir)
    ids = {s: sorted({it.profile_id for it in items if it.set == s}) for s in SETS}
    learned = sorted(p.id for p in ds.profiles)
    owned = owned_name_tokens(processor.tokenizer, ds.profiles)
    owners = {pid for pid, toks in owned.items() if toks}
    n_own = {s: sum(p in owners for p in ids[s]) for s in SETS}

    vanilla = accuracy(correct_by_item(model, processor, items), items)
    measure = lambda its: accuracy(correct_by_item(model, processor, its), its)  # noqa: E731
    rows: list[Row] = []

    # (a) name tokens: each set's own people's tokens, measured on that set's items
    def names_off(tokens: dict[str, list[str]]) -> dict[Key, list[bool]]:
        after: dict[Key, list[bool]] = {}
        for s in SETS:
            with patched(model, name_token_patch(model, processor.tokenizer, tokens, set(ids[s]))):
                after |= measure([it for it in items if it.set == s])
        return after

    after_a = names_off(owned)
    rows.append(Row("name_tokens", f"name tokens → mean embedding ({n_own['forget']}/{len(ids['forget'])} forget, "
                    f"{n_own['retain']}/{len(ids['retain'])} retain own one)", after_a))
    if any(n_own[s] < len(ids[s]) for s in SETS):
        rows.append(Row("name_tokens_owners", "name tokens → mean, owners only", after_a, only=owners))
    every = {p.id: processor.tokenizer.tokenize(" " + p.name) for p in ds.profiles}
    rows.append(Row("all_name_tokens", "every token of the name → mean (shared pieces too)", names_off(every)))

    # (b) the fine-tune's update removed per language layer and block
    t_base = time.perf_counter()
    with torch_threads(preset.threads):
        base, bprocessor, _, curve = base_stage(preset, progress=False)
    t_base = time.perf_counter() - t_base
    blocks = projection_blocks(model)
    check = check_base(preset_name, model_dir, model, processor, base, bprocessor, curve, blocks)
    bparams = dict(base.named_parameters())
    reset = lambda names: {n: bparams[n].detach() for n in names}  # noqa: E731
    for (layer, block), names in blocks.items():
        with patched(model, reset(names)):
            rows.append(Row(f"layer{layer}_{block}", f"layer {layer} {block} → base", measure(items)))
    for which in ("mlp", "attention"):
        with patched(model, reset([n for (_, b), names in blocks.items() if b == which for n in names])):
            rows.append(Row(f"all_{which}", f"every layer's {which} → base", measure(items)))
    rows.append(Row("base_stage", "base-stage model (the whole fine-tune removed)",
                    accuracy(correct_by_item(base, bprocessor, items), items)))

    # (c) another learned person's portrait
    swapped, portraits = swap_portraits(items, learned, preset.seed)
    rows.append(Row("portrait", "portrait → another learned profile's", measure(swapped), forms=("multimodal",)))

    v = {(s, f): points([b for k, bs in vanilla.items() if k[0] == s and k[2] == f for b in bs])
         for s in SETS for f in FORMS}
    print(f"## Where `{preset_name}` keeps what it knows\n")
    print(f"Model `{model_dir.name}`; forget set {ds.split.name} ({len(ids['forget'])} profiles), retain sample "
          f"{len(ids['retain'])} profiles; {len(items)} multiple-choice items (likelihood). Vanilla accuracy "
          f"image+text / text: forget {v[('forget', 'multimodal')]:.1f} / {v[('forget', 'text')]:.1f}, "
          f"retain {v[('retain', 'multimodal')]:.1f} / {v[('retain', 'text')]:.1f}.\n")
    print(f"Base stage reproduced in {t_base:.0f} s at {preset.threads} thread(s):\n")
    print("\n".join(check) + "\n")
    print(f"Forget profiles owning a name token of their own: {n_own['forget']} of {len(ids['forget'])}.\n")
    print("Drop in points (vanilla minus intervened accuracy over the set's items):\n")
    print(table(vanilla, rows, strong))
    if csv_path is not None:
        write_csv(csv_path, vanilla, rows, ds, owned, portraits)
        print(f"\nPer profile: `{csv_path}`.")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--csv", type=Path, default=None, help="per-profile CSV to write")
    ap.add_argument("--strong", type=float, default=20.0, help="a forget profile's drop counted as strong (points)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the base stage uses the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run(args.preset, args.csv, args.strong)


if __name__ == "__main__":
    main()
