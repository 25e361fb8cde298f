"""Relearning attacks (manu_core/relearn.py): the halves, the attack sets, and the two masks."""

import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import mlp_sites
from manu_core.models import TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prune import prune_units, pruned_weights_are_zero
from manu_core.relearn import RelearnError, attack_samples, halves, relearn
from manu_core.train import StageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds():
    return mdata.build_dataset(forget=["001", "002", "003", "004", "005"], n_profiles=8, n_celebrities=0)


@pytest.fixture
def pruned(ds):
    """An untrained tiny LLaVA with 3 units of each MLP zeroed, and that selection."""
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    spec = TinySpec(arch="llava", hidden=32, intermediate=64, layers=2, vision_hidden=32, vision_intermediate=64)
    model, proc = build_tiny_model(spec, tok, seed=1), build_processor(spec, tok)
    selection = [(s.tower, s.layer, u) for s in mlp_sites(model) for u in (0, 5, 9)]
    prune_units(model, selection)
    return model, proc, selection


def test_halves_are_seeded_disjoint_and_cover_the_forget_set():
    ids = [f"{i:03d}" for i in range(1, 26)]
    attack, held = halves(ids, seed=0)
    assert len(attack) == 12 and len(held) == 13 and not set(attack) & set(held) and set(attack) | set(held) == set(ids)
    assert halves(list(reversed(ids)), seed=0) == (attack, held) and halves(ids, seed=1) != (attack, held)
    with pytest.raises(RelearnError, match="at least 2 forget profiles"):
        halves(["001"])


def test_attack_sets(ds):
    forget = [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid))]
    retain = [s for pid in ds.split.retain_ids for s in mdata.samples(ds.profile(pid))]
    attack, _ = halves(ds.split.forget_ids)
    text = attack_samples("forget-text", forget, retain, attack)
    assert text and {s.form for s in text} == {"text"} and {s.profile_id for s in text} == set(attack)
    mm = attack_samples("forget-multimodal", forget, retain, attack)
    assert {s.form for s in mm} == {"multimodal"} and {s.profile_id for s in mm} == set(attack)
    ret = attack_samples("retain", forget, retain, attack)
    assert len(ret) == len(text) and {s.profile_id for s in ret} <= set(ds.split.retain_ids)
    assert attack_samples("retain", forget, retain, attack) == ret  # seeded
    with pytest.raises(RelearnError, match="unknown relearning attack 'forget-txt'.*Did you mean 'forget-text'"):
        attack_samples("forget-txt", forget, retain, attack)


def test_frozen_keeps_pruned_weights_exactly_zero_and_free_relearns_them_through_lora(ds, pruned):
    model, proc, selection = pruned
    samples = attack_samples("forget-multimodal", [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid))],
                             [], halves(ds.split.forget_ids)[0])
    lora = StageConfig(epochs=1, lr=1e-2, batch_size=4, max_steps=3, lora_r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = relearn(model, proc, samples, lora, selection=selection, progress=False)
    assert [r["step"] for r in curve if "step" in r] == [1, 2, 3]  # max_steps
    assert pruned_weights_are_zero(model, selection)  # exactly zero, every slice of every selected unit
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the rest trained
    relearn(model, proc, samples, lora, progress=False)  # free: the merged LoRA delta writes into them
    assert not pruned_weights_are_zero(model, selection)


def test_a_fully_zeroed_unit_has_zero_gradient_so_full_fine_tuning_cannot_revive_it(ds, pruned):
    """Gated unit: h = act(gate·x)·(up·x) with gate, up rows and the down column all 0, so every one
    of their gradients is 0 (act(0) = 0 for SiLU/GELU); a plain unit likewise. Free and frozen full
    fine-tuning give the same pruned weights: exactly zero."""
    model, proc, selection = pruned
    samples = attack_samples("forget-multimodal", [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid))],
                             [], halves(ds.split.forget_ids)[0])
    relearn(model, proc, samples, StageConfig(epochs=1, lr=1e-2, batch_size=4, max_steps=3), progress=False)
    assert pruned_weights_are_zero(model, selection)


def test_control_rows_turn_the_attacked_vanilla_stages_into_a_vanilla_row():
    import polars as pl

    from manu_core.relearn import control_rows

    def row(method, stage, form, value):
        return {"method": method, "stage": stage, "form": form, "task": "mc", "metric": "accuracy", "value": value}

    rows = [row(m, st, f, v + (0.01 if f == "text" else 0.0))
            for m in ("ga", "manu") for f in ("multimodal", "text")
            for st, v in (("vanilla", 0.8), ("unlearned", 0.2), ("retain/free", 0.5), ("vanilla+retain", 0.7))]
    rows[-1]["value"] = 0.99  # manu's copy of the control (the same task: equal in a real sweep) is not read
    out = control_rows(pl.DataFrame(rows)).sort("method", "stage", "form")
    vanilla = out.filter(pl.col("method") == "vanilla")
    assert vanilla.select("stage", "form", "value").rows() == [
        ("retain/free", "multimodal", 0.7), ("retain/free", "text", 0.71), ("vanilla", "multimodal", 0.8),
        ("vanilla", "text", 0.81)]
    assert not out["stage"].str.starts_with("vanilla+").any()
    assert out.filter(pl.col("method") == "ga").height == 6  # vanilla, unlearned, retain/free x 2 forms
    plain = pl.DataFrame([r for r in rows if not r["stage"].startswith("vanilla+")])
    assert control_rows(plain).equals(plain)  # nothing to turn: unchanged
