"""Shared fixtures. Environment-driven folders are set before anything imports the project."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never write into the checkout's artifacts/: one folder per test session.
os.environ["MANU_ARTIFACTS"] = tempfile.mkdtemp(prefix="manu-test-artifacts-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The trained vanilla model of the `tiny` preset (trained once per session, ~20 s)."""
    from manu_core.presets import resolve_model

    return resolve_model("tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from manu_core.models import load_model

    return load_model(tiny_model_dir)
