"""Neuron importance, score and selection (method.md, "Importance functions" and "Score and selection").

Two steps with one explicit contract between them (style.md, practice 3):

1. `neuron_sums(root, tau)`: per (split, form, tower, layer, unit) of the activation store
   (`manu_core.store`), the five sums: count, Σ|z|, Σz, Σz², #(|z| > τ). Float64. For the default τ
   they are the part files' footer totals, added up (the writer computed them); otherwise, or with
   `use_totals=False`, Polars reads the activation column and sums it, as below.
2. `importance_table(sums, params)`: the four importance functions per split, their weighted sum, the
   score S = I(D_f) / (I(D_r) + ε) and the top-α selection. Pure, small (one row per neuron).

`compute_importance(root, params)` runs both; `write_importance(df, path)` writes the result.

How step 1's reading path stays fast and bounded: the store's row groups (256 rows) are packed into chunks of at
most CHUNK_VALUES activations, read with pyarrow and handed to Polars without a copy. Per chunk, the
activation column (one row per sample) is flattened, transposed with one `gather` and reshaped to one
Array(Float64, n) row per unit, so each sum is an `arr.sum` (Σz², `arr.dot`) over contiguous memory.
Working memory is a few chunks, whatever the number of samples; only the sums table (one row per
neuron and stream) grows with the model. The formulations compared and their timings:
`python bench/bench_importance.py --formulations` (README, "Tests and benchmarks").
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import numbers
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from manu_core.store import (
    FORMS,
    LAYOUT_FILE,
    OUTPUTS_DIR,
    SAMPLE_TAU,
    SAMPLE_TOTALS,
    SPLITS,
    TOKEN_TOTALS,
    TOWERS,
    ActivationStoreError,
    PartFile,
    POOLED_LAYER,
    POSITION_STATS,
    PartitionInfo,
    check_complete,
    inspect_activations,
    read_footer_totals,
    read_layout,
    read_positions,
    read_sample_totals,
    read_token_totals,
    required_streams,
    write_table_atomic,
)
from manu_core.progress import progress as progress_bar
from manu_core.vocab import did_you_mean

if TYPE_CHECKING:
    from manu_core.arch import ReleasedTower

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("abs", "freq", "var", "rms")
SCOPES = ("global", "tower", "layer")
NEURON = ("tower", "layer", "unit")
SUM_COLUMNS = ("count", "sum_abs", "sum", "sum_sq", "count_active")
# Token-level sums over every counted position of a stream (store.py's token statistics; null when the
# store has none): N, Σa, Σ|a|, Σa², #(a > 0), #(|a| > store.TOKEN_TAU); max_abs per partition.
TOKEN_SUMS = ("tokens", "tok_sum", "tok_abs", "tok_sq", "tok_pos", "tok_active")
SUMS_SCHEMA = {
    "split": pl.String, "form": pl.String, "tower": pl.String, "layer": pl.Int64, "unit": pl.Int64,
    "count": pl.Int64, "sum_abs": pl.Float64, "sum": pl.Float64, "sum_sq": pl.Float64, "count_active": pl.Int64,
    "tokens": pl.Int64, "tok_sum": pl.Float64, "tok_abs": pl.Float64, "tok_sq": pl.Float64, "tok_pos": pl.Float64,
    "tok_active": pl.Float64, "max_abs": pl.Float64,
}
# The released code's per-position statistics (store.py, "Position statistics"; null when the store has
# none): per layer (pos_*) and with the tower's layers pooled (pool_*, the same in every layer's row).
POSITION_COLUMNS = tuple(f"{kind}_{k}" for kind in ("pos", "pool") for k in POSITION_STATS)
SUMS_SCHEMA.update({c: pl.Float64 for c in POSITION_COLUMNS})
POSITION_CHUNK = 10  # the released code averages per-position values over chunks of this many batches
STD = POSITION_STATS.index("std")
OUTPUT_COLUMNS = (
    *NEURON,
    *(f"{s}_{k}" for s in SPLITS for k in (*WEIGHT_NAMES, "importance")),
    "score", "rank", "selected",
)
# A Linear-output store's neurons (store.py, "Linear outputs"): `unit` indexes the layer's outputs side by
# side; `module` (gate_proj, up_proj, down_proj; fc1, fc2) and `row` (its output row) name it. Present in
# the sums and importance tables of such a store only; pruning zeroes those output rows (prune.py).
SITE_COLUMNS = ("module", "row")
CHUNK_VALUES = 1 << 22  # activations per chunk (rows x width): bounds memory, keeps temporaries in cache


# ----------------------------------------------------------------------------------------------
# Parameters


def _unknown(kind: str, value: str, available: tuple[str, ...]) -> str:
    hint = did_you_mean(value, available)
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
class ModeSpec:
    """A scoring mode's defaults and options (docs/method.md, "Scoring modes")."""

    name: str
    summary: str
    eps: float
    weights: dict[str, float]
    scope: str
    scopes: tuple[str, ...]  # scopes the mode supports
    options: dict[str, object]  # option name -> default
    token_stats: bool  # reads the store's token statistics


