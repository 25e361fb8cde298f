"""GPU check: real-shaped LLaVA-1.5-7B and Idefics2-8B through this project's own code paths.

    bash bench/gpu_check.sh                       # one GPU: both shapes, full size, bfloat16 (< 8 min)
    python bench/gpu_check.py --shapes llava7b --scale 0.02 --device cpu   # the same path, shrunk (tests)

Each shape is built from its published config with random weights (no download) and runs in its own
process (so peak memory is per shape). The processor is the real one with the real image shapes:
LLaVA-1.5 (CLIP 336 px, patch 14, 576 image tokens), Idefics2-8B (SigLIP, shortest edge 378 / longest
980, patch 14, 64 perceiver tokens per image, no image splitting); its tokenizer is a byte-level BPE
trained here on the embedded profiles (the real vocabularies are not on disk), so prompts are real
benchmark questions with the embedded stand-in portraits. Printed, side by side:

  extraction / plain forward   `extract.activation_hooks` + backbone + per-sample reductions vs
                               `model(**batch)`, same batches, interleaved repeats (goal <= 1.05)
  batched / one at a time      `evaluate.generate_texts` at batch size B vs 1, same questions, greedy
                               (goal >= 10x)
  peak memory                  GPU: torch.cuda.max_memory_allocated; CPU: the process's max RSS
  pruned round trip            2% of every MLP's units zeroed (`prune.prune_units`), saved with
                               `prune.save_pruned`, reloaded with `models.load_model`: dtype on disk
                               and after reload, pruned weights still zero, seconds and GB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import bench as time_extraction  # noqa: E402
from bench_extract import llava7b_config  # noqa: E402

from manu_core import data as mdata  # noqa: E402
from manu_core.arch import mlp_sites  # noqa: E402
from manu_core.evaluate import Request, generate_texts  # noqa: E402
from manu_core.models import build_processor, load_model, TinySpec, train_tokenizer  # noqa: E402
from manu_core.portraits import image_for  # noqa: E402
from manu_core.prompts import build_prompt, encode_samples  # noqa: E402
from manu_core.prune import prune_units, pruned_weights_are_zero, save_pruned  # noqa: E402

SHAPES = ("llava7b", "idefics2-8b")
GOALS = {"extraction_ratio": 1.05, "eval_speedup": 10.0}
JSON_TAG = "GPU_CHECK_JSON="


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


def _samples(n: int, form: str) -> list[mdata.Sample]:
    ds = mdata.build_dataset(n_profiles=60, n_celebrities=0)
    ss = [s for p in ds.profiles for s in mdata.samples(p) if s.form == form]
    return ss[:: max(1, len(ss) // n)][:n]


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_extraction(model, processor, args) -> dict:
    batches = [encode_samples(processor, _samples(args.batch_size * args.n_batches // 2, form)[i::args.n_batches // 2])
               for form in ("multimodal", "text") for i in range(args.n_batches // 2)]
    image_tokens = int((batches[0]["input_ids"][0] == model.config.image_token_id).sum())
    times = time_extraction(model, batches, torch.device(args.device), args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"image_tokens_per_sample": image_tokens, "plain_s": med["plain"], "extraction_s": med["extraction"],
            "extraction_ratio": med["extraction"] / med["plain"],
            "batches": f"{len(batches)} x {args.batch_size} ({args.n_batches // 2} image+text, {args.n_batches // 2} text)"}


def check_evaluation(model, processor, args) -> dict:
    groups = [[Request(build_prompt(processor, s.question, image=form == "multimodal"),
                       (image_for(s.image),) if s.image else ()) for s in _samples(args.n_questions // 2, form)]
              for form in ("multimodal", "text")]

    def run(bs: int) -> list[str]:
        return [a for g in groups for a in generate_texts(model, processor, g, batch_size=bs,
                                                          max_new_tokens=args.max_new_tokens, device=args.device)]

    generate_texts(model, processor, groups[0][:2], batch_size=2, max_new_tokens=2, device=args.device)  # warm-up
    times: dict[int, float] = {}
    for bs in (args.eval_batch_size, 1):
        _sync(args.device)
        t0 = time.perf_counter()
        run(bs)
        _sync(args.device)
        times[bs] = time.perf_counter() - t0
    return {"questions": args.n_questions, "batched_s": times[args.eval_batch_size], "one_at_a_time_s": times[1],
            "eval_speedup": times[1] / times[args.eval_batch_size]}


def _disk_dtypes(folder: Path) -> tuple[set[str], float]:
    dtypes, size = set(), 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        size += f.stat().st_size
    return dtypes, size / 2**30


def check_prune_round_trip(model, processor, args) -> dict:
    g = torch.Generator().manual_seed(0)
    selection = [(s.tower, s.layer, int(u)) for s in mlp_sites(model)
                 for u in torch.randperm(s.width, generator=g)[: max(1, s.width // 50)]]
    prune_units(model, selection)
    out = Path(tempfile.mkdtemp(prefix="manu-gpu-check-", dir=args.tmp)) / "pruned"
    try:
        t0 = time.perf_counter()
        save_pruned(model, processor, selection, out)
        saved_s = time.perf_counter() - t0
        disk, gb = _disk_dtypes(out)
        dtype_in = str(next(model.parameters()).dtype)
        model.to("meta")  # free the device before the reload: one model at a time
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        loaded, _ = load_model(out, device=args.device)
        loaded_s = time.perf_counter() - t0
        return {"units_pruned": len(selection), "dtype_in": dtype_in, "dtype_on_disk": sorted(disk),
                "dtype_reloaded": sorted({str(p.dtype) for p in loaded.parameters()}), "disk_gb": gb,
                "zero_after_reload": pruned_weights_are_zero(loaded, selection), "save_s": saved_s, "load_s": loaded_s}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def one_shape(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, processor, what = build(args.shapes, args.scale, args.device, dtype)
    res = {"shape": args.shapes, "model": what, "build_s": time.perf_counter() - t0}
    with torch.inference_mode():
        res |= check_extraction(model, processor, args)
        res |= check_evaluation(model, processor, args)
    res["peak_gb_before_prune"] = _peak_gb(args.device)
    res |= check_prune_round_trip(model, processor, args)
    res["peak_gb"] = _peak_gb(args.device)
    return res


ROWS = [  # (label, key, format)
    ("model", "model", "{}"), ("build (random init)", "build_s", "{:.1f} s"),
    ("image tokens per image+text sample", "image_tokens_per_sample", "{}"), ("extraction batches", "batches", "{}"),
    ("plain forward", "plain_s", "{:.3f} s"), ("extraction", "extraction_s", "{:.3f} s"),
    ("extraction / plain forward (goal <= 1.05)", "extraction_ratio", "{:.3f}"),
    ("evaluation questions", "questions", "{}"), ("one at a time", "one_at_a_time_s", "{:.2f} s"),
    ("batched", "batched_s", "{:.2f} s"), ("batched speed-up (goal >= 10x)", "eval_speedup", "{:.1f}x"),
    ("peak memory before pruning", "peak_gb_before_prune", "{:.1f} GB"), ("peak memory", "peak_gb", "{:.1f} GB"),
    ("units pruned (2% per MLP)", "units_pruned", "{}"), ("dtype in memory", "dtype_in", "{}"),
    ("dtype on disk", "dtype_on_disk", "{}"), ("dtype after reload", "dtype_reloaded", "{}"),
    ("pruned weights zero after reload", "zero_after_reload", "{}"), ("saved size", "disk_gb", "{:.2f} GB"),
    ("save / reload", ("save_s", "load_s"), "{:.1f} s / {:.1f} s"),
]


def table(results: list[dict]) -> str:
    lines = ["| | " + " | ".join(r["shape"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for label, key, fmt in ROWS:
        cells = [fmt.format(*(r[k] for k in key)) if isinstance(key, tuple) else fmt.format(r[key]) for r in results]
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every width and depth (e.g. 0.02 on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16, help="extraction batch size")
    ap.add_argument("--n-batches", type=int, default=8, help="extraction batches (half image+text, half text)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-questions", type=int, default=64, help="evaluation questions (half image+text, half text)")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tmp", default=None, help="where the pruned model is saved and reloaded (default: $TMPDIR)")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU here; use --device cpu with a small --scale (e.g. 0.02)")
    if len(shapes) == 1:
        print(JSON_TAG + json.dumps(one_shape(args)), flush=True)
        return 0
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"gpu_check: {where}, torch {torch.__version__}, {args.dtype}, scale {args.scale:g}", flush=True)
    results, t0 = [], time.perf_counter()
    for shape in shapes:  # one process per shape: its own peak memory, its memory freed after
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--shapes", shape]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode:
            print(out.stdout[-3000:])
            print(f"gpu_check: {shape} failed (exit {out.returncode}); the output above says where", file=sys.stderr)
            return out.returncode
        results.append(json.loads([l for l in out.stdout.splitlines() if l.startswith(JSON_TAG)][-1][len(JSON_TAG):]))
        print(f"  {shape} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(results))
    goals = all(r["extraction_ratio"] <= GOALS["extraction_ratio"] and r["eval_speedup"] >= GOALS["eval_speedup"]
                for r in results)
    sound = all(r["zero_after_reload"] and r["dtype_reloaded"] == [r["dtype_in"]]
                and r["dtype_on_disk"] == [{"torch.bfloat16": "BF16", "torch.float16": "F16"}.get(r["dtype_in"], "F32")]
                for r in results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; speed goals {'met' if goals else 'NOT met'}; "
          f"pruned round trip {'sound' if sound else 'BROKEN'}")
    return 0 if sound else 1


if __name__ == "__main__":
    sys.exit(main())
