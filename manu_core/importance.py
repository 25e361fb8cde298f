"""Neuron importance, score and selection (method.md, "Importance functions" and "Score and selection").

Two steps with one explicit contract between them (style.md, practice 3):

1. `neuron_sums(root, tau)`: Polars reads the activation store (`manu_core.store`) and computes, per
   (split, form, tower, layer, unit), the five sums: count, Σ|z|, Σz, Σz², #(|z| > τ). Float64.
2. `importance_table(sums, params)`: the four importance functions per split, their weighted sum, the
   score S = I(D_f) / (I(D_r) + ε) and the top-α selection. Pure, small (one row per neuron).

`compute_importance(root, params)` runs both; `write_importance(df, path)` writes the result.

How step 1 stays fast and bounded (numbers from `python bench/bench_importance.py --formulations`,
LLaVA-1.5-7B shape, 2 cores shared with other jobs): the store's row groups (256 rows) are packed into
chunks of at most CHUNK_VALUES activations, read with pyarrow and handed to Polars without a copy. Per
chunk, the activation column (Array(Float32, w), one row per sample) is flattened, transposed with one
`gather` (index j·n + i <- i·w + j, built with `int_ranges`, no division), cast to Float64 and reshaped
to one Array(Float64, n) row per unit, so each sum is an `arr.sum` (Σz², `arr.dot`) over contiguous
memory. Working memory is a few chunks, whatever the number of samples; what grows with the model is
only the sums table, one row per neuron and stream (the full-size bench peaks under 1 GB, most of it
that 1.6 M-row table and the importance step's joins).

Per-unit sums of one 1,500 x 11,008 partition already in memory (best of 3): explode + unit index +
group_by 565 ms; to_struct/unnest + column sums 700 ms; halving tree of Array additions 237 ms;
gather-transpose + arr.sum 227 ms, with |z| computed once and arr.dot for Σz² 174 ms; numpy's
x.sum(axis=0) reference 181 ms. Reading that partition: pyarrow `read_row_groups` 59-69 ms,
`pl.read_parquet` / `pl.scan_parquet` 134-139 ms; reading and summing 256-row chunks instead of whole
partitions was about 2x faster end to end (temporaries stay in cache).
"""

from __future__ import annotations

import collections
import difflib
import functools
import logging
import math
import numbers
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from manu_core.store import (
    FORMS,
    SPLITS,
    TOWERS,
    ActivationStoreError,
    PartFile,
    PartitionInfo,
    check_complete,
    inspect_activations,
    required_streams,
    write_table_atomic,
)

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("abs", "freq", "var", "rms")
SCOPES = ("global", "tower", "layer")
NEURON = ("tower", "layer", "unit")
SUM_COLUMNS = ("count", "sum_abs", "sum", "sum_sq", "count_active")
SUMS_SCHEMA = {
    "split": pl.String, "form": pl.String, "tower": pl.String, "layer": pl.Int64, "unit": pl.Int64,
    "count": pl.Int64, "sum_abs": pl.Float64, "sum": pl.Float64, "sum_sq": pl.Float64, "count_active": pl.Int64,
}
OUTPUT_COLUMNS = (
    *NEURON,
    *(f"{s}_{k}" for s in SPLITS for k in (*WEIGHT_NAMES, "importance")),
    "score", "rank", "selected",
)
CHUNK_VALUES = 1 << 22  # activations per chunk (rows x width): bounds memory, keeps temporaries in cache


# ----------------------------------------------------------------------------------------------
# Parameters


