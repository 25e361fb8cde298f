"""Benchmark: the Polars importance step on synthetic activations shaped like LLaVA-1.5-7B.

Default shape: language 32 layers x 11,008 units in 4 streams (forget/retain x multimodal/text),
vision 23 layers x 4,096 units in the 2 multimodal streams, 1,500 samples per stream (~9.6 GB of
float32 activations; the token statistics, on by default, add one small totals file per part).

In one subprocess, times `manu_core.importance.neuron_sums` twice: as the pipeline runs it (the part
files' footer totals added up, no activation read) and reading the activation column
(`use_totals=False`: what a store without footer totals, or another τ, costs), checks that the two
agree, then times `importance_table` for each scoring mode: paper, released, released with
pool_layers, selective (one-shot). Each mode's cost is "sums + table" (what `compute_importance` runs),
compared with the 60 s target. The writer's share (computing the footer totals while it writes the
parts) is timed on one part and scaled to the store. A numpy reference (pyarrow reads the activation column, numpy computes
the sums and the paper formulas) runs in its own subprocess, so peak RSS do not mix, and must agree
with the paper mode. Prints time, peak RSS (per step and overall) and the polars/numpy ratio.

    python bench/bench_importance.py                       # full size (target: <= 60 s on 2 cores)
    python bench/bench_importance.py --samples 200 --lang-layers 2 --lang-units 512 --vision-layers 2 --vision-units 256
    python bench/bench_importance.py --no-token-stats      # the store without token statistics (paper mode only)
    python bench/bench_importance.py --formulations        # also time alternative Polars formulations
    python bench/bench_importance.py --linear-outputs      # the released code's hook sites (option linear_outputs)

--linear-outputs generates the store of the MLP Linears' outputs instead (store.py, "Linear outputs"):
per language layer gate_proj 11,008 + up_proj 11,008 + down_proj 4,096 units, per vision layer fc1
4,096 + fc2 1,024 (LLaVA-1.5-7B), with its modules.json, under its own --root; it times the released
mode with linear_outputs (per layer and with pool_layers). The paper, selective and numpy-reference
steps are the hidden-unit store's (they refuse a Linear-output store), so they are not run there.

The synthetic folder is generated once (seeded) under --root and reused while its manifest matches
(shape, seed and --token-stats: changing any regenerates it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manu_core.store import (  # noqa: E402
    FORMS, SPLITS, ActivationStoreError, check_complete, inspect_activations, partition_dir, write_layout,
    write_partition,
)

TARGET_S = 60.0
# --linear-outputs: the Linears of LLaVA-1.5-7B's MLPs and their output widths, in storage order
LINEAR_OUTPUTS = {"language": [("gate_proj", 11008), ("up_proj", 11008), ("down_proj", 4096)],
                  "vision": [("fc1", 4096), ("fc2", 1024)]}
MANIFEST = "bench_manifest.json"
DEFAULT_ROOT = "artifacts/bench/importance_llava7b"


def streams(tower: str) -> list[tuple[str, str]]:
    return [(s, f) for s in SPLITS for f in FORMS if not (tower == "vision" and f == "text")]


def generate(args: argparse.Namespace, root: Path) -> None:
    """Seeded synthetic activations: per-unit offset and scale, a form shift on some units, a forget shift on others.

    With --token-stats, each sample also gets a token count (uniform 40..600) and token sums drawn as if
    its tokens were a_t ~ N(z, s_u²) with a per-unit token spread s_u = 1.5..4 x the unit's scale:
    Σ|a| ≈ T·sqrt(z² + 0.64 s²), Σa² = T·(z² + s²) (so (Σ|a|)² <= T·Σa²), #(a > 0) = T·clip(0.5 + 0.4 z/s),
    #(|a| > 0.1) = T·(1 − exp(−(z² + s²)/0.02)), counts rounded and <= T. Plausible, not exact; the
    activations themselves are the same as without token statistics (separate random streams).
    """
    config = {k: getattr(args, k) for k in ("samples", "lang_layers", "lang_units", "vision_layers", "vision_units", "part_rows", "seed",
                                            "token_stats")}
    config["linear_outputs"] = args.linear_outputs
    config["store_format"] = 3  # 3: sample totals in the file's key-value metadata (2: in the schema; 1: none)
    manifest = root / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == config:  # written last: generation finished
        try:
            summary = inspect_activations(root)
            check_complete(summary)
            if len(summary.partitions) == 2 * (2 * args.lang_layers + args.vision_layers):
                print(f"reusing {root}")
                return
        except ActivationStoreError as e:
            print(f"regenerating {root}: {e}")
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    towers = {"language": (args.lang_layers, args.lang_units), "vision": (args.vision_layers, args.vision_units)}
    for ti, (tower, (layers, units)) in enumerate(towers.items()):
        for layer in range(layers):
            rng = np.random.default_rng([args.seed, ti, layer])
            mu = rng.normal(0, 0.05, units).astype(np.float32)
            sigma = rng.uniform(0.02, 0.2, units).astype(np.float32)
            form_shift = (rng.random(units) < 0.1) * rng.normal(0, 0.1, units).astype(np.float32)
            forget_shift = (rng.random(units) < 0.02) * rng.normal(0, 0.2, units).astype(np.float32)
            tok_sigma = (sigma * np.random.default_rng([args.seed, ti, layer, 99]).uniform(1.5, 4.0, units)).astype(np.float32)
            tok_var = tok_sigma * tok_sigma
            for si, (split, form) in enumerate(streams(tower)):
                srng = np.random.default_rng([args.seed, ti, layer, 1 + si])
                trng = np.random.default_rng([args.seed, ti, layer, 1 + si, 7])  # token counts: x stays as without them
                shift = mu + (form_shift if form == "text" else 0) + (forget_shift if split == "forget" else 0)
                for part, start in enumerate(range(0, args.samples, args.part_rows)):
                    n = min(args.part_rows, args.samples - start)
                    x = srng.standard_normal((n, units), dtype=np.float32)
                    x *= sigma
                    x += shift
                    ids = [f"{split}-{form}-{i:05d}" for i in range(start, start + n)]
                    extra = token_stats(trng, x, tok_sigma, tok_var) if args.token_stats else {}
                    write_partition(root, split=split, form=form, tower=tower, layer=layer, sample_ids=ids,
                                    profile_ids=[f"p{i // 15:04d}" for i in range(start, start + n)], activations=x, part=part,
                                    **extra)
        print(f"  generated {tower}: {layers} layers x {units} units ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.linear_outputs:
        write_layout(root, LINEAR_OUTPUTS)
    manifest.write_text(json.dumps(config))


def token_stats(rng: np.random.Generator, x: np.ndarray, tok_sigma: np.ndarray, tok_var: np.ndarray) -> dict:
    """write_partition's tokens, token_stats and max_abs for per-sample means x (n, units); see generate."""
    n = len(x)
    tokens = rng.integers(40, 601, n)
    t = tokens.astype(np.float32)[:, None]
    z2 = x * x
    m2 = z2 + tok_var  # mean a² over the tokens
    stats = {
        "abs": np.sqrt(z2 + np.float32(0.64) * tok_var) * t,
        "sq": m2 * t,
        "pos": np.rint(np.clip(np.float32(0.5) + np.float32(0.4) * x / tok_sigma, 0.02, 0.98) * t),
        "active": np.rint(-np.expm1(m2 / np.float32(-0.02)) * t),
    }
    max_abs = float(np.abs(x).max() + 4 * tok_sigma.max())
    return {"tokens": tokens, "token_stats": stats, "max_abs": max_abs}


