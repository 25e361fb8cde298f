"""Forget/retain trade-off: paired drops with profile-bootstrap intervals, curve summaries, the
setting-selection rule and the trade-off figure.

A *drop* is vanilla minus unlearned, in points (x100): positive means the unlearned model scores
lower. Unlearning is only worth something when it costs the forget set much more than the retain
set, so methods are compared along curves (x = retain drop, y = forget drop, one point per strength)
rather than at one arbitrary strength each.

    drops = paired_drops(vanilla_answers, unlearned_answers)    # per set x form x task x scorer
    summary = curve_summary(points)                            # forget drop at a retain budget, AUC
    chosen = choose_settings(validation)                       # RULE: strongest setting within budget
    tradeoff_figure(points, "tradeoff.png")                    # one panel per form

Pure functions of their inputs (seeded where random); nothing here loads a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from manu_core.figures import save_figure
from manu_core.io import atomic_file
from manu_core.vocab import EVAL_SETS, FORM_LABELS, require_columns

KEYS = ("set", "form", "task", "scorer")  # one paired drop per group
ANSWER_COLUMNS = ("item_id", "set", "form", "task", "profile_id", "score", "scorer")
BUDGET = 5.0  # retain drop (points) a method may spend
X_MAX = 20.0  # retain drops the AUC averages over
SELECTIVE_MIN_FORGET = 10.0
SELECTIVE_RATIO = 2.0
RULE = ("per method, the strongest setting whose validation retain multiple-choice drop is at most "
        "{budget:g} points in every form; if none qualifies, the weakest setting, flagged within_budget=False")
SELECTIVE_RULE = (f"selective: forget drop >= {SELECTIVE_MIN_FORGET:g} points and forget drop >= "
                  f"{SELECTIVE_RATIO:g} x retain drop")
SELECTIVE_SHARE = 0.5  # the share of the never-learned headroom HEADROOM_RULE asks for
HEADROOM_RULE = (f"the forget drop closes at least {SELECTIVE_SHARE:g} of the learned headroom (share >= "
                 f"{SELECTIVE_SHARE:g}, headroom interval above 0) and is at least {SELECTIVE_RATIO:g} x the retain drop")


class TradeoffError(ValueError):
    """Bad trade-off input: the message names the rule, the value and the fix."""


def _need(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    require_columns(frame, columns, what, TradeoffError, "pass at least one row")


def _finite(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    for c in columns:
        values = frame[c].cast(pl.Float64)
        bad = values.is_null() | values.is_nan() | values.is_infinite()
        if bad.any():
            raise TradeoffError(f"{what}: column {c!r} must be finite; {int(bad.sum())} null/NaN/inf value(s). "
                                f"Drop or fix those rows first.")


# ----------------------------------------------------------------------------------------------
# Paired drops with a profile bootstrap


def paired_drops(vanilla: pl.DataFrame, unlearned: pl.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> pl.DataFrame:
    """Vanilla minus unlearned mean score per (set, form, task, scorer), in points, with a paired
    percentile bootstrap interval over profiles.

    The two answer frames (evaluate.ANSWER_SCHEMA) are joined on (item_id, scorer) and must hold the
    same items. Items of one profile are correlated (same person), so the bootstrap resamples
    *profiles* with replacement and takes the mean over all items of the drawn profiles (each item
    weighs as in the plain mean); both models use the same draws, so the interval is of the paired
    difference. Each group restarts `np.random.default_rng(seed)` with profiles in sorted id order,
    so a group's interval does not depend on which other groups are present, and groups over the
    same profiles (e.g. mc and gen of one set) see the same resamples.

    Columns: set, form, task, scorer, vanilla, unlearned (mean scores in points), drop, lo, hi
    (points), n_profiles, n_items.
    """
    if n_boot < 1:
        raise TradeoffError(f"n_boot must be >= 1; got {n_boot}. Use e.g. n_boot=1000.")
    if not 0 < level < 1:
        raise TradeoffError(f"level must be in (0, 1); got {level}. Use e.g. level=0.95.")
    for what, frame in (("vanilla answers", vanilla), ("unlearned answers", unlearned)):
        _need(frame, ANSWER_COLUMNS, f"paired_drops({what})")
        _finite(frame, ("score",), f"paired_drops({what})")
        dup = frame.select("item_id", "scorer").is_duplicated()
        if dup.any():
            ids = frame.filter(dup)["item_id"].unique().sort().head(3).to_list()
            raise TradeoffError(f"paired_drops: each (item_id, scorer) must appear once in the {what}; "
                                f"{int(dup.sum())} duplicated rows, e.g. {ids}. Pass one evaluation run per frame.")
    v = vanilla.select(*ANSWER_COLUMNS)
    u = unlearned.select("item_id", "scorer", *(c for c in ANSWER_COLUMNS if c not in ("item_id", "scorer")))
    only_v = v.join(u, on=["item_id", "scorer"], how="anti")
    only_u = u.join(v, on=["item_id", "scorer"], how="anti")
    if not only_v.is_empty() or not only_u.is_empty():
        def show(f: pl.DataFrame) -> list[str]:
            return [f"{i} ({s})" for i, s in f.select("item_id", "scorer").sort("item_id").head(3).iter_rows()]
        raise TradeoffError(
            f"paired_drops: vanilla and unlearned must hold the same (item_id, scorer) rows; {only_v.height} only "
            f"in vanilla (e.g. {show(only_v)}), {only_u.height} only in unlearned (e.g. {show(only_u)}). "
            f"Evaluate both models on the same units with the same scorers.")
    joined = v.join(u, on=["item_id", "scorer"], how="inner", suffix="_u")
    for c in ("set", "form", "task", "profile_id"):
        differ = joined.filter(pl.col(c) != pl.col(f"{c}_u"))
        if not differ.is_empty():
            raise TradeoffError(f"paired_drops: item {differ['item_id'][0]!r} has {c}={differ[c][0]!r} in vanilla "
                                f"but {differ[f'{c}_u'][0]!r} in unlearned; the frames come from different "
                                f"datasets. Evaluate both models on the same data.")
    per_profile = (joined.group_by(*KEYS, "profile_id")
                   .agg(sv=pl.col("score").sum(), su=pl.col("score_u").sum(), n=pl.len())
                   .sort(*KEYS, "profile_id"))
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for key, g in per_profile.group_by(*KEYS, maintain_order=True):
        sv, su, n = (g[c].to_numpy().astype(np.float64) for c in ("sv", "su", "n"))
        p = len(n)
        weights = np.random.default_rng(seed).multinomial(p, np.full(p, 1.0 / p), size=n_boot)  # n_boot x p
        boot = 100.0 * (weights @ (sv - su)) / (weights @ n)
        lo, hi = np.quantile(boot, [lo_q, hi_q])
        vm, um = 100.0 * sv.sum() / n.sum(), 100.0 * su.sum() / n.sum()
        rows.append(dict(zip(KEYS, key)) | {
            "vanilla": vm, "unlearned": um, "drop": 100.0 * (sv.sum() - su.sum()) / n.sum(),
            "lo": float(lo), "hi": float(hi), "n_profiles": p, "n_items": int(n.sum())})
    return pl.DataFrame(rows, schema={**{k: pl.String for k in KEYS}, "vanilla": pl.Float64,
                                      "unlearned": pl.Float64, "drop": pl.Float64, "lo": pl.Float64,
                                      "hi": pl.Float64, "n_profiles": pl.Int64, "n_items": pl.Int64})


# ----------------------------------------------------------------------------------------------
# Curves: forget drop at a retain budget, area under the curve


def _walk(group: pl.DataFrame, method: str, form: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) = (retain drop, forget drop) in strength order, starting at the origin."""
    if group.height > 1:
        if group["strength"].is_null().any() or group["strength"].is_nan().any():
            raise TradeoffError(f"curve_summary: strength must be set when a (method, form) has several points; "
                                f"{method!r}/{form!r} has a null/NaN strength among {group.height}. "
                                f"Give every setting of a swept method its strength.")
        if group["strength"].is_duplicated().any():
            raise TradeoffError(f"curve_summary: strengths must be distinct within a (method, form); {method!r}/"
                                f"{form!r} repeats {group.filter(group['strength'].is_duplicated())['strength'][0]}. "
                                f"Average repeated runs of one setting first.")
    g = group.sort("strength")
    x = np.concatenate([[0.0], g["retain_drop"].to_numpy().astype(np.float64)])
    y = np.concatenate([[0.0], g["forget_drop"].to_numpy().astype(np.float64)])
    return x, y


