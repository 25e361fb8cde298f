"""The activation store: per-sample MLP activations as hive-partitioned Parquet (the user-facing contract).

Layout, one folder per extraction (method.md, "Data forms" and "Neurons"):

    <root>/split=<forget|retain>/form=<multimodal|text>/tower=<language|vision>/layer=<int>/part-NNNNN.parquet

Each part file has one row per sample and these columns (extra columns are allowed and ignored):

    sample_id   str
    profile_id  str
    activation  list of float32: z(d) for every hidden unit of that layer, in unit order
                (method.md, "Per-sample activation"); every row of a (tower, layer) has the same length

and, when the extraction recorded token statistics (it does by default; the `released` and
`selective` scoring modes need them, `paper` does not), the part's **token totals** in the file's
key-value metadata `manu.token_totals` (`read_token_totals(path)` decodes them): summed over the
part's samples in float64, per unit over every counted position (the positions whose mean is z(d)):

    samples       int: the part's rows
    tokens        int: Σ over samples of the positions counted
    token_sum     (width,) float64: Σ a_t (= Σ over samples of z(d)·positions)
    token_abs     (width,): Σ |a_t|      token_sq (width,): Σ a_t²
    token_pos     (width,): #(a_t > 0)   token_active (width,): #(|a_t| > TOKEN_TAU), TOKEN_TAU = 0.1
    max_abs       float: the largest |a_t| of the part, so a clamp at ±c (the released code clamps
                  at ±1e3) is known to change nothing when max_abs <= c

Every part also carries its **sample totals** in the key-value metadata `manu.sample_totals`
(`read_sample_totals(path)`), whatever the extraction recorded: the five sums of the `paper` mode
over the part's rows, in float64 from the stored float32 values: samples (int), sum (Σz), sum_abs
(Σ|z|), sum_sq (Σz²), count_active (#(|z| > SAMPLE_TAU), SAMPLE_TAU = 0.1, compared in float64).
The importance step adds these up instead of reading the activation column (which is what made it
slow: a 7B-shaped store is ~10 GB of float32); it reads the column only for another τ, for a file
without them (another tool's) or when asked to (`neuron_sums(..., use_totals=False)`). The footer's
totals are written with their rows in one atomic file; a damaged footer fails the zip CRC check of
`np.load` and is reported with the file's name. Both totals are entries of the Parquet file's
key-value metadata (`pq.read_metadata(path).metadata`), not of the Arrow schema's metadata: the
schema is stored in the footer too (ARROW:schema), and a second, base64 copy of the totals there
made every footer read twice as slow.

Per-token statistics of a stream (mean |a|, share active, std, rms over every counted token) follow
exactly from these totals. Totals per part, not per sample: every scoring mode needs only a
stream's totals, and per-sample totals would quadruple the store. They sit in the footer so they
are replaced with their part in one atomic rename.

**Position statistics** (optional: `extract_activations(..., position_stats=True)`; the `released`
mode's `per_position` option reads them). The authors' released code does not average per sample:
per batch it takes statistics over the rows of the hooked tensor at each position, padding
included. For that, each stream folder `<root>/split=/form=/tower=` holds `positions-NNNNN.parquet`
beside its `layer=` folders (NNNNN: the part), one row per (batch, layer) with:

    batch      int: the batch's index in its stream (0, 1, ...: the extraction's batches, in order)
    layer      int: the layer, or POOLED_LAYER (-1): every layer of the tower together (rows = layers x
               batch rows), as the released code's pooling quirk sees them
    positions  int: T, the positions of the hooked tensor (the batch's padded length; vision: patches)
    rows       int: the rows at each position (batch rows, or images; x layers when pooled)
    abs, freq, std, rms   list of float64, one per unit: Σ over the T positions of the position's
               mean |a|, share of |a| > TOKEN_TAU, standard deviation (rows − 1 denominator; NaN
               for one row, as torch) and root mean square, over the rows

Averages over positions and batches follow from these sums (importance.py, `position_statistics`).

**Linear outputs** (optional: `extract_activations(..., linear_outputs=True)`; the `released` mode's
`linear_outputs` option reads them). The authors' released code hooks the *outputs* of the MLP's
Linears, not its hidden units. Those are kept in a sub-store `<root>/linear_outputs/` of the same
layout, columns, totals and position files, where the `activation` of a (tower, layer) is the
layer's Linear outputs side by side in forward order: gate_proj, up_proj, down_proj (gated MLPs);
fc1, fc2 (plain MLPs). down_proj / fc2 outputs are residual-stream channels (d_model wide), the
others hidden-unit pre-activations. `<root>/linear_outputs/modules.json` says which: per tower, the
[module, width] pairs in that order (`read_layout`), so unit u of a layer is row u − offset of the
module whose span holds it. Readers of `<root>` skip the sub-store; `inspect_activations(<root>/linear_outputs)`
reads it like any store. It holds every layer, dead vision layers included (LLaVA's last: the
released code hooks it, and its pooling quirk counts it), unlike the hidden-unit store.

Storage choices (readers also accept list<float32> and large_list<float32> from other tools, checking
that every row has the same length): `fixed_size_list<float32, width>` (Polars reads it as an Array
column, the width lives in the schema); CRC32 page checksums, verified by the importance step's
reader, so a damaged file fails with its name instead of changing selections; no compression
(mean-pooled float32 is close to incompressible, and read speed is what the importance step needs);
row groups of 256 rows (what the importance step sums at a time); no dictionary or timestamps, so
the same inputs give the same bytes. Measured costs: README, "Tests and benchmarks".

Writes go to a temporary file in the same folder (name starting with '.', so never a `part-*` file),
are flushed and fsync'ed, then renamed over the final name: a reader sees either the old or the new
complete file, and a crash leaves only an ignored temporary file.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from manu_core.io import atomic_file, atomic_write_json
from manu_core.vocab import FORMS, SPLITS, TOWERS  # noqa: F401  (re-exported: the store's partition keys)
COLUMNS = ("sample_id", "profile_id", "activation")
TOKEN_STATS = ("abs", "sq", "pos", "active")  # per-sample token sums write_partition takes (token_<name>)
TOKEN_TOTALS = ("token_sum", *(f"token_{k}" for k in TOKEN_STATS))  # per-unit arrays of the token totals
TOKEN_TAU = 0.1  # threshold of token_active (the released code's |a| > 0.1)
TOKEN_TOTALS_KEY = b"manu.token_totals"  # key-value metadata of a part file
SAMPLE_TOTALS = ("sum", "sum_abs", "sum_sq", "count_active")  # per-unit arrays of the sample totals
SAMPLE_TAU = 0.1  # threshold of count_active (the paper's τ, method.md)
SAMPLE_TOTALS_KEY = b"manu.sample_totals"
ROW_GROUP_SIZE = 256  # rows per Parquet row group (fixed: part of the deterministic-bytes promise)
COMPRESSION = "none"
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
POSITION_STATS = ("abs", "freq", "std", "rms")  # per-position statistics, summed over positions
POOLED_LAYER = -1  # `layer` of a tower's position statistics with its layers pooled
POSITIONS_GLOB = "split=*/form=*/tower=*/positions-*.parquet"
OUTPUTS_DIR = "linear_outputs"  # the sub-store of the MLP Linears' outputs (module docstring)
LAYOUT_FILE = "modules.json"  # its layout: tower -> [[module, width], ...] in storage order


class ActivationStoreError(ValueError):
    """A bad activation store or write request: the message names the file, the rule and the fix."""


def required_streams(tower: str) -> tuple[tuple[str, str], ...]:
    """The (split, form) pairs a tower must have: all four, except vision which has no text form."""
    forms = ("multimodal",) if tower == "vision" else FORMS
    return tuple((s, f) for s in SPLITS for f in forms)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ActivationStoreError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value  # type: ignore[return-value]


def _check_index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ActivationStoreError(f"{name} must be an integer >= 0; got {value!r}.")
    return int(value)


def partition_dir(root: str | Path, split: str, form: str, tower: str, layer: int) -> Path:
    """The folder of one stream: <root>/split=../form=../tower=../layer=.."""
    _check_choice("split", split, SPLITS)
    _check_choice("form", form, FORMS)
    _check_choice("tower", tower, TOWERS)
    layer = _check_index("layer", layer)
    return Path(root) / f"split={split}" / f"form={form}" / f"tower={tower}" / f"layer={layer}"


# ----------------------------------------------------------------------------------------------
# Writing


def _activation_type(width: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), width)


def _schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("profile_id", pa.string(), nullable=False),
            pa.field("activation", _activation_type(width), nullable=False),
        ]
    )


def _encode_totals(totals: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in totals.items()})
    return base64.b64encode(buf.getvalue())


def read_footer_totals(path: str | Path) -> dict[bytes, bytes]:
    """A part file's raw footer totals {key: encoded bytes} (one footer read); give them to
    read_token_totals / read_sample_totals as `footer` to decode without reading the file again."""
    try:
        kv = pq.read_metadata(path).metadata or {}
    except Exception as e:  # a truncated or foreign file
        raise ActivationStoreError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}). "
                                   "Delete it and rerun the extraction for this partition.") from e
    return {k: v for k, v in kv.items() if k in (TOKEN_TOTALS_KEY, SAMPLE_TOTALS_KEY)}


def _read_totals(path: str | Path, key: bytes, scalars: tuple[str, ...], what: str,
                 footer: dict[bytes, bytes] | None) -> dict | None:
    raw = (read_footer_totals(path) if footer is None else footer).get(key)
    if raw is None:
        return None
    try:
        with np.load(io.BytesIO(base64.b64decode(raw))) as z:
            out = {k: z[k] for k in z.files}
        return {**out, **{k: out[k].item() for k in scalars}}
    except Exception as e:  # damaged metadata (base64, zip CRC): name the file
        raise ActivationStoreError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); "
                                   "rerun the extraction for this partition.") from e


def read_token_totals(path: str | Path, footer: dict[bytes, bytes] | None = None) -> dict | None:
    """A part file's token totals (module docstring) from its footer: {samples, tokens, max_abs,
    token_sum, token_abs, token_sq, token_pos, token_active}; None when it has none."""
    return _read_totals(path, TOKEN_TOTALS_KEY, ("samples", "tokens", "max_abs"), "token totals", footer)


def read_sample_totals(path: str | Path, footer: dict[bytes, bytes] | None = None) -> dict | None:
    """A part file's sample totals (module docstring) from its footer: {samples, sum, sum_abs, sum_sq,
    count_active}; None when it has none."""
    return _read_totals(path, SAMPLE_TOTALS_KEY, ("samples",), "sample totals", footer)


def _sample_totals(values: np.ndarray) -> dict:
    """The five paper-mode sums over a part's rows, float64 (row blocks bound the temporaries)."""
    width = values.shape[1]
    out = {"samples": len(values), **{k: np.zeros(width) for k in SAMPLE_TOTALS}}
    for i in range(0, len(values), ROW_GROUP_SIZE):
        x = values[i:i + ROW_GROUP_SIZE].astype(np.float64)
        a = np.abs(x)
        out["sum"] += x.sum(0)
        out["sum_abs"] += a.sum(0)
        out["sum_sq"] += np.einsum("ij,ij->j", x, x)
        out["count_active"] += (a > SAMPLE_TAU).sum(0)
    out["count_active"] = out["count_active"].astype(np.int64)
    return out


