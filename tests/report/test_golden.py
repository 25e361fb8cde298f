"""Golden files: the rendered reports, byte for byte, so a formatting change is a reviewed diff.

    MANU_UPDATE_GOLDEN=1 pytest tests/report/test_golden.py   # rewrite them after an intended change

The inputs are fixed tables (no model), so the files only move when the rendering does."""

import os
from pathlib import Path

from manu_core.evaluate import Summary, format_report
from manu_core.relearn import control_rows
import polars as pl

from manu_core.report import (artifact_markdown, build_report, counts_note, relearn_tables, run_tables,
                              summaries_frame, tables_markdown)
from tests.report.test_figures import PER_LAYER, lens, pixels, store
from tests.report.test_figures import results as sweep_results
from tests.report.test_modes_report import frame as modes_frame

GOLDEN = Path(__file__).with_name("golden")


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MANU_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with MANU_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} changed: review the diff, then MANU_UPDATE_GOLDEN=1 to accept it"


def summaries(shift: float) -> list[Summary]:
    out = []
    for i, (s, form) in enumerate((s, f) for s in ("forget", "test", "retain", "celebrity") for f in ("multimodal", "text")):
        for task, metric, scorer, v in (("mc", "accuracy", "likelihood", 0.9), ("gen", "rougeL_f1", "rouge-score", 0.8),
                                        ("gen", "factuality", "offline-keyfact-overlap", 8.0), ("cloze", "accuracy", "substring", 0.4)):
            scale = 10 if metric == "factuality" else 1
            out.append(Summary(set=s, form=form, task=task, metric=metric, scorer=scorer,
                               value=v - shift * scale * (i % 3) / 4, n=12 + i))
    return out


def test_sweep_report_links_every_figure_and_embeds_them_in_html(tmp_path):
    acts = store(tmp_path / "acts", 0.0, layers=1)  # one layer per tower: the cheapest full Fig. 6
    paths = build_report(tmp_path / "rep", "Sweep on fixture", sweep_results(), lens=lens(),
                         activations={"forget_5": acts}, selected={"forget_5": PER_LAYER}, chosen_alpha=0.05,
                         notes="made from a **fixture**")
    md = paths["report.md"].read_text()
    check("sweep-report.md", md)
    pngs = sorted(p.name for p in (tmp_path / "rep" / "figures").glob("*.png"))
    assert pngs == ["forget_5-fig2-logit-lens.png", "forget_5-fig4-form-bars.png", "forget_5-fig5-tradeoff.png",
                    "forget_5-fig6-activations.png", "forget_5-selected-neurons.png"]
    for name in pngs:
        assert f"(figures/{name})" in md
        pixels(tmp_path / "rep" / "figures" / name)  # a PNG, opaque (each figure's bytes repeat: test_figures)
    page = paths["report.html"].read_text()
    assert page.count("<img src='data:image/png;base64,") == 5 and "<b>fixture</b>" in page
    assert page.count("<table>") == 6  # Table 1 x 4 sets, Table 2, Table 7
    embedded = artifact_markdown(tmp_path / "rep")
    assert "(figures/" not in embedded and embedded.count("data:image/png;base64,") == 5


def test_modes_report_markdown(tmp_path):
    check("modes-report.md", build_report(tmp_path, "modes", modes_frame())["report.md"].read_text())


def test_run_report_and_evaluate_tables():
    frame = summaries_frame({"vanilla": summaries(0.0), "unlearned": summaries(0.2)})
    check("run-report.md", tables_markdown(run_tables(frame, "unlearned")) + "\n\n" + counts_note(frame) + "\n")
    check("evaluate-report.md", format_report(summaries(0.1)) + "\n")



def test_relearn_tables():
    stages = ["vanilla", "unlearned", "forget-text/free", "forget-text/frozen", "retain/free", "retain/frozen",
              "vanilla+forget-text", "vanilla+retain"]  # the last two: the attacked vanilla model (one row)
    rows = [{"method": m, "stage": st, "form": f, "task": "mc", "metric": "accuracy",
             "value": 0.9 - 0.1 * i - 0.05 * j + (0.02 if f == "text" else 0.0)}
            for i, m in enumerate(["ga lr=0.0003", "manu[paper] α=0.1"]) for j, st in enumerate(stages)
            for f in ("multimodal", "text") if not (m.startswith("ga") and st.endswith("frozen"))]
    tables = relearn_tables(control_rows(pl.DataFrame(rows)), ["vanilla", "ga lr=0.0003", "manu[paper] α=0.1"],
                            "; fixture")
    check("relearn-tables.md", tables_markdown(tables) + "\n")