def _at_budget(x: np.ndarray, y: np.ndarray, budget: float) -> float | None:
    """Forget drop where the walk first reaches retain drop = budget (linear between points), or None."""
    hit = np.flatnonzero(x >= budget)
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:  # only when budget <= 0, which curve_summary refuses
        return float(y[0])
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return float(y0 + (y1 - y0) * (budget - x0) / (x1 - x0))


def _area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Integral over [0, x_max] of the piecewise-linear curve through (x, y) (x non-decreasing),
    flat at y[-1] beyond x[-1]; vertical steps add nothing."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        a, b = max(x0, 0.0), min(x1, x_max)
        if b > a:
            f = lambda t: y0 + (y1 - y0) * (t - x0) / (x1 - x0)  # noqa: E731 - x1 > x0 since b > a
            area += 0.5 * (f(a) + f(b)) * (b - a)
    area += y[-1] * max(0.0, x_max - max(x[-1], 0.0))
    return area


def curve_summary(points: pl.DataFrame, *, budget: float = BUDGET, x_max: float = X_MAX) -> pl.DataFrame:
    """Per (method, form), summarise the curve x = retain drop, y = forget drop, walked in strength
    order from the origin (0, 0) (no unlearning).

    - forget_at_budget: the forget drop where the walk first reaches retain drop = `budget`,
      linearly interpolated between the two points around it; null when it never does
      (reaches_budget=False). forget_at_max_within: the largest forget drop among points with
      retain drop <= budget, the origin included (so >= 0), defined either way.
    - auc: area under the curve over x in [0, x_max], divided by x_max, i.e. the mean forget drop
      over retain drops 0..x_max. Beyond its last point the curve stays flat at its last forget
      drop (extension neither rewards nor penalises strengths that were not tried); parts below
      x = 0 or above x_max are cut off. When the walk goes backwards in x (a stronger setting with a
      smaller retain drop), the walk is not a function of x, so the AUC uses the upper envelope
      instead: points sorted by retain drop with the running maximum of forget drop
      (monotone=False). A monotone walk is integrated as walked, dips included.

    `points` columns: method, strength (larger = stronger; null allowed for a single-point method),
    form, forget_drop, retain_drop (points). Output: method, form, n_points (without the origin),
    reaches_budget, forget_at_budget, forget_at_max_within, auc, monotone, budget, x_max.
    """
    _need(points, ("method", "strength", "form", "forget_drop", "retain_drop"), "curve_summary")
    _finite(points, ("forget_drop", "retain_drop"), "curve_summary")
    if not budget > 0:
        raise TradeoffError(f"curve_summary: budget must be > 0 points; got {budget}. Use e.g. budget=5.")
    if not x_max > 0:
        raise TradeoffError(f"curve_summary: x_max must be > 0 points; got {x_max}. Use e.g. x_max=20.")
    points = points.with_columns(pl.col("strength").cast(pl.Float64))
    rows = []
    for (method, form), g in points.sort("method", "form").group_by("method", "form", maintain_order=True):
        x, y = _walk(g, method, form)
        monotone = bool(np.all(np.diff(x) >= 0))
        if monotone:
            area = _area(x, y, x_max)
        else:
            order = np.lexsort((y, x))
            area = _area(x[order], np.maximum.accumulate(y[order]), x_max)
        at = _at_budget(x, y, budget)
        rows.append({"method": method, "form": form, "n_points": g.height, "reaches_budget": at is not None,
                     "forget_at_budget": at, "forget_at_max_within": float(y[x <= budget].max()),
                     "auc": area / x_max, "monotone": monotone, "budget": float(budget), "x_max": float(x_max)})
    return pl.DataFrame(rows, schema={"method": pl.String, "form": pl.String, "n_points": pl.Int64,
                                      "reaches_budget": pl.Boolean, "forget_at_budget": pl.Float64,
                                      "forget_at_max_within": pl.Float64, "auc": pl.Float64,
                                      "monotone": pl.Boolean, "budget": pl.Float64, "x_max": pl.Float64})