SCORING_MODES: dict[str, ModeSpec] = {
    "paper": ModeSpec("paper", "the paper's four contrasts between the forms, score I(D_f)/(I(D_r)+ε)", 1e-5,
                      {k: 1.0 for k in WEIGHT_NAMES}, "global", SCOPES, {}, False),
    "released": ModeSpec("released", "the authors' released code: per-tower statistics over tokens, "
                         "Σ w·(F/(R+ε) − 1), top p% per tower", 1e-5,
                         {"abs": 2.0, "freq": 0.0, "var": 2.0, "rms": 2.0}, "tower", ("tower",),
                         {"pool_layers": False, "clamp": None, "per_position": False, "linear_outputs": False,
                          "sites": "authors"},
                         True),
    "selective": ModeSpec("selective", "selective pruning (Pochinkov & Schoots 2024): one token statistic's "
                          "forget/retain ratio, top fraction over all layers", 1e-3,
                          {k: 1.0 for k in WEIGHT_NAMES}, "global", SCOPES, {"statistic": "abs"}, True),
}
SELECTIVE_STATISTICS = ("abs", "freq", "std", "rms")
# released option `sites`: "authors" follows what the released code hard-codes for the scored model's
# architecture (arch.ReleasedTower: the Linears it hooks, the layers its pooled score lands on); "uniform"
# applies the mode's own rule (every Linear, the last three layers) on every architecture. They differ on
# Idefics2 only (docs/method.md, "Mode `released`", "Per architecture").
RELEASED_SITES = ("authors", "uniform")


def mode_defaults(mode: str) -> dict:
    """eps, weights and scope of a scoring mode (what None means in ImportanceParams)."""
    if mode not in SCORING_MODES:
        raise ValueError(_unknown("scoring mode", str(mode), tuple(SCORING_MODES)))
    spec = SCORING_MODES[mode]
    return {"eps": spec.eps, "weights": dict(spec.weights), "scope": spec.scope}


def _check_options(spec: ModeSpec, options: Mapping[str, object]) -> dict:
    out = dict(spec.options)
    for k, v in options.items():
        if k not in spec.options:
            avail = tuple(spec.options) or ("(none)",)
            raise ValueError(f"{_unknown(f'option of scoring mode {spec.name!r}', str(k), avail)}")
        out[k] = v
    if spec.name == "released":
        if not isinstance(out["pool_layers"], bool):
            raise ValueError(f"released option pool_layers must be true or false; got {out['pool_layers']!r}.")
        for flag in ("per_position", "linear_outputs"):
            if not isinstance(out[flag], bool):
                raise ValueError(f"released option {flag} must be true or false; got {out[flag]!r}.")
        if out["sites"] not in RELEASED_SITES:
            raise ValueError(f"released option sites must be one of {', '.join(RELEASED_SITES)} (authors: the released "
                             f"code's choices for the model's architecture; uniform: every Linear, the last three "
                             f"layers); got {out['sites']!r}.")
        if out["clamp"] is not None and (_number("released option clamp", out["clamp"]) <= 0):
            raise ValueError(f"released option clamp must be > 0 (the released code uses 1000) or None; "
                             f"got {out['clamp']!r}.")
    if spec.name == "selective" and out["statistic"] not in SELECTIVE_STATISTICS:
        raise ValueError(_unknown("selective statistic", str(out["statistic"]), SELECTIVE_STATISTICS))
    return out


@dataclass(frozen=True)
class ImportanceParams:
    """Scoring and selection settings. `mode` picks the scoring (SCORING_MODES: paper, released,
    selective); eps, weights and scope left None take that mode's defaults; `options` are the mode's
    own (released: pool_layers, clamp, per_position, linear_outputs, sites; selective: statistic). `weights` also
    accepts a mapping or 'abs=1,freq=0,...'."""

    alpha: float = 0.05  # pruning ratio: top α of the neurons in each scope group (paper: 0.02, 0.05, 0.1)
    eps: float | None = None  # ε in the ratios and the score (paper 1e-5, selective 1e-3)
    tau: float = 0.1  # activation threshold of the paper's frequency count (authors' released code)
    weights: Weights | Mapping[str, float] | str | None = None  # a Weights after init
    scope: str | None = None  # global (both towers together), tower, or layer
    mode: str = "paper"
    options: Mapping[str, object] | tuple | None = None  # after init: sorted (name, value) pairs, every option

    def option(self, name: str):
        return dict(self.options)[name]  # type: ignore[arg-type]

    def extraction(self) -> dict[str, bool]:
        """What the extraction must record for this scoring, as `extract_activations` keywords: the
        released options per_position (position statistics) and linear_outputs (the Linears' outputs)."""
        released = self.mode == "released"
        return {"position_stats": released and bool(self.option("per_position")),
                "linear_outputs": released and bool(self.option("linear_outputs"))}

    def __post_init__(self) -> None:
        defaults = mode_defaults(self.mode)
        spec = SCORING_MODES[self.mode]
        alpha = _number("alpha", self.alpha)
        if not 0 < alpha < 1:
            raise ValueError(
                f"alpha must be in (0, 1); got {self.alpha}. Give a fraction, e.g. 0.05 for the paper's 5%."
            )
        eps = defaults["eps"] if self.eps is None else self.eps
        for name, value in (("eps", eps), ("tau", self.tau)):
            if _number(name, value) < 0:
                default = defaults["eps"] if name == "eps" else 0.1
                raise ValueError(f"{name} must be >= 0; got {value}. The default is {default}.")
        w = defaults["weights"] if self.weights is None else self.weights
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
        scope = defaults["scope"] if self.scope is None else self.scope
        if scope not in SCOPES:
            raise ValueError(_unknown("scope", str(scope), SCOPES))
        if scope not in spec.scopes:
            raise ValueError(f"scoring mode {self.mode!r} selects per {' or '.join(spec.scopes)} (its code does); "
                             f"got scope={scope!r}. Leave scope unset for the mode's default.")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "eps", float(eps))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "weights", Weights(**{k: float(v) for k, v in w.as_dict().items()}))
        object.__setattr__(self, "scope", scope)
        given = dict(self.options or {})  # a mapping, or the pairs of an ImportanceParams already built
        object.__setattr__(self, "options", tuple(sorted(_check_options(spec, given).items())))


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
        f = pq.ParquetFile(s.part.path, page_checksum_verification=True)
        offset = s.offset
        batches = f.iter_batches(batch_size=max_rows, row_groups=[s.row_group], columns=["activation"])
        while True:  # streamed batch by batch, as before; only the reads are checked
            with _checked(s.part.path):
                batch = next(batches, None)
            if batch is None:
                return
            yield [_Slice(s.part, s.row_group, offset, batch.num_rows)], pl.from_arrow(batch.column(0))
            offset += batch.num_rows
    chunks = []
    for path in dict.fromkeys(s.part.path for s in job):  # files in job order
        groups = [s.row_group for s in job if s.part.path == path]
        f = pq.ParquetFile(path, page_checksum_verification=True)
        with _checked(path):
            chunks.extend(f.read_row_groups(groups, columns=["activation"]).column(0).chunks)
    if all(c.type == chunks[0].type for c in chunks):
        yield job, pl.from_arrow(chunks[0] if len(chunks) == 1 else pa.chunked_array(chunks).combine_chunks())
    else:  # files of one partition written with different list types: lists here, checked in _chunk_sums
        yield job, pl.concat([pl.from_arrow(c).cast(pl.List(pl.Float32)) for c in chunks], rechunk=True)


