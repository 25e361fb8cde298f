"""The report task: figures, tables and the self-contained report of a run or a sweep.

    report(runs=[...results task folders...], lenses=[...logit_lens task folders...], title, chosen_alpha)
    comparison(runs=[...])   # a sweep: drops with intervals, trade-off curves, settings chosen on validation
    sweep_table(report_dir, comparison_dir, name)   # a sweep's long table, with the report and comparison

reads each run's `results.json` (whose `run` names its method, variant, models, data and
activations), matches each logit lens to its run by (model, data, system prompt), and calls
`manu_core.report.build_report`. Cached like every stage; its key also hashes the presentation
modules (tasks.cache.PRESENTATION), so restyling a figure redraws only the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from prefect import get_run_logger

from manu_core.io import atomic_dir, atomic_file, atomic_write_json
from manu_core.vocab import NEVER_LEARNED, forget_name
from tasks.cache import finish, stage_dir
from tasks.stages import manu_task


def dropped_weights(variant: dict) -> list[str]:
    """The importance functions an ablation variant leaves out (weight 0; not a mode's default 0)."""
    return [k for k, w in (variant.get("weights") or {}).items() if w == 0]


def summary_rows(results: dict) -> list[dict]:
    """One row per vanilla and unlearned summary of a run's results.json (manu_core.report.RESULTS_SCHEMA)."""
    run = results["run"]
    variant = run.get("variant") or {}
    dropped = dropped_weights(variant)
    forget = forget_name(run["config"]["forget"])
    rows = [{"forget": forget, "method": "vanilla", "family": "vanilla", **s} for s in results["vanilla"]]
    rows += [{"forget": forget, "method": run.get("label", run["method"]), "family": run["method"],
              "alpha": variant.get("alpha"), "lr": variant.get("lr"), "without": "+".join(dropped) or None,
              "mode": run.get("mode", variant.get("mode")), "seed": run.get("seed", variant.get("seed")),
              "shadows": run.get("shadows", variant.get("shadows")), **s} for s in results["unlearned"]]
    # the forget set's never-learned reference, where the run evaluated one (its forget set only)
    rows += [{"forget": forget, "method": NEVER_LEARNED, "family": "reference", **s}
             for s in (results.get("reference") or {}).get("summaries", [])]
    return rows


def _notes(runs: list[dict], results: pl.DataFrame) -> str:
    cfg = runs[0]["config"]
    ev = cfg.get("eval", {})
    scorers = ", ".join(f"`{s}`" for s in sorted(set(results["scorer"].drop_nulls().to_list())))
    caps = ev.get("max_profiles") or {}
    lines = [f"Model `{cfg['model']}`; methods evaluated on MLLMU-Bench's four sets, each asked with the image "
             f"(image+text) and with the name in the question (text only). Scorers: {scorers}.",
             "Accuracy and ROUGE-L are in %, factuality on the judge's 1-10 scale. "
             + (f"Evaluation capped at {', '.join(f'{n} {s} profiles' for s, n in sorted(caps.items()))} (seeded)."
                if caps else "Every profile of every set evaluated.")]
    if "offline-keyfact-overlap" in results["scorer"].to_list() or ev.get("judge", "offline") == "offline":
        lines.append("Factuality comes from the offline key-fact overlap judge, not an LLM.")
    modes = sorted({r["mode"] for r in runs if r.get("mode")})
    if modes:
        lines.append("MANU scoring modes: " + ", ".join(f"`{m}`" for m in modes) + " (manu[mode] α=…; "
                     "paper: the paper's formulas, released: the authors' released code, selective: Pochinkov & "
                     "Schoots' selective pruning).")
    options = sorted({(r["config"].get("scoring", "paper"), k, json.dumps(v)) for r in runs
                      for k, v in (r["config"].get("scoring_options") or {}).items()})
    if options:  # a sweep's variants of the config's own mode take its options; labels do not name them
        lines.append("Scoring options: " + "; ".join(f"`{m}` {k}={v}" for m, k, v in options)
                     + " (the other modes at their defaults).")
    if "reference" in results["family"].to_list():
        lines.append(f"`{NEVER_LEARNED}`: the forget set's never-learned reference, the model trained by the same recipe "
                     "without the forget people, evaluated on the forget set only (the run's tasks); what a model that "
                     "never learned them scores, so vanilla minus it is what unlearning can remove (the comparison's "
                     "headroom).")
    if any(r["method"] == "random" for r in runs):
        lines.append("random(manu[…] α=…): the control of that MANU variant, as many neurons per tower as it "
                     "selects (per layer when it selects per layer), drawn uniformly, one run per seed; the tables "
                     "show the mean over the seeds with their spread (min–max) in the row below, the figures their mean.")
    return "\n\n".join(lines)


def _relearn_note(runs: list[dict]) -> str:
    r = runs[0]["config"].get("relearn") or {}
    lr = f"lr {r['lr']:g}" if r.get("lr") else "the preset's fine-tune lr (2e-5 for a checkpoint)"
    return (f"; {r.get('steps')} steps of batch {r.get('batch_size')} at {lr}; the forget profiles split in seeded "
            "halves: attack on one, evaluate the other; forget-text / forget-multimodal: the attack half in one form, "
            "retain: retain profiles only")


@manu_task(name="report", paths=("runs", "lenses"), presentation=True,
           task_run_name=lambda parameters: f"report-{parameters['title']}")
def report(runs: list[str], lenses: list[str], title: str, chosen_alpha: float | None = None) -> str:
    """The report of the given runs (results task folders; one section per forget split): report.md,
    report.html (self-contained) and figures/*.png."""
    out = stage_dir()
    paths = write_report(out, runs, lenses, title, chosen_alpha)
    get_run_logger().info("report: %s (%d figures)", out / "report.html", len(paths) - 2)
    return str(finish(out))


def write_report(out: Path, reports: list[str], lenses: list[str], title: str,
                 chosen_alpha: float | None = None) -> dict[str, Path]:
    """The `report` task's work, without Prefect: `out`/report.md, report.html, figures/,
    results.parquet and sources.json (its inputs, so `docs/make_example.py --redraw` can redo it)."""
    from manu_core.report import build_report, results_frame

    runs, rows, activations, selected, relearn_rows = [], [], {}, {}, []
    for rep in reports:
        res = json.loads((Path(rep) / "results.json").read_text())
        run, forget = res["run"], forget_name(res["run"]["config"]["forget"])
        runs.append(run)
        rows += summary_rows(res)
        relearn_rows += [{"forget": forget, "method": run.get("label", run["method"]), **r} for r in res.get("relearn", [])]
        if run.get("activations"):
            activations[forget] = str(Path(run["activations"]) / "activations")
        variant = run.get("variant") or {}
        full = all(w != 0 for w in (variant.get("weights") or {}).values())
        if run["method"] == "manu" and full and (chosen_alpha is None or variant.get("alpha") == chosen_alpha):
            # the configured scoring mode's selection when the run has several modes
            if forget not in selected or variant.get("mode", "paper") == run["config"].get("scoring", "paper"):
                selected[forget] = pl.read_parquet(Path(rep) / "selected_per_layer.parquet")
    results = results_frame(rows).unique(maintain_order=True)

    frames = []
    for lens_dir in lenses:
        meta = json.loads((Path(lens_dir) / "lens.json").read_text())
        table = pl.read_parquet(Path(lens_dir) / "lens.parquet")
        for run in runs:
            forget = forget_name(run["config"]["forget"])
            if run.get("data") != meta["data_dir"] or run.get("system") != meta["system"]:
                continue
            if meta["model_dir"] == run.get("vanilla_model") and meta["system"] is None:
                frames.append(table.with_columns(forget=pl.lit(forget), method=pl.lit("vanilla")))
            if meta["model_dir"] == run.get("model"):
                frames.append(table.with_columns(forget=pl.lit(forget), method=pl.lit(run.get("label", run["method"]))))
    lens = pl.concat(frames).unique(subset=["forget", "method", "split", "form", "layer"], maintain_order=True) \
        if frames else None

    relearn = pl.DataFrame(relearn_rows) if relearn_rows else None
    paths = build_report(out, title, results, lens=lens, activations=activations, selected=selected,
                         chosen_alpha=chosen_alpha, notes=_notes(runs, results), relearn=relearn,
                         relearn_note=_relearn_note(runs) if relearn_rows else "")
    with atomic_file(out / "results.parquet") as tmp:
        results.write_parquet(tmp)
    atomic_write_json(out / "sources.json", {"title": title, "chosen_alpha": chosen_alpha,
                                             "reports": list(reports), "lenses": list(lenses)})
    return paths


def _answers(units: list[str]) -> pl.DataFrame:
    from manu_core.tradeoff import ANSWER_COLUMNS

    return pl.concat([pl.read_parquet(Path(u) / "answers.parquet", columns=list(ANSWER_COLUMNS)) for u in units])


def _compared(runs: list[str]) -> list[dict]:
    """The runs' results folders as manu_core.tradeoff reads them (`run_drops`)."""
    compared = []
    for rep in runs:
        res = json.loads((Path(rep) / "results.json").read_text())
        run, variant = res["run"], res["run"].get("variant") or {}
        compared.append({"forget": forget_name(run["config"]["forget"]), "label": run.get("label", run["method"]),
                         "family": run["method"], "mode": variant.get("mode"),
                         "iterative": variant.get("iterative", False),
                         "strength": variant.get("alpha", variant.get("lr")), "seed": variant.get("seed"),
                         "without": "+".join(dropped_weights(variant)) or None,
                         "vanilla": _answers(res["units"]["vanilla"]), "unlearned": _answers(res["units"]["unlearned"]),
                         "reference": res.get("reference"), "planted": res.get("planted")})
    return compared


@manu_task(name="choose", paths=("runs",), task_run_name="choose-settings-on-validation")
def choose(runs: list[str], budget: float = 5.0) -> str:
    """Each curve's setting chosen by the rule on the validation runs' multiple choice (a two-phase
    sweep's choice between its phases, the same rule and numbers as the comparison's chosen.parquet):
    `chosen.json`, [{method (the curve), setting, strength, within_budget, rule}]."""
    from manu_core.tradeoff import chosen_settings, curve_points, run_drops

    chosen = chosen_settings(curve_points(run_drops(_compared(runs))), budget=budget)
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "chosen.json", chosen.to_dicts() if chosen is not None else [])
    return str(finish(out))