# ----------------------------------------------------------------------------------------------
# The two measured runs (each in its own subprocess)


MODES = [  # (label, mode, options): the importance_table calls timed after one neuron_sums
    ("paper", "paper", {}),
    ("released", "released", {}),
    ("released pool_layers", "released", {"pool_layers": True}),
    ("selective (one-shot)", "selective", {}),
]
OUTPUT_MODES = [  # the same on a Linear-output store (--linear-outputs)
    ("released linear_outputs", "released", {"linear_outputs": True}),
    ("released lin.out. pooled", "released", {"linear_outputs": True, "pool_layers": True}),
]


def _hwm_mib() -> float:
    """This process's peak RSS (VmHWM) since its exec or the last _reset_hwm."""
    kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return kib / 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: '5' > /proc/self/clear_refs), so each step gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_polars(root: Path, alpha: float, out: Path, linear_outputs: bool = False) -> dict:
    """neuron_sums once, then importance_table per mode; writes the paper table to `out`; returns timings."""
    import polars as pl

    from manu_core.importance import ImportanceParams, importance_table, neuron_sums

    from manu_core.store import ROW_GROUP_SIZE, _sample_totals

    steps: dict[str, dict] = {}
    tau = ImportanceParams(alpha=alpha).tau
    reset = _reset_hwm()
    t0 = time.perf_counter()
    read = neuron_sums(root, tau, use_totals=False)
    steps["read"] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _hwm_mib() if reset else None}
    reset = _reset_hwm()
    t0 = time.perf_counter()
    sums = neuron_sums(root, tau)
    steps["sums"] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _hwm_mib() if reset else None}
    cols = ["sum", "sum_abs", "sum_sq", "count_active"]
    a, b = sums.select(cols).to_numpy(), read.select(cols).to_numpy()
    steps["read"]["max_rel_diff"] = float((np.abs(a - b) / np.maximum(np.abs(b), 1e-300)).max())
    steps["read"]["same_counts"] = bool(sums["count_active"].equals(read["count_active"]))
    del read
    # The writer's share: footer totals of one language part (best of 3), scaled by the store's values.
    first = sorted(root.glob("split=forget/form=multimodal/tower=language/layer=0/part-*.parquet"))[0]
    x = pl.read_parquet(first, columns=["activation"])["activation"].to_numpy()
    t = min(_timed(lambda: _sample_totals(x)) for _ in range(3))
    values = sum(int(n) * int(w) for n, w in sums.group_by("split", "form", "tower", "layer").agg(
        pl.col("count").first(), pl.len()).select("count", "len").iter_rows())
    steps["write"] = {"seconds": t * values / x.size, "part": list(x.shape), "row_block": ROW_GROUP_SIZE}
    has_tokens = sums["tokens"].null_count() == 0
    steps["sums"]["token_stats"] = bool(has_tokens)
    steps["sums"]["rows"] = len(sums)
    for label, mode, options in (OUTPUT_MODES if linear_outputs else MODES):
        if mode != "paper" and not has_tokens:
            continue  # released and selective need the token statistics
        params = ImportanceParams(alpha=alpha, mode=mode, options=options)
        reset = _reset_hwm()
        t = time.perf_counter()
        df = importance_table(sums, params)
        seconds = time.perf_counter() - t
        steps[label] = {"seconds": seconds, "peak_rss_mib": _hwm_mib() if reset else None,
                        "selected": int(df["selected"].sum()), "scored": int(df["score"].is_not_null().sum())}
        if mode == "paper":
            df.select("tower", "layer", "unit", "score", "selected").write_parquet(out)
        del df
    return steps


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def numpy_reference(root: Path, alpha: float, eps: float = 1e-5, tau: float = 0.1) -> dict[str, np.ndarray]:
    """Independent reference: pyarrow reads each part, numpy sums in float64, method.md formulas, global top-α."""
    import pyarrow.parquet as pq

    stats: dict[tuple, np.ndarray] = {}  # (split, form, tower, layer) -> (4, units): A, N, V, Q
    for d in sorted(root.glob("split=*/form=*/tower=*/layer=*")):
        key = tuple(p.split("=")[1] for p in d.relative_to(root).parts)
        sums = None
        for f in sorted(d.glob("part-*.parquet")):
            col = pq.read_table(f, columns=["activation"]).column("activation").combine_chunks()
            x = col.values.to_numpy().reshape(len(col), -1).astype(np.float64)  # (n, units)
            s = np.stack([np.full(x.shape[1], len(x), np.float64), np.abs(x).sum(0), x.sum(0), np.square(x).sum(0),
                          (np.abs(x) > tau).sum(0)])
            sums = s if sums is None else sums + s
        count, sa, s1, s2, na = sums
        stats[(key[0], key[1], key[2], int(key[3]))] = np.stack(
            [sa / count, na, np.maximum(s2 / count - (s1 / count) ** 2, 0), s2 / count])
    tower_rank = {"language": 0, "vision": 1}
    keys = sorted({(t, l) for (_, _, t, l) in stats}, key=lambda k: (tower_rank[k[0]], k[1]))
    imp = {}
    for split in SPLITS:
        per_layer = []
        for t, l in keys:
            m = stats[(split, "multimodal", t, l)]
            tx = stats.get((split, "text", t, l), np.zeros_like(m))  # vision: text stats are 0
            (am, nm, vm, qm), (at, nt, vt, qt) = m, tx
            per_layer.append(np.abs(am - at) / (am + at + eps) + np.abs(nm - nt) / (nm + nt + eps)
                             + np.sqrt(vm + vt) + np.sqrt(np.abs(qm - qt) / (qm + qt + eps)))
        imp[split] = np.concatenate(per_layer)
    score = imp["forget"] / (imp["retain"] + eps)
    tower = np.concatenate([np.full(len(stats[("forget", "multimodal", t, l)][0]), tower_rank[t]) for t, l in keys])
    layer = np.concatenate([np.full(len(stats[("forget", "multimodal", t, l)][0]), l) for t, l in keys])
    unit = np.concatenate([np.arange(len(stats[("forget", "multimodal", t, l)][0])) for t, l in keys])
    order = np.lexsort((unit, layer, tower, -score))  # descending score, ties by (tower, layer, unit)
    k = math.floor(Fraction(repr(alpha)) * len(score))  # ⌊α·N⌋ exactly, as manu_core does
    selected = np.zeros(len(score), bool)
    selected[order[:k]] = True
    return {"score": score, "selected": selected}