def _check_ids(name: str, ids: Sequence[str], n: int) -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise ActivationStoreError(
            f"{name} must be a sequence of strings, one per row; got a single {type(ids).__name__}."
        )
    ids = list(ids)
    if len(ids) != n:
        raise ActivationStoreError(
            f"{name} must have one entry per activation row; got {len(ids)} for {n} rows. "
            "Pass the ids of exactly the samples in `activations`, in the same order."
        )
    for i, v in enumerate(ids):
        if not isinstance(v, str) or not v:
            raise ActivationStoreError(f"{name}[{i}] must be a non-empty string; got {v!r}.")
    return ids


def write_table_atomic(table: pa.Table, path: str | Path, **kwargs) -> Path:
    """Write `table` to `path` via a temporary file in the same folder, fsync, and an atomic rename.

    `kwargs` go to `pyarrow.parquet.write_table`. The temporary name starts with '.', so no reader of
    this store ever takes it for a part file.
    """
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_partition(
    root: str | Path,
    *,
    split: str,
    form: str,
    tower: str,
    layer: int,
    sample_ids: Sequence[str],
    profile_ids: Sequence[str],
    activations: np.ndarray,
    part: int = 0,
    tokens: np.ndarray | Sequence[int] | None = None,
    token_stats: dict[str, np.ndarray] | None = None,
    max_abs: float | None = None,
) -> Path:
    """Write one part file of a stream: rows = samples, `activations` (n, width) float32, unit order.

    `tokens` (n,) positions counted per sample and `token_stats` ({abs, sq, pos, active} -> (n, width)
    per-sample sums over those positions, float32) add the part's token totals file (module docstring);
    give both or neither. `max_abs`: the largest |a_t| of the part (required with them).

    Writes `part-{part:05d}.parquet` atomically (temporary name, then `os.replace`); an existing part
    with the same number is replaced (a rerun after a crash rewrites it whole). Returns its path.
    """
    folder = partition_dir(root, split, form, tower, layer)
    if tower == "vision" and form == "text":
        raise ActivationStoreError(
            "The vision tower has no text-form partition: it does not run on text-only input, so its "
            "text-form statistics are 0 (method.md, 'Vision neurons on text-only input'). Do not store it."
        )
    part = _check_index("part", part)
    if not isinstance(activations, np.ndarray):
        raise ActivationStoreError(
            f"activations must be a numpy array of shape (samples, units); got {type(activations).__name__}. "
            "Convert a torch tensor with `.float().cpu().numpy()`."
        )
    if activations.ndim != 2 or activations.shape[0] == 0 or activations.shape[1] == 0:
        raise ActivationStoreError(
            f"activations must have shape (samples, units) with both >= 1; got shape {activations.shape}."
        )
    if not np.issubdtype(activations.dtype, np.floating):
        raise ActivationStoreError(
            f"activations must be a float array (stored as float32); got dtype {activations.dtype}."
        )
    with np.errstate(over="ignore"):  # an overflow to inf is reported just below, with its row and unit
        values = np.ascontiguousarray(activations, dtype=np.float32)
    if not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[0]
        raise ActivationStoreError(
            f"activations must be finite (no NaN or inf, also after casting to float32); row {bad[0]}, "
            f"unit {bad[1]} of {folder / f'part-{part:05d}.parquet'} is {values[bad[0], bad[1]]}. "
            "Check the extraction for overflow (run the model in float32 or bfloat16, not float16)."
        )
    n, width = values.shape
    sids = _check_ids("sample_ids", sample_ids, n)
    pids = _check_ids("profile_ids", profile_ids, n)
    if (tokens is None) != (token_stats is None) or (tokens is not None and max_abs is None):
        raise ActivationStoreError(
            "tokens, token_stats and max_abs go together (token totals need each sample's position count and "
            f"the part's largest |a|); got tokens={'None' if tokens is None else 'given'}, token_stats="
            f"{'None' if token_stats is None else 'given'}, max_abs={max_abs!r}."
        )
    meta = {SAMPLE_TOTALS_KEY: _encode_totals(_sample_totals(values))}
    if tokens is not None:
        meta[TOKEN_TOTALS_KEY] = _encode_totals(_token_totals(folder, values, tokens, token_stats, max_abs))
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=_activation_type(width))
    table = pa.Table.from_arrays(
        [pa.array(sids, pa.string()), pa.array(pids, pa.string()), column], schema=_schema(width)
    )
    path = folder / f"part-{part:05d}.parquet"
    with atomic_file(path) as tmp:
        with pq.ParquetWriter(
            tmp,
            table.schema,
            compression=COMPRESSION,
            use_dictionary=["sample_id", "profile_id"],
            write_statistics=["sample_id", "profile_id"],
            write_page_checksum=True,  # readers verify them: a flipped byte is an error, not a silent change
        ) as writer:
            writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
            # The file's key-value metadata, not the Arrow schema's: the schema (ARROW:schema) would
            # carry a second, base64-encoded copy of the totals and double every footer read.
            writer.add_key_value_metadata(meta)
    return path


