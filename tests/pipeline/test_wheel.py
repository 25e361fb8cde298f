"""A wheel built from the repository runs the embedded default: `pip install .` (not editable) into
a fresh environment, then `manu run --model tiny` from an empty folder, far from any checkout, under
umask 022 (everything it writes readable by others, the models' safetensors included)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# What a clone holds that the build reads (tests, docs and artifacts are not part of the package).
SOURCES = ("pyproject.toml", "README.md", "manu_core", "tasks", "flows", "data")


def _fresh_env_with_wheel(tmp_path: Path) -> Path:
    """A new venv holding only the wheel; its dependencies come from this environment's site
    folder, added as a plain path (so this checkout's editable install of manu is not seen)."""
    import torch

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("manu-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "manu-test-deps.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True, text=True,
                   timeout=300)
    return venv


def test_a_wheel_installed_in_a_fresh_env_runs_the_tiny_flow(tiny_model_dir, tmp_path):
    import os

    venv = _fresh_env_with_wheel(tmp_path)
    where = subprocess.run([venv / "bin" / "python", "-c",
                            "import manu_core, manu_core.data as d; print(manu_core.__file__); print(d.DATA_DIR)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the installed copy, data included
    work = tmp_path / "work"
    # The trained tiny model, found by its key: same sources and data in the wheel, so the same key.
    shutil.copytree(tiny_model_dir, work / "artifacts" / "models" / tiny_model_dir.name)
    env = {k: v for k, v in os.environ.items() if k not in ("MANU_ARTIFACTS", "PREFECT_API_URL", "PYTHONPATH")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               MANU_PREFECT_RESULTS="")
    arts = work / "artifacts"
    before = {p: p.stat().st_mtime_ns for p in arts.rglob("*")}
    # under umask 022, as on a shared server: a colleague must be able to read what the run writes
    out = subprocess.run([venv / "bin" / "manu", "run", "--model", "tiny",
                          "--cap", "forget=1,test=1,retain=1,celebrity=1"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600, umask=0o022)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    _assert_readable_by_others(arts, before)
    shown = Path([l for l in out.stdout.splitlines() if l.startswith("results: ")][-1][len("results: "):])
    assert shown.is_relative_to(work / "artifacts")  # outputs go to ./artifacts, not into site-packages
    results = json.loads((shown.parent / "results.json").read_text())
    assert results["vanilla"] and results["unlearned"]
    assert [p.name for p in (work / "artifacts" / "models").iterdir()] == [tiny_model_dir.name]  # not retrained


def _assert_readable_by_others(arts: Path, before: dict) -> None:
    """Every file the run wrote (the pruned model's safetensors, which safetensors' writer creates 0600,
    the Parquet tables, the reports, the Prefect result records) is readable by group and others, and
    every folder it made can be entered."""
    import stat

    written = [p for p in arts.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    models = [p for p in written if p.name == "model.safetensors"]
    assert models and any(p.is_relative_to(arts / "pipeline" / "prune") for p in models), models
    closed = {str(p.relative_to(arts)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
              if p.stat().st_mode & 0o044 != 0o044}
    assert not closed, f"files others cannot read under umask 022: {closed}"
    folders = {str(p.relative_to(arts)): oct(stat.S_IMODE(p.stat().st_mode)) for p in arts.rglob("*")
               if p.is_dir() and p not in before and p.stat().st_mode & 0o055 != 0o055}
    assert not folders, f"folders others cannot enter under umask 022: {folders}"