def _unknown(kind: str, value: str, available: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, available, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown {kind} '{value}'.{hint} Available: {', '.join(available)}"


def parse_weights(text: str) -> dict[str, float]:
    """'abs=1,freq=0,var=1,rms=1' -> {'abs': 1.0, 'freq': 0.0, 'var': 1.0, 'rms': 1.0}; unnamed ones stay 1."""
    weights = {k: 1.0 for k in WEIGHT_NAMES}
    seen = set()
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ValueError(
                f"weights must be 'name=value' pairs separated by commas, e.g. 'abs=1,freq=0'; got {item!r}."
            )
        if key not in WEIGHT_NAMES:
            raise ValueError(_unknown("weight", key, WEIGHT_NAMES))
        if key in seen:
            raise ValueError(f"weight '{key}' is given twice in {text!r}; give each weight once.")
        seen.add(key)
        try:
            weights[key] = float(value)
        except ValueError:
            raise ValueError(f"weight '{key}' must be a number; got {value!r}.") from None
    return weights


@dataclass(frozen=True)
class Weights:
    """Weights of the four importance functions (method.md: I = Σ_k w_k I_k; 0 drops one, Table 7)."""

    abs: float = 1.0
    freq: float = 1.0
    var: float = 1.0
    rms: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in WEIGHT_NAMES}


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class ImportanceParams:
    """Importance and selection settings; `weights` also accepts a mapping or 'abs=1,freq=0,...'."""

    alpha: float = 0.05  # pruning ratio: top α of the neurons in each scope group (paper: 0.02, 0.05, 0.1)
    eps: float = 1e-5  # ε in the ratios and the score (method.md)
    tau: float = 0.1  # activation threshold of the frequency count (authors' released code)
    weights: Weights | Mapping[str, float] | str = field(default_factory=Weights)  # a Weights after init
    scope: str = "global"  # global (both towers together, the paper), tower, or layer

    def __post_init__(self) -> None:
        alpha = _number("alpha", self.alpha)
        if not 0 < alpha < 1:
            raise ValueError(
                f"alpha must be in (0, 1); got {self.alpha}. Give a fraction, e.g. 0.05 for the paper's 5%."
            )
        for name in ("eps", "tau"):
            if _number(name, getattr(self, name)) < 0:
                default = getattr(type(self), name)
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}. The default is {default}.")
        w = self.weights
        if isinstance(w, str):
            w = Weights(**parse_weights(w))
        elif isinstance(w, Mapping):
            for k in w:
                if k not in WEIGHT_NAMES:
                    raise ValueError(_unknown("weight", str(k), WEIGHT_NAMES))
            w = Weights(**{k: v for k, v in w.items()})
        elif not isinstance(w, Weights):
            raise ValueError(
                f"weights must be a Weights, a mapping or 'abs=1,freq=1,var=1,rms=1'; got {type(w).__name__}."
            )
        for k, v in w.as_dict().items():
            if _number(f"weight '{k}'", v) < 0:
                raise ValueError(f"weight '{k}' must be >= 0; got {v}. Use 0 to drop an importance function.")
        if not any(w.as_dict().values()):
            raise ValueError(
                "weights are all 0; at least one of abs, freq, var, rms must be > 0 (0 drops one function)."
            )
        if self.scope not in SCOPES:
            raise ValueError(_unknown("scope", str(self.scope), SCOPES))
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "weights", Weights(**{k: float(v) for k, v in w.as_dict().items()}))


# ----------------------------------------------------------------------------------------------
# Step 1: the five sums per neuron and stream, in Polars


@dataclass(frozen=True)
class _Slice:
    """Rows [offset, offset + rows) of a part file, all in row group `row_group`."""

    part: PartFile
    row_group: int
    offset: int
    rows: int


def _jobs(p: PartitionInfo, max_rows: int) -> list[list[_Slice]]:
    """Pack a partition's row groups, in order, into jobs of at most `max_rows` rows.

    A row group larger than `max_rows` (a file from another tool) is a job of its own, read in batches.
    """
    jobs: list[list[_Slice]] = [[]]
    used = 0
    for f in p.parts:
        offset = 0
        for rg, rows in enumerate(f.row_groups):
            if jobs[-1] and used + rows > max_rows:
                jobs.append([])
                used = 0
            jobs[-1].append(_Slice(f, rg, offset, rows))
            used += rows
            offset += rows
    return [j for j in jobs if j]