def write_positions(root: str | Path, *, split: str, form: str, tower: str, part: int,
                    records: Sequence[tuple[int, int, int, int, np.ndarray]]) -> Path:
    """One part's position statistics of a stream (module docstring): records of (batch, layer,
    positions, rows, (4, width) float64 in POSITION_STATS order). Written atomically."""
    folder = partition_dir(root, split, form, tower, 0).parent
    part = _check_index("part", part)
    if not records:
        raise ActivationStoreError(f"no position statistics to write for {folder} part {part}.")
    values = [np.asarray(r[4], dtype=np.float64) for r in records]
    bad = [v.shape for v in values if v.ndim != 2 or v.shape[0] != len(POSITION_STATS)]
    if bad:
        raise ActivationStoreError(f"position statistics must be ({len(POSITION_STATS)}, width) arrays; got {bad[0]}.")
    columns = {k: pa.array([int(r[j]) for r in records], pa.int64())
               for j, k in enumerate(("batch", "layer", "positions", "rows"))}
    for j, k in enumerate(POSITION_STATS):
        columns[k] = pa.array([v[j] for v in values], pa.list_(pa.field("element", pa.float64(), nullable=False)))
    folder.mkdir(parents=True, exist_ok=True)
    return write_table_atomic(pa.table(columns), folder / f"positions-{part:05d}.parquet", compression=COMPRESSION,
                              write_statistics=False, use_dictionary=False, store_schema=True)


