"""Relearning attacks: does what an unlearning method removed come back after a brief fine-tune?

Knowledge that unlearning only hides returns after a few steps of fine-tuning, even on other data
(Lynch et al. 2024, "Eight methods to evaluate robust unlearning in LLMs"; Hu et al. 2024, "Jogging
the memory of unlearned LLMs through targeted relearning"). Here the forget profiles are split in
two seeded halves: the model is fine-tuned on an *attack set*, then the *held-out* half is evaluated
in both forms, which says how much comes back, and through which form.

Attack sets (`ATTACKS`):
  forget-text        the attack half's QA pairs, text only (the name in the question)
  forget-multimodal  the attack half's QA pairs, image + question
  retain             retain profiles' QA pairs only, both forms, as many as forget-text has

Masks (`MASKS`) for a model with pruned units (MANU, its random control, the attribution bound):
  free    every weight trainable: zeroed units can be relearned
  frozen  the pruned units' weights held at exactly zero (their gradients masked; re-zeroed after
          a LoRA merge, which would otherwise write into them)
A method that prunes nothing has only `free`.

The control: the vanilla model attacked alike (free) says what an attack does by itself; a run
records it as stages `vanilla+<attack>` and the report shows it as a `vanilla` row (`control_rows`).

What to expect (tests/core/test_relearn.py): a unit whose weights are all zero has zero gradient
(gated: h = act(gate·x)·(up·x), and act(0) = 0; plain: likewise through fc2's zero column), so full
fine-tuning leaves it at zero in both masks; only a LoRA merge writes into it. Relearning after
pruning therefore goes through the *other* units.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Sequence

import polars as pl

from manu_core.data import Sample
from manu_core.rng import GLOBAL_RNG

if TYPE_CHECKING:  # the training code is imported where it runs (`relearn`), not with this module
    import torch

    from manu_core.train import StageConfig
from manu_core.vocab import did_you_mean

ATTACKS = ("forget-text", "forget-multimodal", "retain")
MASKS = ("free", "frozen")
VANILLA_ATTACKED = "vanilla+"  # stage prefix of the attacked vanilla model (the attack's control)


class RelearnError(ValueError):
    """Bad relearning input: the message names the rule, the value and the fix."""


def check(attack: str | None = None, mask: str | None = None) -> None:
    """Refuse an unknown attack or mask (each checked when given)."""
    if attack is not None and attack not in ATTACKS:
        raise RelearnError(f"unknown relearning attack {attack!r}; attacks are {', '.join(ATTACKS)}."
                           f"{did_you_mean(attack, ATTACKS)}")
    if mask is not None and mask not in MASKS:
        raise RelearnError(f"unknown relearning mask {mask!r}; masks are {', '.join(MASKS)}.{did_you_mean(mask, MASKS)}")


def halves(forget_ids: Sequence[str], seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attack half, held-out half) of the forget profiles: a seeded shuffle, ⌊n/2⌋ to the attack."""
    ids = sorted(set(forget_ids))
    if len(ids) < 2:
        raise RelearnError(f"relearning needs at least 2 forget profiles (one to relearn, one held out); got {ids}.")
    random.Random(f"relearn/{seed}").shuffle(ids)
    k = len(ids) // 2
    return tuple(sorted(ids[:k])), tuple(sorted(ids[k:]))


def attack_samples(attack: str, forget: Sequence[Sample], retain: Sequence[Sample], attack_ids: Sequence[str],
                   seed: int = 0) -> list[Sample]:
    """The samples an attack fine-tunes on (see the module docstring)."""
    check(attack=attack)
    mine = [s for s in forget if s.profile_id in set(attack_ids)]
    text = [s for s in mine if s.form == "text"]
    if attack == "forget-text":
        return text
    if attack == "forget-multimodal":
        return [s for s in mine if s.form == "multimodal"]
    pool = sorted(retain, key=lambda s: s.sample_id)
    return random.Random(f"relearn-retain/{seed}").sample(pool, min(len(pool), len(text)))


def _mask_gradients(model, selection: pl.DataFrame) -> list:
    """Gradient hooks that zero the selected units' slices of every weight that trains."""
    import torch

    from manu_core.prune import pruned_slices

    handles = []
    for sl in pruned_slices(model, selection)[0]:
        if not sl.param.requires_grad:
            continue
        keep = torch.ones_like(sl.param, dtype=torch.bool).index_fill_(sl.dim, sl.index.to(sl.param.device), False)
        handles.append(sl.param.register_hook(lambda g, keep=keep: g * keep))
    return handles


def relearn(model, processor, samples: Sequence[Sample], cfg: StageConfig, *, selection: pl.DataFrame | None = None,
            seed: int = 0, device: str | torch.device = "cpu", images: Callable | None = None,
            progress: bool = True) -> list[dict]:
    """Fine-tune `model` in place on `samples` (the preset's recipe, `cfg`, usually with max_steps);
    with `selection` (a pruned model's selection table) its units stay exactly zero. Returns the loss curve.
    (torch and the training loop are imported here: the flow imports this module for its names only.)"""
    from manu_core.prune import prune_units
    from manu_core.train import train_stage

    if not samples:
        raise RelearnError("the attack set is empty: no QA pair to relearn from.")
    handles = _mask_gradients(model, selection) if selection is not None else []
    try:
        with GLOBAL_RNG:  # torch's generator is the process's: no other training seeds it meanwhile
            curve = train_stage(model, processor, samples, cfg, seed=seed, name="relearn", device=device,
                                progress=progress, images=images)
    finally:
        for h in handles:
            h.remove()
    if selection is not None:
        prune_units(model, selection)  # exact zeros after a LoRA merge too (a no-op otherwise)
    return curve


def control_rows(relearn: pl.DataFrame) -> pl.DataFrame:
    """The relearning table (method, stage, ...) with the attacked vanilla model as a `vanilla` method:
    its rows are the `vanilla` stage and `<attack>/free` from the `vanilla+<attack>` stages (equal in
    every run that has them: one task; the first run's are kept), and the `vanilla+` stages leave the
    other methods' rows. A table without them comes back unchanged."""
    attacked = pl.col("stage").str.starts_with(VANILLA_ATTACKED)
    control = relearn.filter(attacked)
    if not control.height:
        return relearn
    first = control["method"][0]
    rows = pl.concat([relearn.filter((pl.col("method") == first) & (pl.col("stage") == "vanilla")),
                      control.filter(pl.col("method") == first).with_columns(
                          stage=pl.col("stage").str.strip_prefix(VANILLA_ATTACKED) + "/free")])
    return pl.concat([rows.with_columns(method=pl.lit("vanilla")), relearn.filter(~attacked)], how="vertical_relaxed")
