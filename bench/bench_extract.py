"""Benchmark: activation-extraction overhead = extraction time ÷ plain forward time, same batches.

    python bench/bench_extract.py                  # tiny LLaVA (TinySpec defaults), 20 batches x 32 real
                                                   # samples (10 multimodal, 10 text); target <= 1.10 on CPU
    python bench/bench_extract.py --shape llava7b --device cuda --dtype bfloat16 --batch-sizes 4,16
                                                   # LLaVA-1.5-7B shape, random weights; target <= 1.05
    python bench/bench_extract.py --shape llava7b --scale 0.05 --batch-sizes 2 --n-batches 4
                                                   # the same code path, shrunk to run on a CPU

Three timings per repeat, interleaved (the order rotates each repeat so drift hits all three alike):
  plain       `model(**batch)`: the forward a user would run (LM head included)
  backbone    the model's backbone without the LM head, no hooks (what extraction runs)
  extraction  `extract.activation_hooks` + backbone + per-sample reductions + the one host copy per
              batch (`set_batch`, forward, `collect`), i.e. everything `extract.iter_stream` does per
              batch except tokenising (batches are encoded once, before timing, for all three)
The headline is median(extraction) / median(plain); extraction / backbone is the hooks' own cost.
`--stats` picks what the hooks record besides the per-sample means: none (the headline's setting),
token (the token statistics `extract_activations` records by default) or position (also the released
mode's per-position statistics, `position_stats=True`); the target applies to none.
The 7B shape uses synthetic batches (random token ids, 576 image tokens per multimodal sample, 20-60
text tokens, right padding), since no tokenizer of that vocabulary exists offline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manu_core.arch import get_adapter, mlp_sites  # noqa: E402
from manu_core.extract import activation_hooks  # noqa: E402
from manu_core.prompts import encode_samples  # noqa: E402
from manu_core.prompts import model_inputs  # noqa: E402

TARGETS = {"cpu": 1.10, "cuda": 1.05}


# ----------------------------------------------------------------------------------------------
# Models and batches


def tiny_llava(n_batches: int, batch_size: int):
    from manu_core import data as mdata
    from manu_core.models import TinySpec, build_processor, build_tiny_model, train_tokenizer

    ds = mdata.build_dataset(n_profiles=60, n_celebrities=0)
    every = [s for p in ds.profiles for s in mdata.samples(p)]
    tok = train_tokenizer([f"{s.question} {s.answer}" for s in every], TinySpec().vocab_size)
    spec = TinySpec(arch="llava")
    model, proc = build_tiny_model(spec, tok).eval(), build_processor(spec, tok)
    batches = []
    for form in ("multimodal", "text"):
        ss = [s for s in every if s.form == form]
        n = n_batches // 2 if form == "multimodal" else n_batches - n_batches // 2
        if len(ss) < n * batch_size:
            raise SystemExit(f"only {len(ss)} {form} samples for {n} batches of {batch_size}; use fewer batches")
        batches += [encode_samples(proc, ss[i * batch_size : (i + 1) * batch_size]) for i in range(n)]
    return model, batches, f"tiny LLaVA (TinySpec defaults: {spec.layers} layers, hidden {spec.hidden})"


def llava7b_config(scale: float = 1.0):
    """LLaVA-1.5-7B's shape (Llama-2-7B + CLIP ViT-L/14-336), every width and depth times `scale`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    def width(x: int, step: int) -> int:
        return max(step, int(x * scale) // step * step)

    hidden, v_hidden = width(4096, 64), width(1024, 64)
    text = LlamaConfig(
        vocab_size=32064 if scale >= 1 else max(1024, int(32064 * scale)), hidden_size=hidden,
        intermediate_size=width(11008, 16), num_hidden_layers=max(1, round(32 * scale)),
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096, pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=v_hidden, intermediate_size=width(4096, 16), num_hidden_layers=max(2, round(24 * scale)),
        num_attention_heads=max(1, v_hidden // 64), image_size=336, patch_size=14, projection_dim=768,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=text.vocab_size - 64, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def llava7b(n_batches: int, batch_size: int, scale: float, device: str, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    cfg = llava7b_config(scale)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    image_id, n_img = cfg.image_token_id, cfg.image_seq_length
    batches = []
    for i in range(n_batches):
        multimodal = i < n_batches // 2
        lens = torch.randint(20, 61, (batch_size,), generator=g)
        total = lens + (n_img if multimodal else 0)
        t = int(total.max())
        ids = torch.zeros(batch_size, t, dtype=torch.long)
        attn = torch.zeros(batch_size, t, dtype=torch.long)
        for b in range(batch_size):
            row = torch.randint(1, image_id, (int(lens[b]),), generator=g)
            if multimodal:  # "USER: <image>\n...": the image tokens after a few text tokens
                row = torch.cat([row[:4], torch.full((n_img,), image_id), row[4:]])
            ids[b, : row.numel()] = row
            attn[b, : row.numel()] = 1
        batch = {"input_ids": ids, "attention_mask": attn}
        if multimodal:
            batch["pixel_values"] = torch.randn(batch_size, 3, 336, 336, generator=g)
        batches.append(batch)
    sites = mlp_sites(model)
    n_units = sum(s.width for s in sites)
    name = (f"LLaVA-1.5-7B shape x{scale:g} ({cfg.text_config.num_hidden_layers} text layers, hidden "
            f"{cfg.text_config.hidden_size}; {cfg.vision_config.num_hidden_layers} vision layers; {n_units} units), random weights")
    return model, batches, name


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(model, batches, device):
    for enc in batches:
        model(**model_inputs(enc, device), use_cache=False)


def run_backbone(model, batches, device):
    backbone = model.get_submodule(get_adapter(model).backbone)
    for enc in batches:
        backbone(**model_inputs(enc, device), use_cache=False)


def _one_batch(rec, model, backbone, enc, device):
    rec.set_batch(enc, device)
    backbone(**model_inputs(enc, device), use_cache=False)
    rec.collect()


STATS = {"none": {}, "token": {"token_stats": True}, "position": {"token_stats": True, "position_stats": True}}


def bench(model, batches, device, repeats: int, stats: str = "none") -> dict[str, list[float]]:
    mm = [b for b in batches if "pixel_values" in b]
    txt = [b for b in batches if "pixel_values" not in b]
    sites = mlp_sites(model)
    backbone = model.get_submodule(get_adapter(model).backbone)

    def extraction():
        # what iter_stream does per stream: hooks on every live site for images, language-only for text
        for group, ss in ((mm, sites), (txt, [s for s in sites if s.tower == "language"])):
            if not group:
                continue
            with activation_hooks(model, ss, "mean", **STATS[stats]) as rec:
                for enc in group:
                    _one_batch(rec, model, backbone, enc, device)

    runs = {"plain": lambda: run_plain(model, mm + txt, device),
            "backbone": lambda: run_backbone(model, mm + txt, device),
            "extraction": extraction}
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for k in names:  # warm-up
            runs[k]()
        for r in range(repeats):
            for k in names[r % 3:] + names[: r % 3]:
                sync(device)
                t0 = time.perf_counter()
                runs[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("tiny", "llava7b"), default="tiny")
    ap.add_argument("--scale", type=float, default=1.0, help="llava7b: multiply widths and depths (e.g. 0.05 on a CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="32")
    ap.add_argument("--n-batches", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--stats", choices=tuple(STATS), default="none",
                    help="what the hooks record besides the means (module docstring); the target is for none")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    target = TARGETS.get(device.type, TARGETS["cuda"])
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"bench_extract: device {device} ({where}), dtype {args.dtype}, torch {torch.__version__}, "
          f"hooks record: means{'' if args.stats == 'none' else ' + ' + args.stats + ' statistics'}")
    ok = True
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        if args.shape == "tiny":
            model, batches, name = tiny_llava(args.n_batches, bs)
            model.to(device=device, dtype=dtype)
        else:
            model, batches, name = llava7b(args.n_batches, bs, args.scale, args.device, dtype)
        n_mm = sum("pixel_values" in b for b in batches)
        times = bench(model, batches, device, args.repeats, args.stats)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["extraction"] / med["plain"]
        paired = statistics.median(e / p for e, p in zip(times["extraction"], times["plain"]))
        ok &= ratio <= target or args.stats != "none"
        print(f"\n{name}\n  {len(batches)} batches x {bs} samples ({n_mm} multimodal, {len(batches) - n_mm} text), "
              f"{args.repeats} repeats, median seconds per pass:")
        print(f"  plain forward  model(**batch)      {med['plain']:8.3f} s")
        print(f"  backbone forward (no LM head)      {med['backbone']:8.3f} s")
        print(f"  extraction (hooks + reductions)    {med['extraction']:8.3f} s")
        verdict = f"target <= {target:.2f}: {'PASS' if ratio <= target else 'FAIL'}" if args.stats == "none" else "no target"
        print(f"  extraction / plain forward         {ratio:8.3f}   (paired median {paired:.3f}; {verdict})")
        print(f"  extraction / backbone forward      {med['extraction'] / med['backbone']:8.3f}   (the hooks' own cost)")
        del model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