def read_positions(root: str | Path) -> pl.DataFrame | None:
    """Every position-statistics row of the store with its split, form and tower (None: the store has
    none). Rows in (split, form, tower, batch, layer) order."""
    files = sorted(Path(root).glob(POSITIONS_GLOB))
    if not files:
        return None
    frames = []
    for f in files:
        keys = {k: v for k, _, v in (part.partition("=") for part in f.parent.relative_to(root).parts)}
        try:
            df = pl.read_parquet(f)
        except Exception as e:  # a damaged file: say which
            raise ActivationStoreError(f"{f}: unreadable position statistics ({e}); rerun the extraction.") from e
        missing = [c for c in ("batch", "layer", "positions", "rows", *POSITION_STATS) if c not in df.columns]
        if missing:
            raise ActivationStoreError(f"{f}: position statistics lack column(s) {', '.join(missing)}; rerun the extraction.")
        frames.append(df.select(pl.lit(keys.get("split")).alias("split"), pl.lit(keys.get("form")).alias("form"),
                                pl.lit(keys.get("tower")).alias("tower"), "batch", "layer", "positions", "rows",
                                *POSITION_STATS))
    return pl.concat(frames).sort("split", "form", "tower", "batch", "layer", maintain_order=True)


def write_layout(root: str | Path, layout: dict[str, list[tuple[str, int]]]) -> Path:
    """Write a Linear-output sub-store's modules.json (module docstring), atomically."""
    return atomic_write_json(Path(root) / LAYOUT_FILE,
                             {t: [[m, int(w)] for m, w in mods] for t, mods in sorted(layout.items())})


