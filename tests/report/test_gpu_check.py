"""bench/gpu_check.sh: it refuses a machine without a GPU at once, and at tiny shapes on the CPU (--cpu) it
runs the script a GPU owner runs, on the same code path, printing each figure as it is measured."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # No GPU whatever torch is installed, so a CUDA machine runs these tests as CI does.
    env = {**os.environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_gpu_check_without_a_gpu_refuses_within_seconds_and_says_the_fix():
    import torch

    t0 = time.perf_counter()
    out = gpu_check()
    took = time.perf_counter() - t0
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert took < 5, f"the refusal took {took:.1f} s"
    assert out.stdout == ""  # nothing was built or measured
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("gpu_check: refused: this check runs on a CUDA GPU") and torch.__version__ in line
    assert "`bash bench/gpu_check.sh --cpu` for the tiny plumbing run" in line
    if torch.version.cuda is None:  # a CPU build (this project's CI): install the CUDA one
        assert "a CPU build. Fix: install a CUDA torch with `make install-gpu`" in line
    # a CPU run of the real shapes (hours) is refused too: only --cpu's tiny scale runs on a CPU
    big = gpu_check("--device", "cpu", "--scale", "1")
    assert big.returncode == 2 and "runs the 7B shapes on a CPU (hours)" in big.stderr


def test_gpu_check_reads_the_torch_build_without_importing_torch():
    import importlib.util

    import torch

    path = list(sys.path)  # the script puts bench/ and the repository first on sys.path: not for later tests
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
        gpu_check_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check_module)
    finally:
        sys.path[:] = path
    assert gpu_check_module.torch_build() == (torch.__version__, torch.version.cuda)


def test_gpu_check_runs_both_shapes_at_tiny_scale_on_cpu():
    out = gpu_check("--cpu", "--threads", "1")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    # first, before anything is built: which torch, which device
    assert re.fullmatch(r"gpu_check: torch \S+ \((CUDA \S+|a CPU build, no CUDA)\) in \S+", lines[0]), lines[0]
    assert lines[1].startswith("gpu_check: device cpu: ") and "the --cpu plumbing run" in lines[1], lines[1]
    # then each figure as it is measured, with the seconds since the start, before the table
    streamed = {m[2]: (m[1], m[3]) for l in lines if (m := re.fullmatch(r"\[ *(\d+) s\] (\S+ +[^:]+): (.*)", l))}
    for shape in ("llava7b", "idefics2-8b"):
        def figure(label: str) -> str:
            return streamed[f"{shape:<12} {label}"][1]

        assert re.fullmatch(r"\d+\.\d{3} s", figure("extraction, token statistics (the pipeline's default)"))
        assert re.fullmatch(r"\d+\.\d{3} s", figure("extraction, means only"))
        assert float(figure("default extraction / plain forward (goal <= 1.05)")) > 0
        # one NPO step with its frozen reference: at the first step the model is the reference, so the
        # loss is (2/β) log 2 with the benchmark's β = 0.4
        assert re.fullmatch(r"\d+\.\d s, first loss 3\.466", figure("NPO step (LoRA r16, batch 4, + frozen reference)"))
        assert re.fullmatch(r"\d+\.\d\d GB", figure("peak memory, NPO step"))
        assert figure("peak memory is") == "CPU: the process's peak RSS per phase (not a GPU figure)"
    assert lines.index("") > max(i for i, l in enumerate(lines) if l.startswith("[")), "the table comes last"

    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in out.stdout.splitlines() if l.startswith("| ")}
    assert rows[""] == ["llava7b", "idefics2-8b"]
    # The real processors' image shapes: 576 CLIP patches at 336 px; 64 perceiver latents for Idefics2.
    assert rows["image tokens per image+text sample"] == ["576", "64"]
    for ratio in (rows["default extraction / plain forward (goal <= 1.05)"] + rows["means only / plain forward"]
                  + [c.rstrip("x") for c in rows["batched speed-up (goal >= 10x)"]]):
        assert float(ratio) > 0
    assert rows["dtype on disk"] == ["['BF16']"] * 2 and rows["dtype after reload"] == ["['torch.bfloat16']"] * 2
    assert rows["pruned weights zero after reload"] == ["True"] * 2
    assert all(int(n) > 0 for n in rows["units pruned (2% per MLP)"])
    assert re.search(r"pruned round trip sound; NPO step ran", out.stdout)


def test_gpu_check_stops_at_its_time_budget_and_says_so():
    out = gpu_check("--cpu", "--threads", "1", "--budget-s", "1")
    assert out.returncode == 124, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.startswith("gpu_check: torch ")
    assert "gpu_check: stopped during llava7b at the 1 s budget (--budget-s); the figures above are what was measured" \
        in out.stderr
