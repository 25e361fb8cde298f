"""The report with scoring modes and the random control: random runs grouped over seeds (their mean, then their min–max),
each beside the MANU variant it shadows; Table 2 a row block per mode; the figures draw one mean per group."""

import itertools

import polars as pl
import pytest

from manu_core.report import build_report, paper_tables, random_groups, results_frame, seed_means

SETS = ("forget", "retain")
METRICS = (("mc", "accuracy"), ("gen", "factuality"))


def rows(label, family, value, *, alpha=None, mode=None, seed=None, shadows=None, without=None):
    """One method's rows: `value(set, form, metric)` gives each number."""
    return [{"forget": "forget_5", "method": label, "family": family, "alpha": alpha, "without": without,
             "mode": mode, "seed": seed, "shadows": shadows, "set": s, "form": f, "task": t, "metric": m,
             "scorer": "x", "value": value(s, f, m), "n": 4}
            for s, f, (t, m) in itertools.product(SETS, ("multimodal", "text"), METRICS)]


def const(v):
    return lambda s, f, m: v


def frame() -> pl.DataFrame:
    r = rows("vanilla", "vanilla", const(0.9)) + rows("ga", "ga", const(0.5))
    for mode in ("released", "paper"):  # out of report order on purpose
        for a in (0.05, 0.1):
            label = f"manu[{mode}] α={a:g}"
            r += rows(label, "manu", const(0.6 if mode == "paper" else 0.7), alpha=a, mode=mode)
    # paper α=0.1's random control: forget MC accuracy 0.2, 0.5, 0.35 (image+text) for seeds 2, 0, 1,
    # text form 0.1 higher; everything else 0.8
    forget_mm = {0: 0.5, 1: 0.35, 2: 0.2}
    for seed in (2, 0, 1):
        def value(s, f, m, seed=seed):
            if s == "forget" and m == "accuracy":
                return forget_mm[seed] + (0.1 if f == "text" else 0.0)
            return 0.8
        r += rows(f"random(manu[paper] α=0.1) seed={seed}", "random", value, alpha=0.1, mode="paper", seed=seed,
                  shadows="manu[paper] α=0.1")
    r += rows("random(manu[released] α=0.05) seed=0", "random", const(0.4), alpha=0.05, mode="released", seed=0,
              shadows="manu[released] α=0.05")
    r += rows("manu[paper] α=0.05 without var", "manu", const(0.3), alpha=0.05, mode="paper", without="var")
    return results_frame(r)


def test_random_groups_collect_the_seeds_of_each_shadowed_variant():
    groups = random_groups(frame())
    assert groups == {
        "random(manu[paper] α=0.1), seeds 0,1,2": [f"random(manu[paper] α=0.1) seed={s}" for s in (0, 1, 2)],
        "random(manu[released] α=0.05), seed 0": ["random(manu[released] α=0.05) seed=0"],
    }


def test_table_1_puts_each_random_control_after_its_manu_variant_as_mean_and_range():
    forget, retain = paper_tables(frame())[:2]  # a table per set, both forms in each cell
    assert forget.caption.startswith("Table 1 · forget (each cell: image+text / text only")
    assert forget.header == ["method", "MC", "Fact"]
    assert [r[0] for r in forget.rows] == [
        "vanilla", "ga", "manu[paper] α=0.05", "manu[paper] α=0.1", "random(manu[paper] α=0.1), seeds 0,1,2",
        "↳ seeds min–max", "manu[released] α=0.05", "random(manu[released] α=0.05), seed 0", "manu[released] α=0.1"]
    by = {r[0]: r for r in forget.rows}
    rnd = forget.rows.index(by["random(manu[paper] α=0.1), seeds 0,1,2"])
    # image+text: seeds 0.5, 0.35, 0.2 -> mean 0.35 (in %); text only: each 0.1 higher
    assert forget.rows[rnd][1] == "35.0 / 45.0"
    assert forget.rows[rnd + 1][1] == "20–50 / 30–60"  # the seeds' spread, per form, the row below
    # all seeds equal: the spread collapses to one number's bounds
    assert {r[0]: r for r in retain.rows}["random(manu[paper] α=0.1), seeds 0,1,2"][2] == "0.80 / 0.80"
    assert retain.rows[retain.rows.index({r[0]: r for r in retain.rows}["random(manu[paper] α=0.1), seeds 0,1,2"]) + 1][2] == "0.8–0.8 / 0.8–0.8"
    assert by["random(manu[released] α=0.05), seed 0"][1] == "40.0 / 40.0"  # one seed: its value, no spread row
    assert by["manu[paper] α=0.1"][1] == "60.0 / 60.0" and by["vanilla"][1] == "90.0 / 90.0"