def _batches(job: list[_Slice], max_rows: int):
    """Yield (slices, activation Series) of at most `max_rows` rows (more only if one row group is bigger).

    pyarrow reads (twice as fast as Polars' reader here, see the module docstring), Polars computes:
    `pl.from_arrow` hands the column over without a copy.
    """
    if len(job) == 1 and job[0].rows > max_rows:
        s = job[0]
        f = pq.ParquetFile(s.part.path)
        offset = s.offset
        for batch in f.iter_batches(batch_size=max_rows, row_groups=[s.row_group], columns=["activation"]):
            yield [_Slice(s.part, s.row_group, offset, batch.num_rows)], pl.from_arrow(batch.column(0))
            offset += batch.num_rows
        return
    chunks = []
    for path in dict.fromkeys(s.part.path for s in job):  # files in job order
        groups = [s.row_group for s in job if s.part.path == path]
        chunks.extend(pq.ParquetFile(path).read_row_groups(groups, columns=["activation"]).column(0).chunks)
    if all(c.type == chunks[0].type for c in chunks):
        yield job, pl.from_arrow(chunks[0] if len(chunks) == 1 else pa.chunked_array(chunks).combine_chunks())
    else:  # files of one partition written with different list types: lists here, checked in _chunk_sums
        yield job, pl.concat([pl.from_arrow(c).cast(pl.List(pl.Float32)) for c in chunks], rechunk=True)


def _diagnose(s: _Slice, width: int) -> ActivationStoreError | None:
    """The error for the first bad row of a slice (null, wrong length, NaN/inf), naming its file; None if clean."""
    scan = pl.scan_parquet(s.part.path, hive_partitioning=False).select("sample_id", "activation")
    df = scan.slice(s.offset, s.rows).collect()
    act = df["activation"]
    where = lambda row: f"{s.part.path}: row {s.offset + row} (sample {df['sample_id'][row]!r})"
    if act.dtype != pl.Array(pl.Float32, width):
        lens = act.list.len()
        bad = (lens != width).fill_null(True)
        if bad.any():
            row = int(bad.arg_max())
            return ActivationStoreError(
                f"{where(row)} has {lens[row]} activation values, expected {width} (mismatched widths across "
                "rows). Every row of a layer needs one value per hidden unit; rerun the extraction for it."
            )
        act = act.cast(pl.Array(pl.Float32, width))
    flat = act.explode()
    bad = (~flat.is_finite()).fill_null(True)
    if bad.any():
        i = int(bad.arg_max())
        return ActivationStoreError(
            f"{where(i // width)}, unit {i % width} is {flat[i]}; activations must be finite numbers (no NaN, "
            "inf or null). Rerun the extraction for this partition (in float32 or bfloat16, not float16)."
        )
    return None


def _first_error(slices: list[_Slice], width: int) -> ActivationStoreError:
    for s in slices:
        if (err := _diagnose(s, width)) is not None:
            return err
    raise AssertionError(f"a chunk failed its checks but no slice of it did: {[str(s.part.path) for s in slices]}")


def _transpose_index(n: int, width: int, cache: dict) -> pl.Series:
    """Index that gathers a row-major (n, width) flat array into unit-major order: j·n + i <- i·width + j."""
    index = cache.get((n, width))
    if index is None:
        dtype = pl.UInt32 if n * width < 2**32 else pl.UInt64
        starts = pl.int_range(width, dtype=dtype)
        index = pl.select(pl.int_ranges(starts, starts + n * width, width, dtype=dtype).explode()).to_series()
        if len(cache) >= 8:  # chunks come in few shapes (row-group sizes); keep the cache small
            cache.clear()
        cache[(n, width)] = index
    return index


