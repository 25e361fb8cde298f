"""The paper's figures, drawn with matplotlib from the pipeline's tables (headless, deterministic).

Every function takes a Polars frame (or the activation store's folder) and a PNG path, writes the
PNG atomically and returns its path. Figures are built with `matplotlib.figure.Figure` and the Agg
canvas directly: no pyplot, no display, no global state shared between threads. The PNG carries no
timestamp or software version, so the same data give the same bytes (same matplotlib version).

    plot_logit_lens(lens, "fig2.png")        # Fig. 2: answer probability per method x layer, 4 panels
    plot_form_bars(results, "fig4.png")      # Fig. 4: change vs vanilla per method, image+text vs text
    plot_tradeoff(results, "fig5.png")       # Fig. 5: forget drop vs retain / celebrity accuracy
    plot_activations(acts_dir, "fig6.png")   # Fig. 6: activation histograms, forget vs retain, per form
    plot_selected(per_layer, "sel.png")      # selected neurons per tower and layer

`results` has one row per (method, set, form, task, metric): the columns of `RESULT_COLUMNS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from manu_core.io import atomic_file
from manu_core.store import FORMS, SPLITS, inspect_activations
from manu_core.vocab import EVAL_SETS, FORM_LABELS, require_columns

DPI = 100
MIN_POINTS = 9  # at DPI 100: 12.5 px text
RESULT_COLUMNS = ("method", "set", "form", "task", "metric", "value")
FORM_COLORS = {"multimodal": "#3b75af", "text": "#e1812c"}
SPLIT_COLORS = {"forget": "#c44e52", "retain": "#55a868"}
# (task, metric) in the paper's column order, with the axis label and the factor shown
METRICS = (("mc", "accuracy", "MC accuracy (pp)", 100.0), ("gen", "rougeL_f1", "ROUGE-L F1 (pp)", 100.0),
           ("gen", "factuality", "factuality (1-10)", 1.0), ("cloze", "accuracy", "cloze accuracy (pp)", 100.0))
VANILLA = "vanilla"


class FigureError(ValueError):
    """A figure's input lacks what the figure needs: the message names the column or row and the fix."""


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG to `path` atomically (no timestamp or software metadata). Every text is at
    least MIN_POINTS (12.5 px at DPI 100), so labels stay legible in the Prefect artifact pane."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    for text in fig.findobj(lambda o: hasattr(o, "get_fontsize") and hasattr(o, "set_fontsize")):
        if text.get_fontsize() < MIN_POINTS:
            text.set_fontsize(MIN_POINTS)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _need(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    require_columns(frame, columns, what, FigureError, "run at least one evaluation first")


def _ordered(values) -> list:
    """Unique values in order of first appearance, vanilla first."""
    seen = list(dict.fromkeys(values))
    return ([VANILLA] if VANILLA in seen else []) + [v for v in seen if v != VANILLA]


# ----------------------------------------------------------------------------------------------
# Fig. 2: knowledge across layers (logit lens)


def plot_logit_lens(lens: pl.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Heatmaps of the mean answer-token probability decoded from each language layer (logit lens),
    one row per method, one panel per (split, form): forget/retain x image+text/text only."""
    _need(lens, ("method", "split", "form", "layer", "prob"), "plot_logit_lens")
    methods = _ordered(lens["method"].to_list())
    layers = sorted(lens["layer"].unique().to_list())
    # at least 5.6 in wide: with few layers the panels' titles ("forget · image+text") would overlap
    fig = Figure(figsize=(max(5.6, 2.2 + 0.45 * len(layers) * 2), 1.2 + 0.32 * len(methods) * 2), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False, sharex=True, sharey=True)
    image = None
    for r, split in enumerate(SPLITS):
        for c, form in enumerate(FORMS):
            ax = axes[r][c]
            grid = np.full((len(methods), len(layers)), np.nan)
            sub = lens.filter((pl.col("split") == split) & (pl.col("form") == form))
            for row in sub.iter_rows(named=True):
                grid[methods.index(row["method"]), layers.index(row["layer"])] = row["prob"]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
            if grid.size <= 240:
                for (i, j), v in np.ndenumerate(grid):
                    if not np.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if v > 0.6 else "white")
            ax.set_title(f"{split} · {FORM_LABELS[form]}", fontsize=9)
            ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
            ax.set_yticks(range(len(methods)), methods, fontsize=7)
            if r == 1:
                ax.set_xlabel("language layer")
    fig.colorbar(image, ax=axes, shrink=0.8, label="p(answer token)")
    fig.suptitle(title or "Knowledge across layers (logit lens)", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Results: Fig. 4 (per-form change) and Fig. 5 (trade-off)


def _metrics_present(results: pl.DataFrame) -> list[tuple[str, str, str, float]]:
    have = set(zip(results["task"].to_list(), results["metric"].to_list()))
    return [m for m in METRICS if (m[0], m[1]) in have]


def _value(results: pl.DataFrame, method: str, set_name: str, form: str | None, task: str, metric: str):
    q = results.filter((pl.col("method") == method) & (pl.col("set") == set_name) & (pl.col("task") == task)
                       & (pl.col("metric") == metric))
    if form is not None:
        q = q.filter(pl.col("form") == form)
    return float(q["value"].mean()) if q.height else None


def plot_form_bars(results: pl.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """For each set (rows) and metric (columns): each method's change vs vanilla, image+text and text
    only side by side (paper Fig. 4). Accuracy and ROUGE in percentage points."""
    _need(results, RESULT_COLUMNS, "plot_form_bars")
    if VANILLA not in results["method"].to_list():
        raise FigureError("plot_form_bars shows changes vs vanilla; the results have no 'vanilla' rows.")
    methods = [m for m in _ordered(results["method"].to_list()) if m != VANILLA]
    sets = [s for s in EVAL_SETS if s in results["set"].to_list()]
    metrics = _metrics_present(results)
    # at most two metric panels side by side, so the figure fits an artifact pane (~690 px) at full
    # size and its 7-point labels stay readable; each set takes as many rows as its metrics need
    cols = min(2, len(metrics))
    per_set = -(-len(metrics) // cols)
    fig = Figure(figsize=(1.6 + 2.4 * cols, 0.8 + (0.5 + 0.24 * len(methods)) * len(sets) * per_set),
                 layout="constrained")
    axes = fig.subplots(len(sets) * per_set, cols, squeeze=False)
    for ax in axes.flat[len(sets) * len(metrics):]:
        ax.set_visible(False)
    y = np.arange(len(methods))
    for r, set_name in enumerate(sets):
        for i, (task, metric, label, factor) in enumerate(metrics):
            c = i % cols
            ax = axes[r * per_set + i // cols][c]
            for k, form in enumerate(FORMS):
                base = _value(results, VANILLA, set_name, form, task, metric)
                deltas = [(_value(results, m, set_name, form, task, metric) - base) * factor
                          if base is not None and _value(results, m, set_name, form, task, metric) is not None
                          else np.nan for m in methods]
                ax.barh(y + (k - 0.5) * 0.4, deltas, height=0.4, color=FORM_COLORS[form], label=FORM_LABELS[form])
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_yticks(y, methods if c == 0 else [""] * len(methods), fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{set_name}: Δ {label}", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Change vs vanilla per form (image+text vs text only)", fontsize=10)
    return save_figure(fig, path)


RELEARN_COLUMNS = ("method", "stage", "form", "task", "metric", "value")


def relearn_stages(relearn: pl.DataFrame) -> list[str]:
    """vanilla, unlearned, then <attack>/<mask> in attack order (free before frozen)."""
    from manu_core.relearn import ATTACKS, MASKS

    def rank(stage: str) -> tuple:
        if stage in ("vanilla", "unlearned"):
            return (0, stage != "vanilla")
        attack, _, mask = stage.partition("/")
        return (1, ATTACKS.index(attack) if attack in ATTACKS else 9, MASKS.index(mask) if mask in MASKS else 9)

    return sorted(set(relearn["stage"].to_list()), key=rank)


def relearn_value(relearn: pl.DataFrame, method: str, stage: str, form: str) -> float | None:
    """Held-out forget multiple-choice accuracy of one method after one stage, in one form."""
    q = relearn.filter((pl.col("method") == method) & (pl.col("stage") == stage) & (pl.col("form") == form)
                       & (pl.col("task") == "mc") & (pl.col("metric") == "accuracy"))
    return float(q["value"].mean()) if q.height else None


def plot_relearn(relearn: pl.DataFrame, path: str | Path, *, mask: str = "free", title: str = "") -> Path:
    """Per form (panels), per method (rows): held-out forget MC accuracy after unlearning and after
    each relearning attack with `mask`; the dashed line is the vanilla model."""
    _need(relearn, RELEARN_COLUMNS, "plot_relearn")
    methods = _ordered(relearn["method"].to_list())
    stages = [s for s in relearn_stages(relearn) if s == "unlearned" or s.endswith(f"/{mask}")]
    fig = Figure(figsize=(7.0, 1.6 + 0.25 * len(methods) * max(1, len(stages))), layout="constrained")
    axes = fig.subplots(1, len(FORMS), squeeze=False)[0]
    y = np.arange(len(methods))
    h = 0.8 / max(1, len(stages))
    colors = plt_colors(len(stages))
    for ax, form in zip(axes, FORMS):
        vanilla = [relearn_value(relearn, m, "vanilla", form) for m in methods]
        for k, stage in enumerate(stages):
            vals = [relearn_value(relearn, m, stage, form) for m in methods]
            ax.barh(y - 0.4 + (k + 0.5) * h, [100 * v if v is not None else np.nan for v in vals], height=h,
                    color=colors[k], label=stage.replace(f"/{mask}", ""))
        v = [x for x in vanilla if x is not None]
        if v:
            ax.axvline(100 * sum(v) / len(v), color="black", linestyle="--", linewidth=1, label="vanilla")
        ax.set_yticks(y, methods if form == FORMS[0] else [""] * len(methods))
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("held-out forget MC accuracy (%)")
        ax.set_title(FORM_LABELS[form])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    fig.suptitle(title or f"Relearning ({mask}): held-out forget accuracy", fontsize=10)
    return save_figure(fig, path)


def plt_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def tradeoff_points(results: pl.DataFrame) -> pl.DataFrame:
    """Per method: forget MC-accuracy drop vs vanilla and retain / celebrity MC accuracy, each the
    average of the two forms (the numbers `plot_tradeoff` draws)."""
    _need(results, RESULT_COLUMNS, "tradeoff_points")
    mc = results.filter((pl.col("task") == "mc") & (pl.col("metric") == "accuracy"))
    avg = mc.group_by("method", "set").agg(pl.col("value").mean())
    wide = avg.pivot(on="set", index="method", values="value")
    if "forget" not in wide.columns or VANILLA not in wide["method"].to_list():
        raise FigureError("the trade-off needs multiple-choice accuracy on the forget set for vanilla and each method.")
    base = float(wide.filter(pl.col("method") == VANILLA)["forget"][0])
    order = {m: i for i, m in enumerate(_ordered(results["method"].to_list()))}
    return (wide.with_columns(forget_drop=base - pl.col("forget"))
            .sort(pl.col("method").replace_strict(order, return_dtype=pl.Int64)))


def plot_tradeoff(results: pl.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """x = forget MC-accuracy drop vs vanilla, y = retain (left) and celebrity (right) MC accuracy,
    one point per method (and per α for MANU); top-right is better (paper Fig. 5)."""
    pts = tradeoff_points(results)
    ys = [s for s in ("retain", "celebrity") if s in pts.columns]
    if not ys:
        raise FigureError("the trade-off needs retain or celebrity multiple-choice accuracy; neither was evaluated.")
    fig = Figure(figsize=(5.8, 3.4 * len(ys) + 0.4), layout="constrained")  # one above the other: pane-wide
    axes = fig.subplots(len(ys), 1, squeeze=False)[:, 0]
    markers = "osD^v<>phX*P"
    label_points = pts.height <= 6  # beyond that the labels collide: the legend names the markers
    for ax, ys_name in zip(axes, ys):
        for i, row in enumerate(pts.iter_rows(named=True)):
            if row[ys_name] is None:
                continue
            x, yv = 100 * row["forget_drop"], 100 * row[ys_name]
            ax.scatter([x], [yv], marker=markers[i % len(markers)], color=f"C{i % 10}", s=36, label=row["method"],
                       zorder=3, alpha=0.85)
            if label_points:
                ax.annotate(row["method"], (x, yv), textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xlabel("forget MC accuracy drop vs vanilla (pp) →", fontsize=8)
        ax.set_ylabel(f"{ys_name} MC accuracy (%) →", fontsize=8)
        ax.grid(True, linewidth=0.3)
        ax.tick_params(labelsize=7)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=6)
    fig.suptitle(title or "Forgetting vs utility (average of both forms; top right is better)", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Fig. 6: activation distributions; selected neurons


def pick_layers(layers: list[int], n: int = 3) -> list[int]:
    """`n` layers spread from first to last (all of them when there are fewer)."""
    layers = sorted(set(layers))
    if len(layers) <= n:
        return layers
    return sorted({layers[round(i * (len(layers) - 1) / (n - 1))] for i in range(n)})


def _stream_values(part_paths: list[Path], max_values: int) -> np.ndarray:
    frames = [pl.read_parquet(p, columns=["activation"]) for p in part_paths]
    values = np.concatenate([np.asarray(f["activation"].to_list() if f["activation"].dtype == pl.List
                                        else f["activation"].to_numpy(), dtype=np.float32).ravel() for f in frames])
    if values.size > max_values:  # a fixed stride: deterministic, spread over samples and units
        values = values[:: int(np.ceil(values.size / max_values))]
    return values


def plot_activations(activations: str | Path, path: str | Path, *, layers_per_tower: int = 3, bins: int = 60,
                     max_values: int = 2_000_000, title: str = "") -> Path:
    """Histograms of neuron activations (the stored per-sample values) for a few language and vision
    layers, forget vs retain, one column per form (paper Fig. 6), over the central 99% of the layer's
    values (the x range is shared by the panels of one layer). Vision has no text-only input."""
    summary = inspect_activations(activations)
    if not summary.partitions:
        raise FigureError(f"no activation partitions under {activations}; run extraction first.")
    rows = [(tower, layer) for tower in summary.towers()
            for layer in pick_layers([p.layer for p in summary.partitions if p.tower == tower], layers_per_tower)]
    fig = Figure(figsize=(7.0, 1.1 + 1.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(FORMS), squeeze=False)
    for r, (tower, layer) in enumerate(rows):
        data = {}
        for form in FORMS:
            for split in SPLITS:
                p = summary.get(split, form, tower, layer)
                if p is not None:
                    data[(form, split)] = _stream_values([f.path for f in p.parts], max_values)
        every = np.concatenate(list(data.values()))
        lo, hi = np.percentile(every, [0.5, 99.5]) if every.size else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        for c, form in enumerate(FORMS):
            ax = axes[r][c]
            for split in SPLITS:
                if (form, split) in data:
                    ax.hist(data[(form, split)], bins=edges, density=True,
                            histtype="stepfilled", alpha=0.45, color=SPLIT_COLORS[split], label=split)
            if not any((form, s) in data for s in SPLITS):
                ax.text(0.5, 0.5, "no text-only input\n(vision tower)", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_yscale("log")
                ax.tick_params(labelsize=6)
            ax.set_title(f"{tower} layer {layer} · {FORM_LABELS[form]}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Activation distributions, forget vs retain", fontsize=10)
    return save_figure(fig, path)


def plot_selected(per_layer: pl.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Selected neurons per tower and layer (bars) with each layer's share of its units."""
    return save_figure(selected_figure(per_layer, title=title), path)


def selected_figure(per_layer: pl.DataFrame, *, title: str = "") -> Figure:
    """The figure plot_selected saves: one bar panel per tower."""
    _need(per_layer, ("tower", "layer", "units", "selected"), "plot_selected")
    towers = _ordered(per_layer["tower"].to_list())
    fig = Figure(figsize=(3.2 * len(towers) + 0.6, 3.0), layout="constrained")
    axes = fig.subplots(1, len(towers), squeeze=False)[0]
    for ax, tower in zip(axes, towers):
        t = per_layer.filter(pl.col("tower") == tower).sort("layer")
        layers = t["layer"].to_list()
        ax.bar(layers, t["selected"].to_list(), color="#8172b3")
        ax.set_xticks(layers)  # layer ids are integers: no fractional ticks
        ax.set_ylim(bottom=0, top=max(1, int(t["selected"].max() or 0)) * 1.1)
        total, units = int(t["selected"].sum()), int(t["units"].sum())
        if total == 0:
            ax.text(0.5, 0.5, "none selected", transform=ax.transAxes, ha="center", va="center",
                    fontsize=8, color="0.4")
        ax.set_title(f"{tower}: {total} of {units} units ({100 * total / max(units, 1):.2f}%)", fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("selected neurons", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "Selected neurons per tower and layer", fontsize=10)
    return fig
