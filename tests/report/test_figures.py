"""Figures: each renders headless from a small fixture into a non-empty, opaque PNG whose pixels follow
the data and whose bytes repeat (the whole report with every figure: test_golden.py)."""

import io
import itertools

import numpy as np
import polars as pl
import pytest
from PIL import Image

from manu_core import figures as F
from manu_core.report import paper_tables, results_frame
from manu_core.store import write_partition

SETS = ("forget", "test", "retain", "celebrity")
METRICS = (("mc", "accuracy"), ("gen", "rougeL_f1"), ("gen", "factuality"), ("cloze", "accuracy"))
# (method label, family, alpha, without)
METHODS = [("vanilla", "vanilla", None, None), ("ga", "ga", None, None), ("manu α=0.05", "manu", 0.05, None),
           ("manu α=0.1", "manu", 0.1, None), ("manu α=0.05 without var", "manu", 0.05, "var")]


def results(shift: float = 0.0, methods=METHODS, sets=SETS, metrics=METRICS) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for (label, family, alpha, without), s, form, (task, metric) in itertools.product(
            methods, sets, ("multimodal", "text"), metrics):
        base = 0.9 if label == "vanilla" else 0.3 + 0.5 * rng.random()
        base += 0 if label == "vanilla" else shift
        value = base * (9 if metric == "factuality" else 1) + (1 if metric == "factuality" else 0)
        rows.append({"forget": "forget_5", "method": label, "family": family, "alpha": alpha, "without": without,
                     "set": s, "form": form, "task": task, "metric": metric, "scorer": "x", "value": value, "n": 4})
    return results_frame(rows)


def lens(shift: float = 0.0) -> pl.DataFrame:
    rows = [{"forget": "forget_5", "method": m, "split": sp, "form": f, "layer": layer,
             "prob": min(1.0, 0.1 + 0.2 * layer + shift + (0.1 if m == "vanilla" else 0))}
            for m in ("vanilla", "ga") for sp in ("forget", "retain") for f in ("multimodal", "text") for layer in range(4)]
    return pl.DataFrame(rows)


def store(root, shift, layers=4):
    rng = np.random.default_rng(1)
    for split, form, tower, layer in itertools.product(("forget", "retain"), ("multimodal", "text"),
                                                        ("language", "vision"), range(layers)):
        if tower == "vision" and form == "text":
            continue
        acts = (rng.normal(size=(6, 16)) + (shift if split == "forget" else 0)).astype(np.float32)
        write_partition(root, split=split, form=form, tower=tower, layer=layer, sample_ids=[f"s{i}" for i in range(6)],
                        profile_ids=["p"] * 6, activations=acts)
    return root


PER_LAYER = pl.DataFrame({"tower": ["language"] * 3 + ["vision"] * 2, "layer": [0, 1, 2, 0, 1],
                          "units": [64] * 5, "selected": [3, 0, 5, 1, 2]})


