"""The positive control, through the product: on `tiny-planted` (manu_core/plant.py) the forget people
are known only to 26 new units per language layer, so a scoring that can see them must find those
units and forget those people, and the random control of as many units must not.

This is the test that fails when the instrument breaks: forget and retain streams swapped, the score
inverted, a prune that zeroes the unit's neighbour, an evaluation that reads the vanilla model's
answers each make an assertion below fail (docs/embedded.md, "The positive control", says how that
was checked). The never-learned reference of the planted set (the planted units zeroed) is evaluated
by the flow too, and the run records the drop's share of the headroom it gives.

Which mode sees the plant was measured, not assumed (docs/embedded.md): `released` does; `paper`
does not, because three of its four importance functions contrast the two forms, and a unit that
carries a person in both forms alike has no contrast to show. The last test pins that property."""

import json
from pathlib import Path

import polars as pl
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


def _language(result: dict) -> dict:
    return next(r for r in result["planted"]["recall"] if r["tower"] == "language")


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    base = RunConfig(model="tiny-planted", alpha=ALPHA, extract_batch_size=16, lens_samples=0, random_seeds=[0],
                     eval=EvalSettings(max_new_tokens=4, sets=["forget", "retain"], tasks=["mc"]))
    out = {}
    for name, scoring, method in (("released", "released", "manu"), ("random", "released", "random"),
                                  ("paper", "paper", "manu")):
        state = manu(base.model_copy(update={"scoring": scoring}), method=method, return_state=True)
        assert state.is_completed(), state
        out[name] = json.loads((Path(state.result()) / "results.json").read_text())
    return out


def test_released_mode_finds_the_planted_units_and_random_does_not(runs):
    found, drawn = _language(runs["released"]), _language(runs["random"])
    model = resolve_model("tiny-planted", models=models_dir(), train=False)
    assert runs["released"]["planted"]["n_units"] == len(planted_units(model)) == found["planted"] == 52
    assert found["recall"] >= 0.4 and found["precision"] >= 0.4, found
    assert drawn["selected"] == found["selected"] and drawn["recall"] <= 0.2, drawn  # as many, drawn blind


def test_released_mode_forgets_the_planted_people_in_both_forms_and_random_does_not(runs):
    found, drawn = _drops(runs["released"]), _drops(runs["random"])
    for form in ("multimodal", "text"):
        assert is_selective(found[("forget", form)], found[("retain", form)]), (form, found)
        assert not is_selective(drawn[("forget", form)], drawn[("retain", form)]), (form, drawn)


def test_the_never_learned_reference_bounds_the_forgetting(runs):
    ref = runs["released"]["reference"]
    rows = {r["form"]: r for r in ref["headroom"] if r["task"] == "mc"}
    for form in ("multimodal", "text"):
        assert rows[form]["headroom_excludes_0"] and rows[form]["headroom"] >= 10, rows[form]  # the plant taught
        assert 0.4 <= rows[form]["share"] <= 1.2, rows[form]  # pruning the found half closes about half
    drawn = {r["form"]: r["share"] for r in runs["random"]["reference"]["headroom"] if r["task"] == "mc"}
    assert all(s < 0.3 for s in drawn.values()), drawn
    quality = {r["form"]: r for r in ref["forget_quality"]}
    assert set(quality) == {"multimodal", "text"} and all(q["available"] for q in quality.values())


def test_paper_mode_does_not_see_units_that_carry_a_person_in_both_forms_alike(runs):
    """The paper mode's I_abs, I_freq and I_rms are |multi − text| / (multi + text) contrasts: a
    planted unit fires on the planted people in both forms, so its forget-side contrast is no larger
    than any other unit's, and its score does not reach the top α."""
    assert _language(runs["paper"])["recall"] <= 0.1, _language(runs["paper"])
    table = pl.read_parquet(Path(runs["paper"]["run"]["model"]) / "selection.parquet")  # scores with their terms
    planted = set(map(tuple, planted_units(resolve_model("tiny-planted", models=models_dir(), train=False))))
    lang = table.filter(pl.col("tower") == "language").with_columns(
        planted=pl.struct("tower", "layer", "unit").map_elements(lambda r: (r["tower"], r["layer"], r["unit"]) in planted,
                                                                 return_dtype=pl.Boolean),
        contrast=pl.col("forget_abs") + pl.col("forget_freq") + pl.col("forget_rms"))
    median = dict(lang.group_by("planted").agg(pl.col("contrast").median()).iter_rows())
    assert median[True] <= 1.25 * median[False], median  # no more form contrast on the forget set than any unit


def test_the_unlearned_model_has_exactly_the_selected_units_zeroed(runs):
    """Read from the saved weights themselves, not through prune.py: every selected language unit's
    gate row, up row and down column are zero, and the unselected units' are not."""
    import torch

    from manu_core.models import load_model

    run = runs["released"]["run"]
    model, _ = load_model(run["model"])
    chosen = pl.read_parquet(Path(run["model"]) / "selection.parquet").filter(pl.col("tower") == "language")
    for layer, g in chosen.group_by("layer"):
        mlp = model.model.language_model.layers[layer[0]].mlp
        zero = ((mlp.down_proj.weight == 0).all(0) & (mlp.gate_proj.weight == 0).all(1) & (mlp.up_proj.weight == 0).all(1))
        picked = torch.zeros_like(zero)
        picked[g.filter(pl.col("selected"))["unit"].to_list()] = True
        assert torch.equal(zero, picked), (layer, torch.nonzero(zero ^ picked).flatten().tolist()[:10])