def read_layout(root: str | Path) -> dict[str, list[tuple[str, int]]] | None:
    """The layout of a Linear-output sub-store (tower -> [(module, width)] in storage order); None for
    a store of hidden units (no modules.json)."""
    path = Path(root) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        out = {t: [(str(m), int(w)) for m, w in mods] for t, mods in raw.items()}
    except (ValueError, TypeError) as e:
        raise ActivationStoreError(f"{path}: unreadable module layout ({e}); rerun the extraction.") from e
    bad = sorted(set(out) - set(TOWERS))
    if bad:
        raise ActivationStoreError(f"{path}: unknown tower {bad[0]!r}; towers are {', '.join(TOWERS)}.")
    return out


def _token_totals(folder: Path, values: np.ndarray, tokens, stats: dict, max_abs: float) -> dict:
    """The part's token totals (module docstring), from per-sample float32 sums."""
    n, width = values.shape
    counts = np.asarray(tokens)
    if counts.shape != (n,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 1).any():
        raise ActivationStoreError(
            f"tokens must be one integer >= 1 per row (positions each sample counts); got shape {counts.shape}, "
            f"dtype {counts.dtype} for {n} rows in {folder}."
        )
    if set(stats) != set(TOKEN_STATS):
        raise ActivationStoreError(
            f"token_stats must have exactly the keys {', '.join(TOKEN_STATS)}; got {', '.join(sorted(stats))}."
        )
    if not (isinstance(max_abs, (int, float, np.floating)) and math.isfinite(max_abs) and max_abs >= 0):
        raise ActivationStoreError(f"max_abs must be a finite number >= 0; got {max_abs!r}.")
    out = {"samples": n, "tokens": int(counts.sum()), "max_abs": float(max_abs),
           "token_sum": values.astype(np.float64).T @ counts.astype(np.float64)}
    for k in TOKEN_STATS:
        v = np.asarray(stats[k])
        if v.shape != (n, width) or not np.isfinite(v).all():
            raise ActivationStoreError(
                f"token_stats[{k!r}] must be a finite (samples, units) array of shape {(n, width)}; "
                f"got shape {v.shape}{'' if v.shape != (n, width) else ' with non-finite values'} in {folder}."
            )
        out[f"token_{k}"] = v.astype(np.float32).astype(np.float64).sum(0)
    return out


