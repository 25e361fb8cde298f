"""The positive control, through the product: on `tiny-planted` (manu_core/plant.py) the forget people
are known only to 26 new units per language layer, so a working pipeline must find those units and
forget those people, and the random control of as many units must not.

This is the test that fails when the instrument breaks: forget and retain streams swapped, the score
inverted, a prune that zeroes the unit's neighbour, an evaluation that reads the vanilla model's
answers each make an assertion below fail (docs/embedded.md, "The positive control", says how that
was checked). The never-learned reference of the planted set (the planted units zeroed) is evaluated
by the flow too, and the run records the drop's share of the headroom it gives."""

import json
from pathlib import Path

import pytest

from flows.pipeline import EvalSettings, RunConfig, manu
from manu_core.plant import planted_units
from manu_core.presets import resolve_model
from manu_core.tradeoff import is_selective
from tasks.cache import models_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]

ALPHA = 0.05  # the planted fraction: 52 of 1076 language units (4.8 %); declared with the plant


def _mc(records: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["set"], r["form"]): 100 * r["value"] for r in records if r["task"] == "mc" and r["metric"] == "accuracy"}


def _drops(result: dict) -> dict[tuple[str, str], float]:
    before, after = _mc(result["vanilla"]), _mc(result["unlearned"])
    return {k: before[k] - after[k] for k in before}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    cfg = RunConfig(model="tiny-planted", alpha=ALPHA, extract_batch_size=16, lens_samples=0, random_seeds=[0],
                    eval=EvalSettings(max_new_tokens=4, sets=["forget", "retain"]))
    out = {}
    for method in ("manu", "random"):
        state = manu(cfg, method=method, return_state=True)
        assert state.is_completed(), state
        out[method] = json.loads((Path(state.result()) / "results.json").read_text())
    return out


def test_paper_mode_finds_the_planted_units(runs):
    plant = runs["manu"]["planted"]
    language = next(r for r in plant["recall"] if r["tower"] == "language")
    assert plant["n_units"] == len(planted_units(resolve_model("tiny-planted", models=models_dir(), train=False)))
    assert language["planted"] == 52 and language["recall"] >= 0.8, plant
    random = next(r for r in runs["random"]["planted"]["recall"] if r["tower"] == "language")
    assert random["selected"] == language["selected"] and random["recall"] <= 0.25, random  # as many, drawn blind


def test_paper_mode_forgets_the_planted_people_in_both_forms_and_random_does_not(runs):
    manu_drops, random_drops = _drops(runs["manu"]), _drops(runs["random"])
    for form in ("multimodal", "text"):
        forget, retain = manu_drops[("forget", form)], manu_drops[("retain", form)]
        assert is_selective(forget, retain), (form, manu_drops)
        assert not is_selective(random_drops[("forget", form)], random_drops[("retain", form)]), (form, random_drops)


def test_the_never_learned_reference_bounds_the_forgetting(runs):
    ref = runs["manu"]["reference"]
    share = {(r["form"], r["task"]): r for r in ref["headroom"] if r["task"] == "mc"}
    for form in ("multimodal", "text"):
        row = share[(form, "mc")]
        assert row["headroom_excludes_0"] and row["headroom"] >= 10, row  # the plant taught something
        assert row["share"] >= 0.5, row  # pruning the found units closes most of it
    random_share = {r["form"]: r["share"] for r in runs["random"]["reference"]["headroom"] if r["task"] == "mc"}
    assert all(s < 0.5 for s in random_share.values()), random_share
    assert {r["form"] for r in ref["forget_quality"]} == {"multimodal", "text"}