@contextmanager
def _checked(path: Path):
    """Reads inside the block that hit a damaged page (a CRC mismatch of the writer's page checksums)
    fail with the file named."""
    try:
        yield
    except OSError as e:
        raise ActivationStoreError(
            f"{path}: damaged ({e}); its bytes changed after it was written (page checksums). Delete it and rerun "
            "the extraction (the pipeline's extract task recomputes when its outputs are damaged)."
        ) from e


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


def _flat(slices: list[_Slice], act: pl.Series, width: int) -> pl.Series:
    """(n,) lists of `width` floats -> (n·width,) row-major values, every length and null checked."""
    if act.dtype != pl.Array(pl.Float32, width):  # list<float32> from another tool: check every length
        lens = act.list.len()
        if lens.null_count() or lens.min() != width or lens.max() != width:
            raise _first_error(slices, width)
        act = act.cast(pl.Array(pl.Float32, width))
    flat = act.explode()
    if flat.null_count():  # nulls would be skipped by the sums below
        raise _first_error(slices, width)
    return flat


def _chunk_sums(slices: list[_Slice], act: pl.Series, width: int, tau: float, cache: dict) -> pl.DataFrame:
    """The five sums per unit over the rows of one chunk: a (width, 6) frame. `act`: (n,) lists of width floats."""
    n = len(act)
    # Transpose to unit-major, Float64 (sums in float64), then one row of n values per unit.
    index = _transpose_index(n, width, cache)
    z = _flat(slices, act, width).gather(index).cast(pl.Float64).to_frame("z")
    per_unit = lambda e: e.reshape((width, n))  # (width,) arrays of n
    sums = dict(
        unit=pl.int_range(width, dtype=pl.Int64),
        count=pl.lit(n, dtype=pl.Int64),
        sum_abs=per_unit(pl.col("a")).arr.sum(),
        sum=per_unit(pl.col("z")).arr.sum(),
        sum_sq=per_unit(pl.col("z")).arr.dot(per_unit(pl.col("z"))),  # no z² temporary
        count_active=per_unit(pl.col("a") > tau).arr.sum().cast(pl.Int64),
    )
    out = z.with_columns(a=pl.col("z").abs()).select(**sums)
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


def _part_totals(p: PartitionInfo, read, arrays: tuple[str, ...], what: str, footers: list[dict] | None) -> list[dict]:
    """Each part's footer totals of one kind (`read`: store.read_token_totals or read_sample_totals),
    checked against the part's rows and the partition's width (`footers`: the parts'
    store.read_footer_totals, when already read)."""
    parts = [read(f.path, footers and footers[i]) for i, f in enumerate(p.parts)]
    for f, t in zip(p.parts, parts):
        if t is None or t["samples"] != f.rows or any(t[c].shape != (p.width,) for c in arrays):
            raise ActivationStoreError(
                f"{f.path}: its {what} do not match its {f.rows} samples and {p.width} units; "
                "rerun the extraction for this partition."
            )
    return parts


def _token_totals(p: PartitionInfo, footers: list[dict] | None = None) -> pl.DataFrame:
    """A partition's token totals per unit (store.py): its parts' footer totals, added up."""
    parts = _part_totals(p, read_token_totals, TOKEN_TOTALS, "token totals", footers)
    return pl.DataFrame({"unit": np.arange(p.width, dtype=np.int64),
                         **{c.replace("token_", "tok_"): sum(t[c] for t in parts) for c in TOKEN_TOTALS}}).with_columns(
        tokens=pl.lit(sum(t["tokens"] for t in parts), pl.Int64),
        max_abs=pl.lit(max(t["max_abs"] for t in parts), pl.Float64))


def _with_keys(p: PartitionInfo, sums: pl.DataFrame, tokens: bool, footers: list[dict] | None = None) -> pl.DataFrame:
    """One partition's five sums with its key columns and token totals (null without them), in SUMS_SCHEMA order."""
    split, form, tower, layer = p.stream
    df = sums.with_columns(split=pl.lit(split), form=pl.lit(form), tower=pl.lit(tower), layer=pl.lit(layer, pl.Int64))
    if tokens:
        df = df.join(_token_totals(p, footers), on="unit", how="left")
    else:
        df = df.with_columns(pl.lit(None, SUMS_SCHEMA[c]).alias(c) for c in (*TOKEN_SUMS, "max_abs"))
    return df.select(c for c in SUMS_SCHEMA if c not in POSITION_COLUMNS)


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