# ----------------------------------------------------------------------------------------------
# Choosing one setting per method, selectivity


def choose_settings(validation: pl.DataFrame, *, budget: float = BUDGET,
                    metric_filter: pl.Expr | None = None) -> pl.DataFrame:
    """One setting per method by RULE, decided on the validation run so the test run stays unseen.

    `validation` columns: method, setting (label), strength (larger = stronger; null for a method
    with a single setting, e.g. prompting), form, retain_drop (retain multiple-choice drop, points).
    `metric_filter`, when given, is a Polars expression applied first (e.g. to keep one scorer's
    rows from a longer table). Every setting of a method must have one row per form the method has.
    Output: method, setting, strength, within_budget, rule.
    """
    if metric_filter is not None:
        validation = validation.filter(metric_filter)
    _need(validation, ("method", "setting", "strength", "form", "retain_drop"), "choose_settings")
    _finite(validation, ("retain_drop",), "choose_settings")
    dup = validation.select("method", "setting", "form").is_duplicated()
    if dup.any():
        m, s, f = validation.filter(dup).select("method", "setting", "form").row(0)
        raise TradeoffError(f"choose_settings: each (method, setting, form) must appear once; "
                            f"{m!r}/{s!r}/{f!r} repeats. Pass one metric "
                            f"(retain mc drop) per row, e.g. with metric_filter.")
    rule = RULE.format(budget=budget)
    validation = validation.with_columns(pl.col("strength").cast(pl.Float64))
    rows = []
    for (method,), g in validation.sort("method").group_by("method", maintain_order=True):
        forms = set(g["form"])
        per = (g.group_by("setting", maintain_order=True)
               .agg(strength=pl.col("strength").first(), n_strength=pl.col("strength").n_unique(),
                    forms=pl.col("form"), worst=pl.col("retain_drop").max()))
        for s, fs in zip(per["setting"], per["forms"]):
            if set(fs) != forms:
                raise TradeoffError(f"choose_settings: every setting of {method!r} must be validated in every form "
                                    f"{sorted(forms)}; {s!r} has {sorted(fs)}. Evaluate the missing forms.")
        if (per["n_strength"] > 1).any():
            raise TradeoffError(f"choose_settings: a setting of {method!r} has several strengths; one label must "
                                f"name one strength. Fix the setting labels.")
        if per.height > 1:
            if per["strength"].is_null().any() or per["strength"].is_nan().any():
                raise TradeoffError(f"choose_settings: {method!r} has {per.height} settings, so each needs a "
                                    f"strength; some are null/NaN. Give every swept setting its strength.")
            if per["strength"].is_duplicated().any():
                raise TradeoffError(f"choose_settings: {method!r} has two settings with one strength; strengths "
                                    f"must order the settings. Give distinct strengths.")
        ok = per.filter(pl.col("worst") <= budget)
        pick = ok.sort("strength").tail(1) if not ok.is_empty() else per.sort("strength").head(1)
        r = pick.row(0, named=True)
        rows.append({"method": method, "setting": r["setting"], "strength": r["strength"],
                     "within_budget": bool(r["worst"] <= budget), "rule": rule})
    return pl.DataFrame(rows, schema={"method": pl.String, "setting": pl.String, "strength": pl.Float64,
                                      "within_budget": pl.Boolean, "rule": pl.String})


