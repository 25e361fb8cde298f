"""The `manu` flow end to end on the `tiny-qwen2vl` preset (a third architecture: Qwen2-VL's vision
blocks see every image's patches as one sequence, its processor is the image-only one where
torchvision is missing): extract -> importance -> prune -> evaluate -> report, the preset trained on
first use (~20 s of one core: a 3 + 3-epoch smoke recipe; nothing here reads what it remembers)."""

import json
import math
from pathlib import Path

import polars as pl
import pytest

from flows.pipeline import EvalSettings, RunConfig
from tests.pipeline.flow_helpers import CAPS, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


def test_smoke_flow_on_tiny_qwen2vl():
    from manu_core.models import load_model
    from manu_core.prune import pruned_weights_are_zero
    from manu_core.store import check_complete, inspect_activations
    from tasks.cache import pipeline_dir

    cfg = RunConfig(model="tiny-qwen2vl", alpha=0.05, extract_batch_size=16, lens_samples=4,
                    eval=EvalSettings(max_new_tokens=8, max_profiles=CAPS))
    results, states = run(cfg)
    # every task ran or was a cache hit (prepare_data's split is tiny's, which another test may have made);
    # the model's own stages ran on this model
    assert set(states.values()) <= {"Completed", "Cached"}, states
    assert all(states[t] == "Completed" for t in ("extract", "prune") if t in states), states
    assert {"prepare_data", "vanilla_model", "extract", "importance_sums", "prune", "results", "report"} <= set(states)
    for model in ("vanilla", "manu-paper-0-05"):
        assert sum(n.startswith(f"evaluate-{model}-") for n in states) == 8, states

    record = json.loads((Path(results) / "results.json").read_text())
    run_ = record["run"]
    assert json.loads((Path(run_["vanilla_model"]) / "config.json").read_text())["model_type"] == "qwen2_vl"

    # extraction: both towers on the image+text streams, the language tower alone on the text ones
    summary = inspect_activations(Path(run_["activations"]) / "activations")
    check_complete(summary)
    towers = {(p.split, p.form): set() for p in summary.partitions}
    for p in summary.partitions:
        towers[p.split, p.form].add(p.tower)
    assert towers == {(s, "multimodal"): {"language", "vision"} for s in ("forget", "retain")} | {
        (s, "text"): {"language"} for s in ("forget", "retain")}

    # importance over every unit of both towers; the top 5 % zeroed in the saved model
    model_dir = Path(run_["model"])
    scores = pl.read_parquet(model_dir / "selection.parquet")
    assert dict(scores.group_by("tower").len().iter_rows()) == {"language": 2 * 512, "vision": 2 * 128}
    assert all(math.isfinite(v) for v in scores["score"])
    chosen = scores.filter(pl.col("selected"))
    assert chosen.height == math.floor(0.05 * scores.height) == json.loads(
        (model_dir / "prune_report.json").read_text())["n_pruned"]
    pruned, processor = load_model(model_dir)
    assert pruned_weights_are_zero(pruned, chosen.select("tower", "layer", "unit"))
    assert processor.image_token == "<|image_pad|>"

    # evaluation of both models on every set and form, and the report
    for model in ("vanilla", "unlearned"):
        assert {(r["set"], r["form"]) for r in record[model]} == {
            (s, f) for s in ("forget", "test", "retain", "celebrity") for f in ("multimodal", "text")}
    [report] = [d for d in (pipeline_dir() / "report").iterdir() if (d / "sources.json").is_file()
                and json.loads((d / "sources.json").read_text())["reports"] == [results]]
    assert "on tiny-qwen2vl" in (report / "report.md").read_text()
    assert (report / "report.html").is_file() and list((report / "figures").glob("*.png"))
