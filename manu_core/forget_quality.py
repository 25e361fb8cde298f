"""Forgetting judged against a never-learned reference model (TOFU's and MUSE's "retain model").

The reference is trained by the vanilla model's recipe on everything except the forget set: it is
what a perfect unlearning would give. Drops from vanilla (`tradeoff.paired_drops`) say how much a
method removed; the reference says how much there was to remove, and where to stop.

    h = headroom(vanilla, unlearned, reference)    # per set x form x task x scorer: share of the gap closed
    tr = truth_ratios(answers)                     # per multiple-choice item: TOFU's truth ratio R
    fq = forget_quality(unlearned, reference)      # per form: paired log R gap (headline) and TOFU's KS test

**Headroom and share.** headroom = vanilla − reference (points): what the forget-set knowledge is
worth on a metric; share = (vanilla − unlearned) / headroom: 0 is no forgetting, 1 is the reference,
above 1 is forgetting more than a model that never saw the people (a failure too).

**Truth ratio.** For a multiple-choice item with one correct option c and wrong options w,
R = mean_w P(w | q)^(1/|w|) / P(c | q)^(1/|c|) (TOFU's definition, arithmetic mean over the wrong
options). The length-normalised likelihoods are the `option_logprobs` the likelihood scorer keeps
(`evaluate.span_mean_logprobs`: the mean token log-probability from the first token where the options
differ, so it is P(option | question, shared prefix)^(1/length)). R < 1: the model prefers the truth.
The letter scorer of real checkpoints keeps no likelihoods; then the statistic is reported as
unavailable, with the reason, never filled in from something else.

**The headline: the paired difference, not the KS p-value.** TOFU's forget quality is the p-value of
a two-sample Kolmogorov–Smirnov test between the unlearned model's and the reference's truth ratios
on the forget set. Here it is kept for comparability (`ks_statistic`, `p_value`), but the headline
is the paired mean gap mean_i (log R_unlearned,i − log R_reference,i) with a profile-bootstrap
interval, because:

- both models answer the *same* questions; the KS test throws that pairing away and compares two
  marginal distributions, so most of the item-to-item variation (easy vs hard questions) stays in
  its noise; the paired gap removes it;
- with the ~100–400 forget-set items of MLLMU-Bench, KS is weak: a large p-value mostly says the
  sample is small, not that the models agree, and the same gap gets a smaller p-value on a larger
  forget set, so the "quality" measures the sample size as much as the model;
- KS treats items as independent; a profile's questions are not (same person), which makes its
  p-values too small; the bootstrap resamples profiles, as everywhere in this project;
- the gap has a sign and a unit: negative = the unlearned model still prefers the truth more than a
  never-learned model (under-forgotten), positive = it avoids the truth more than one (over-forgotten,
  a tell-tale of unlearning that a probe could detect); a p-value is symmetric and says neither.

An interval that contains 0 means the sweep does not tell the model from the reference, not that
they are equal. Nothing here says anything about utility (retain, celebrity: `tradeoff.paired_drops`).

Pure functions of their inputs (seeded where random); nothing here loads a model.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.stats import ks_2samp

from manu_core.scoring import LETTERS
from manu_core.vocab import FORM_LABELS, require_columns

KEYS = ("set", "form", "task", "scorer")  # one headroom per group
ANSWER_COLUMNS = ("item_id", "set", "form", "task", "profile_id", "score", "scorer")
TRUTH_COLUMNS = ("item_id", "set", "form", "task", "profile_id", "scorer", "options", "correct")
LIKELIHOOD = "likelihood"  # the multiple-choice scorer that keeps option log-likelihoods (evaluate.py)

HEADROOM_SCHEMA = {**{k: pl.String for k in KEYS}, "vanilla": pl.Float64, "reference": pl.Float64,
                   "unlearned": pl.Float64, "headroom": pl.Float64, "headroom_lo": pl.Float64,
                   "headroom_hi": pl.Float64, "headroom_excludes_0": pl.Boolean, "drop": pl.Float64,
                   "drop_lo": pl.Float64, "drop_hi": pl.Float64, "share": pl.Float64, "share_lo": pl.Float64,
                   "share_hi": pl.Float64, "share_undefined_draws": pl.Int64, "n_profiles": pl.Int64,
                   "n_items": pl.Int64}
TRUTH_SCHEMA = {"item_id": pl.String, "set": pl.String, "form": pl.String, "profile_id": pl.String,
                "truth_ratio": pl.Float64, "log_truth_ratio": pl.Float64}
QUALITY_SCHEMA = {"set": pl.String, "form": pl.String, "available": pl.Boolean, "reason": pl.String,
                  "n_items": pl.Int64, "n_profiles": pl.Int64, "log_tr_unlearned": pl.Float64,
                  "log_tr_reference": pl.Float64, "paired_diff": pl.Float64, "paired_lo": pl.Float64,
                  "paired_hi": pl.Float64, "verdict": pl.String, "ks_statistic": pl.Float64, "p_value": pl.Float64}


class ForgetQualityError(ValueError):
    """Bad input to a reference comparison: the message names the rule, the value and the fix."""


def _check_level(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ForgetQualityError(f"n_boot must be >= 1; got {n_boot}. Use e.g. n_boot=1000.")
    if not 0 < level < 1:
        raise ForgetQualityError(f"level must be in (0, 1); got {level}. Use e.g. level=0.95.")


def _check_answers(frame: pl.DataFrame, columns: tuple[str, ...], what: str, score: bool = True) -> None:
    require_columns(frame, columns, what, ForgetQualityError, "pass the answers of at least one evaluation unit")
    if score:
        values = frame["score"].cast(pl.Float64)
        bad = values.is_null() | values.is_nan() | values.is_infinite()
        if bad.any():
            raise ForgetQualityError(f"{what}: column 'score' must be finite; {int(bad.sum())} null/NaN/inf "
                                     f"value(s). Drop or fix those rows first.")
    dup = frame.select("item_id", "scorer").is_duplicated()
    if dup.any():
        ids = frame.filter(dup)["item_id"].unique().sort().head(3).to_list()
        raise ForgetQualityError(f"{what}: each (item_id, scorer) must appear once; {int(dup.sum())} duplicated "
                                 f"rows, e.g. {ids}. Pass one evaluation run per frame.")


def _pair(frames: dict[str, pl.DataFrame], fn: str, values: tuple[str, ...]) -> pl.DataFrame:
    """The frames joined on (item_id, scorer), `values` suffixed with each frame's name; every frame must
    hold the same rows, and the same set/form/task/profile_id for each."""
    (first, base), *rest = frames.items()
    keys = ["item_id", "scorer"]
    meta = [c for c in ("set", "form", "task", "profile_id") if c in base.columns]
    joined = base.select(*keys, *meta, *(pl.col(v).alias(f"{v}_{first}") for v in values))

    def show(f: pl.DataFrame) -> list[str]:
        return [f"{i} ({s})" for i, s in f.select(keys).sort("item_id").head(3).iter_rows()]

    for name, frame in rest:
        other = frame.select(*keys, *(pl.col(c).alias(f"{c}_{name}") for c in meta),
                             *(pl.col(v).alias(f"{v}_{name}") for v in values))
        only_a, only_b = joined.join(other, on=keys, how="anti"), other.join(joined, on=keys, how="anti")
        if not only_a.is_empty() or not only_b.is_empty():
            raise ForgetQualityError(
                f"{fn}: {first} and {name} must hold the same (item_id, scorer) rows; {only_a.height} only in "
                f"{first} (e.g. {show(only_a)}), {only_b.height} only in {name} (e.g. {show(only_b)}). "
                f"Evaluate every model on the same units with the same scorers.")
        joined = joined.join(other, on=keys, how="inner")
        for c in meta:
            differ = joined.filter(pl.col(c) != pl.col(f"{c}_{name}"))
            if not differ.is_empty():
                raise ForgetQualityError(
                    f"{fn}: item {differ['item_id'][0]!r} has {c}={differ[c][0]!r} in {first} but "
                    f"{differ[f'{c}_{name}'][0]!r} in {name}; the frames come from different datasets. "
                    f"Evaluate every model on the same data.")
        joined = joined.drop(f"{c}_{name}" for c in meta)
    return joined


def _weights(n_profiles: int, n_boot: int, seed: int) -> np.ndarray:
    """n_boot x n_profiles multinomial counts: profile i drawn w[b, i] times in draw b (paired_drops' draws)."""
    return np.random.default_rng(seed).multinomial(n_profiles, np.full(n_profiles, 1.0 / n_profiles), size=n_boot)


def _quantiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# Headroom: how much of the vanilla - reference gap a method closed


def headroom(vanilla: pl.DataFrame, unlearned: pl.DataFrame, reference: pl.DataFrame, *, n_boot: int = 1000,
             seed: int = 0, level: float = 0.95) -> pl.DataFrame:
    """Per (set, form, task, scorer): the vanilla, reference and unlearned mean scores (points), the
    headroom vanilla − reference, the drop vanilla − unlearned and the share of the headroom the drop
    closes, with paired percentile bootstrap intervals over profiles.

    The three answer frames (evaluate.ANSWER_SCHEMA) must hold the same (item_id, scorer) rows. The
    bootstrap is `tradeoff.paired_drops`': each group restarts `np.random.default_rng(seed)` with its
    profiles in sorted id order and draws profiles with replacement; all three models use the same
    draws. In a draw, headroom and drop are means over the drawn profiles' items and the share is the
    ratio of the resampled sums, sum(vanilla − unlearned) / sum(vanilla − reference). A draw whose
    resampled headroom is exactly 0 has no share: it is left out of the share's interval and counted
    in `share_undefined_draws` (the point share is NaN when the headroom itself is 0).

    share = 1: the unlearned model scores like the reference; 0: like vanilla; > 1: below the
    reference (forgot more than a model that never learned the forget set: over-unlearning, also a
    failure); < 0: above vanilla. The share is only interpretable where `headroom_excludes_0`: where
    the headroom's interval contains 0 (retain and celebrity sets, which the reference learned too;
    or a metric the forget set barely moves), the ratio divides by noise and its interval is
    meaningless, however narrow it looks.

    Columns: set, form, task, scorer, vanilla, reference, unlearned (points), headroom, headroom_lo,
    headroom_hi, headroom_excludes_0, drop, drop_lo, drop_hi (points), share, share_lo, share_hi
    (fractions), share_undefined_draws, n_profiles, n_items.
    """
    _check_level(n_boot, level)
    frames = {"vanilla": vanilla, "unlearned": unlearned, "reference": reference}
    for what, frame in frames.items():
        _check_answers(frame, ANSWER_COLUMNS, f"headroom({what} answers)")
    joined = _pair(frames, "headroom", ("score",))
    per_profile = (joined.group_by(*KEYS, "profile_id")
                   .agg(sv=pl.col("score_vanilla").sum(), su=pl.col("score_unlearned").sum(),
                        sr=pl.col("score_reference").sum(), n=pl.len())
                   .sort(*KEYS, "profile_id"))
    rows = []
    for key, g in per_profile.group_by(*KEYS, maintain_order=True):
        sv, su, sr, n = (g[c].to_numpy().astype(np.float64) for c in ("sv", "su", "sr", "n"))
        w = _weights(len(n), n_boot, seed)
        wn, gap, dropped = w @ n, w @ (sv - sr), w @ (sv - su)
        h_lo, h_hi = _quantiles(100.0 * gap / wn, level)
        d_lo, d_hi = _quantiles(100.0 * dropped / wn, level)
        defined = gap != 0
        s_lo, s_hi = _quantiles(dropped[defined] / gap[defined], level) if defined.any() else (np.nan, np.nan)
        total_gap, total_drop = float(sv.sum() - sr.sum()), float(sv.sum() - su.sum())
        rows.append(dict(zip(KEYS, key)) | {
            "vanilla": 100.0 * sv.sum() / n.sum(), "reference": 100.0 * sr.sum() / n.sum(),
            "unlearned": 100.0 * su.sum() / n.sum(), "headroom": 100.0 * total_gap / n.sum(),
            "headroom_lo": h_lo, "headroom_hi": h_hi, "headroom_excludes_0": bool(h_lo > 0 or h_hi < 0),
            "drop": 100.0 * total_drop / n.sum(), "drop_lo": d_lo, "drop_hi": d_hi,
            "share": total_drop / total_gap if total_gap != 0 else np.nan, "share_lo": s_lo, "share_hi": s_hi,
            "share_undefined_draws": int((~defined).sum()), "n_profiles": len(n), "n_items": int(n.sum())})
    return pl.DataFrame(rows, schema=HEADROOM_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Truth ratios (TOFU) from the likelihood scorer's option log-likelihoods


def _truth_gap(answers: pl.DataFrame, what: str) -> str | None:
    """Why `answers` cannot give truth ratios (None when it can): no column, no likelihood-scored
    multiple-choice rows, or such rows without option log-likelihoods."""
    mc = answers.filter(pl.col("task") == "mc")
    if mc.is_empty():
        return f"{what} hold no multiple-choice answers (tasks: {sorted(set(answers['task']))})"
    if "option_logprobs" not in answers.columns:
        return (f"{what} have no option_logprobs column: they were written before the likelihood scorer kept "
                f"option log-likelihoods; evaluate again into a new folder")
    lik = mc.filter(pl.col("scorer") == LIKELIHOOD)
    if lik.is_empty():
        return (f"{what} were scored by {sorted(set(mc['scorer']))}, which keep no option likelihoods (the letter "
                f"scorer reads a generated letter); truth ratios need mc_scorer='{LIKELIHOOD}'")
    missing = lik["option_logprobs"].is_null()
    if missing.any():
        return (f"{int(missing.sum())} of {lik.height} likelihood-scored answers in {what} have no option_logprobs "
                f"(parts written before the scorer kept them); evaluate again into a new folder")
    return None


def truth_ratios(answers: pl.DataFrame) -> pl.DataFrame:
    """TOFU's truth ratio of every likelihood-scored multiple-choice answer (other rows are ignored).

    R = mean over the wrong options w of exp(l_w − l_c), where l is the option's length-normalised
    log-likelihood (`option_logprobs`, the mean token log-probability: exp(l) = P^(1/length)) and c
    the correct option; log R is computed as logsumexp(l_w − l_c) − log(#wrong), so it stays finite
    where R overflows. R < 1: the model prefers the correct answer; R = 1: no preference on average.

    Raises ForgetQualityError when the answers cannot give truth ratios (no likelihood-scored
    multiple-choice rows, e.g. the letter scorer; or answers that predate `option_logprobs`).
    Columns: item_id, set, form, profile_id, truth_ratio, log_truth_ratio.
    """
    _check_answers(answers, TRUTH_COLUMNS, "truth_ratios(answers)", score=False)
    gap = _truth_gap(answers, "the answers")
    if gap:
        raise ForgetQualityError(f"truth_ratios: {gap}.")
    mc = answers.filter((pl.col("task") == "mc") & (pl.col("scorer") == LIKELIHOOD))
    rows = []
    for r in mc.select("item_id", "set", "form", "profile_id", "options", "correct", "option_logprobs").iter_rows(
            named=True):
        lp, k = np.asarray(r["option_logprobs"], dtype=np.float64), len(r["options"])
        if lp.size != k or k < 2:
            raise ForgetQualityError(f"truth_ratios: item {r['item_id']!r} needs one option log-likelihood per option "
                                     f"and at least 2 options; got {lp.size} for {k} options. Pass answers as "
                                     f"evaluate.py writes them.")
        if not np.isfinite(lp).all():
            raise ForgetQualityError(f"truth_ratios: item {r['item_id']!r} has non-finite option log-likelihoods "
                                     f"{lp.tolist()}. Evaluate it again.")
        c = LETTERS.find(r["correct"] or "?")
        if not 0 <= c < k:
            raise ForgetQualityError(f"truth_ratios: item {r['item_id']!r} has correct={r['correct']!r}; it must be "
                                     f"one of {list(LETTERS[:k])}. Pass answers as evaluate.py writes them.")
        diff = np.delete(lp, c) - lp[c]
        top = diff.max()
        log_r = float(top + np.log(np.exp(diff - top).sum()) - np.log(diff.size))
        with np.errstate(over="ignore"):  # R = inf past ~1e308; log R stays exact
            ratio = float(np.exp(log_r))
        rows.append({"item_id": r["item_id"], "set": r["set"], "form": r["form"], "profile_id": r["profile_id"],
                     "truth_ratio": ratio, "log_truth_ratio": log_r})
    return pl.DataFrame(rows, schema=TRUTH_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Forget quality against the reference


def _verdict(lo: float, hi: float) -> str:
    if hi < 0:
        return "under-forgotten"  # still prefers the truth more than a never-learned model
    if lo > 0:
        return "over-forgotten"  # avoids the truth more than a never-learned model
    return "not told apart"


def forget_quality(unlearned: pl.DataFrame, reference: pl.DataFrame, *, set_name: str = "forget",
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pl.DataFrame:
    """Per form of `set_name`: how far the unlearned model's truth ratios are from the reference's.

    Headline (see the module docstring for why): paired_diff = mean over items of
    log R_unlearned − log R_reference, with a percentile bootstrap interval over profiles (each form
    restarts `np.random.default_rng(seed)`, profiles sorted, as in `tradeoff.paired_drops`), and its
    verdict: "under-forgotten" (interval below 0: the model still prefers the truth more than the
    reference), "over-forgotten" (above 0: it avoids the truth more than a model that never learned
    it) or "not told apart" (the interval contains 0: not evidence that they are equal). Kept for
    comparison with TOFU: ks_statistic and p_value, the two-sample Kolmogorov–Smirnov test
    (`scipy.stats.ks_2samp`, method "auto") between the two models' truth ratios (on log R, which gives
    the same statistic as on R); TOFU calls the p-value "forget quality".

    Both frames must hold the same likelihood-scored multiple-choice items of `set_name`. When either
    cannot give truth ratios (the letter scorer, answers that predate `option_logprobs`), each form is
    reported with available=False, the reason, and null statistics: nothing is faked.

    Columns: set, form, available, reason, n_items, n_profiles, log_tr_unlearned, log_tr_reference
    (mean log R), paired_diff, paired_lo, paired_hi, verdict, ks_statistic, p_value.
    """
    _check_level(n_boot, level)
    fn = "forget_quality"
    picked = {}
    for what, frame in (("unlearned", unlearned), ("reference", reference)):
        _check_answers(frame, ("item_id", "set", "form", "task", "profile_id", "scorer"), f"{fn}({what} answers)",
                       score=False)
        mine = frame.filter((pl.col("set") == set_name) & (pl.col("task") == "mc"))
        if mine.is_empty():
            raise ForgetQualityError(f"{fn}: the {what} answers hold no multiple-choice items of set {set_name!r} "
                                     f"(sets: {sorted(set(frame['set']))}). Evaluate that set's mc task, or pass "
                                     f"set_name= one of those.")
        picked[what] = mine
    forms = sorted(set(picked["unlearned"]["form"]) | set(picked["reference"]["form"]))
    gaps = [g for what, f in picked.items() if (g := _truth_gap(f, f"the {what} answers"))]
    if gaps:
        counts = dict(picked["unlearned"].group_by("form").agg(n=pl.len()).iter_rows())
        return pl.DataFrame([{"set": set_name, "form": form, "available": False, "reason": "; ".join(gaps),
                              "n_items": counts.get(form, 0)} for form in forms], schema=QUALITY_SCHEMA)
    tr = {what: truth_ratios(f) for what, f in picked.items()}
    joined = _pair({w: t.with_columns(scorer=pl.lit(LIKELIHOOD), task=pl.lit("mc")) for w, t in tr.items()}, fn,
                   ("log_truth_ratio",))
    joined = joined.with_columns(d=pl.col("log_truth_ratio_unlearned") - pl.col("log_truth_ratio_reference"))
    rows = []
    for (form,), g in joined.sort("form", "profile_id", "item_id").group_by("form", maintain_order=True):
        per = g.group_by("profile_id").agg(s=pl.col("d").sum(), n=pl.len()).sort("profile_id")
        s, n = per["s"].to_numpy().astype(np.float64), per["n"].to_numpy().astype(np.float64)
        w = _weights(len(n), n_boot, seed)
        lo, hi = _quantiles((w @ s) / (w @ n), level)
        lu, lr = g["log_truth_ratio_unlearned"].to_numpy(), g["log_truth_ratio_reference"].to_numpy()
        ks = ks_2samp(lu, lr)
        rows.append({"set": set_name, "form": form, "available": True, "reason": None, "n_items": g.height,
                     "n_profiles": len(n), "log_tr_unlearned": float(lu.mean()), "log_tr_reference": float(lr.mean()),
                     "paired_diff": float(s.sum() / n.sum()), "paired_lo": lo, "paired_hi": hi,
                     "verdict": _verdict(lo, hi), "ks_statistic": float(ks.statistic), "p_value": float(ks.pvalue)})
    return pl.DataFrame(rows, schema=QUALITY_SCHEMA)


# ----------------------------------------------------------------------------------------------
# One run's reference block (results.json "reference") and its table


def reference_block(vanilla: pl.DataFrame, unlearned: pl.DataFrame, reference: pl.DataFrame,
                    summaries: list | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """What a run records of its never-learned reference: the reference's summaries, `headroom` on
    the items the reference answered (vanilla and unlearned restricted to them), `forget_quality` of
    the unlearned model and, for scale, of the vanilla model (its distance from never having learned)."""
    keys = reference.select("item_id", "scorer").unique()
    v, u = (f.join(keys, on=["item_id", "scorer"], how="semi") for f in (vanilla, unlearned))
    return {"summaries": [s if isinstance(s, dict) else s.__dict__ for s in (summaries or [])],
            "headroom": headroom(v, u, reference, n_boot=n_boot, seed=seed).to_dicts(),
            "forget_quality": forget_quality(u, reference, n_boot=n_boot, seed=seed).to_dicts(),
            "vanilla_forget_quality": forget_quality(v, reference, n_boot=n_boot, seed=seed).to_dicts()}


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def reference_markdown(block: dict) -> str:
    """The never-learned reference of one run, as markdown: per form and metric, the vanilla,
    reference and unlearned scores, the headroom and the drop's share of it with 95 % intervals; then
    the forget-quality statistic (paired log truth-ratio gap, headline) beside TOFU's KS p-value."""
    lines = ["## Against the never-learned reference (forget set)", "",
             "| form | task | scorer | vanilla | never-learned | unlearned | headroom [95% CI] | "
             "share of headroom [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in block["headroom"]:
        head = f"{_num(r['headroom'])} [{_num(r['headroom_lo'])}, {_num(r['headroom_hi'])}]"
        share = f"{_num(r['share'], '{:.2f}')} [{_num(r['share_lo'], '{:.2f}')}, {_num(r['share_hi'], '{:.2f}')}]"
        if not r["headroom_excludes_0"]:
            share += " (headroom not above 0: not interpretable)"
        lines.append(f"| {FORM_LABELS.get(r['form'], r['form'])} | {r['task']} | {r['scorer']} | {_num(r['vanilla'])} | "
                     f"{_num(r['reference'])} | "
                     f"{_num(r['unlearned'])} | {head} | {share} |")
    lines += ["", "Forget quality: the mean paired gap of log truth ratios, unlearned − never-learned, over the "
              "forget set's multiple-choice items (0: as if never learned; below: still knows; above: "
              "over-forgotten), with TOFU's KS p-value beside it.", "",
              "| form | unlearned gap [95% CI] | verdict | KS p-value | vanilla gap [95% CI] |", "|---|---|---|---|---|"]
    vanilla = {r["form"]: r for r in block["vanilla_forget_quality"]}
    for r in block["forget_quality"]:
        if not r["available"]:
            lines.append(f"| {FORM_LABELS.get(r['form'], r['form'])} | unavailable: {r['reason']} | | | |")
            continue
        v = vanilla.get(r["form"], {})
        lines.append(f"| {FORM_LABELS.get(r['form'], r['form'])} | {r['paired_diff']:+.3f} [{r['paired_lo']:+.3f}, "
                     f"{r['paired_hi']:+.3f}] | "
                     f"{r['verdict']} | {r['p_value']:.3g} | "
                     + (f"{v['paired_diff']:+.3f} [{v['paired_lo']:+.3f}, {v['paired_hi']:+.3f}] |"
                        if v.get("available") else "- |"))
    return "\n".join(lines)