def _footer_sums(p: PartitionInfo, footers: list[dict]) -> pl.DataFrame:
    """A partition's five sums per unit from its parts' footer sample totals (store.py), added up."""
    parts = _part_totals(p, read_sample_totals, SAMPLE_TOTALS, "sample totals", footers)
    return pl.DataFrame({"unit": np.arange(p.width, dtype=np.int64), "count": np.full(p.width, p.samples, np.int64),
                         **{c: sum(t[c] for t in parts) for c in SAMPLE_TOTALS}})


def position_statistics(root: str | Path) -> pl.DataFrame | None:
    """The released code's per-position statistics of every (split, form, tower, layer, unit), from the
    store's position sums (store.py; None when it has none); layer POOLED_LAYER: the tower's layers pooled.

    As `prune_utility.collect_feedforward_activations` averages them: the per-position values of each
    chunk of POSITION_CHUNK consecutive batches are averaged together (Σ over the chunk's batches of the
    position sums / Σ of their positions T, so a batch weighs by its padded length), then the chunk
    values are averaged. Columns pos_abs, pos_freq, pos_std, pos_rms. One difference, where the released
    code breaks: a batch of one row (e.g. a stream's last) has a NaN std there, which would turn the
    statistic of every unit NaN; here it is left out of the std's average (NaN only when a whole chunk
    has one-row batches, which scoring refuses)."""
    df = read_positions(root)
    if df is None:
        return None
    frames = []
    for (split, form, tower, layer), g in df.group_by("split", "form", "tower", "layer", maintain_order=True):
        batches = g["batch"].to_numpy()
        if not np.array_equal(batches, np.arange(len(batches))):
            raise ActivationStoreError(
                f"{root}: position statistics of {split}/{form}/{tower} layer {layer} have batches "
                f"{batches[:5].tolist()}..., not 0..{len(batches) - 1} once each; rerun the extraction.")
        width = len(g["abs"][0])
        try:
            values = np.stack([g[k].explode().to_numpy().reshape(len(g), width) for k in POSITION_STATS], 1)
        except ValueError:
            raise ActivationStoreError(f"{root}: position statistics of {split}/{form}/{tower} layer {layer} have "
                                       "rows of different widths; rerun the extraction.") from None
        starts = np.arange(0, len(g), POSITION_CHUNK)
        # A batch of one row has no std (torch gives NaN, which would make the released statistic NaN
        # for every unit): it is left out of the std's average (positions and sums), kept in the others'.
        alone = g["rows"].to_numpy() == 1
        values[alone, STD] = 0.0
        positions = np.repeat(g["positions"].to_numpy().astype(np.float64)[:, None], len(POSITION_STATS), 1)
        positions[alone, STD] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):  # a chunk of one-row batches only: NaN std
            stats = (np.add.reduceat(values, starts, axis=0)
                     / np.add.reduceat(positions, starts, axis=0)[:, :, None]).mean(0)  # (4, width)
        frames.append(pl.DataFrame({
            "split": [split] * width, "form": [form] * width, "tower": [tower] * width,
            "layer": np.full(width, layer, np.int64), "unit": np.arange(width, dtype=np.int64),
            **{f"pos_{k}": stats[j] for j, k in enumerate(POSITION_STATS)}}))
    return pl.concat(frames)


def _with_positions(sums: pl.DataFrame, root: str | Path) -> pl.DataFrame:
    """The sums table with the store's position statistics joined in (pos_*, pool_*; null when none)."""
    pos = position_statistics(root)
    if pos is None:
        return sums.with_columns(pl.lit(None, pl.Float64).alias(c) for c in POSITION_COLUMNS)
    stream = ["split", "form", "tower"]
    pooled = pos.filter(pl.col("layer") == POOLED_LAYER).drop("layer").rename(
        {f"pos_{k}": f"pool_{k}" for k in POSITION_STATS})
    return (sums.join(pos.filter(pl.col("layer") != POOLED_LAYER), on=[*stream, "layer", "unit"], how="left")
            .join(pooled, on=[*stream, "unit"], how="left"))


def _with_modules(sums: pl.DataFrame, root: str | Path) -> pl.DataFrame:
    """A Linear-output store's sums with each unit's module and output row (SITE_COLUMNS); others as given."""
    layout = read_layout(root)
    if layout is None:
        return sums
    frames = []
    for tower, mods in layout.items():
        frames += [pl.DataFrame({"tower": tower, "unit": np.arange(w, dtype=np.int64) + off, "module": m,
                                 "row": np.arange(w, dtype=np.int64)})
                   for (m, w), off in zip(mods, np.cumsum([0] + [w for _, w in mods]))]
    decoded = sums.join(pl.concat(frames), on=["tower", "unit"], how="left", maintain_order="left")
    if (lost := decoded.filter(pl.col("module").is_null())).height:
        r = lost.row(0, named=True)
        raise ActivationStoreError(f"{root}: {r['tower']} layer {r['layer']} unit {r['unit']} lies outside the "
                                   f"modules of {LAYOUT_FILE} ({layout.get(r['tower'])}); rerun the extraction.")
    return decoded


