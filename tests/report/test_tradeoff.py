"""Trade-off analysis: paired drops with a profile bootstrap, curve summaries checked against hand
computations, the setting-selection rule, the selectivity rule and the figure."""

import math

import numpy as np
import polars as pl
import pytest
from PIL import Image

from manu_core.tradeoff import (RULE, SELECTIVE_RULE, TradeoffError, choose_settings, curve_summary, is_selective,
                                paired_drops, tradeoff_figure)


def answers(scores: dict[str, list[float]], *, set_="forget", form="multimodal", task="mc",
            scorer="letter") -> pl.DataFrame:
    """One answer row per item: scores[profile] lists that profile's item scores."""
    rows = [{"item_id": f"{set_}/{pid}/{i:02d}/{form}/{task}", "set": set_, "form": form, "task": task,
             "profile_id": pid, "score": float(s), "scorer": scorer, "question": "q"}
            for pid, ss in scores.items() for i, s in enumerate(ss)]
    return pl.DataFrame(rows)


def pattern(n_profiles: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Vanilla knows everything; the unlearned model keeps k/4 of profile k % 5's four items."""
    van = {f"{p:03d}": [1.0] * 4 for p in range(n_profiles)}
    unl = {f"{p:03d}": [1.0] * (p % 5) + [0.0] * (4 - p % 5) for p in range(n_profiles)}
    return answers(van), answers(unl)


# ----------------------------------------------------------------------------------------------
# paired_drops


def test_drop_is_exact_and_inside_its_interval():
    van = answers({"a": [1, 1, 1], "b": [1, 0], "c": [1, 1, 0, 0]})
    unl = answers({"a": [0, 0, 1], "b": [1, 0], "c": [0, 0, 0, 0]})
    out = paired_drops(van, unl, n_boot=500)
    assert out.height == 1
    r = out.row(0, named=True)
    # vanilla 6/9, unlearned 2/9 (item-weighted, not a mean of profile means)
    assert r["vanilla"] == pytest.approx(100 * 6 / 9)
    assert r["unlearned"] == pytest.approx(100 * 2 / 9)
    assert r["drop"] == pytest.approx(100 * 4 / 9)
    assert r["lo"] <= r["drop"] <= r["hi"]
    assert r["lo"] < r["hi"]
    assert (r["n_profiles"], r["n_items"]) == (3, 9)
    assert (r["set"], r["form"], r["task"], r["scorer"]) == ("forget", "multimodal", "mc", "letter")


def test_interval_resamples_profiles_not_items():
    """One profile: every resample draws that profile, so the interval collapses onto the drop even
    though its items disagree (an item bootstrap would give a wide interval)."""
    van = answers({"a": [1, 1, 1, 1]})
    unl = answers({"a": [1, 0, 1, 0]})
    r = paired_drops(van, unl, n_boot=200).row(0, named=True)
    assert r["drop"] == pytest.approx(50.0)
    assert r["lo"] == pytest.approx(50.0) and r["hi"] == pytest.approx(50.0)


def test_bootstrap_mean_matches_a_plain_index_resample():
    """The multinomial-weight bootstrap agrees in distribution with resampling profile indices."""
    van, unl = pattern(10)
    r = paired_drops(van, unl, n_boot=4000, seed=1).row(0, named=True)
    rng = np.random.default_rng(123)
    drops = np.array([100.0 * (4 - p % 5) / 4 for p in range(10)])  # 4 items each: profile mean = item mean
    boot = drops[rng.integers(0, 10, size=(4000, 10))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert r["lo"] == pytest.approx(lo, abs=2.5) and r["hi"] == pytest.approx(hi, abs=2.5)


def test_interval_shrinks_with_more_profiles():
    small = paired_drops(*pattern(10)).row(0, named=True)
    large = paired_drops(*pattern(100)).row(0, named=True)
    assert small["drop"] == pytest.approx(large["drop"]) == pytest.approx(50.0)
    assert (large["hi"] - large["lo"]) < 0.6 * (small["hi"] - small["lo"])


def test_identical_models_drop_zero_with_zero_width():
    van = answers({"a": [1, 0, 1], "b": [0, 0], "c": [0.25, 0.75]})
    r = paired_drops(van, van.clone()).row(0, named=True)
    assert (r["drop"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)


def test_same_seed_same_interval_other_seed_differs():
    van, unl = pattern(12)
    a = paired_drops(van, unl, seed=3)
    assert a.equals(paired_drops(van, unl, seed=3))
    b = paired_drops(van, unl, seed=4)
    assert (a["lo"][0], a["hi"][0]) != (b["lo"][0], b["hi"][0])


def test_groups_split_by_set_form_task_scorer_and_ignore_row_order():
    van = pl.concat([answers({"a": [1, 1], "b": [1, 1]}, task="mc"),
                     answers({"a": [0.5], "b": [1.0]}, task="gen", scorer="rouge-score"),
                     answers({"a": [1, 1], "b": [1, 1]}, set_="retain", form="text")])
    unl = pl.concat([answers({"a": [0, 0], "b": [1, 0]}, task="mc"),
                     answers({"a": [0.25], "b": [0.5]}, task="gen", scorer="rouge-score"),
                     answers({"a": [1, 1], "b": [1, 1]}, set_="retain", form="text")])
    out = paired_drops(van, unl.reverse())
    got = {(r["set"], r["form"], r["task"], r["scorer"]): r["drop"] for r in out.iter_rows(named=True)}
    assert got == pytest.approx({("forget", "multimodal", "mc", "letter"): 75.0,
                                 ("forget", "multimodal", "gen", "rouge-score"): 37.5,
                                 ("retain", "text", "mc", "letter"): 0.0})


def test_mismatched_items_raise():
    van, unl = pattern(5)
    with pytest.raises(TradeoffError, match=r"same \(item_id, scorer\).*1 only in vanilla"):
        paired_drops(van, unl.head(unl.height - 1))
    with pytest.raises(TradeoffError, match=r"same \(item_id, scorer\)"):
        paired_drops(van, unl.with_columns(scorer=pl.lit("likelihood")))
    with pytest.raises(TradeoffError, match="appear once"):
        paired_drops(pl.concat([van, van.head(1)]), unl)
    with pytest.raises(TradeoffError, match="score"):
        paired_drops(van.drop("score"), unl)
    with pytest.raises(TradeoffError, match="level"):
        paired_drops(van, unl, level=95)


# ----------------------------------------------------------------------------------------------
# curve_summary


def curve(*pts: tuple[float, float, float], method="manu", form="multimodal") -> pl.DataFrame:
    """(strength, retain_drop, forget_drop) triples for one method and form."""
    return pl.DataFrame([{"method": method, "strength": s, "form": form, "retain_drop": x, "forget_drop": y}
                         for s, x, y in pts], schema={"method": pl.String, "strength": pl.Float64, "form": pl.String,
                                                      "retain_drop": pl.Float64, "forget_drop": pl.Float64})


def test_forget_at_budget_interpolates_in_strength_order():
    # given out of order: the walk is by strength, (0,0) -> (2,10) -> (8,30)
    r = curve_summary(curve((0.2, 8.0, 30.0), (0.1, 2.0, 10.0)), budget=5.0).row(0, named=True)
    assert r["reaches_budget"] is True
    assert r["forget_at_budget"] == pytest.approx(10 + (30 - 10) * 3 / 6)  # 20
    assert r["forget_at_max_within"] == pytest.approx(10.0)
    assert r["n_points"] == 2 and r["monotone"] is True


def test_budget_on_the_first_segment_starts_from_the_origin():
    r = curve_summary(curve((1.0, 10.0, 40.0)), budget=5.0).row(0, named=True)
    assert r["forget_at_budget"] == pytest.approx(20.0)
    assert r["forget_at_max_within"] == 0.0  # only the origin is within budget


def test_never_reaching_the_budget_gives_null_and_the_best_within():
    r = curve_summary(curve((1.0, 1.0, 12.0), (2.0, 3.0, 18.0), (3.0, 4.0, 15.0)), budget=5.0).row(0, named=True)
    assert r["reaches_budget"] is False
    assert r["forget_at_budget"] is None
    assert r["forget_at_max_within"] == pytest.approx(18.0)


def test_auc_of_y_equals_2x_is_20():
    r = curve_summary(curve((1.0, 5.0, 10.0), (2.0, 10.0, 20.0), (3.0, 20.0, 40.0)), x_max=20.0).row(0, named=True)
    assert r["auc"] == pytest.approx(20.0)  # (1/20) * integral_0^20 2x dx


def test_auc_flat_extension_and_clipping():
    # (0,0) -> (4,20), then flat at 20 to x = 20: (0.5*4*20 + 16*20) / 20 = 18
    assert curve_summary(curve((1.0, 4.0, 20.0))).row(0, named=True)["auc"] == pytest.approx(18.0)
    # (0,0) -> (40,40) is cut at x = 20, where y = 20: (0.5*20*20) / 20 = 10
    assert curve_summary(curve((1.0, 40.0, 40.0))).row(0, named=True)["auc"] == pytest.approx(10.0)


def test_backwards_walk_uses_the_upper_envelope():
    # walk x: 0 -> 4 -> 2 goes backwards; envelope by x: (0,0), (2,25), (4, max(20,25)=25), flat to 20
    r = curve_summary(curve((1.0, 4.0, 20.0), (2.0, 2.0, 25.0))).row(0, named=True)
    assert r["monotone"] is False
    assert r["auc"] == pytest.approx((0.5 * 2 * 25 + 2 * 25 + 16 * 25) / 20)  # 23.75
    assert r["forget_at_budget"] is None and r["forget_at_max_within"] == pytest.approx(25.0)


def test_curve_summary_groups_and_refuses_ambiguous_input():
    pts = pl.concat([curve((1.0, 2.0, 10.0)), curve((1.0, 6.0, 12.0), form="text"),
                     curve((None, 1.0, 3.0), method="prompt")])
    out = curve_summary(pts)
    assert out.select("method", "form").rows() == [("manu", "multimodal"), ("manu", "text"),
                                                   ("prompt", "multimodal")]
    with pytest.raises(TradeoffError, match="distinct"):
        curve_summary(curve((1.0, 2.0, 10.0), (1.0, 3.0, 12.0)))
    with pytest.raises(TradeoffError, match="strength must be set"):
        curve_summary(curve((None, 2.0, 10.0), (1.0, 3.0, 12.0)))
    with pytest.raises(TradeoffError, match="budget"):
        curve_summary(curve((1.0, 2.0, 10.0)), budget=0)


# ----------------------------------------------------------------------------------------------
# choose_settings, is_selective


def validation_rows(method: str, settings: dict[str, tuple[float | None, dict[str, float]]]) -> list[dict]:
    return [{"method": method, "setting": label, "strength": strength, "form": form, "retain_drop": drop}
            for label, (strength, drops) in settings.items() for form, drop in drops.items()]


def test_choose_settings_rule():
    rows = (validation_rows("manu", {"α=0.05": (0.05, {"multimodal": 1.0, "text": 2.0}),
                                     "α=0.1": (0.1, {"multimodal": 3.0, "text": 6.0}),  # text over budget
                                     "α=0.2": (0.2, {"multimodal": 4.0, "text": 5.0}),  # on the budget: allowed
                                     "α=0.4": (0.4, {"multimodal": 9.0, "text": 4.0})})
            + validation_rows("ga", {"lr=1e-5": (1e-5, {"multimodal": 7.0, "text": 6.0}),
                                     "lr=1e-4": (1e-4, {"multimodal": 30.0, "text": 25.0})})
            + validation_rows("prompt", {"default": (None, {"multimodal": 0.5, "text": 1.0})})
            + validation_rows("system", {"default": (None, {"multimodal": 8.0, "text": 1.0})}))
    out = choose_settings(pl.DataFrame(rows), budget=5.0)
    got = {r["method"]: (r["setting"], r["within_budget"]) for r in out.iter_rows(named=True)}
    assert got == {"manu": ("α=0.2", True),       # strongest within budget in every form
                   "ga": ("lr=1e-5", False),      # none within: the weakest, flagged
                   "prompt": ("default", True),   # a single setting is taken as it is
                   "system": ("default", False)}
    assert out.columns == ["method", "setting", "strength", "within_budget", "rule"]
    assert out["rule"].unique().to_list() == [RULE.format(budget=5.0)]
    assert math.isclose(out.filter(pl.col("method") == "manu")["strength"][0], 0.2)
    # a tighter budget moves manu to the weakest setting
    tight = choose_settings(pl.DataFrame(rows), budget=2.0)
    assert tight.filter(pl.col("method") == "manu").select("setting", "within_budget").row(0) == ("α=0.05", True)


def test_choose_settings_filter_and_errors():
    rows = validation_rows("manu", {"a": (0.1, {"multimodal": 1.0, "text": 1.0}),
                                    "b": (0.2, {"multimodal": 2.0, "text": 3.0})})
    frame = pl.DataFrame(rows).with_columns(scorer=pl.lit("letter"))
    other = frame.with_columns(scorer=pl.lit("likelihood"), retain_drop=pl.lit(50.0))
    out = choose_settings(pl.concat([frame, other]), metric_filter=pl.col("scorer") == "letter")
    assert out["setting"].to_list() == ["b"]
    with pytest.raises(TradeoffError, match="appear once"):
        choose_settings(pl.concat([frame, other]))
    with pytest.raises(TradeoffError, match="every form"):
        choose_settings(pl.DataFrame(rows[:-1]))
    with pytest.raises(TradeoffError, match="needs a strength"):
        choose_settings(pl.DataFrame(rows).with_columns(strength=pl.lit(None, pl.Float64)))


@pytest.mark.parametrize(("forget", "retain", "expected"), [
    (10.0, 5.0, True), (10.0, 5.01, False), (9.99, 0.0, False), (10.0, -3.0, True), (40.0, 20.0, True),
    (40.0, 20.5, False), (float("nan"), 0.0, False)])
def test_is_selective(forget, retain, expected):
    assert is_selective(forget, retain) is expected
    assert "10" in SELECTIVE_RULE and "2" in SELECTIVE_RULE


# ----------------------------------------------------------------------------------------------
# figure


def test_tradeoff_figure_writes_a_png(tmp_path):
    pts = pl.concat([curve((0.1, 2.0, 10.0), (0.2, 8.0, 30.0)), curve((0.1, 1.0, 5.0), (0.2, 3.0, 20.0), form="text"),
                     curve((1e-5, 6.0, 8.0), method="ga"), curve((1e-5, 5.0, 9.0), method="ga", form="text")])
    pts = pts.with_columns(lo=pl.col("forget_drop") - 3, hi=pl.col("forget_drop") + 4,
                           celebrity_drop=pl.col("retain_drop") / 2)
    for versus in ("retain", "celebrity"):
        path = tradeoff_figure(pts, tmp_path / "sub" / f"{versus}.png", versus=versus)
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > im.height > 100
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["celebrity.png", "retain.png"]  # no temp left
    with pytest.raises(TradeoffError, match="celebrity_drop"):
        tradeoff_figure(pts.drop("celebrity_drop"), tmp_path / "x.png", versus="celebrity")


def _answers(drop_by_set: dict[str, float], seed: int, n_profiles: int = 8) -> pl.DataFrame:
    """mc answers of one model: per set and form, each profile answers 4 items; exactly a share
    `drop_by_set` of the items wrong, which ones shifted by `seed`."""
    rows = []
    total = 4 * n_profiles
    for st, wrong in drop_by_set.items():
        for form in ("multimodal", "text"):
            for k in range(total):
                p, i = divmod(k, 4)
                rows.append({"item_id": f"{st}/{p}/{i}/{form}", "set": st, "form": form, "task": "mc",
                             "profile_id": f"{p:03d}", "score": float((k + 7 * seed) % total >= round(wrong * total)),
                             "scorer": "likelihood"})
    return pl.DataFrame(rows)


def test_compare_chooses_on_validation_and_reports_the_official_split(tmp_path):
    from manu_core.tradeoff import compare

    vanilla = _answers({"forget": 0.0, "retain": 0.0, "celebrity": 0.0}, 0)
    runs = []
    for forget in ("validation", "forget_5"):
        for a, (f, r) in {0.05: (0.2, 0.02), 0.1: (0.5, 0.04), 0.2: (0.9, 0.5)}.items():
            runs.append({"forget": forget, "label": f"manu[paper] α={a:g}", "family": "manu", "mode": "paper",
                         "strength": a, "vanilla": vanilla,
                         "unlearned": _answers({"forget": f, "retain": r, "celebrity": r}, 1)})
            for s in (0, 1):
                runs.append({"forget": forget, "label": f"random(manu[paper] α={a:g}) seed={s}", "family": "random",
                             "mode": "paper", "strength": a, "seed": s, "vanilla": vanilla,
                             "unlearned": _answers({"forget": r, "retain": r, "celebrity": r}, 2 + s)})
        runs.append({"forget": forget, "label": "prompting", "family": "prompting", "vanilla": vanilla,
                     "unlearned": _answers({"forget": 0.3, "retain": 0.3, "celebrity": 0.3}, 5)})
        runs.append({"forget": forget, "label": "manu[paper] α=0.1 without var", "family": "manu", "mode": "paper",
                     "strength": 0.1, "without": "var", "vanilla": vanilla, "unlearned": vanilla})
    paths = compare(runs, tmp_path, n_boot=200)
    chosen = pl.read_parquet(paths["chosen"])
    manu = chosen.filter(pl.col("method") == "manu[paper]").row(0, named=True)
    assert manu["strength"] == 0.1 and manu["within_budget"]  # α = 0.2 costs retain 50 points on validation
    head = pl.read_parquet(paths["headline"])
    assert set(head["forget"]) == {"forget_5"}  # validation chooses, the official split is reported
    mh = head.filter((pl.col("method") == "manu[paper]") & (pl.col("set") == "forget"))
    assert set(mh["strength"]) == {0.1} and mh["selective"].all() and (mh["drop"] > 30).all()
    rnd = head.filter((pl.col("method") == "random[paper]") & (pl.col("set") == "forget"))
    assert (rnd["seeds"] == 2).all() and not rnd["selective"].any()
    assert not head["setting"].str.contains("without").any()  # ablations are no curve point
    md = paths["markdown"].read_text()
    assert "Headline: forget forget_5" in md and "seeds" in md and "**yes**" in md
    assert paths["tradeoff-forget_5-retain"].stat().st_size > 1000


def test_compare_reports_each_chosen_setting_against_the_never_learned_reference(tmp_path):
    from manu_core.forget_quality import reference_block
    from manu_core.tradeoff import compare, is_selective_headroom

    vanilla = _answers({"forget": 0.0, "retain": 0.0}, 0)
    reference = _answers({"forget": 0.625}, 9)  # never learned: wrong on 62.5 % of the forget items
    runs = []
    for forget in ("validation", "forget_5"):
        for a, (f, r) in {0.05: (0.2, 0.02), 0.1: (0.5, 0.04)}.items():
            for label, family, seed, unl in ((f"manu[paper] α={a:g}", "manu", None, (f, r)),
                                             (f"random(manu[paper] α={a:g}) seed=0", "random", 0, (r, r))):
                unlearned = _answers({"forget": unl[0], "retain": unl[1]}, 1)
                runs.append({"forget": forget, "label": label, "family": family, "mode": "paper", "strength": a,
                             "seed": seed, "vanilla": vanilla, "unlearned": unlearned,
                             "reference": reference_block(vanilla, unlearned, reference, n_boot=200)})
    paths = compare(runs, tmp_path, n_boot=200)
    ref = pl.read_parquet(paths["reference"])
    assert ref.height == 16 and set(ref["form"]) == {"multimodal", "text"}
    manu = ref.filter((pl.col("forget") == "forget_5") & (pl.col("label") == "manu[paper] α=0.1")).row(0, named=True)
    assert manu["headroom"] == pytest.approx(62.5) and manu["share"] == pytest.approx(50 / 62.5)
    assert manu["headroom_lo"] <= 62.5 <= manu["headroom_hi"] and manu["headroom_excludes_0"]
    assert manu["gap"] is None  # these answers keep no option likelihoods: no truth ratio, said, not faked
    md = paths["markdown"].read_text()
    section = md.split("## Against the never-learned reference")[1]
    assert "### forget forget_5" in section and "validation" not in section.split("### forget forget_5")[0].split("\n\n")[-1]
    assert "| manu[paper] α=0.1 | image+text | 100.0 | 37.5 |" in section and "**yes** / **yes**" in section
    assert "| random(manu[paper] α=0.1) | image+text |" in section and "α=0.05" not in section  # chosen settings only
    assert is_selective_headroom(0.6, True, 30.0, 10.0) and not is_selective_headroom(0.4, True, 30.0, 1.0)
    assert not is_selective_headroom(0.9, False, 30.0, 1.0) and not is_selective_headroom(0.9, True, 30.0, 20.0)


def test_without_a_validation_run_every_setting_is_judged_against_the_reference(tmp_path):
    from manu_core.forget_quality import reference_block
    from manu_core.tradeoff import compare

    vanilla, reference = _answers({"forget": 0.0, "retain": 0.0}, 0), _answers({"forget": 0.625}, 9)
    runs = []
    for a, (f, r) in {0.05: (0.125, 0.0), 0.1: (0.5, 0.0625)}.items():
        unlearned = _answers({"forget": f, "retain": r}, 1)
        runs.append({"forget": "forget_5", "label": f"manu[released] α={a:g}", "family": "manu", "mode": "released",
                     "strength": a, "vanilla": vanilla, "unlearned": unlearned,
                     "reference": reference_block(vanilla, unlearned, reference, n_boot=200)})
    section = compare(runs, tmp_path, n_boot=200)["markdown"].read_text().split("## Against the never-learned")[1]
    rows = [line for line in section.splitlines() if line.startswith("| manu[released]")]
    assert len(rows) == 4  # two settings x two forms, one row each (not pooled over α)
    weak = next(r for r in rows if "α=0.05 | image+text" in r)
    strong = next(r for r in rows if "α=0.1 | image+text" in r)
    assert weak.endswith("| **yes** / no |") and "0.20" in weak  # 12.5 points pass the points rule, a fifth of 62.5 not
    assert strong.endswith("| **yes** / **yes** |") and "0.80" in strong  # 50 points, retain 6.25: both rules