# ----------------------------------------------------------------------------------------------
# Reading: structure and validation (file footers; list<float32> files also need their list lengths)


@dataclass(frozen=True)
class PartFile:
    path: Path
    part: int
    rows: int
    width: int
    fixed: bool  # fixed_size_list (width from the schema) vs list (width checked from the data)
    row_groups: tuple[int, ...]  # rows per Parquet row group (readers chunk along them)
    tokens: bool = False  # the footer holds token totals (read_token_totals)
    sample_totals: bool = False  # the footer holds sample totals (read_sample_totals)


@dataclass(frozen=True)
class PartitionInfo:
    split: str
    form: str
    tower: str
    layer: int
    samples: int
    width: int
    parts: tuple[PartFile, ...]  # in part-number order
    size_bytes: int

    @property
    def token_stats(self) -> bool:
        """Every part has token totals."""
        return all(p.tokens for p in self.parts)

    @property
    def stream(self) -> tuple[str, str, str, int]:
        return (self.split, self.form, self.tower, self.layer)

    @property
    def dir(self) -> Path:
        return self.parts[0].path.parent


@dataclass(frozen=True)
class ActivationsSummary:
    root: Path
    partitions: tuple[PartitionInfo, ...]  # sorted by (split, form, tower, layer)

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.partitions)

    def towers(self) -> tuple[str, ...]:
        return tuple(t for t in TOWERS if any(p.tower == t for p in self.partitions))

    def get(self, split: str, form: str, tower: str, layer: int) -> PartitionInfo | None:
        for p in self.partitions:
            if p.stream == (split, form, tower, layer):
                return p
        return None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _read_footer(path: Path) -> tuple[pa.Schema, int, tuple[int, ...], set[bytes]]:
    """Arrow schema, rows, rows per row group and the keys of the file's key-value metadata."""
    try:
        f = pq.ParquetFile(path)
        md = f.metadata
        return (f.schema_arrow, md.num_rows, tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)),
                set(md.metadata or {}))
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise ActivationStoreError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {e}). "
            "Delete it and rerun the extraction for this partition."
        ) from e


def _check_schema(path: Path, schema: pa.Schema) -> bool:
    """Validate the three contract columns; return True for fixed_size_list activations."""
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise ActivationStoreError(
            f"{path}: missing column(s) {', '.join(missing)}; the store schema needs sample_id (str), "
            f"profile_id (str), activation (list of float32). Columns found: {', '.join(schema.names)}."
        )
    for c in ("sample_id", "profile_id"):
        t = schema.field(c).type
        if not _is_string(t):
            raise ActivationStoreError(f"{path}: column {c} must be a string; got {t}. Write ids as str.")
    t = schema.field("activation").type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not is_list or t.value_type != pa.float32():
        raise ActivationStoreError(
            f"{path}: column activation must be a list of float32; got {t}. "
            "Cast it (e.g. pl.col('activation').cast(pl.List(pl.Float32))) or write it with write_partition."
        )
    return pa.types.is_fixed_size_list(t)


def _list_width(path: Path, rows: int) -> int:
    """Width of a list<float32> file: every row must have the same length (read with Polars)."""
    lens = pl.scan_parquet(path, hive_partitioning=False).select(
        n=pl.col("activation").list.len(), sid=pl.col("sample_id")
    ).collect()
    if lens["n"].null_count():
        row = int(lens["n"].is_null().arg_max())
        raise ActivationStoreError(
            f"{path}: row {row} (sample {lens['sid'][row]!r}) has a null activation list; "
            "every row needs one value per unit."
        )
    if rows == 0:
        return 0
    width = int(lens["n"][0])
    if lens["n"].n_unique() > 1:
        row = int((lens["n"] != width).arg_max())
        raise ActivationStoreError(
            f"{path}: activation lists have different lengths across rows (mismatched widths): row 0 has "
            f"{width} values, row {row} (sample {lens['sid'][row]!r}) has {lens['n'][row]}. Every row of a "
            "layer needs one value per hidden unit; rerun the extraction for this partition."
        )
    return width