def neuron_sums(root: str | Path, tau: float, *, progress: bool = False, threads: int = 2,
                use_totals: bool = True) -> pl.DataFrame:
    """The five sums per (split, form, tower, layer, unit) of an activation folder (method.md, "Importance functions").

    Columns: split, form, tower, layer, unit, count, sum_abs (Σ|z|), sum (Σz), sum_sq (Σz²),
    count_active (#|z| > tau); sorted by (split, form, tower, layer, unit). The vision tower's text form
    has no rows (no partition; its statistics are 0). Validates the folder first (`store.check_complete`).
    Also the token totals (TOKEN_SUMS, max_abs) and, when the store has them, the position statistics
    (`position_statistics`: pos_* per layer, pool_* with the tower's layers pooled).

    With `use_totals` (the default), tau = store.SAMPLE_TAU and every part holding its sample totals
    (write_partition always writes them), the sums are the footers' totals added up: no activation is
    read. Otherwise the activation column is read (page checksums verified) and summed in Polars,
    `threads` chunks at once (reading one while summing another); both give the same sums up to
    float64 rounding of the order of addition.
    """
    tau = _number("tau", tau)
    if tau < 0:
        raise ValueError(f"tau must be >= 0; got {tau}. The default is 0.1.")
    summary = inspect_activations(root)
    check_complete(summary)
    tokens = all(p.token_stats for p in summary.partitions)  # else the token columns are null
    from_footers = use_totals and tau == SAMPLE_TAU and all(f.sample_totals for p in summary.partitions for f in p.parts)
    if from_footers:
        log.info("Adding up the footer totals of %d partitions under %s", len(summary.partitions), summary.root)
        parts = summary.partitions
        if progress:
            parts = progress_bar(parts, desc="neuron sums (footers)", unit="partition")
        frames = []
        for p in parts:
            footers = [read_footer_totals(f.path) for f in p.parts]  # one read per part serves both totals
            frames.append(_with_keys(p, _footer_sums(p, footers), tokens, footers))
        return _with_modules(_with_positions(pl.concat(frames), summary.root), summary.root)
    jobs = [(p, j) for p in summary.partitions for j in _jobs(p, max(1, CHUNK_VALUES // p.width))]
    log.info("Summing %d partitions (%d chunks) under %s", len(summary.partitions), len(jobs), summary.root)
    cache: dict = {}
    run = lambda job: _job_sums(job[1], job[0].width, tau, cache)
    frames, total, current = [], None, None

    def finish() -> None:  # one partition's sums, with its key columns and token totals
        frames.append(_with_keys(current, total, tokens))  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = _ordered_map(pool, run, jobs, ahead=2 * max(1, threads))  # partitions' jobs are consecutive
        if progress:
            results = progress_bar(results, total=len(jobs), desc="neuron sums", unit="chunk")
        for (p, _), sums in zip(jobs, results):
            if p is not current:
                if current is not None:
                    finish()
                current, total = p, sums
            else:
                total = _add(total, sums)  # type: ignore[arg-type]
        finish()
    # Partitions come sorted by (split, form, tower, layer) and units in order: no sort needed.
    return _with_modules(_with_positions(pl.concat(frames), summary.root), summary.root)


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


def _check_sums(sums: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """Validate a sums table for `params.mode`; returns it with the schema's types (token columns
    added as nulls when absent)."""
    need = [c for c in SUMS_SCHEMA if c not in (*TOKEN_SUMS, "max_abs", *POSITION_COLUMNS)]
    missing = [c for c in need if c not in sums.columns]
    if missing:
        raise ValueError(
            f"sums table lacks column(s) {', '.join(missing)}; expected {', '.join(SUMS_SCHEMA)} (from neuron_sums)."
        )
    sums = sums.with_columns(pl.lit(None, SUMS_SCHEMA[c]).alias(c) for c in SUMS_SCHEMA if c not in sums.columns)
    sums = sums.cast({k: v for k, v in SUMS_SCHEMA.items()})  # type: ignore[arg-type]
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
    outputs = params.mode == "released" and params.option("linear_outputs")
    if outputs and "module" not in sums.columns:
        raise ValueError("released option linear_outputs scores the MLP Linears' outputs, and these are the sums of "
                         "hidden units. Use the sums of the store's linear_outputs/ sub-store (extract with "
                         "linear_outputs=True; the flow does when the option is set).")
    if not outputs and "module" in sums.columns:
        raise ValueError(f"these sums are of the MLP Linears' outputs (a linear_outputs store), which only the "
                         f"released mode's linear_outputs option scores; mode {params.mode!r} scores hidden units: "
                         "use the sums of the activation store itself, or set linear_outputs.")
    if SCORING_MODES[params.mode].token_stats and sums["tokens"].null_count():
        raise ActivationStoreError(
            f"scoring mode {params.mode!r} needs the store's token statistics (per-token sums), and these "
            "activations have none (extracted with token_stats=False, or by an older manu). Rerun the extraction "
            "(token statistics are on by default), or use mode 'paper'."
        )
    return sums


def _check_holes(df: pl.DataFrame, split: str, column_of: dict[str, str]) -> None:
    """Every neuron has the statistics its tower needs ({form: a column that is null when missing})."""
    for tower in df["tower"].unique().sort():
        for f in (f for s, f in required_streams(tower) if s == split):
            if f not in column_of:
                continue
            hole = df.filter((pl.col("tower") == tower) & pl.col(column_of[f]).is_null())
            if len(hole):
                layer, unit = hole.sort(["layer", "unit"]).select("layer", "unit").row(0)
                raise ValueError(
                    f"sums table has no {split}/{f} row for {tower} layer {layer} unit {unit} (present in "
                    "other streams); every neuron needs both splits and both forms (vision: multimodal only)."
                )


def _paper_scores(sums: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """method.md, "Importance functions" (Section 3.1) and the score S = I(D_f) / (I(D_r) + ε)."""
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
        _check_holes(df, split, {f: f"A_{f}" for f in FORMS})
        a_m, a_t = pl.col("A_multimodal"), pl.col("A_text")
        n_m, n_t = pl.col("N_multimodal"), pl.col("N_text")
        q_m, q_t = pl.col("Q_multimodal"), pl.col("Q_text")
        imp = {
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
    return table.with_columns(score=_ratio(pl.col("forget_importance"), pl.col("retain_importance") + eps)).collect()


def _token_stats(df: pl.LazyFrame, freq_column: str) -> pl.LazyFrame:
    """Per-token statistics from token sums: mean |a|, share of tokens counted by `freq_column`, the
    unbiased standard deviation over tokens (torch's .std(); 0 for a single token) and the RMS."""
    n = pl.col("tokens").cast(pl.Float64)
    var = ((pl.col("tok_sq") - pl.col("tok_sum") ** 2 / n) / (n - 1)).clip(lower_bound=0.0)
    return df.with_columns(
        s_abs=pl.col("tok_abs") / n,
        s_freq=pl.col(freq_column) / n,
        s_var=pl.when(n > 1).then(var.sqrt()).otherwise(0.0),
        s_rms=(pl.col("tok_sq") / n).sqrt(),
    )


def _position_stats(used: pl.DataFrame, kind: str) -> pl.DataFrame:
    """The released code's per-position statistics (`position_statistics`) as s_abs, s_freq, s_var (its
    std), s_rms; `kind` pos (per layer) or pool (the tower's layers pooled)."""
    cols = {k: f"{kind}_{'std' if k == 'var' else k}" for k in WEIGHT_NAMES}
    def first(bad) -> dict | None:  # the first row where `bad` holds for one of the columns
        rows = used.filter(pl.any_horizontal(bad(pl.col(c)) for c in cols.values()))
        return rows.row(0, named=True) if len(rows) else None

    if (r := first(pl.Expr.is_null)) is not None:
        raise ActivationStoreError(
            f"released option per_position needs the store's position statistics, and {r['split']}/{r['form']} "
            f"{r['tower']} layer {r['layer']} has none{' pooled over its layers' if kind == 'pool' else ''}. "
            "Rerun the extraction with position_stats=True (the flow does when per_position is set).")
    if (r := first(pl.Expr.is_nan)) is not None:
        raise ValueError(
            f"released option per_position: {r['split']}/{r['form']} {r['tower']} layer {r['layer']} has a chunk of "
            f"{POSITION_CHUNK} batches of one row each, which has no per-position std (rows − 1 = 0). Extract with "
            "batches of at least 2 rows (the released code's batch size is 4), or drop per_position.")
    return used.with_columns(**{f"s_{k}": pl.col(c) for k, c in cols.items()})


def _check_clamp(sums: pl.DataFrame, clamp: float | None) -> None:
    """The released code clamps activations to ±clamp first; the store keeps per-sample token sums,
    not tokens, so a clamp is reproduced exactly only when it changes nothing (max |a| <= clamp)."""
    if clamp is None:
        return
    over = sums.filter(pl.col("max_abs").is_null() | (pl.col("max_abs") > clamp))
    if len(over):
        r = over.row(0, named=True)
        seen = "was not recorded" if r["max_abs"] is None else f"reaches {r['max_abs']:g}"
        raise ValueError(
            f"released option clamp={clamp:g} cannot be reproduced exactly: |a| in {r['split']}/{r['form']} "
            f"{r['tower']} layer {r['layer']} {seen}, and the store keeps per-sample token sums, not the tokens. "
            "Drop the clamp option (exact when no |a| exceeds it), or re-extract with a manu that records max_abs."
        )


def _pooled(sums: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return sums.group_by(by, maintain_order=True).agg(*(pl.col(c).sum() for c in TOKEN_SUMS))


def released_choices(params: ImportanceParams, model_type: str | None) -> dict[str, ReleasedTower]:
    """Per tower, the `arch.ReleasedTower` the released mode follows: with option sites="authors" (the
    default) the released code's choices for `model_type` (a `config.model_type`, e.g. "idefics2"), with
    sites="uniform" or no model_type the mode's own rule (every Linear, the last three layers), which is
    the authors' choice on LLaVA. docs/method.md, "Mode `released`", "Per architecture"."""
    from manu_core.arch import ReleasedTower, get_adapter  # imported here: arch imports torch, scoring needs none

    if params.mode != "released" or params.option("sites") == "uniform" or model_type is None:
        return {t: ReleasedTower() for t in TOWERS}
    adapter = get_adapter(model_type)
    return {t: adapter.released(t) for t in TOWERS}


def _authors_linears(sums: pl.DataFrame, choices: dict) -> pl.DataFrame:
    """A Linear-output store's sums restricted, per tower, to the Linears the released code hooks
    (ReleasedTower.linears; Idefics2's vision tower: fc1 only). The others are not neurons of the table:
    never scored, selected or drawn by the random control, as if never hooked (a Linear's statistics do
    not depend on which other Linears are hooked, so one extraction serves both `sites` settings)."""
    keep = {t: c.linears for t, c in choices.items() if c.linears is not None}
    if "module" not in sums.columns or not keep:
        return sums
    for tower, linears in keep.items():
        present = set(sums.filter(pl.col("tower") == tower)["module"].unique().to_list())
        if present and not present & set(linears):
            raise ValueError(f"released option sites='authors' scores the {tower} outputs of {', '.join(linears)} (the "
                             f"released code's hook sites), and these sums have only {', '.join(sorted(present))}. "
                             "Extract again with linear_outputs=True (it hooks every Linear), or set sites='uniform'.")
    dropped = pl.any_horizontal(
        (pl.col("tower") == t) & ~pl.col("module").is_in(list(linears)) for t, linears in keep.items())
    return sums.filter(~dropped)


def _released_scores(sums: pl.DataFrame, params: ImportanceParams, model_type: str | None = None) -> pl.DataFrame:
    """The authors' released code (docs/method.md, "Scoring modes"): vision units on the image+text
    form, language units on the text form; per-token statistics per split; score Σ_k w_k (F_k/(R_k+ε) − 1).
    With pool_layers, a tower's layers are pooled per unit index and the score lands on three of its layers:
    per architecture, those its code names (`released_choices`; the last three but on Idefics2's vision
    tower). With linear_outputs, the Linears it hooks (every one but on Idefics2's vision tower: fc1)."""
    eps, w, opts = params.eps, params.weights.as_dict(), dict(params.options)
    choices = released_choices(params, model_type)
    if model_type is None and params.option("sites") == "authors" and (opts["pool_layers"] or opts["linear_outputs"]):
        log.warning("released mode without the model's architecture (model_type=None): the last three layers and "
                    "every Linear are scored, the released code's choice on LLaVA but not on Idefics2 (vision: fc1 "
                    "outputs, layers 21-23). Pass model_type (config.model_type) to follow it per architecture.")
    sums = _authors_linears(sums, choices)
    form_of = pl.when(pl.col("tower") == "vision").then(pl.lit("multimodal")).otherwise(pl.lit("text"))
    used = sums.filter(pl.col("form") == form_of)
    _check_clamp(used, opts["clamp"])
    neurons = sums.select(NEURON).unique()
    key = list(NEURON)
    if opts["pool_layers"]:
        widths = used.group_by("tower", "layer").agg(pl.len()).group_by("tower").agg(pl.col("len").n_unique())
        if (widths["len"] > 1).any():
            raise ValueError("released option pool_layers needs every layer of a tower to have the same width.")
        key = ["tower", "unit"]
    if opts["per_position"]:
        used = _position_stats(used, "pool" if opts["pool_layers"] else "pos")
        if opts["pool_layers"]:  # the pooled values repeat in every layer's row: take one
            used = used.group_by("split", *key, maintain_order=True).agg(pl.col(f"s_{k}").first() for k in WEIGHT_NAMES)
    else:
        if opts["pool_layers"]:
            used = _pooled(used, ["split", *key])
        used = _token_stats(used.lazy(), "tok_active").collect()
    frames = {}
    for split in SPLITS:
        df = used.lazy().filter(pl.col("split") == split)
        frames[split] = df.select(*key, **{f"{split}_{k}": pl.col(f"s_{k}") for k in WEIGHT_NAMES})
    table = frames["forget"].join(frames["retain"], on=key, how="inner").collect()
    score = pl.sum_horizontal([w[k] * (pl.col(f"forget_{k}") / (pl.col(f"retain_{k}") + eps) - 1) for k in WEIGHT_NAMES])
    table = table.with_columns(
        *(pl.sum_horizontal([w[k] * pl.col(f"{s}_{k}") for k in WEIGHT_NAMES]).alias(f"{s}_importance")
          for s in SPLITS),
        score=score,
    )
    if opts["pool_layers"]:
        # the released code stores every layer under three layers' names: per tower, the score lands there
        layers = neurons.select("tower", "layer").unique().group_by("tower").agg(pl.col("layer"))
        targets = pl.DataFrame([(t, l) for t, ls in layers.iter_rows() for l in choices[t].pool_layers(ls)],
                               schema={"tower": pl.String, "layer": pl.Int64}, orient="row")
        table = neurons.join(targets, on=["tower", "layer"], how="inner").join(table, on=["tower", "unit"], how="left")
        table = neurons.join(table, on=list(NEURON), how="left")  # other layers: no score, never selected
    else:
        table = neurons.join(table, on=list(NEURON), how="left")
        _check_holes(table, "forget", {"multimodal": "score"})
    return table


def _selective_scores(sums: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """Selective pruning (Pochinkov & Schoots 2024): per split, one statistic over every counted token of
    both forms (vision: image+text only); score F/(R+ε). The frequency statistic counts a > 0."""
    eps, stat = params.eps, params.option("statistic")
    stat = "var" if stat == "std" else stat
    pooled = _pooled(sums, ["split", *NEURON])
    frames = {}
    for split in SPLITS:
        df = _token_stats(pooled.lazy().filter(pl.col("split") == split), "tok_pos")
        frames[split] = df.select(*NEURON, **{f"{split}_{k}": pl.col(f"s_{k}") for k in WEIGHT_NAMES},
                                  **{f"{split}_importance": pl.col(f"s_{stat}")})
    table = frames["forget"].join(frames["retain"], on=list(NEURON), how="inner")
    return table.with_columns(score=_ratio(pl.col("forget_importance"), pl.col("retain_importance") + eps)).collect()


SCORERS = {"paper": _paper_scores, "released": _released_scores, "selective": _selective_scores}


def importance_table(sums: pl.DataFrame, params: ImportanceParams, *, already: pl.DataFrame | None = None,
                     model_type: str | None = None) -> pl.DataFrame:
    """Per-split statistics, score and selection under `params.mode`: one row per neuron, sorted by
    (tower, layer, unit).

    Columns: tower, layer, unit, forget_{abs,freq,var,rms,importance}, retain_{...}, score, rank, selected;
    for the sums of a Linear-output store (released option linear_outputs), also module and row (SITE_COLUMNS).
    paper: the four importance functions and their weighted sum I; released and selective: the split's
    token statistics (mean |a|, share active, std, rms) and, as importance, their weighted sum (released)
    or the statistic scored (selective). A neuron without a score (released with pool_layers: layers
    other than the three its score lands on) has null score and rank and is never selected.

    `model_type`: the scored model's `config.model_type` (e.g. "llava", "idefics2"). The released mode
    follows the released code's choices for that architecture (option sites="authors", the default;
    `released_choices`); None scores as sites="uniform" (the authors' choice on LLaVA, not on Idefics2).
    The other modes ignore it.

    `already`: a previous importance table (iterative pruning): its selected neurons stay selected and
    are left out of the ranking, and ⌊α·N⌋ more are selected among the others.
    """
    sums = _check_sums(sums, params)
    if params.mode == "released":  # the one mode that reads the architecture
        table = _released_scores(sums, params, model_type)
    else:
        table = SCORERS[params.mode](sums, params)
    previous = None
    if already is not None:
        if params.mode == "released":
            raise ValueError("iterative selection (already=...) is for the 'selective' and 'paper' modes; the "
                             "released code selects once per tower.")
        previous = already.filter(pl.col("selected")).select(*NEURON, prev=pl.lit(True))
    out = _select_threshold(table, params) if params.mode == "released" else _select(table, params, previous)
    if "module" in sums.columns:  # a Linear-output store: name each unit's module and output row
        names = sums.select(*NEURON, *SITE_COLUMNS).unique(NEURON)
        out = out.join(names, on=list(NEURON), how="left", maintain_order="left")
    return out


def require_selection(table: pl.DataFrame, params: ImportanceParams) -> int:
    """The number of selected neurons; an α that selects none is a mistake, not a result: the error
    says which α would select one (⌊α·N⌋ = 0 in every scope group). Callers that prune call this."""
    n = int(table["selected"].sum())
    if n:
        return n
    group = {"global": [], "tower": ["tower"], "layer": ["tower", "layer"]}[params.scope]
    scored = table.filter(pl.col("score").is_not_null())
    largest = int(scored.group_by(group).len()["len"].max()) if group else scored.height
    step = Fraction(10) ** (math.floor(math.log10(1 / max(largest, 1))) - 2)  # 1/N rounded up at 3 digits
    smallest = float(math.ceil(Fraction(1, max(largest, 1)) / step) * step)
    raise ValueError(
        f"alpha={params.alpha:g} selects no neuron: ⌊α·N⌋ = 0 in every {params.scope} group (largest N = "
        f"{largest:,}). The smallest α that selects one neuron here is about 1/{largest:,}: use alpha >= "
        f"{smallest:g}; the paper uses 0.02, 0.05 and 0.1."
    )


def _select_threshold(table: pl.DataFrame, params: ImportanceParams) -> pl.DataFrame:
    """The released code's selection: per tower, k = ⌊α·N⌋ of the scored neurons, threshold = the k-th
    largest score, selected = score >= threshold (ties at the threshold all selected)."""
    alpha = Fraction(repr(params.alpha))
    order = table.sort(["tower", "score", *NEURON], descending=[False, True, False, False, False], nulls_last=True)
    order = order.with_columns(
        rank=pl.when(pl.col("score").is_not_null()).then(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("tower"))
    )
    parts = []
    for _, grp in order.group_by("tower", maintain_order=True):
        scored = grp.filter(pl.col("score").is_not_null())
        k = math.floor(alpha * scored.height)
        sel = (pl.col("score") >= scored["score"][k - 1]).fill_null(False) if k > 0 else pl.lit(False)
        parts.append(grp.with_columns(selected=sel))
    return pl.concat(parts).sort(list(NEURON)).select(OUTPUT_COLUMNS)


def _select(table: pl.DataFrame, params: ImportanceParams, previous: pl.DataFrame | None = None) -> pl.DataFrame:
    """rank: 1-based, descending score, ties by (tower, layer, unit); selected: rank <= ⌊α·N⌋ per scope group.
    With `previous` (prev = True rows), those stay selected, are ranked after every other neuron, and
    ⌊α·N⌋ others are selected (N counts every neuron of the group)."""
    group = {"global": [], "tower": ["tower"], "layer": ["tower", "layer"]}[params.scope]
    if previous is not None:
        table = table.join(previous, on=list(NEURON), how="left").with_columns(pl.col("prev").fill_null(False))
    else:
        table = table.with_columns(prev=pl.lit(False))
    order = table.sort([*group, "prev", "score", *NEURON],
                       descending=[False] * len(group) + [False, True, False, False, False], nulls_last=True)
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
    new = (pl.col("rank") <= pl.col("k")) & ~pl.col("prev") & pl.col("score").is_not_null()
    out = order.with_columns(selected=new | pl.col("prev")).drop("k", "prev")
    return out.sort(list(NEURON)).select(OUTPUT_COLUMNS)


def compute_importance(root: str | Path, params: ImportanceParams, *, progress: bool = False,
                       model_type: str | None = None) -> pl.DataFrame:
    """Importance table of an activation folder: `importance_table(neuron_sums(root, params.tau), params,
    model_type=model_type)`; with the released option linear_outputs, of its linear_outputs/ sub-store
    (when `root` is not one)."""
    root = Path(root)
    if params.mode == "released" and params.option("linear_outputs") and read_layout(root) is None \
            and (root / OUTPUTS_DIR).is_dir():
        root = root / OUTPUTS_DIR
    return importance_table(neuron_sums(root, params.tau, progress=progress), params, model_type=model_type)


def write_importance(df: pl.DataFrame, path: str | Path) -> Path:
    """Write the importance table as Parquet, atomically and with deterministic bytes; returns the path."""
    missing = [c for c in OUTPUT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"importance table lacks column(s) {', '.join(missing)}; write the output of importance_table."
        )
    table = df.select(*OUTPUT_COLUMNS, *(c for c in SITE_COLUMNS if c in df.columns)).to_arrow()
    return write_table_atomic(table, path, compression="zstd", compression_level=3, row_group_size=1 << 20)