def _chunk_sums(slices: list[_Slice], act: pl.Series, width: int, tau: float, cache: dict) -> pl.DataFrame:
    """The five sums per unit over the rows of one chunk: a (width, 6) frame. `act`: (n,) lists of width floats."""
    n = len(act)
    if act.dtype != pl.Array(pl.Float32, width):  # list<float32> from another tool: check every length
        lens = act.list.len()
        if lens.null_count() or lens.min() != width or lens.max() != width:
            raise _first_error(slices, width)
        act = act.cast(pl.Array(pl.Float32, width))
    flat = act.explode()  # (n·width,) row-major
    if flat.null_count():  # nulls would be skipped by the sums below
        raise _first_error(slices, width)
    # Transpose to unit-major, Float64 (sums in float64), then one row of n values per unit.
    z = flat.gather(_transpose_index(n, width, cache)).cast(pl.Float64).to_frame("z")
    per_unit = lambda e: e.reshape((width, n))  # (width,) arrays of n
    out = z.with_columns(a=pl.col("z").abs()).select(
        unit=pl.int_range(width, dtype=pl.Int64),
        count=pl.lit(n, dtype=pl.Int64),
        sum_abs=per_unit(pl.col("a")).arr.sum(),
        sum=per_unit(pl.col("z")).arr.sum(),
        sum_sq=per_unit(pl.col("z")).arr.dot(per_unit(pl.col("z"))),  # no z² temporary
        count_active=per_unit(pl.col("a") > tau).arr.sum().cast(pl.Int64),
    )
    # A NaN or inf anywhere makes its unit's Σz² non-finite (z² of a finite float32 cannot overflow
    # float64): one cheap check, and only then a search for the file and row.
    if not out["sum_sq"].is_finite().all():
        raise _first_error(slices, width)
    return out