def _read_part(path: Path, part: int) -> PartFile:
    schema, rows, row_groups, keys = _read_footer(path)
    fixed = _check_schema(path, schema)
    width = schema.field("activation").type.list_size if fixed else _list_width(path, rows)
    if rows == 0 or width == 0:
        raise ActivationStoreError(
            f"{path}: empty part file ({rows} rows, width {width}); every part needs >= 1 sample and >= 1 unit. "
            "Delete it and rerun the extraction for this partition."
        )
    return PartFile(path=path, part=part, rows=rows, width=width, fixed=fixed, row_groups=row_groups,
                    tokens=TOKEN_TOTALS_KEY in keys, sample_totals=SAMPLE_TOTALS_KEY in keys)


def _parse(path: Path, key: str, choices: tuple[str, ...] | None) -> str | int | None:
    """Parse a hive folder name `key=value`; None for entries that are not such folders."""
    name = path.name
    if not path.is_dir() or name.startswith((".", "_")) or (key == "split" and name == OUTPUTS_DIR):
        return None
    k, sep, v = name.partition("=")
    if not sep or k != key:
        raise ActivationStoreError(
            f"{path}: unexpected folder; expected `{key}=<value>` here "
            "(layout <root>/split=../form=../tower=../layer=<int>/part-*.parquet)."
        )
    if choices is None:
        if not v.isdigit():
            raise ActivationStoreError(f"{path}: layer must be an integer >= 0; got {v!r}.")
        return int(v)
    if v not in choices:
        raise ActivationStoreError(f"{path}: {key} must be one of {', '.join(choices)}; got {v!r}.")
    return v


def _children(path: Path, key: str, choices: tuple[str, ...] | None) -> list[tuple[str | int, Path]]:
    out = []
    for child in sorted(path.iterdir()):
        v = _parse(child, key, choices)
        if v is not None:
            out.append((v, child))
    return sorted(out, key=lambda x: x[0])


def inspect_activations(root: str | Path) -> ActivationsSummary:
    """What is in an activation folder: every partition with its sample count and width.

    Reads only Parquet footers for files written by `write_partition` (list<float32> files from other
    tools are also read for their list lengths). Checks each file's schema and that widths agree within
    a partition; completeness across streams is `check_complete`'s job, so a partial folder can be inspected.
    """
    root = Path(root)
    if not root.is_dir():
        raise ActivationStoreError(
            f"{root}: activation folder does not exist (or is not a folder). "
            "Run the extraction first or fix the path."
        )
    partitions = []
    for split, d1 in _children(root, "split", SPLITS):
        for form, d2 in _children(d1, "form", FORMS):
            for tower, d3 in _children(d2, "tower", TOWERS):
                layers = _children(d3, "layer", None)
                for (a, da), (b, db) in zip(layers, layers[1:]):
                    if a == b:
                        raise ActivationStoreError(
                            f"{da} and {db} are the same layer; keep one (written as layer={a})."
                        )
                for layer, d4 in layers:
                    files = sorted(
                        (int(m.group(1)), p) for p in d4.iterdir() if (m := PART_RE.match(p.name)) and p.is_file()
                    )
                    if not files:
                        raise ActivationStoreError(
                            f"{d4}: partition folder has no part-*.parquet file (an interrupted extraction?). "
                            "Rerun the extraction for it or delete the folder."
                        )
                    parts = tuple(_read_part(p, i) for i, p in files)
                    for pf in parts[1:]:
                        if pf.width != parts[0].width:
                            raise ActivationStoreError(
                                f"{pf.path}: width {pf.width} differs from {parts[0].path.name}'s {parts[0].width} "
                                "in the same partition (mismatched widths across parts). Every part of a layer "
                                "needs one value per hidden unit; rerun the extraction for this partition."
                            )
                    partitions.append(
                        PartitionInfo(
                            split=split, form=form, tower=tower, layer=layer,  # type: ignore[arg-type]
                            samples=sum(p.rows for p in parts), width=parts[0].width, parts=parts,
                            size_bytes=sum(p.path.stat().st_size for p in parts),
                        )
                    )
    if not partitions:
        raise ActivationStoreError(
            f"{root}: no activation partitions found; expected "
            "<root>/split=<forget|retain>/form=<multimodal|text>/tower=<language|vision>/layer=<int>/part-*.parquet."
        )
    return ActivationsSummary(root=root, partitions=tuple(sorted(partitions, key=lambda p: p.stream)))


