"""The `manu` flow with a local MLLMU-Bench (`benchmark=`): every stage shows the model the
benchmark's own images and questions, never an embedded stand-in portrait."""

import hashlib
import io
import json
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from flows.pipeline import EvalSettings, RunConfig, manu
from flows.runs import settled_task_runs
from manu_core.portraits import image_for
from tests.eval import mllmu_fixture as fx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


def test_extraction_baselines_and_lens_use_the_benchmarks_images(tiny_model_dir, tmp_path):
    """The tiny model as a checkpoint folder, a 4-profile benchmark fixture whose PNGs differ from any
    embedded portrait, forget = two of its profiles. The embedded resolver refuses benchmark keys, so a
    stage that fell back to stand-in portraits would fail the run; the streams record which image each
    sample was shown, checked here against the fixture's files."""
    root = fx.build(tmp_path / "mllmu")
    cfg = RunConfig(model=str(tiny_model_dir), benchmark=str(root), forget=["001", "002"], alpha=0.05,
                    extract_batch_size=4, eval=EvalSettings(max_new_tokens=8))
    for method in ("manu", "ga"):
        state = manu(cfg, method=method, return_state=True)
        assert state.is_completed(), state
    runs = settled_task_runs(state)
    assert any(r.name.startswith("baseline-ga") for r in runs) and any(r.name.startswith("logit-lens-") for r in runs)
    [prep] = [r for r in runs if r.name.startswith("prepare_data-")]
    data = Path(prep.state.result())
    split = json.loads((data / "split.json").read_text())
    assert split["forget_ids"] == ["001", "002"] and split["retain_ids"] == ["003", "004"]
    assert split["celebrity_ids"] == fx.CELEBS
    streams = pl.read_parquet(data / "streams.parquet")
    mm = streams.filter(pl.col("form") == "multimodal")
    assert mm.height >= 3 and streams.filter(pl.col("form") == "text")["image"].is_null().all()
    for row in mm.iter_rows(named=True):
        assert row["image"] == f"mllmu:Full_Set:{row['profile_id']}"
        png = Image.open(io.BytesIO(fx._png(row["profile_id"]))).convert("RGB")
        assert row["image_sha256"] == hashlib.sha256(png.tobytes()).hexdigest()
        stand_in = image_for(row["profile_id"]).convert("RGB")
        assert row["image_sha256"] != hashlib.sha256(stand_in.tobytes()).hexdigest()
    items = pl.read_parquet(data / "eval_items.parquet")
    assert set(items["source"]) == {"mllmu-bench"}
    # One benchmark config edited (a celebrity row dropped): data preparation and what follows rerun.
    fx.write_config(root, "Retain_Set", [{**fx._row("c01"), "image": {"bytes": fx._png("c01"), "path": None}}])
    state = manu(cfg, method="manu", return_state=True)
    states = {r.name.split("-")[0]: r.state.name for r in settled_task_runs(state)
              if r.name.startswith(("prepare_data-", "extract-"))}
    assert states == {"prepare_data": "Completed", "extract": "Completed"}, states
