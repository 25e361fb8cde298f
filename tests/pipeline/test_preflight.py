"""A real checkpoint's run fails before any server or task when it cannot succeed (RunConfig.preflight):
no benchmark, a missing folder, truncated weights, a bad dtype, a forget id the benchmark lacks, NPO
without its reference, a judge that does not answer, a misspelled config key."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.pipeline import RunConfig, SweepConfig, manu
from manu_core.benchmark import BenchmarkError
from manu_core.judge import JudgeError
from manu_core.models import ModelError
from tests.eval import mllmu_fixture as fx

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a lab would hold a checkpoint: a folder without manu_preset.json."""
    out = tmp_path_factory.mktemp("ckpt") / "llava-tiny"
    shutil.copytree(tiny_model_dir, out)
    (out / "manu_preset.json").unlink()
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return fx.build(tmp_path_factory.mktemp("bench") / "MLLMU-Bench")


def check(**kw) -> list[str]:
    cfg = RunConfig(**kw)
    return cfg.preflight(["manu"], [cfg.data_spec()["forget"]])


def test_a_checkpoint_needs_its_benchmark_or_an_explicit_stand_in(checkpoint, bench):
    with pytest.raises(ValueError, match="needs its benchmark: pass --benchmark.*--stand-in-data"):
        check(model=str(checkpoint))
    (note,) = check(model=str(checkpoint), stand_in_data=True)
    assert note.startswith("STAND-IN DATA") and "not a result" in note
    assert check(model=str(checkpoint), benchmark=str(bench)) == []


def test_paths_weights_and_dtype_fail_naming_what_and_how(checkpoint, bench, tmp_path):
    with pytest.raises(BenchmarkError, match="MLLMU-Bench folder not found: /nowhere/bench.*huggingface-cli download"):
        check(model=str(checkpoint), benchmark="/nowhere/bench")
    with pytest.raises(ModelError, match="'/nowhere/model' is neither a preset .* nor an existing folder"):
        check(model="/nowhere/model", benchmark=str(bench))
    with pytest.raises(ModelError, match="dtype must be one of float32, bfloat16, float16.*got 'fp16'"):
        check(model=str(checkpoint), benchmark=str(bench), dtype="fp16")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    with pytest.raises(ModelError, match=f"the weights file {weights} cannot be read.*copy it again"):
        check(model=str(broken), benchmark=str(bench))
    empty = tmp_path / "empty-bench"
    (empty / "forget_5").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="config 'forget_5' is missing under .*configs found: none"):
        check(model=str(checkpoint), benchmark=str(empty))


def test_a_forget_id_the_benchmark_lacks_fails_in_seconds(checkpoint, bench):
    t0 = time.perf_counter()
    with pytest.raises(BenchmarkError, match=r"forget ids must be profiles of Full_Set .*1 are not: \['005'\]"):
        check(model=str(checkpoint), benchmark=str(bench), forget=["001", "005"])  # 005: not in the fixture
    assert time.perf_counter() - t0 < 5


def test_npo_on_a_checkpoint_needs_its_reference(checkpoint, bench):
    cfg = RunConfig(model=str(checkpoint), benchmark=str(bench))
    with pytest.raises(ValueError, match="NPO on the checkpoint .* needs its reference model .*: pass --reference"):
        cfg.preflight(["manu", "ga", "npo"], ["forget_5"])
    cfg.model_copy(update={"reference": str(checkpoint)}).preflight(["manu", "ga", "npo"], ["forget_5"])


def test_a_judge_that_does_not_answer_fails_before_any_model_loads(checkpoint, bench):
    with pytest.raises(JudgeError, match="does not answer"):
        check(model=str(checkpoint), benchmark=str(bench), eval={"judge": "openai:http://127.0.0.1:9/v1#m"})


def test_unknown_config_keys_are_refused_with_the_nearest_one():
    with pytest.raises(ValidationError, match="unknown RunConfig key 'benchmrk'. Did you mean 'benchmark'?"):
        RunConfig(model="tiny", benchmrk="/data/MLLMU-Bench")
    with pytest.raises(ValidationError, match="unknown EvalSettings key 'max_profile'. Did you mean 'max_profiles'?"):
        RunConfig(eval={"max_profile": {"retain": 5}})
    with pytest.raises(ValidationError, match="unknown SweepConfig key 'alpha'. Did you mean 'alphas'?"):
        SweepConfig(alpha=[0.1])


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_run_carries_its_one_line_cause():
    """What `prefect deployment run --watch` and the UI show: the state message names the cause."""
    state = manu({"model": "tiny", "benchmrk": "/data/MLLMU-Bench"}, return_state=True)
    assert state.is_failed()
    assert "unknown RunConfig key 'benchmrk'. Did you mean 'benchmark'?" in state.message
    assert "\n" not in state.message


def test_manu_run_refuses_before_any_server(checkpoint, tmp_path, monkeypatch):
    """`manu run --model <checkpoint>` without --benchmark: one line, rc 2, no Prefect server (a real
    process, as a user types it); then the other refusals through the same CLI in this process."""
    from typer.testing import CliRunner

    from flows.cli import app

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MANU_ARTIFACTS": str(tmp_path / "artifacts")}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--model", str(checkpoint)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "needs its benchmark" in out, out
    assert [line for line in out.splitlines() if line.strip()] == [out.strip()]  # one line
    assert "server" not in out.lower() and not (tmp_path / "artifacts" / "pipeline").exists()

    monkeypatch.setenv("MANU_ARTIFACTS", str(tmp_path / "artifacts"))
    for args, why in [(["--benchmark", "/nowhere"], "MLLMU-Bench folder not found"),
                      (["--dtype", "half"], "dtype must be one of"), (["--model", "/nowhere"], "nor an existing folder")]:
        res = CliRunner().invoke(app, ["run", "--model", str(checkpoint), *args])  # a second --model wins
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
        assert [line for line in res.output.splitlines() if line.strip()] == [res.output.strip()]
        assert "server" not in res.output.lower() and not (tmp_path / "artifacts" / "pipeline").exists()
