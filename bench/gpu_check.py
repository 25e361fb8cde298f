"""GPU check: real-shaped LLaVA-1.5-7B and Idefics2-8B through this project's own code paths.

    make install-gpu && bash bench/gpu_check.sh   # one GPU: both shapes, full size, bfloat16 (< 8 min)
    bash bench/gpu_check.sh --cpu                  # the same code at tiny shapes on a CPU (~30-45 s; the tests)

It refuses to start without a CUDA GPU: a CPU build of torch (what `make install` puts in where it finds no
CUDA) would otherwise run the 7B shapes on the CPU for hours. `--cpu` (here: `--device cpu` with a small
`--scale`) is the tiny plumbing run, which measures nothing about a GPU. The first two lines, printed
before any model is built, say which torch runs (version, CUDA build, interpreter) and on what device.

Each shape is built from its published config with random weights (no download) and runs in its own
process (so peak memory is per shape). The processor is the real one with the real image shapes:
LLaVA-1.5 (CLIP 336 px, patch 14, 576 image tokens), Idefics2-8B (SigLIP, shortest edge 378 / longest
980, patch 14, 64 perceiver tokens per image, no image splitting); its tokenizer is a byte-level BPE
trained here on the embedded profiles (the real vocabularies are not on disk), so prompts are real
benchmark questions with the embedded stand-in portraits. Every figure is printed (and flushed) the
moment it is measured, so a run stopped at its time budget (`--budget-s`) or killed keeps what it had;
a side-by-side table follows at the end. In the order measured:

  extraction, default          `extract.activation_hooks` recording the token statistics (what
                               `extract_activations` and the flow record unless told otherwise) +
                               backbone + per-sample reductions + the host copies, ÷ `model(**batch)`;
                               same batches, interleaved repeats (goal <= 1.05)
  extraction, means only       the same hooks recording the per-sample means alone, beside it
                               (`bench_extract.py --stats none`)
  NPO step                     one step of `baselines.unlearn_gradient` as a checkpoint's NPO trains:
                               LoRA r16 on the language model, 4 image+text samples, a frozen reference
                               copy of the whole model beside it (the pipeline loads two); seconds, loss
                               (2 ln 2 / β at the first step, where model and reference agree), peak memory
  batched / one at a time      `evaluate.generate_texts` at batch size B vs 1, same questions, greedy
                               (goal >= 10x)
  pruned round trip            2% of every MLP's units zeroed (`prune.prune_units`), saved with
                               `prune.save_pruned`, reloaded with `models.load_model`: dtype on disk
                               and after reload, pruned weights still zero, seconds and GB
  peak memory                  per phase (extraction, NPO step, evaluation, save + reload). GPU:
                               torch.cuda.max_memory_allocated since the phase began; CPU: the process's
                               peak RSS since the phase began (VmHWM, reset per phase), not a GPU figure
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STARTED = time.perf_counter()  # the budget and the printed seconds count from here: torch's import included
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

SHAPES = ("llava7b", "idefics2-8b")
GOALS = {"extraction_ratio": 1.05, "eval_speedup": 10.0}
JSON_TAG = "GPU_CHECK_JSON="
CPU_MAX_SCALE = 0.1  # above this a CPU run is no plumbing run: hours of the 7B shapes on a CPU
FIX_CPU = "or `bash bench/gpu_check.sh --cpu` for the tiny plumbing run on the CPU (no GPU figures)"


# ----------------------------------------------------------------------------------------------
# Before anything is built: which torch, which device (the refusal, or the first two lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every width and depth (0.02: the --cpu run)")
    ap.add_argument("--device", default="cuda",
                    help=f"cuda (default; refused without one) or cpu (only with --scale <= {CPU_MAX_SCALE:g})")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16, help="extraction batch size")
    ap.add_argument("--n-batches", type=int, default=8, help="extraction batches (half image+text, half text)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-questions", type=int, default=64, help="evaluation questions (half image+text, half text)")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tmp", default=None, help="where the pruned model is saved and reloaded (default: $TMPDIR)")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="stop the check after this many seconds, keeping what it printed (0: no limit)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one shape's process
    return ap


def torch_build() -> tuple[str | None, str | None]:
    """(torch's version, the CUDA version it was built for or None), read from torch/version.py without
    importing torch (seconds): a CPU build is refused at once. (None, None) where it cannot be read."""
    try:
        spec = importlib.util.find_spec("torch")
        values = {}
        for node in ast.parse(Path(spec.origin).with_name("version.py").read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    values[getattr(t, "id", "")] = node.value.value
        return values["__version__"], values.get("cuda")
    except Exception:  # noqa: BLE001 - an unusual install: torch itself answers, after its import
        return None, None


def refusal(args, version: str | None, cuda: str | None, gpu_visible: bool | None) -> str | None:
    """None if the run may start, else the one-line refusal: the rule, what was found, the fix.
    `gpu_visible` None: not asked yet (torch not imported)."""
    if args.device.startswith("cuda"):
        if version is not None and cuda is None:
            return (f"gpu_check: refused: this check runs on a CUDA GPU, but {sys.executable} has torch "
                    f"{version}, a CPU build. Fix: install a CUDA torch with `make install-gpu`, {FIX_CPU}.")
        if gpu_visible is False:
            return (f"gpu_check: refused: this check runs on a CUDA GPU, but torch {version} (CUDA "
                    f"{cuda}) sees none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; "
                    f"does `nvidia-smi` list one?). Fix: run it where a GPU is visible, {FIX_CPU}.")
    elif args.scale > CPU_MAX_SCALE:
        return (f"gpu_check: refused: --device {args.device} at --scale {args.scale:g} runs the 7B shapes on a CPU "
                f"(hours). Fix: run it on a GPU (`make install-gpu`, then `bash bench/gpu_check.sh`), {FIX_CPU}.")
    return None


if __name__ == "__main__":  # refused before torch loads, where its files already say it is a CPU build
    if _early := refusal(build_parser().parse_known_args()[0], *torch_build(), gpu_visible=None):
        print(_early, file=sys.stderr, flush=True)
        sys.exit(2)

import torch  # noqa: E402  (the rest of this project is imported where used, in each shape's process)


def torch_line() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build, no CUDA"
    return f"gpu_check: torch {torch.__version__} ({build}) in {sys.executable}"


def device_line(args) -> str:
    """The device, used once (a GPU that torch lists but cannot run on fails here, not minutes later)."""
    what = f"{args.dtype}, scale {args.scale:g}, budget {args.budget_s:g} s"
    if not args.device.startswith("cuda"):
        threads = args.threads or torch.get_num_threads()
        return (f"gpu_check: device {args.device}: {os.cpu_count()} cores, {threads} torch thread(s); {what}; "
                "the --cpu plumbing run: tiny shapes, no GPU figure")
    dev = torch.device(args.device)
    torch.ones(1, device=dev).add_(1).item()
    free, total = torch.cuda.mem_get_info(dev)
    cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    return (f"gpu_check: device {args.device}: {torch.cuda.get_device_name(dev)} (compute {cap}, "
            f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free), {torch.cuda.device_count()} visible; {what}")


# ----------------------------------------------------------------------------------------------
# The shapes


def _width(x: int, scale: float, step: int) -> int:
    return max(step, int(x * scale) // step * step)


def _vocab(real: int, scale: float, tok) -> int:
    """The real vocabulary size at full scale; shrunk with the model, never below the tokenizer."""
    return real if scale >= 1 else max(len(tok), int(real * scale)) // 64 * 64 + 64


def idefics2_8b_config(scale: float, tok):
    """Idefics2-8B's shape (Mistral-7B + SigLIP-so400m at 980 px + a 3-layer perceiver, 64 latents)."""
    from transformers import Idefics2Config

    hidden, v_hidden = _width(4096, scale, 64), _width(1152, scale, 64)
    heads = max(1, hidden // 128)
    return Idefics2Config(
        text_config=dict(model_type="mistral", vocab_size=_vocab(32003, scale, tok), hidden_size=hidden,
                         intermediate_size=_width(14336, scale, 16), num_hidden_layers=max(1, round(32 * scale)),
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=32768, rms_norm_eps=1e-5),
        vision_config=dict(model_type="idefics2_vision", hidden_size=v_hidden, intermediate_size=_width(4304, scale, 16),
                           num_hidden_layers=max(2, round(27 * scale)), num_attention_heads=max(1, v_hidden // 72),
                           image_size=980, patch_size=14),
        perceiver_config=dict(model_type="idefics2_perceiver", hidden_size=hidden, resampler_n_latents=64,
                              resampler_depth=3, resampler_n_heads=max(1, round(16 * scale)), resampler_head_dim=96,
                              num_key_value_heads=max(1, round(4 * scale))),
        tie_word_embeddings=False,
    )


def build(shape: str, scale: float, device: str, dtype: torch.dtype):
    """(model, processor, description): random weights on `device` in `dtype`, real image shapes."""
    from transformers import Idefics2ForConditionalGeneration, LlavaForConditionalGeneration

    from bench_extract import llava7b_config
    from manu_core import data as mdata
    from manu_core.arch import mlp_sites
    from manu_core.models import TinySpec, build_processor, train_tokenizer

    ds = mdata.build_dataset(n_profiles=60, n_celebrities=0)
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 4096)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<pad>", "<s>", "</s>")}
    if shape == "llava7b":
        cfg, cls = llava7b_config(scale), LlavaForConditionalGeneration
        cfg.text_config.vocab_size = _vocab(32064, scale, tok)
        cfg.image_token_id = ids["<image>"]
        processor = build_processor(TinySpec(arch="llava", image_size=336, patch=14), tok)
    else:
        cfg, cls = idefics2_8b_config(scale, tok), Idefics2ForConditionalGeneration
        cfg.image_token_id = ids["<image>"]
        processor = build_processor(TinySpec(arch="idefics2", image_size=980, patch=14), tok)
        processor.image_processor.size = {"longest_edge": 980, "shortest_edge": 378}
        processor.image_seq_len = 64
    for c in (cfg, cfg.text_config):
        c.pad_token_id, c.bos_token_id, c.eos_token_id = ids["<pad>"], ids["<s>"], ids["</s>"]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids["<pad>"], ids["</s>"]
    n_params = sum(p.numel() for p in model.parameters())
    n_units = sum(s.width for s in mlp_sites(model))
    text = cfg.text_config
    what = (f"{shape} x{scale:g}: {n_params / 1e9:.2f} B params, {text.num_hidden_layers} text layers x hidden "
            f"{text.hidden_size}, {cfg.vision_config.num_hidden_layers} vision layers, {n_units} MLP units")
    return model, processor, what


def _samples(n: int, form: str):
    from manu_core import data as mdata

    ds = mdata.build_dataset(n_profiles=60, n_celebrities=0)
    ss = [s for p in ds.profiles for s in mdata.samples(p) if s.form == form]
    return ss[:: max(1, len(ss) // n)][:n]


# ----------------------------------------------------------------------------------------------
# Measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    """Start a phase's peak memory: the GPU allocator's peak, or the process's peak RSS (Linux VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: _peak_gb then gives the process's peak so far


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 2**20
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def extraction_pass(model, batches, device, token_stats: bool) -> None:
    """One pass of what `extract.iter_stream` does per batch, tokenising aside: every live site for the
    image+text batches, the language sites for the text batches; set_batch, backbone forward, collect
    (the host copies, of the token statistics too when recorded)."""
    from manu_core.arch import get_adapter, mlp_sites
    from manu_core.extract import activation_hooks
    from manu_core.prompts import model_inputs

    sites = mlp_sites(model)
    backbone = model.get_submodule(get_adapter(model).backbone)
    groups = (([b for b in batches if "pixel_values" in b], sites),
              ([b for b in batches if "pixel_values" not in b], [s for s in sites if s.tower == "language"]))
    for group, ss in groups:
        if not group:
            continue
        with activation_hooks(model, ss, "mean", token_stats=token_stats) as rec:
            for enc in group:
                rec.set_batch(enc, device)
                backbone(**model_inputs(enc, device), use_cache=False)
                rec.collect()


def check_extraction(model, processor, args, say) -> None:
    from bench_extract import run_plain
    from manu_core.prompts import encode_samples

    half = args.n_batches // 2
    batches = [encode_samples(processor, _samples(args.batch_size * half, form)[i::half])
               for form in ("multimodal", "text") for i in range(half)]
    say(image_tokens_per_sample=int((batches[0]["input_ids"][0] == model.config.image_token_id).sum()),
        batches=f"{len(batches)} x {args.batch_size} ({half} image+text, {half} text)")
    device = torch.device(args.device)
    runs = {"plain": lambda: run_plain(model, batches, device),
            "means": lambda: extraction_pass(model, batches, device, token_stats=False),
            "default": lambda: extraction_pass(model, batches, device, token_stats=True)}
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:  # warm-up
        runs[k]()
    for r in range(args.repeats):  # interleaved, the order rotating, so drift hits all three alike
        for k in names[r % 3:] + names[: r % 3]:
            _sync(args.device)
            t0 = time.perf_counter()
            runs[k]()
            _sync(args.device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    say(plain_s=med["plain"])
    say(means_s=med["means"], means_ratio=med["means"] / med["plain"])
    say(extraction_s=med["default"], extraction_ratio=med["default"] / med["plain"])


def check_npo(model, processor, args, say) -> None:
    """One NPO step as `tasks.stages.baseline` runs it on a checkpoint (LoRA, batch 4, a frozen reference
    model beside the trained one). The trained copy is a deep copy, dropped after: the model measured
    next is untouched, also after an out-of-memory error, which is reported as the figure."""
    from manu_core.baselines import BaselineConfig, unlearn_gradient

    cfg = BaselineConfig("npo")
    forget = _samples(cfg.batch_size, "multimodal")
    trained = merged = None
    try:
        t0 = time.perf_counter()
        trained = copy.deepcopy(model)
        merged, curve = unlearn_gradient(trained, processor, forget, [], cfg, frozen=model, device=args.device,
                                         progress=False)
        _sync(args.device)
        say(npo_s=time.perf_counter() - t0, npo_loss=curve[0]["loss"], npo_steps=len(curve))
    except torch.OutOfMemoryError as e:
        say(npo_s=f"OUT OF MEMORY ({str(e).splitlines()[0][:120]})", npo_loss="", npo_steps=0)
    finally:
        del trained, merged  # the second copy: freed before the next phase's peak starts
        for p in model.parameters():  # unlearn_gradient froze the reference (this model)
            p.requires_grad_(True)
        model.eval()
        _free(args.device)


def check_evaluation(model, processor, args, say) -> None:
    from manu_core.evaluate import Request, generate_texts
    from manu_core.portraits import image_for
    from manu_core.prompts import build_prompt

    groups = [[Request(build_prompt(processor, s.question, image=form == "multimodal"),
                       (image_for(s.image),) if s.image else ()) for s in _samples(args.n_questions // 2, form)]
              for form in ("multimodal", "text")]

    def run(bs: int) -> list[str]:
        return [a for g in groups for a in generate_texts(model, processor, g, batch_size=bs,
                                                          max_new_tokens=args.max_new_tokens, device=args.device)]

    say(questions=args.n_questions)
    generate_texts(model, processor, groups[0][:2], batch_size=2, max_new_tokens=2, device=args.device)  # warm-up
    times: dict[int, float] = {}
    for bs, key in ((args.eval_batch_size, "batched_s"), (1, "one_at_a_time_s")):
        _sync(args.device)
        t0 = time.perf_counter()
        run(bs)
        _sync(args.device)
        times[bs] = time.perf_counter() - t0
        say(**{key: times[bs]})
    say(eval_speedup=times[1] / times[args.eval_batch_size])


def _disk_dtypes(folder: Path) -> tuple[set[str], float]:
    dtypes, size = set(), 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        size += f.stat().st_size
    return dtypes, size / 2**30


def check_prune_round_trip(model, processor, args, say) -> None:
    from manu_core.arch import mlp_sites
    from manu_core.models import load_model
    from manu_core.prune import prune_units, pruned_weights_are_zero, save_pruned

    g = torch.Generator().manual_seed(0)
    selection = [(s.tower, s.layer, int(u)) for s in mlp_sites(model)
                 for u in torch.randperm(s.width, generator=g)[: max(1, s.width // 50)]]
    prune_units(model, selection)
    say(units_pruned=len(selection), dtype_in=str(next(model.parameters()).dtype))
    out = Path(tempfile.mkdtemp(prefix="manu-gpu-check-", dir=args.tmp)) / "pruned"
    try:
        t0 = time.perf_counter()
        save_pruned(model, processor, selection, out)
        saved_s = time.perf_counter() - t0
        disk, gb = _disk_dtypes(out)
        say(dtype_on_disk=sorted(disk), disk_gb=gb)
        model.to("meta")  # free the device before the reload: one model at a time
        _free(args.device)
        t0 = time.perf_counter()
        loaded, _ = load_model(out, device=args.device)
        say(save_s=saved_s, load_s=time.perf_counter() - t0)
        say(dtype_reloaded=sorted({str(p.dtype) for p in loaded.parameters()}),
            zero_after_reload=pruned_weights_are_zero(loaded, selection))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# One shape (its own process), printed as measured


ROWS = [  # (label, key or keys, format), in the order measured
    ("peak memory is", "memory", "{}"), ("model", "model", "{}"), ("build (random init)", "build_s", "{:.1f} s"),
    ("image tokens per image+text sample", "image_tokens_per_sample", "{}"), ("extraction batches", "batches", "{}"),
    ("plain forward", "plain_s", "{:.3f} s"),
    ("extraction, means only", "means_s", "{:.3f} s"),
    ("extraction, token statistics (the pipeline's default)", "extraction_s", "{:.3f} s"),
    ("means only / plain forward", "means_ratio", "{:.3f}"),
    ("default extraction / plain forward (goal <= 1.05)", "extraction_ratio", "{:.3f}"),
    ("peak memory, extraction", "peak_gb_extraction", "{:.2f} GB"),
    ("NPO step (LoRA r16, batch 4, + frozen reference)", ("npo_s", "npo_loss"), "{:.1f} s, first loss {:.3f}"),
    ("peak memory, NPO step", "peak_gb_npo", "{:.2f} GB"),
    ("evaluation questions", "questions", "{}"), ("batched", "batched_s", "{:.2f} s"),
    ("one at a time", "one_at_a_time_s", "{:.2f} s"), ("batched speed-up (goal >= 10x)", "eval_speedup", "{:.1f}x"),
    ("peak memory, evaluation", "peak_gb_eval", "{:.2f} GB"),
    ("units pruned (2% per MLP)", "units_pruned", "{}"), ("dtype in memory", "dtype_in", "{}"),
    ("dtype on disk", "dtype_on_disk", "{}"), ("saved size", "disk_gb", "{:.2f} GB"),
    ("save / reload", ("save_s", "load_s"), "{:.1f} s / {:.1f} s"),
    ("dtype after reload", "dtype_reloaded", "{}"), ("pruned weights zero after reload", "zero_after_reload", "{}"),
    ("peak memory, save + reload", "peak_gb_prune", "{:.2f} GB"),
]


def _keys(key) -> tuple[str, ...]:
    return key if isinstance(key, tuple) else (key,)


def cell(fmt: str, values: list) -> str:
    """A row's value; a figure that is text (an out-of-memory report) is shown as it is."""
    if any(isinstance(v, str) and "{:." in fmt for v in values):
        return " ".join(str(v) for v in values if v != "")
    return fmt.format(*values)


class Figures(dict):
    """One shape's results. `say(...)` stores figures and prints each row the moment its last figure
    arrives, flushed: a run killed mid-way keeps every figure it measured."""

    def __init__(self, shape: str):
        super().__init__(shape=shape)

    def say(self, **figures) -> None:
        self.update(figures)
        for label, key, fmt in ROWS:
            keys = _keys(key)
            if figures.keys() & set(keys) and all(k in self for k in keys):
                print(f"{self['shape']:<12} {label}: {cell(fmt, [self[k] for k in keys])}", flush=True)


def one_shape(args) -> dict:
    import warnings

    import peft  # noqa: F401  (loaded before the clocks start: each figure times its own work only)
    from transformers.utils import logging as hf_logging

    import bench_extract  # noqa: F401
    from manu_core import baselines, evaluate, extract, models, prune  # noqa: F401

    hf_logging.disable_progress_bar()  # the save's and the reload's bars would break up the figures
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft's
    if args.threads:
        torch.set_num_threads(args.threads)
    res = Figures(args.shapes)
    res.say(memory="GPU: torch.cuda.max_memory_allocated per phase" if args.device.startswith("cuda")
            else "CPU: the process's peak RSS per phase (not a GPU figure)")
    t0 = time.perf_counter()
    _reset_peak(args.device)
    model, processor, what = build(args.shapes, args.scale, args.device, getattr(torch, args.dtype))
    res.say(model=what, build_s=time.perf_counter() - t0)
    with torch.inference_mode():
        check_extraction(model, processor, args, res.say)
    res.say(peak_gb_extraction=_peak_gb(args.device))
    _reset_peak(args.device)
    check_npo(model, processor, args, res.say)
    res.say(peak_gb_npo=_peak_gb(args.device))
    _reset_peak(args.device)
    with torch.inference_mode():
        check_evaluation(model, processor, args, res.say)
    res.say(peak_gb_eval=_peak_gb(args.device))
    _reset_peak(args.device)
    check_prune_round_trip(model, processor, args, res.say)
    res.say(peak_gb_prune=_peak_gb(args.device))
    return res


# ----------------------------------------------------------------------------------------------
# The run: one process per shape, their lines relayed as they come, the table at the end


def table(results: list[dict]) -> str:
    lines = ["| | " + " | ".join(r["shape"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for label, key, fmt in ROWS:
        cells = [cell(fmt, [r[k] for k in _keys(key)]) if all(k in r for k in _keys(key)) else "not measured"
                 for r in results]
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def run_shape(shape: str, argv: list[str], t0: float, budget_s: float) -> tuple[int, dict | None]:
    """(exit status, figures) of one shape's process; its lines are printed as they come, with the time
    since the check began. Stopped at the budget (exit 124): what it printed stays."""
    cmd = [sys.executable, __file__, *argv, "--shapes", shape, "--child"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    stopped = threading.Event()

    def stop():
        stopped.set()
        proc.kill()

    timer = threading.Timer(max(0.0, t0 + budget_s - time.perf_counter()), stop) if budget_s else None
    if timer:
        timer.start()
    result = None
    try:
        for line in proc.stdout:
            if line.startswith(JSON_TAG):
                result = json.loads(line[len(JSON_TAG):])
            else:
                print(f"[{time.perf_counter() - t0:4.0f} s] {line}", end="", flush=True)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    return (124 if stopped.is_set() else rc), result


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    visible = torch.cuda.is_available() if args.device.startswith("cuda") else None
    if why := refusal(args, torch.__version__, torch.version.cuda, visible):
        print(why, file=sys.stderr, flush=True)
        return 2
    if args.child:
        print(JSON_TAG + json.dumps(one_shape(args)), flush=True)
        return 0
    t0 = STARTED
    print(torch_line(), flush=True)
    print(device_line(args), flush=True)
    results = []
    for shape in shapes:  # one process per shape: its own peak memory, its memory freed after
        rc, res = run_shape(shape, argv, t0, args.budget_s)
        if res:
            results.append(res)
        if rc == 124:
            print(f"gpu_check: stopped during {shape} at the {args.budget_s:g} s budget (--budget-s); "
                  "the figures above are what was measured", file=sys.stderr, flush=True)
        elif rc:
            print(f"gpu_check: {shape} failed (exit {rc}); the output above says where", file=sys.stderr, flush=True)
        if rc:
            break
        print(f"[{time.perf_counter() - t0:4.0f} s] {shape} done", flush=True)
    if not results:
        return rc or 1
    print("\n" + table(results), flush=True)
    goals = all(r["extraction_ratio"] <= GOALS["extraction_ratio"] and r["eval_speedup"] >= GOALS["eval_speedup"]
                for r in results)
    sound = all(r["zero_after_reload"] and r["dtype_reloaded"] == [r["dtype_in"]]
                and r["dtype_on_disk"] == [{"torch.bfloat16": "BF16", "torch.float16": "F16"}.get(r["dtype_in"], "F32")]
                for r in results)
    npo = all(r["npo_steps"] == 1 for r in results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; speed goals {'met' if goals else 'NOT met'} (default extraction, "
          f"batched evaluation); pruned round trip {'sound' if sound else 'BROKEN'}; "
          f"NPO step {'ran' if npo else 'did NOT run (out of memory)'}", flush=True)
    return rc or (0 if sound and npo else 1)


if __name__ == "__main__":
    sys.exit(main())
