"""bench/gpu_check.sh at tiny shapes on the CPU: the script a GPU owner runs, on the same code path."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_both_shapes_at_tiny_scale_on_cpu():
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--threads", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PY": sys.executable})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in out.stdout.splitlines() if l.startswith("| ")}
    assert rows[""] == ["llava7b", "idefics2-8b"]
    # The real processors' image shapes: 576 CLIP patches at 336 px; 64 perceiver latents for Idefics2.
    assert rows["image tokens per image+text sample"] == ["576", "64"]
    for ratio in rows["extraction / plain forward (goal <= 1.05)"] + [c.rstrip("x") for c in rows["batched speed-up (goal >= 10x)"]]:
        assert float(ratio) > 0
    assert rows["dtype on disk"] == ["['BF16']"] * 2 and rows["dtype after reload"] == ["['torch.bfloat16']"] * 2
    assert rows["pruned weights zero after reload"] == ["True"] * 2
    assert all(int(n) > 0 for n in rows["units pruned (2% per MLP)"])
    assert re.search(r"pruned round trip sound", out.stdout)