def child(args: argparse.Namespace) -> None:
    root, out = Path(args.root), Path(args.out)
    t0 = time.perf_counter()
    steps = None
    if args.child == "polars":
        steps = run_polars(root, args.alpha, out, args.linear_outputs)
        # The overall peak: the largest of the per-step peaks (VmHWM is reset before each mode).
        peak_mib = max(s.get("peak_rss_mib") or 0 for s in steps.values())
        peak_mib = max(peak_mib, _hwm_mib())
    else:
        ref = numpy_reference(root, args.alpha)
        np.savez(out, **ref)
        # VmHWM: this process's peak RSS since its exec (ru_maxrss would also count the parent at fork time).
        peak_mib = _hwm_mib()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib, "steps": steps}))


def measure(kind: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", args.root, "--out", str(out), "--alpha", str(args.alpha)]
    cmd += ["--linear-outputs"] if args.linear_outputs else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Alternative Polars formulations of per-unit column sums over an Array column (one partition)


def formulations(root: Path, tau: float = 0.1) -> None:
    import polars as pl

    import manu_core.importance as importance

    d = partition_dir(root, "forget", "multimodal", "language", 0)
    act = pl.read_parquet(sorted(d.glob("part-*.parquet")), columns=["activation"])["activation"]
    n, w = len(act), act.dtype.size
    x = act.to_numpy().astype(np.float64)
    ref = np.stack([np.abs(x).sum(0), x.sum(0), np.square(x).sum(0), (np.abs(x) > tau).sum(0)], 1)
    df = act.to_frame("a")

    def explode_group_by():
        return (df.lazy().select(z=pl.col("a").explode().cast(pl.Float64))
                .with_columns(unit=pl.int_range(pl.len(), dtype=pl.UInt32) % w).group_by("unit")
                .agg(pl.col("z").abs().sum(), pl.col("z").sum().alias("s"), (pl.col("z") ** 2).sum().alias("q"),
                     (pl.col("z").abs() > tau).sum().alias("c")).sort("unit").collect().drop("unit"))

    def struct_unnest():
        wide = df.select(pl.col("a").arr.to_struct([f"u{i}" for i in range(w)])).unnest("a").cast(pl.Float64)
        rows = [wide.select(e).row(0) for e in (pl.all().abs().sum(), pl.all().sum(), (pl.all() ** 2).sum(), (pl.all().abs() > tau).sum())]
        return pl.DataFrame(np.array(rows).T)

    def tree_reduce():
        z = df.select(pl.col("a").cast(pl.Array(pl.Float64, w)))
        t = z.select(a=pl.col("a").arr.eval(pl.element().abs()), s=pl.col("a"), q=pl.col("a").arr.eval(pl.element() ** 2),
                     c=pl.col("a").arr.eval((pl.element().abs() > tau).cast(pl.Float64)))
        while t.height > 1:
            h = t.height // 2
            top = pl.DataFrame([t[c].slice(0, h) + t[c].slice(h, h) for c in t.columns])
            t = pl.concat([top, t.slice(2 * h, 1)]) if t.height % 2 else top
        return pl.DataFrame({c: t[c][0].to_numpy() for c in t.columns})

    def gather_transpose():
        starts = pl.int_range(w, dtype=pl.UInt32)
        idx = pl.select(pl.int_ranges(starts, starts + n * w, w, dtype=pl.UInt32).explode()).to_series()
        z = act.explode().gather(idx).cast(pl.Float64).to_frame("z")
        f = lambda e: e.reshape((w, n)).arr.sum()
        return z.select(f(pl.col("z").abs()), s=f(pl.col("z")), q=f(pl.col("z") * pl.col("z")), c=f(pl.col("z").abs() > tau))

    def gather_transpose_dot():  # |z| once, Σz² as arr.dot (no z² temporary)
        starts = pl.int_range(w, dtype=pl.UInt32)
        idx = pl.select(pl.int_ranges(starts, starts + n * w, w, dtype=pl.UInt32).explode()).to_series()
        z = act.explode().gather(idx).cast(pl.Float64).to_frame("z")
        r = lambda e: e.reshape((w, n))
        return z.with_columns(a=pl.col("z").abs()).select(r(pl.col("a")).arr.sum(), s=r(pl.col("z")).arr.sum(),
                                                          q=r(pl.col("z")).arr.dot(r(pl.col("z"))), c=r(pl.col("a") > tau).arr.sum())

    def manu_core_chunked():  # what manu_core.importance runs: the above per chunk of <= CHUNK_VALUES values
        rows = max(1, importance.CHUNK_VALUES // w)
        cache: dict = {}
        parts = [importance._chunk_sums([], {"activation": act.slice(i, rows)}, w, tau, cache) for i in range(0, n, rows)]
        total = functools.reduce(importance._add, parts)
        return total.select("sum_abs", "sum", "sum_sq", "count_active")

    def numpy_ref():
        y = act.to_numpy().astype(np.float64)
        return pl.DataFrame(np.stack([np.abs(y).sum(0), y.sum(0), np.square(y).sum(0), (np.abs(y) > tau).sum(0)], 1))

    print(f"\nPer-unit sums (|z|, z, z², |z|>τ) of one partition ({n} x {w}), activation column in memory, best of 3:")
    for name, f in [("explode + unit index + group_by", explode_group_by), ("to_struct/unnest + column sums", struct_unnest),
                    ("halving tree of Array additions", tree_reduce), ("gather-transpose + reshape + arr.sum", gather_transpose),
                    ("  + |z| once, arr.dot for z²", gather_transpose_dot), ("  + in chunks (manu_core.importance)", manu_core_chunked),
                    ("numpy reference (x.sum(axis=0))", numpy_ref)]:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = f()
            times.append(time.perf_counter() - t0)
        err = np.abs(out.cast(pl.Float64).to_numpy() - ref).max()
        print(f"  {name:40s} {min(times) * 1000:8.1f} ms   max abs diff {err:.1e}")


def report_linear_outputs(pol: dict, args: argparse.Namespace, work: Path) -> None:
    """The --linear-outputs run: sums + table per released variant against the target (no numpy step)."""
    shutil.rmtree(work)
    steps = pol["steps"]
    sums, read = steps.pop("sums"), steps.pop("read")
    steps.pop("write")
    print(f"\nLinear-output store (language {args.lang_units:,} and vision {args.vision_units:,} outputs per layer), "
          f"sums table {sums['rows']:,} rows, alpha {args.alpha}")
    print(f"{'neuron_sums (footers)':26s} {sums['seconds']:8.2f}s   peak RSS {sums['peak_rss_mib']:.0f} MiB")
    print(f"{'neuron_sums (reading)':26s} {read['seconds']:8.2f}s   (agrees with the footers to "
          f"{read['max_rel_diff']:.1e} relative, identical counts: {read['same_counts']})")
    ok = read["max_rel_diff"] < 1e-9 and read["same_counts"]
    for label, s in steps.items():
        total = sums["seconds"] + s["seconds"]
        ok &= total <= TARGET_S
        print(f"{label:26s} {s['seconds']:8.2f}s  sums+table {total:6.1f}s  {total / TARGET_S:.2f} of the target  "
              f"{'PASS' if total <= TARGET_S else 'FAIL'}  selected {s['selected']:,} of {s['scored']:,} scored")
    print(f"target <= {TARGET_S:.0f} s (sums + table) for every variant: {'PASS' if ok else 'FAIL'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--samples", type=int, default=1500, help="samples per stream")
    p.add_argument("--lang-layers", type=int, default=32)
    p.add_argument("--lang-units", type=int, default=11008)
    p.add_argument("--vision-layers", type=int, default=23)
    p.add_argument("--vision-units", type=int, default=4096)
    p.add_argument("--part-rows", type=int, default=500, help="rows per part file (extraction writes per batch chunk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--token-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="generate the store with token statistics (needed by the released and selective modes)")
    p.add_argument("--formulations", action="store_true", help="also time alternative Polars formulations")
    p.add_argument("--linear-outputs", action="store_true",
                   help="a store of the MLP Linears' outputs at the 7B shape (released option linear_outputs)")
    p.add_argument("--delete", action="store_true", help="delete the generated folder at the end")
    p.add_argument("--child", choices=["polars", "numpy"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import polars as pl

    if args.linear_outputs:
        args.lang_units, args.vision_units = (sum(w for _, w in LINEAR_OUTPUTS[t]) for t in ("language", "vision"))
        if args.root == DEFAULT_ROOT:
            args.root = DEFAULT_ROOT + "_linear_outputs"
    root = Path(args.root)
    generate(args, root)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    print(f"folder {root}: {size / 2**30:.2f} GiB")
    if args.formulations:
        formulations(root)
    work = root.parent / f".{root.name}-bench-out"
    work.mkdir(exist_ok=True)
    pol = measure("polars", args, work / "polars.parquet")
    if args.linear_outputs:
        return report_linear_outputs(pol, args, work)
    ref = measure("numpy", args, work / "numpy.npz")
    got = pl.read_parquet(work / "polars.parquet")
    exp = np.load(work / "numpy.npz")
    shutil.rmtree(work)
    diff = np.abs(got["score"].to_numpy() - exp["score"])
    score_diff = float(diff.max())
    rel_diff = float((diff / np.maximum(np.abs(exp["score"]), 1e-300)).max())
    same = bool((got["selected"].to_numpy() == exp["selected"]).all())
    steps = pol["steps"]
    sums, read, write = steps.pop("sums"), steps.pop("read"), steps.pop("write")
    mib = lambda v: "      -" if v is None else f"{v:7.0f}"
    print(f"\nneurons {len(got):,} (sums table {sums['rows']:,} rows), alpha {args.alpha}, "
          f"token statistics in the store: {sums['token_stats']}")
    if not sums["token_stats"]:
        print("released and selective need token statistics: not timed (run without --no-token-stats)")
    print(f"\n{'step':24s} {'time':>9s} {'sums+table':>11s} {'/ target':>9s} {'':5s} {'peak RSS':>11s} {'selected':>10s}")
    print(f"{'neuron_sums (footers)':24s} {sums['seconds']:8.2f}s {'':>11s} {'':>9s} {'':5s} {mib(sums['peak_rss_mib'])} MiB")
    print(f"{'neuron_sums (reading)':24s} {read['seconds']:8.2f}s {'':>11s} {'':>9s} {'':5s} {mib(read['peak_rss_mib'])} MiB"
          f"  (use_totals=False; agrees with the footers to {read['max_rel_diff']:.1e} relative, "
          f"identical counts: {read['same_counts']})")
    all_fast = True
    for label, s in steps.items():
        total = sums["seconds"] + s["seconds"]
        fast = total <= TARGET_S
        all_fast &= fast
        print(f"{label:24s} {s['seconds']:8.2f}s {total:10.1f}s {total / TARGET_S:9.2f} {'PASS' if fast else 'FAIL':5s} "
              f"{mib(s['peak_rss_mib'])} MiB {s['selected']:>10,}")
    print(f"{'numpy reference (paper)':24s} {ref['seconds']:8.2f}s {'':>11s} {'':>9s} {'':5s} {mib(ref['peak_rss_mib'])} MiB")
    print(f"peak RSS of the polars process (sums + every mode): {pol['peak_rss_mib']:.0f} MiB; numpy: {ref['peak_rss_mib']:.0f} MiB "
          "(per-mode peaks: VmHWM reset before each importance_table, so they include the sums table held)")
    paper = sums["seconds"] + steps["paper"]["seconds"]
    print(f"ratio polars (footer sums + paper table) / numpy: time {paper / ref['seconds']:.3f}; reading path "
          f"(sums + paper table) / numpy: {(read['seconds'] + steps['paper']['seconds']) / ref['seconds']:.2f}; "
          f"peak RSS of the polars process / numpy {pol['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")
    print(f"the writer's share: footer totals of one {write['part'][0]} x {write['part'][1]} part scaled to this store: "
          f"{write['seconds']:.1f} s, spent during the extraction (once), not in the importance step")
    print(f"agreement (paper mode): max |score diff| {score_diff:.2e} (relative {rel_diff:.1e}), identical selection: {same}")
    ok = all_fast and same and rel_diff < 1e-9 and read["max_rel_diff"] < 1e-9 and read["same_counts"]
    print(f"target <= {TARGET_S:.0f} s (sums + table) for every mode, with agreement: {'PASS' if ok else 'FAIL'}")
    if args.delete:
        shutil.rmtree(root)
        print(f"deleted {root}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
