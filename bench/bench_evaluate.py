"""Benchmark: batched evaluation vs one question at a time, same model, same questions, one run.

    python bench/bench_evaluate.py                   # lite preset's tiny LLaVA, 64 generation questions
                                                     # (32 image+text, 32 text), 50 new tokens; target >= 5x
    python bench/bench_evaluate.py --model tiny --n 32
    python bench/bench_evaluate.py --shape llava7b --device cuda --dtype float16 --batch-size 32
                                                     # LLaVA-1.5-7B shape, random weights, synthetic prompts
                                                     # (576 image tokens + 20-60 text tokens); target >= 10x
    python bench/bench_evaluate.py --shape llava7b --scale 0.05 --n 8 --batch-size 8
                                                     # the same code path, shrunk to run on a CPU

Tiny shape: the real evaluation path, `evaluate.generate_texts` over chat-formatted prompts of the
embedded items (portraits included), batch size B vs 1; the answers of both are compared (they must
agree: greedy decoding, left padding). 7B shape: `model.generate` on synthetic left-padded batches,
`min_new_tokens = max_new_tokens` so a random model generates the full length in both modes.
Each mode runs `--repeats` times, interleaved; the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from manu_core import data as mdata  # noqa: E402
from manu_core.evaluate import Request, generate_texts  # noqa: E402
from manu_core.portraits import image_for  # noqa: E402
from manu_core.prompts import build_prompt  # noqa: E402
from manu_core.scoring import gen_prompt  # noqa: E402

TARGETS = {"cpu": 5.0, "cuda": 10.0}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tiny_case(args):
    from manu_core.models import load_model
    from manu_core.presets import get_preset, preset_dataset, resolve_model
    from tasks.cache import models_dir

    model_dir = resolve_model(args.model, models=models_dir())
    model, processor = load_model(model_dir, device=args.device)
    items = [it for it in mdata.eval_items(preset_dataset(get_preset(args.model))) if it.task == "gen"
             and it.set == "retain"]
    half = args.n // 2
    chosen = [it for it in items if it.form == "multimodal"][:half] + [it for it in items if it.form == "text"][:half]
    reqs = [Request(build_prompt(processor, gen_prompt(it.question) if args.instructions else it.question,
                                 image=it.image is not None),
                    (image_for(it.image),) if it.image else ()) for it in chosen]
    groups = [[r for r in reqs if r.images], [r for r in reqs if not r.images]]

    def run(bs: int) -> list[str]:
        out = []
        for g in groups:  # one form per batch, as evaluate_unit runs them
            out += generate_texts(model, processor, g, batch_size=bs, max_new_tokens=args.max_new_tokens,
                                  device=args.device)
        return out

    name = f"{args.model} preset ({model_dir.name}), {len(reqs)} questions ({half} image+text, {half} text)"
    return run, name


def llava7b_case(args):
    from bench_extract import llava7b_config
    from transformers import LlavaForConditionalGeneration

    cfg = llava7b_config(args.scale)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    image_id, n_img = cfg.image_token_id, cfg.image_seq_length
    prompts = []
    for i in range(args.n):
        multimodal = i < args.n // 2
        row = torch.randint(1, image_id, (int(torch.randint(20, 61, (1,), generator=g)),), generator=g)
        if multimodal:
            row = torch.cat([row[:4], torch.full((n_img,), image_id), row[4:]])
        prompts.append((row, torch.randn(3, 336, 336, generator=g, dtype=torch.float32) if multimodal else None))

    @torch.no_grad()
    def run(bs: int) -> list[list[int]]:
        out = []
        for group in ([p for p in prompts if p[1] is not None], [p for p in prompts if p[1] is None]):
            for s in range(0, len(group), bs):
                chunk = group[s : s + bs]
                t = max(r.numel() for r, _ in chunk)
                ids = torch.zeros(len(chunk), t, dtype=torch.long)
                attn = torch.zeros(len(chunk), t, dtype=torch.long)
                for b, (r, _) in enumerate(chunk):  # left padding
                    ids[b, t - r.numel():], attn[b, t - r.numel():] = r, 1
                kw = {"input_ids": ids.to(args.device), "attention_mask": attn.to(args.device)}
                if chunk[0][1] is not None:
                    kw["pixel_values"] = torch.stack([p for _, p in chunk]).to(args.device, dtype)
                gen = model.generate(**kw, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=0)
                out += gen[:, t:].tolist()
        return out

    name = (f"LLaVA-1.5-7B shape x{args.scale:g} ({cfg.text_config.num_hidden_layers} text layers, hidden "
            f"{cfg.text_config.hidden_size}), random weights, {args.dtype}, {args.n} synthetic prompts")
    return run, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=("tiny", "llava7b"), default="tiny")
    ap.add_argument("--model", default="lite", help="tiny shape: embedded preset")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=64, help="questions (half image+text, half text)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    ap.add_argument("--instructions", action="store_true", help="tiny shape: append the benchmark's generation "
                    "instruction (the tiny models never saw it and ramble; default: bare questions, as they are evaluated)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run, name = (tiny_case if args.shape == "tiny" else llava7b_case)(args)
    run(args.batch_size)  # warm-up (allocations, caches)
    times: dict[int, list[float]] = {args.batch_size: [], 1: []}
    answers = {}
    for r in range(args.repeats):
        for bs in ((args.batch_size, 1) if r % 2 == 0 else (1, args.batch_size)):
            sync(args.device)
            t0 = time.perf_counter()
            answers[bs] = run(bs)
            sync(args.device)
            times[bs].append(time.perf_counter() - t0)
    batched, single = statistics.median(times[args.batch_size]), statistics.median(times[1])
    same = sum(a == b for a, b in zip(answers[args.batch_size], answers[1]))
    target = TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]
    print(f"model: {name}")
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, greedy, {args.max_new_tokens} new tokens")
    print(f"one at a time : {single:8.2f} s  ({args.n / single:7.1f} q/s)   runs: {[round(t, 2) for t in times[1]]}")
    print(f"batch size {args.batch_size:<3}: {batched:8.2f} s  ({args.n / batched:7.1f} q/s)   runs: "
          f"{[round(t, 2) for t in times[args.batch_size]]}")
    print(f"speed-up batched / one at a time: {single / batched:.1f}x (target >= {target:g}x)")
    print(f"identical answers batched vs one at a time: {same}/{len(answers[1])}")


if __name__ == "__main__":
    main()