def pixels(path) -> np.ndarray:
    """A figure's RGB pixels, after checking it is a PNG whose every pixel is opaque: Prefect's dark
    theme shows a PNG on a dark page, where transparent pixels would put black labels on black."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    assert image.getchannel("A").getextrema() == (255, 255)
    return np.asarray(image.convert("RGB"))


DRAWERS = {  # small inputs: a figure's cost is its panels (the report test draws the full ones)
    "activations": lambda p, d: F.plot_activations(store(p.with_suffix(""), 30 * d, layers=1), p),
    "logit_lens": lambda p, d: F.plot_logit_lens(lens(d), p),
    "form_bars": lambda p, d: F.plot_form_bars(results(d, sets=SETS[:2], metrics=METRICS[:2]), p),
    "tradeoff": lambda p, d: F.plot_tradeoff(results(d), p),
    "selected": lambda p, d: F.plot_selected(PER_LAYER.with_columns(selected=pl.col("selected") + int(100 * d)), p),
}


@pytest.mark.parametrize("name", sorted(DRAWERS))
def test_figure_renders_headless_and_follows_the_data(tmp_path, name):
    draw = DRAWERS[name]
    a = pixels(draw(tmp_path / "a.png", 0.0))
    assert a.std() > 0  # not a blank canvas
    again = draw(tmp_path / "again.png", 0.0)
    assert again.read_bytes() == (tmp_path / "a.png").read_bytes()  # deterministic bytes
    b = pixels(draw(tmp_path / "b.png", 0.05))
    assert a.shape != b.shape or np.any(a != b)


def test_renders_without_a_display(tmp_path):
    """A fresh interpreter with no DISPLAY and no backend chosen: the figures never touch pyplot."""
    import os
    import subprocess
    import sys

    code = ("import polars as pl, sys; from manu_core.figures import plot_selected; "
            "plot_selected(pl.DataFrame({'tower':['language'],'layer':[0],'units':[4],'selected':[1]}), sys.argv[1]); "
            "print('pyplot' in ' '.join(sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.png")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and (tmp_path / "s.png").stat().st_size > 0


def test_selected_panel_of_a_tower_with_nothing_selected_says_so(tmp_path):
    none = PER_LAYER.with_columns(selected=pl.when(pl.col("tower") == "vision").then(0).otherwise(pl.col("selected")))
    language, vision = F.selected_figure(none).axes
    assert [t.get_text() for t in vision.texts] == ["none selected"] and vision.get_ylim()[0] == 0
    assert list(vision.get_xticks()) == [0, 1] and list(language.get_xticks()) == [0, 1, 2]  # integer layer ids
    assert len(language.texts) == 0 and "0 of 128 units" in vision.get_title()
    assert pixels(F.plot_selected(none, tmp_path / "none.png")).std() > 0


def test_pick_layers_spreads_first_to_last():
    assert F.pick_layers(list(range(32)), 3) == [0, 16, 31]
    assert F.pick_layers([0, 1], 3) == [0, 1]


def test_bad_input_names_the_missing_column(tmp_path):
    with pytest.raises(F.FigureError, match=r"plot_logit_lens needs columns .*\['prob'\] missing"):
        F.plot_logit_lens(lens().drop("prob"), tmp_path / "x.png")
    with pytest.raises(F.FigureError, match="no 'vanilla' rows"):
        F.plot_form_bars(results().filter(pl.col("method") != "vanilla"), tmp_path / "x.png")
    with pytest.raises(F.FigureError, match="empty table"):
        F.plot_tradeoff(results().clear(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_tradeoff_points_are_the_forget_drop_and_retain_accuracy():
    pts = F.tradeoff_points(results())
    r = results()
    mc = r.filter((pl.col("task") == "mc") & (pl.col("metric") == "accuracy"))
    ga = mc.filter(pl.col("method") == "ga")
    row = pts.filter(pl.col("method") == "ga").row(0, named=True)
    forget = ga.filter(pl.col("set") == "forget")["value"].mean()
    assert row["forget_drop"] == pytest.approx(0.9 - forget)
    assert row["retain"] == pytest.approx(ga.filter(pl.col("set") == "retain")["value"].mean())
    assert pts["method"].to_list()[0] == "vanilla"


def test_paper_tables_have_table_2_and_7_only_when_the_sweep_has_them():
    tables = paper_tables(results())
    captions = [t.caption for t in tables]
    assert [c.split(" (")[0] for c in captions[:4]] == [f"Table 1 · {s}" for s in SETS]  # a table per set
    assert any(c.startswith("Table 2") for c in captions) and any(c.startswith("Table 7") for c in captions)
    t1 = tables[0]
    assert [r[0] for r in t1.rows] == ["vanilla", "ga", "manu α=0.05", "manu α=0.1"]  # ablations in Table 7 only
    assert t1.header == ["method", "MC", "ROUGE-L", "Fact", "Cloze"]  # narrow: fits the artifact pane
    vanilla = results().filter((pl.col("method") == "vanilla") & (pl.col("set") == "forget") & (pl.col("task") == "mc"))
    mm, text = (vanilla.filter(pl.col("form") == f)["value"][0] for f in ("multimodal", "text"))
    assert t1.rows[0][1] == f"{100 * mm:.1f} / {100 * text:.1f}"  # image+text / text only, in %
    t2 = next(t for t in tables if t.caption.startswith("Table 2"))
    assert [r[:2] for r in t2.rows[:2]] == [["forget", "0.05"], ["forget", "0.1"]]
    t7 = next(t for t in tables if t.caption.startswith("Table 7"))
    assert [r[1] for r in t7.rows[:2]] == ["all four", "without var"]
    single = paper_tables(results(methods=METHODS[:3]))
    assert len(single) == 4  # one α, no ablation: Table 1 only (one per set)