def _job_sums(job: list[_Slice], width: int, tau: float, cache: dict) -> pl.DataFrame:
    max_rows = max(1, CHUNK_VALUES // width)
    frames = [_chunk_sums(slices, act, width, tau, cache) for slices, act in _batches(job, max_rows)]
    return functools.reduce(_add, frames)


def _add(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Sums of two chunks of the same units (same order)."""
    return a.with_columns(a[c] + b[c] for c in SUM_COLUMNS)


def _ordered_map(pool: ThreadPoolExecutor, fn, items: list, ahead: int):
    """pool.map with at most `ahead` jobs in flight: bounded memory, and an error stops the run promptly."""
    pending: collections.deque = collections.deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def neuron_sums(root: str | Path, tau: float, *, progress: bool = False, threads: int = 2) -> pl.DataFrame:
    """The five sums per (split, form, tower, layer, unit) of an activation folder (method.md, "Importance functions").

    Columns: split, form, tower, layer, unit, count, sum_abs (Σ|z|), sum (Σz), sum_sq (Σz²),
    count_active (#|z| > tau); sorted by (split, form, tower, layer, unit). The vision tower's text form
    has no rows (no partition; its statistics are 0). Validates the folder first (`store.check_complete`).
    `threads` chunks are processed at once (reading one while summing another).
    """
    tau = _number("tau", tau)
    if tau < 0:
        raise ValueError(f"tau must be >= 0; got {tau}. The default is 0.1.")
    summary = inspect_activations(root)
    check_complete(summary)
    jobs = [(p, j) for p in summary.partitions for j in _jobs(p, max(1, CHUNK_VALUES // p.width))]
    log.info("Summing %d partitions (%d chunks) under %s", len(summary.partitions), len(jobs), summary.root)
    cache: dict = {}
    run = lambda job: _job_sums(job[1], job[0].width, tau, cache)
    frames, total, current = [], None, None

    def finish() -> None:  # one partition's sums, with its key columns
        split, form, tower, layer = current.stream  # type: ignore[union-attr]
        key = dict(split=pl.lit(split), form=pl.lit(form), tower=pl.lit(tower), layer=pl.lit(layer, pl.Int64))
        frames.append(total.with_columns(**key).select(list(SUMS_SCHEMA)))  # type: ignore[union-attr]

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = _ordered_map(pool, run, jobs, ahead=2 * max(1, threads))  # partitions' jobs are consecutive
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="neuron sums", unit="chunk")
        for (p, _), sums in zip(jobs, results):
            if p is not current:
                if current is not None:
                    finish()
                current, total = p, sums
            else:
                total = _add(total, sums)  # type: ignore[arg-type]
        finish()
    # Partitions come sorted by (split, form, tower, layer) and units in order: no sort needed.
    return pl.concat(frames)


# ----------------------------------------------------------------------------------------------
# Step 2: importance functions, score, selection (pure; one row per neuron)


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    """num / den with 0/0 := 0 (both forms silent: no difference). Only reachable with eps = 0."""
    return pl.when((num == 0) & (den == 0)).then(0.0).otherwise(num / den)


def _form_stats(sums: pl.DataFrame, split: str, form: str) -> pl.LazyFrame:
    """Per-form statistics A, N, V, Q of one (split, form) (method.md, "Importance functions")."""
    c = pl.col("count").cast(pl.Float64)
    mean = pl.col("sum") / c
    return (
        sums.lazy()
        .filter((pl.col("split") == split) & (pl.col("form") == form))
        .select(
            *NEURON,
            A=pl.col("sum_abs") / c,  # mean |z|
            N=pl.col("count_active").cast(pl.Float64),  # #(|z| > τ): a count, as method.md states
            V=(pl.col("sum_sq") / c - mean * mean).clip(lower_bound=0.0),  # population variance, ≥ 0 after rounding
            Q=pl.col("sum_sq") / c,  # mean z²
        )
        .rename({k: f"{k}_{form}" for k in "ANVQ"})
    )


def _check_sums(sums: pl.DataFrame) -> None:
    missing = [c for c in SUMS_SCHEMA if c not in sums.columns]
    if missing:
        raise ValueError(
            f"sums table lacks column(s) {', '.join(missing)}; expected {', '.join(SUMS_SCHEMA)} (from neuron_sums)."
        )
    for col, values in (("split", SPLITS), ("form", FORMS), ("tower", TOWERS)):
        bad = sums.filter(~pl.col(col).is_in(values))
        if len(bad):
            raise ValueError(f"sums table: {col} must be one of {', '.join(values)}; got {bad[col][0]!r}.")
    if len(sums.filter(pl.col("count") <= 0)):
        raise ValueError("sums table: count must be >= 1 in every row (a stream without samples).")
    dup = sums.group_by(["split", "form", *NEURON]).len().filter(pl.col("len") > 1)
    if len(dup):
        raise ValueError(
            f"sums table: {len(dup)} duplicate (split, form, tower, layer, unit) rows, e.g. {dup.row(0)[:-1]}; "
            "sum them first."
        )


def importance_table(sums: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """Importances per split, score and selection: one row per neuron, sorted by (tower, layer, unit).

    Columns: tower, layer, unit, forget_{abs,freq,var,rms,importance}, retain_{...}, score, rank, selected.
    """
    _check_sums(sums)
    sums = sums.cast({k: v for k, v in SUMS_SCHEMA.items()})  # type: ignore[arg-type]
    eps, w = params.eps, params.weights.as_dict()
    neurons = sums.select(NEURON).unique().lazy()
    per_split = []
    for split in SPLITS:
        lf = neurons
        for form in FORMS:
            lf = lf.join(_form_stats(sums, split, form), on=list(NEURON), how="left")
        # The vision tower has no text form: A = N = V = Q = 0 there (method.md, "Vision neurons on text-only input").
        text = [f"{k}_text" for k in "ANVQ"]
        vision = pl.col("tower") == "vision"
        lf = lf.with_columns(pl.when(vision).then(pl.col(c).fill_null(0.0)).otherwise(pl.col(c)).alias(c) for c in text)
        df = lf.collect()
        for tower in df["tower"].unique().sort():
            for f in (f for s, f in required_streams(tower) if s == split):
                hole = df.filter((pl.col("tower") == tower) & pl.col(f"A_{f}").is_null())
                if len(hole):
                    layer, unit = hole.sort(["layer", "unit"]).row(0)[1:3]
                    raise ValueError(
                        f"sums table has no {split}/{f} row for {tower} layer {layer} unit {unit} (present in "
                        "other streams); every neuron needs both splits and both forms (vision: multimodal only)."
                    )
        a_m, a_t = pl.col("A_multimodal"), pl.col("A_text")
        n_m, n_t = pl.col("N_multimodal"), pl.col("N_text")
        q_m, q_t = pl.col("Q_multimodal"), pl.col("Q_text")
        imp = {  # method.md, "Importance functions" (Section 3.1)
            "abs": _ratio((a_m - a_t).abs(), a_m + a_t + eps),
            "freq": _ratio((n_m - n_t).abs(), n_m + n_t + eps),
            "var": (pl.col("V_multimodal") + pl.col("V_text")).sqrt(),
            "rms": _ratio((q_m - q_t).abs(), q_m + q_t + eps).sqrt(),
        }
        combined = pl.sum_horizontal([w[k] * pl.col(f"{split}_{k}") for k in WEIGHT_NAMES])
        per_split.append(
            df.lazy()
            .select(*NEURON, **{f"{split}_{k}": e for k, e in imp.items()})
            .with_columns(combined.alias(f"{split}_importance"))
        )
    table = per_split[0].join(per_split[1], on=list(NEURON), how="inner")
    # Score (method.md, "Score and selection"): S = I(D_f) / (I(D_r) + ε).
    table = table.with_columns(score=_ratio(pl.col("forget_importance"), pl.col("retain_importance") + eps)).collect()
    return _select(table, params)


def _select(table: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """rank: 1-based, descending score, ties by (tower, layer, unit); selected: rank <= ⌊α·N⌋ per scope group."""
    group = {"global": [], "tower": ["tower"], "layer": ["tower", "layer"]}[params.scope]
    order = table.sort([*group, "score", *NEURON], descending=[False] * len(group) + [True, False, False, False])
    rank = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    order = order.with_columns(rank=rank.over(group) if group else rank)
    # k = ⌊α·N⌋ in exact arithmetic on α as written (0.29·100 is 28.999... in binary, k must be 29).
    alpha = Fraction(repr(params.alpha))
    if group:
        sizes = order.group_by(group).len()
        k = sizes.with_columns(k=pl.Series([math.floor(alpha * n) for n in sizes["len"]], dtype=pl.Int64)).drop("len")
        order = order.join(k, on=group, how="left")
    else:
        order = order.with_columns(k=pl.lit(math.floor(alpha * len(order)), dtype=pl.Int64))
    out = order.with_columns(selected=pl.col("rank") <= pl.col("k")).drop("k")
    return out.sort(list(NEURON)).select(OUTPUT_COLUMNS)


def compute_importance(root: str | Path, params: ImportanceParams, *, progress: bool = False) -> pl.DataFrame:
    """Importance table of an activation folder: `importance_table(neuron_sums(root, params.tau), params)`."""
    return importance_table(neuron_sums(root, params.tau, progress=progress), params)


def write_importance(df: pl.DataFrame, path: str | Path) -> Path:
    """Write the importance table as Parquet, atomically and with deterministic bytes; returns the path."""
    missing = [c for c in OUTPUT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"importance table lacks column(s) {', '.join(missing)}; write the output of importance_table."
        )
    table = df.select(OUTPUT_COLUMNS).to_arrow()
    return write_table_atomic(table, path, compression="zstd", compression_level=3, row_group_size=1 << 20)
