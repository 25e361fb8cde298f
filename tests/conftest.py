"""Shared fixtures. Environment-driven folders are set before anything imports the project."""

import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="manu-test-hf-datasets-")
# Tests never write into the checkout's artifacts/: one folder per test session (per xdist worker).
os.environ["MANU_ARTIFACTS"] = tempfile.mkdtemp(prefix="manu-test-artifacts-")
# ... except the trained presets, shared by the workers of one run: `presets.resolve_model` trains a
# preset once under a lock and the other workers take that model (the tiny preset is ~1 min of one
# core: trained once instead of once per worker).
if os.environ.get("PYTEST_XDIST_TESTRUNUID"):
    _models = Path(tempfile.gettempdir()) / f"manu-test-models-{os.environ['PYTEST_XDIST_TESTRUNUID']}"
    _models.mkdir(exist_ok=True)
    (Path(os.environ["MANU_ARTIFACTS"]) / "models").symlink_to(_models, target_is_directory=True)
# `make test` runs three xdist workers on two cores (the third fills the others' waits; Makefile): each
# (and every process it starts, e.g. `manu run`) gets one torch thread, since processes of two threads
# each on two cores spin each other to a crawl. Presets then train with one thread, under their own key
# (presets.as_trained_here).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import pytest  # noqa: E402

# A test is `slow` (left out of `make test-fast`) when it needs a trained model or a Prefect server:
# it uses one of these fixtures, directly or through another fixture. Modules that train or run a
# pipeline in their own helpers also mark themselves (`pytestmark = pytest.mark.slow`).
SLOW_FIXTURES = {"tiny_model_dir", "prefect_harness"}


SLOW_MODULE = re.compile(r"^pytestmark = \[?pytest\.mark\.slow\b", re.M)


def pytest_ignore_collect(collection_path, config):
    """`make test-fast` (-m "not slow") does not even import a module marked slow as a whole: its imports
    (Prefect, the flows) would cost each worker seconds for tests it then deselects."""
    if (config.getoption("markexpr") == "not slow" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_") and SLOW_MODULE.search(collection_path.read_text())):
        return True
    return None


# The order in which `make test`'s workers start the files (xdist's loadfile with
# --no-loadscope-reorder hands whole files out in collection order, each to the first worker that is
# nearly free). First the longest file, whose first test trains `tiny` (~1 min of one core); then every
# file with no slow test, which the other workers run meanwhile instead of waiting for `tiny`; then
# the long files, longest first (measured with --durations), so no long file starts last and leaves
# a worker idle at the end, except that the two that train presets of their own (test_models.py's
# tiny-idefics2, the positive control's tiny-planted) come first, while `tiny` is still training; then
# the rest, as collected. Only the order changes, never what runs. (The durations behind the order:
# `MANU_TEST_TIMELINE=<file> make test`, then `python bench/suite_timeline.py <file>`.)
LONG_FILES = (
    "pipeline/test_flow.py", "core/test_models.py", "pipeline/test_positive_control.py", "pipeline/test_fanout.py",
    "pipeline/test_deployment.py", "pipeline/test_modes_flow.py", "pipeline/test_comparison_flow.py",
    "pipeline/test_interrupts.py", "pipeline/test_wheel.py", "pipeline/test_relearn_flow.py", "pipeline/test_dask.py",
    "pipeline/test_benchmark_flow.py", "report/test_gpu_check.py", "eval/test_evaluate.py",
    "pipeline/test_qwen2vl_flow.py", "baselines/test_baselines.py", "pipeline/test_preflight.py",
    "pipeline/test_devices.py", "pipeline/test_cache.py",
)


def _file_rank(path: str, slow_files: set[str]) -> tuple[int, int]:
    rel = path.split("tests/", 1)[-1]
    if rel == LONG_FILES[0]:
        return (0, 0)
    if path not in slow_files:
        return (1, 0)
    return (2, LONG_FILES.index(rel)) if rel in LONG_FILES else (3, 0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _file_rank(item.nodeid.split("::")[0], slow_files))  # stable: tests keep their order


# MANU_TEST_TIMELINE=<file>: each test's start and end (wall clock, xdist worker) appended as JSON lines;
# `python bench/suite_timeline.py <file>` shows when each worker ran which file and how long it sat idle.
_TIMELINE = os.environ.get("MANU_TEST_TIMELINE")


def _mark(nodeid: str, event: str) -> None:
    import json
    import time

    line = json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": nodeid, "event": event,
                       "t": time.time()})
    with open(_TIMELINE, "a") as f:  # one short line per write: appends from several workers do not interleave
        f.write(line + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs where the test runs (an xdist worker, or pytest itself), never in xdist's controller."""
    if _TIMELINE:
        _mark(item.nodeid, "start")
    yield
    if _TIMELINE:
        _mark(item.nodeid, "end")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The trained vanilla model of the `tiny` preset (trained once per test run, ~1 min on one thread)."""
    from manu_core.presets import resolve_model
    from tasks.cache import models_dir

    return resolve_model("tiny", models=models_dir(), progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from manu_core.models import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads can be much slower.
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