def test_table_2_has_a_row_block_per_mode_and_table_7_the_paper_ablation():
    tables = {t.caption.split(":")[0]: t for t in paper_tables(frame())}
    t2 = tables["Table 2"]
    assert t2.header[:4] == ["set", "scoring", "α", "MC"] and "per scoring mode" in t2.caption
    assert [r[:4] for r in t2.rows[:4]] == [["forget", "paper", "0.05", "60.0 / 60.0"], ["forget", "paper", "0.1", "60.0 / 60.0"],
                                            ["forget", "released", "0.05", "70.0 / 70.0"], ["forget", "released", "0.1", "70.0 / 70.0"]]
    assert [r[0] for r in t2.rows] == ["forget"] * 4 + ["retain"] * 4
    t7 = tables["Table 7"]
    assert [r[1] for r in t7.rows[:2]] == ["all four", "without var"] and "paper scoring" in t7.caption
    assert t7.rows[0][2] == "60.0 / 60.0"  # the paper-mode reference at α=0.05, not the released one


def test_seed_means_gives_the_figures_one_method_per_random_control():
    means = seed_means(frame())
    assert "random(manu[paper] α=0.1), seeds 0,1,2" in means["method"].to_list()
    assert not any(m.endswith(("seed=0", "seed=1", "seed=2")) for m in means["method"].unique().to_list())
    v = means.filter((pl.col("method") == "random(manu[paper] α=0.1), seeds 0,1,2") & (pl.col("set") == "forget")
                     & (pl.col("form") == "multimodal") & (pl.col("metric") == "accuracy"))["value"]
    assert v.to_list() == [pytest.approx(0.35)]
    assert means.filter(pl.col("family") != "random").equals(frame().filter(pl.col("family") != "random"))


def test_report_of_modes_and_random_controls_renders(tmp_path):
    paths = build_report(tmp_path / "rep", "modes", frame())
    md = paths["report.md"].read_text()
    assert "| random(manu[paper] α=0.1), seeds 0,1,2 | 35.0 / 45.0 |" in md
    assert md.count("**Table") == 4  # Table 1 for forget and retain, Table 2, Table 7 and (tmp_path / "rep" / "figures" / "forget_5-fig4-form-bars.png").is_file()


def test_the_never_learned_reference_sits_under_vanilla_in_the_forget_table_only(tmp_path, monkeypatch):
    """A run's never-learned reference (results.json `reference.summaries`: here forget multiple choice) becomes
    a `never-learned` row right under vanilla in the forget set's Table 1; the retain table has none
    (the reference is evaluated on the forget set only) and the figures leave it out (no retain score)."""
    import manu_core.figures as F
    from manu_core.vocab import NEVER_LEARNED
    from tasks.reporting import summary_rows

    mc = [{"set": "forget", "form": f, "task": "mc", "metric": "accuracy", "scorer": "likelihood", "value": v, "n": 4}
          for f, v in (("multimodal", 0.6), ("text", 0.55))]
    results = {"run": {"method": "ga", "label": "ga", "config": {"forget": "forget_5"}},
               "vanilla": [], "unlearned": [], "reference": {"summaries": mc}}
    ref = summary_rows(results)
    assert [(r["method"], r["family"], r["form"], r["value"]) for r in ref] == [
        (NEVER_LEARNED, "reference", "multimodal", 0.6), (NEVER_LEARNED, "reference", "text", 0.55)]
    assert summary_rows({**results, "reference": None}) == []  # a run without one adds no row

    both = pl.concat([frame(), results_frame(ref)])
    forget, retain = paper_tables(both)[:2]
    assert [r[0] for r in forget.rows[:3]] == ["vanilla", NEVER_LEARNED, "ga"]
    assert forget.rows[1][1:] == ["60.0 / 55.0", "- / -"]  # MC only: no factuality for the reference
    assert NEVER_LEARNED not in [r[0] for r in retain.rows]

    drawn = []
    for name in ("plot_form_bars", "plot_tradeoff"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda res, *a, real=real, **k: (drawn.append(set(res["method"])), real(res, *a, **k))[1])
    md = build_report(tmp_path / "rep", "with reference", both)["report.md"].read_text()
    assert f"| {NEVER_LEARNED} | 60.0 / 55.0 |" in md
    assert len(drawn) == 2 and all(NEVER_LEARNED not in methods and "vanilla" in methods for methods in drawn)