@manu_task(name="comparison", paths=("runs",), presentation=True,
           task_run_name=lambda parameters: f"comparison-{len(parameters['runs'])} runs")
def comparison(runs: list[str], budget: float = 5.0, x_max: float = 20.0, n_boot: int = 1000, seed: int = 0) -> str:
    """The sweep's comparison (manu_core/tradeoff.py): paired drops with profile-bootstrap intervals
    per run, the trade-off curves and their summaries, each method's setting chosen on the validation
    forget set, the headline table on the reported forget sets, and the figures."""
    from manu_core.tradeoff import compare

    out = stage_dir()
    paths = compare(_compared(runs), out, budget=budget, x_max=x_max, n_boot=n_boot, seed=seed)
    get_run_logger().info("comparison: %s", paths["markdown"])
    return str(finish(out))


def sweep_markdown(df: pl.DataFrame) -> str:
    """The sweep's long table: one row per (forget set, method, set, task, metric), both forms and
    their average, each value in the one report format (manu_core.vocab.fmt_metric)."""
    from manu_core.vocab import FORM_LABELS, fmt_metric

    wide = (df.pivot(on="form", index=["forget", "method", "set", "task", "metric", "scorer"], values="value")
            .sort("forget", "set", "task", "metric", "method"))
    lines = [f"| forget | method | set | task | metric | {FORM_LABELS['multimodal']} | {FORM_LABELS['text']} | average |",
             "|---|---|---|---|---|---|---|---|"]
    for r in wide.iter_rows(named=True):
        mm, tx = r.get("multimodal"), r.get("text")
        avg = (mm + tx) / 2 if mm is not None and tx is not None else None
        cells = " | ".join(fmt_metric(r["metric"], v) for v in (mm, tx, avg))
        lines.append(f"| {r['forget']} | {r['method']} | {r['set']} | {r['task']} | {r['metric']} | {cells} |")
    return "\n".join(lines)


@manu_task(name="sweep_table", paths=("report_dir", "comparison_dir"), presentation=True,
           task_run_name="sweep-table-{name}")
def sweep_table(report_dir: str, comparison_dir: str, name: str, note: str = "") -> str:
    """A sweep's outputs in one folder: sweep.parquet and sweep.md (every method and variant per
    forget set; `note` first: which numbers come from which phase), report/ (the report task's files)
    and comparison/ (the comparison task's)."""
    import shutil

    df = pl.read_parquet(Path(report_dir) / "results.parquet")
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "sweep.parquet") as tmp:
        df.write_parquet(tmp)
    with atomic_file(out / "sweep.md") as tmp:
        tmp.write_text((f"{note}\n\n" if note else "") + sweep_markdown(df) + "\n")
    for name, src in (("report", report_dir), ("comparison", comparison_dir)):
        with atomic_dir(out / name) as tmp:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*", "_manu_*"), dirs_exist_ok=True)
    get_run_logger().info("sweep table: %s (%d rows); comparison: %s", out / "sweep.parquet", df.height,
                          out / "comparison" / "comparison.md")
    return str(finish(out))