def is_selective(forget_drop: float, retain_drop: float) -> bool:
    """SELECTIVE_RULE: the forget drop is large (>= 10 points) and at least twice the retain drop."""
    return bool(forget_drop >= SELECTIVE_MIN_FORGET and forget_drop >= SELECTIVE_RATIO * retain_drop)


# ----------------------------------------------------------------------------------------------
# Figure


def tradeoff_figure(points: pl.DataFrame, path: str | Path, *, versus: str = "retain",
                    budget: float = BUDGET) -> Path:
    """Forget drop against the `versus` drop (column f"{versus}_drop": retain or celebrity), one
    panel per form, one line per method in strength order from the origin; the dashed diagonal
    y = 2x marks the selectivity ratio and the shaded band x <= budget the retain budget. Optional
    columns lo/hi (forget drop interval) are drawn as vertical error bars. Written atomically."""
    xcol = f"{versus}_drop"
    _need(points, ("method", "strength", "form", "forget_drop", xcol), "tradeoff_figure")
    _finite(points, ("forget_drop", xcol), "tradeoff_figure")
    has_ci = "lo" in points.columns and "hi" in points.columns
    points = points.with_columns(pl.col("strength").cast(pl.Float64))
    forms = [f for f in FORM_LABELS if f in set(points["form"])] + sorted(set(points["form"]) - set(FORM_LABELS))
    methods = sorted(set(points["method"]))
    x_all = points[xcol].to_numpy()
    x_lo, x_hi = min(0.0, float(x_all.min())), max(budget, float(x_all.max())) * 1.05

    fig = Figure(figsize=(4.2 * len(forms) + 2.6, 4.2), layout="constrained")
    axes = fig.subplots(1, len(forms), squeeze=False)[0]
    for ax, form in zip(axes, forms):
        ax.axvspan(x_lo, budget, color="0.9", zorder=0, label=f"{versus} drop ≤ {budget:g} pp")
        ax.plot([x_lo, x_hi], [2 * x_lo, 2 * x_hi], "k--", lw=1, label=f"selective: forget ≥ 2× {versus}")
        for i, method in enumerate(methods):
            g = points.filter((pl.col("form") == form) & (pl.col("method") == method)).sort("strength")
            if g.is_empty():
                continue
            color = f"C{i % 10}"
            x = np.concatenate([[0.0], g[xcol].to_numpy()])
            y = np.concatenate([[0.0], g["forget_drop"].to_numpy()])
            ax.plot(x, y, "-o", color=color, ms=4, label=method)
            if has_ci:
                c = g.filter(pl.col("lo").is_not_null() & pl.col("hi").is_not_null())
                if not c.is_empty():
                    fy = c["forget_drop"].to_numpy()
                    err = np.vstack([fy - c["lo"].to_numpy(), c["hi"].to_numpy() - fy]).clip(min=0)
                    ax.errorbar(c[xcol].to_numpy(), fy, yerr=err, fmt="none", ecolor=color, capsize=2, lw=1)
        ax.set_xlim(x_lo, x_hi)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_title(FORM_LABELS.get(form, form))
        ax.set_xlabel(f"{versus} drop (pp)")
        ax.set_ylabel("forget drop (pp)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# A sweep's comparison: drops of every run, curves, settings chosen on validation, headline table

VALIDATION = "validation"  # the forget set settings are chosen on (manu_core.data.VALIDATION)


def curve_name(family: str, mode: str | None, iterative: bool = False) -> str:
    """The curve a run belongs to: 'manu[paper]', 'random[released]', 'ga', 'prompting'."""
    if family in ("manu", "random"):
        return f"{family}[{mode or 'paper'}{' iterative' if iterative else ''}]"
    return family


def run_drops(runs: list[dict], *, task: str = "mc", n_boot: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Paired drops of each run's `task` items, per set and form, with profile-bootstrap intervals.

    A run: {forget, label, family, mode, iterative, strength, seed, without, vanilla, unlearned}, the
    last two answer frames. Runs that leave an importance function out (`without`) are ablations, not
    points of a curve, and are skipped. Columns: forget, curve, label, strength, seed, set, form,
    drop, lo, hi, vanilla, unlearned, n_profiles."""
    frames = []
    for r in runs:
        if r.get("without"):
            continue
        d = paired_drops(r["vanilla"].filter(pl.col("task") == task), r["unlearned"].filter(pl.col("task") == task),
                         n_boot=n_boot, seed=seed)
        frames.append(d.with_columns(forget=pl.lit(r["forget"]), label=pl.lit(r["label"]),
                                     curve=pl.lit(curve_name(r["family"], r.get("mode"), r.get("iterative", False))),
                                     strength=pl.lit(r.get("strength"), dtype=pl.Float64),
                                     seed=pl.lit(r.get("seed"), dtype=pl.Int64)))
    if not frames:
        raise TradeoffError(f"run_drops: no run to compare (ablations are skipped); got {len(runs)} runs.")
    return pl.concat(frames).select("forget", "curve", "label", "strength", "seed", "set", "form", "drop", "lo", "hi",
                                    "vanilla", "unlearned", "n_profiles")


def curve_points(drops: pl.DataFrame) -> pl.DataFrame:
    """One point per (forget, curve, strength, form): x = retain / celebrity drop, y = forget drop
    (with its interval). Seeded curves (the random control) average their seeds; `seeds` counts them
    and forget_min/forget_max give their spread. Sets that were not evaluated give null columns."""
    wide = (drops.filter(pl.col("set").is_in(["forget", "retain", "celebrity"]))
            .with_columns(setting=pl.col("label").str.replace(r" seed=\d+$", ""))
            .pivot(on="set", index=["forget", "curve", "setting", "strength", "seed", "form"],
                   values=["drop", "lo", "hi"]))
    for m in ("drop", "lo", "hi"):
        for st in ("forget", "retain", "celebrity"):
            name = f"{m}_{st}"
            wide = wide.rename({name: f"{st}_{m}"}) if name in wide.columns else wide.with_columns(
                pl.lit(None, dtype=pl.Float64).alias(f"{st}_{m}"))
    return (wide.group_by("forget", "curve", "setting", "strength", "form", maintain_order=True)
            .agg(seeds=pl.len(), forget_drop=pl.col("forget_drop").mean(), lo=pl.col("forget_lo").mean(),
                 hi=pl.col("forget_hi").mean(), forget_min=pl.col("forget_drop").min(),
                 forget_max=pl.col("forget_drop").max(), retain_drop=pl.col("retain_drop").mean(),
                 retain_lo=pl.col("retain_lo").mean(), retain_hi=pl.col("retain_hi").mean(),
                 celebrity_drop=pl.col("celebrity_drop").mean())
            .rename({"curve": "method"}).sort("forget", "method", "strength", "form", nulls_last=False))


def chosen_settings(points: pl.DataFrame, *, budget: float = BUDGET) -> pl.DataFrame | None:
    """RULE applied to the validation forget set's points (None when the sweep has no validation run)."""
    val = points.filter(pl.col("forget") == VALIDATION)
    if val.is_empty():
        return None
    return choose_settings(val.select("method", "setting", "strength", "form", "retain_drop"), budget=budget)


def headline(drops: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
    """Each method at its chosen strength on every reported (non-validation) forget set, per form and
    set: the drop with its interval (seeded methods: the mean over seeds, intervals averaged, and the
    seeds' min–max), and whether the method is selective in that form (SELECTIVE_RULE)."""
    pick = chosen.select(pl.col("method").alias("curve"), pl.col("strength").alias("chosen"), "within_budget")
    d = (drops.filter(pl.col("forget") != VALIDATION).join(pick, on="curve")
         .filter((pl.col("strength") == pl.col("chosen")) | (pl.col("strength").is_null() & pl.col("chosen").is_null()))
         .with_columns(setting=pl.col("label").str.replace(r" seed=\d+$", "")))
    agg = (d.group_by("forget", "curve", "setting", "strength", "within_budget", "form", "set", maintain_order=True)
           .agg(drop=pl.col("drop").mean(), lo=pl.col("lo").mean(), hi=pl.col("hi").mean(),
                seed_min=pl.col("drop").min(), seed_max=pl.col("drop").max(), seeds=pl.len()))
    fr = agg.filter(pl.col("set") == "forget").select("forget", "curve", "form", f=pl.col("drop"))
    rt = agg.filter(pl.col("set") == "retain").select("forget", "curve", "form", r=pl.col("drop"))
    sel = fr.join(rt, on=["forget", "curve", "form"], how="left").with_columns(
        selective=pl.struct("f", "r").map_elements(lambda x: is_selective(x["f"], x["r"] if x["r"] is not None
                                                                           else float("nan")), return_dtype=pl.Boolean))
    return (agg.join(sel.select("forget", "curve", "form", "selective"), on=["forget", "curve", "form"], how="left")
            .rename({"curve": "method"}))


REFERENCE_COLUMNS = ("forget", "curve", "label", "strength", "seed", "form", "vanilla", "reference", "unlearned",
                     "headroom", "headroom_lo", "headroom_hi", "headroom_excludes_0", "share", "share_lo", "share_hi",
                     "gap", "gap_lo", "gap_hi", "verdict", "ks_p")


def reference_frame(runs: list[dict]) -> pl.DataFrame:
    """Every run's forget-set multiple choice against its never-learned reference (the `reference`
    block of results.json: forget_quality.reference_block), one row per (run, form): the scores, the
    headroom and the drop's share of it with intervals, and the paired log truth-ratio gap (forget
    quality's headline) with TOFU's KS p-value. Empty when no run has a reference."""
    rows = []
    for r in runs:
        block = r.get("reference")
        if not block or r.get("without"):
            continue
        quality = {q["form"]: q for q in block["forget_quality"]}
        for h in block["headroom"]:
            if h["task"] != "mc" or h["set"] != "forget":
                continue
            q = quality.get(h["form"], {})
            rows.append({"forget": r["forget"], "curve": curve_name(r["family"], r.get("mode"), r.get("iterative", False)),
                         "label": r["label"], "strength": r.get("strength"), "seed": r.get("seed"), "form": h["form"],
                         **{k: h[k] for k in ("vanilla", "reference", "unlearned", "headroom", "headroom_lo",
                                              "headroom_hi", "headroom_excludes_0", "share", "share_lo", "share_hi")},
                         "gap": q.get("paired_diff"), "gap_lo": q.get("paired_lo"), "gap_hi": q.get("paired_hi"),
                         "verdict": q.get("verdict"), "ks_p": q.get("p_value")})
    schema = {c: pl.Float64 for c in REFERENCE_COLUMNS} | {"forget": pl.String, "curve": pl.String, "label": pl.String,
                                                            "seed": pl.Int64, "form": pl.String, "verdict": pl.String,
                                                            "headroom_excludes_0": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row")


def is_selective_headroom(share: float | None, excludes_0: bool, forget_drop: float, retain_drop: float) -> bool:
    """HEADROOM_RULE: at least half the learned headroom closed, on a headroom whose interval is above
    0, and the forget drop at least 2 x the retain drop."""
    return (bool(excludes_0) and share is not None and np.isfinite(share) and share >= SELECTIVE_SHARE
            and np.isfinite(retain_drop) and forget_drop >= SELECTIVE_RATIO * retain_drop)


def reference_markdown(ref: pl.DataFrame, head: pl.DataFrame | None, points: pl.DataFrame | None = None) -> str:
    """The never-learned reference section of the comparison: per reported forget set, each method at
    its chosen setting (with no chosen settings: every setting of `points`) beside the reference, with
    both verdicts (in points, SELECTIVE_RULE; against the headroom, HEADROOM_RULE). Seeded runs (the
    random control) show their mean."""
    out = ["## Against the never-learned reference (forget multiple choice)", "",
           "`never-learned`: the forget-set score of the model trained by the same recipe without the forget "
           "people; `headroom` = vanilla − never-learned (what was learned); `share` = the forget drop / headroom "
           "(1: as if never learned; above 1: over-forgotten); `gap`: the mean paired log truth-ratio gap, "
           "unlearned − never-learned (0: as if never learned; below: still knows), with TOFU's KS p-value. "
           "95 % profile-bootstrap intervals.", "", f"**Selective against the headroom**: {HEADROOM_RULE}.", ""]
    keys = ["forget", "curve", "setting", "form"]
    rows = ref.filter(pl.col("forget") != VALIDATION).with_columns(setting=pl.col("label").str.replace(r" seed=\d+$", ""))
    drops: dict[tuple, tuple[float, float | None]] = {}  # (forget, curve, setting, form) -> (forget drop, retain drop)
    if head is not None:
        rows = rows.join(head.select(pl.col("forget"), pl.col("method").alias("curve"), "setting", "form").unique(),
                         on=keys, how="semi")
        wide = (head.filter(pl.col("set").is_in(["forget", "retain"])).with_columns(pl.col("set") + "_drop")
                .pivot(on="set", index=["forget", "method", "setting", "form"], values="drop", aggregate_function="mean"))
        for r in wide.iter_rows(named=True):
            drops[(r["forget"], r["method"], r["setting"], r["form"])] = (r["forget_drop"], r.get("retain_drop"))
    elif points is not None:
        for r in points.iter_rows(named=True):
            drops[(r["forget"], r["method"], r["setting"], r["form"])] = (r["forget_drop"], r["retain_drop"])
    agg = (rows.group_by(*keys, maintain_order=True)
           .agg(pl.len().alias("runs"), *(pl.col(c).mean() for c in REFERENCE_COLUMNS
                if c not in ("forget", "curve", "label", "strength", "seed", "form", "verdict", "headroom_excludes_0")),
                pl.col("headroom_excludes_0").all()))
    for (name,), g in agg.sort("forget").group_by("forget", maintain_order=True):
        out += [f"### forget {name}", "", "| method | form | vanilla | never-learned | headroom | share of headroom | "
                "truth-ratio gap (KS p) | selective: points / headroom |", "|---|---|---|---|---|---|---|---|"]
        for r in g.iter_rows(named=True):
            fd, rd = drops.get((name, r["curve"], r["setting"], r["form"]), (r["vanilla"] - r["unlearned"], None))
            if rd is None:
                verdicts = "– / –"
            else:
                verdicts = " / ".join("**yes**" if ok else "no" for ok in (
                    is_selective(fd, rd), is_selective_headroom(r["share"], r["headroom_excludes_0"], fd, rd)))
            gap = "–" if r["gap"] is None else f"{r['gap']:+.3f} [{r['gap_lo']:+.3f}, {r['gap_hi']:+.3f}] ({r['ks_p']:.2g})"
            seeds = f" ({r['runs']} seeds, means)" if r["runs"] > 1 else ""
            out.append(f"| {r['setting']}{seeds} | {FORM_LABELS.get(r['form'], r['form'])} | {r['vanilla']:.1f} | "
                       f"{r['reference']:.1f} | {_ci(r['headroom'], r['headroom_lo'], r['headroom_hi'])} | "
                       f"{r['share']:.2f} [{r['share_lo']:.2f}, {r['share_hi']:.2f}] | {gap} | {verdicts} |")
        out.append("")
    return "\n".join(out) + "\n"


def planted_frame(runs: list[dict]) -> pl.DataFrame:
    """Every run's planted-unit recall and precision per tower (results.json `planted`: runs on a
    planted preset, manu_core/plant.py); empty when no run has planted units."""
    rows = [{"forget": r["forget"], "curve": curve_name(r["family"], r.get("mode"), r.get("iterative", False)),
             "label": r["label"], "strength": r.get("strength"), "seed": r.get("seed"), **t}
            for r in runs if r.get("planted") for t in r["planted"]["recall"]]
    return pl.DataFrame(rows, schema={"forget": pl.String, "curve": pl.String, "label": pl.String, "strength": pl.Float64,
                                      "seed": pl.Int64, "tower": pl.String, "planted": pl.Int64, "selected": pl.Int64,
                                      "hits": pl.Int64, "recall": pl.Float64, "precision": pl.Float64}, orient="row")


def planted_markdown(planted: pl.DataFrame) -> str:
    """Planted recall of every run (language tower: where the units are planted), in run order."""
    out = ["## Planted units recovered (positive control)", "",
           "Per run, in the language tower (the planted tower): planted units among those the run pruned. "
           "Random runs draw as many units per tower as the selection they shadow.", "",
           "| forget | run | selected | planted among them | recall | precision |", "|---|---|---|---|---|---|"]
    for r in planted.filter(pl.col("tower") == "language").iter_rows(named=True):
        prec = "–" if r["precision"] is None else f"{100 * r['precision']:.0f} %"
        out.append(f"| {r['forget']} | {r['label']} | {r['selected']} | {r['hits']} of {r['planted']} | "
                   f"{100 * r['recall']:.0f} % | {prec} |")
    return "\n".join(out) + "\n"


def _ci(drop: float | None, lo: float | None, hi: float | None) -> str:
    return "–" if drop is None else f"{drop:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def comparison_markdown(points: pl.DataFrame, summary: pl.DataFrame, chosen: pl.DataFrame | None,
                        head: pl.DataFrame | None, *, budget: float = BUDGET, x_max: float = X_MAX) -> str:
    """The comparison as markdown: the rule and the chosen settings, the headline table per forget
    set (drops in points, 95 % profile-bootstrap intervals), the verdicts, and every curve's summary."""
    out = ["## The comparison (multiple choice)", "",
           "Drops are vanilla minus unlearned accuracy in points; brackets are 95 % bootstrap intervals over "
           "profiles (paired). Seeded methods (the random control) show the mean over seeds and, after `seeds`, "
           "their min–max. Differences whose intervals overlap are not told apart by this sweep.", ""]
    if chosen is None or head is None:
        out += ["No validation run in this sweep, so no setting is chosen and no headline table is drawn: add "
                "`validation` to `forget_splits`. Every point is in the curves below.", ""]
    else:
        out += [f"**Rule** (fixed in the code before any sweep ran): {RULE.format(budget=budget)}.", "",
                f"**Selective**: {SELECTIVE_RULE.removeprefix('selective: ')}.", "", "| method | chosen setting | within budget |",
                "|---|---|---|"]
        out += [f"| {r['method']} | {r['setting']} | {'yes' if r['within_budget'] else 'no (weakest setting)'} |"
                for r in chosen.iter_rows(named=True)]
        for forget in sorted(head["forget"].unique()):
            out += ["", f"### Headline: forget {forget}", "",
                    "| method | setting | form | forget | test | retain | celebrity | selective |",
                    "|---|---|---|---|---|---|---|---|"]
            h = head.filter(pl.col("forget") == forget)
            for (method, setting, form), g in h.group_by("method", "setting", "form", maintain_order=True):
                cells = []
                for st in EVAL_SETS:
                    row = g.filter(pl.col("set") == st)
                    if row.is_empty():
                        cells.append("–")
                        continue
                    r = row.row(0, named=True)
                    spread = f" seeds {r['seed_min']:+.1f}–{r['seed_max']:+.1f}" if r["seeds"] > 1 else ""
                    cells.append(_ci(r["drop"], r["lo"], r["hi"]) + spread)
                verdict = g["selective"][0]
                out.append(f"| {method} | {setting} | {FORM_LABELS.get(form, form)} | " + " | ".join(cells)
                           + f" | {'**yes**' if verdict else 'no'} |")
    out += ["", f"### Curves: forget drop at a retain drop of {budget:g} points, and area under the curve",
            "", f"`at budget`: the forget drop where the curve (points in strength order from the origin) "
            f"reaches a retain drop of {budget:g}, interpolated (– when it never does; then `best within` is "
            f"the largest forget drop at retain drop ≤ {budget:g}); `AUC`: the mean forget drop over retain "
            f"drops 0–{x_max:g}.", "", "| forget | method | form | points | at budget | best within | AUC |",
            "|---|---|---|---|---|---|---|"]
    for r in summary.iter_rows(named=True):
        at = "–" if r["forget_at_budget"] is None else f"{r['forget_at_budget']:+.1f}"
        out.append(f"| {r['forget']} | {r['method']} | {FORM_LABELS.get(r['form'], r['form'])} | {r['n_points']} | "
                   f"{at} | {r['forget_at_max_within']:+.1f} | {r['auc']:+.1f} |")
    return "\n".join(out) + "\n"


def compare(runs: list[dict], out_dir: str | Path, *, budget: float = BUDGET, x_max: float = X_MAX,
            n_boot: int = 1000, seed: int = 0) -> dict[str, Path]:
    """The whole comparison of a sweep's runs (see `run_drops` for a run's fields) into `out_dir`:
    drops.parquet, points.parquet, curves.parquet, chosen.parquet and headline.parquet (when the sweep
    has a validation run), comparison.md and one trade-off figure per forget set and axis (retain,
    celebrity). Returns {name: path}."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    drops = run_drops(runs, n_boot=n_boot, seed=seed)
    points = curve_points(drops)
    summary = pl.concat([curve_summary(g, budget=budget, x_max=x_max).with_columns(forget=pl.lit(f))
                         for (f,), g in points.group_by("forget", maintain_order=True)]).select(
        "forget", pl.exclude("forget"))
    chosen = chosen_settings(points, budget=budget)
    head = headline(drops, chosen) if chosen is not None else None
    ref, planted = reference_frame(runs), planted_frame(runs)
    paths = {}
    for name, frame in (("drops", drops), ("points", points), ("curves", summary), ("chosen", chosen),
                        ("headline", head), ("reference", None if ref.is_empty() else ref),
                        ("planted", None if planted.is_empty() else planted)):
        if frame is not None:
            with atomic_file(out / f"{name}.parquet") as tmp:
                frame.write_parquet(tmp)
            paths[name] = out / f"{name}.parquet"
    for (forget,), g in points.group_by("forget", maintain_order=True):
        for versus in ("retain", "celebrity"):
            if g[f"{versus}_drop"].is_null().all():
                continue
            pts = g.with_columns(pl.col(f"{versus}_drop").fill_null(0.0))
            paths[f"tradeoff-{forget}-{versus}"] = tradeoff_figure(
                pts, out / "figures" / f"tradeoff-{forget}-{versus}.png", versus=versus, budget=budget)
    md = comparison_markdown(points, summary, chosen, head, budget=budget, x_max=x_max)
    if not ref.is_empty():
        md += "\n" + reference_markdown(ref, head, points)
    if not planted.is_empty():
        md += "\n" + planted_markdown(planted)
    md += "\n" + "\n".join(f"![{n}](figures/{p.name})" for n, p in paths.items() if n.startswith("tradeoff-")) + "\n"
    with atomic_file(out / "comparison.md") as tmp:
        tmp.write_text(md)
    paths["markdown"] = out / "comparison.md"
    return paths