def check_complete(summary: ActivationsSummary) -> None:
    """The rules the importance step needs, each failure naming the folder or file.

    Per tower present: every required (split, form) stream exists (vision: multimodal only, and no text
    form at all), all streams have the same layers, each (tower, layer) has one width across streams,
    and each (split, form) has one sample count across towers and layers (same samples everywhere).
    """
    root = summary.root
    for tower in summary.towers():
        parts = [p for p in summary.partitions if p.tower == tower]
        if tower == "vision":
            for p in parts:
                if p.form == "text":
                    raise ActivationStoreError(
                        f"{p.dir}: the vision tower has no text-form partition (it does not run on text-only "
                        "input; method.md: its text-form statistics are 0). Delete this folder."
                    )
        layers_by_stream = {
            (s, f): {p.layer for p in parts if (p.split, p.form) == (s, f)} for s, f in required_streams(tower)
        }
        all_layers = sorted(set().union(*layers_by_stream.values()))
        for (s, f), layers in layers_by_stream.items():
            if not layers:
                raise ActivationStoreError(
                    f"{root / f'split={s}' / f'form={f}' / f'tower={tower}'}: missing; the {tower} tower needs "
                    f"activations for {', '.join(f'{a}/{b}' for a, b in required_streams(tower))}. "
                    "Run the extraction for this split and form."
                )
            for layer in all_layers:
                if layer not in layers:
                    raise ActivationStoreError(
                        f"{partition_dir(root, s, f, tower, layer)}: missing; layer {layer} of the {tower} tower "
                        f"exists in other streams but not in {s}/{f}. Every stream needs the same layers; "
                        "rerun the extraction for it."
                    )
        for layer in all_layers:
            same = [p for p in parts if p.layer == layer]
            for p in same[1:]:
                if p.width != same[0].width:
                    raise ActivationStoreError(
                        f"{p.parts[0].path}: width {p.width} for {tower} layer {layer} differs from "
                        f"{same[0].parts[0].path}'s {same[0].width} (mismatched widths across streams). "
                        "All streams must come from the same model; rerun the extraction."
                    )
    for s in SPLITS:
        for f in FORMS:
            stream = [p for p in summary.partitions if (p.split, p.form) == (s, f)]
            for p in stream[1:]:
                if p.samples != stream[0].samples:
                    raise ActivationStoreError(
                        f"{p.dir}: {p.samples} samples but {stream[0].dir} has {stream[0].samples}; every "
                        f"tower and layer of {s}/{f} must hold the same samples (an interrupted extraction?). "
                        "Rerun the extraction for this split and form."
                    )


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start, prev = [], None, None
    for v in sorted(values) + [None]:  # type: ignore[list-item]
        if start is not None and (v is None or v != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(out)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def format_summary(summary: ActivationsSummary) -> str:
    """A human-readable table: one line per (split, form, tower, samples, width) with its layers."""
    groups: dict[tuple, list[PartitionInfo]] = {}
    for p in summary.partitions:
        groups.setdefault((p.split, p.form, p.tower, p.samples, p.width), []).append(p)
    header = ("split", "form", "tower", "layers", "#layers", "samples", "width", "files", "size")
    rows = [
        (s, f, t, _ranges([p.layer for p in ps]), str(len(ps)), str(n), str(w),
         str(sum(len(p.parts) for p in ps)), _size(sum(p.size_bytes for p in ps)))
        for (s, f, t, n, w), ps in groups.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {4, 5, 6, 7, 8}

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    lines = [
        f"Activations in {summary.root}: {len(summary.partitions)} partitions, {_size(summary.size_bytes)}",
        fmt(header),
        fmt(tuple("-" * w for w in widths)),
        *map(fmt, rows),
    ]
    if "vision" in summary.towers():
        lines.append("(vision has no text form: its text-form statistics are 0, method.md)")
    positions = sorted(summary.root.glob(POSITIONS_GLOB))
    if positions:
        lines.append(f"position statistics (the released mode's per_position): {len(positions)} positions-*.parquet "
                     f"files in the stream folders, {_size(sum(f.stat().st_size for f in positions))}")
    layout = read_layout(summary.root)
    if layout is not None:
        lines.append("Linear outputs side by side per layer (the released mode's linear_outputs): "
                     + "; ".join(f"{t} " + ", ".join(f"{m} {w}" for m, w in mods) for t, mods in layout.items()))
    sub = summary.root / OUTPUTS_DIR
    if (sub / LAYOUT_FILE).is_file():
        lines.append(f"{OUTPUTS_DIR}/: the MLP Linears' outputs (the released mode's linear_outputs); "
                     f"`manu inspect {sub}` lists them")
    return "\n".join(lines)
