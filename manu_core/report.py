"""The run report: the paper's tables and figures for one run or a sweep, as one self-contained file.

    results = results_frame(rows)                        # one row per (forget, method, set, form, task, metric)
    paths = build_report(out_dir, "MANU on lite", results, lens=lens, activations={"forget_5": acts},
                         selected={"forget_5": per_layer}, chosen_alpha=0.1)

writes under `out_dir`:

    figures/<forget>-fig2-logit-lens.png    knowledge across layers (needs `lens`)
    figures/<forget>-fig4-form-bars.png     change vs vanilla per form
    figures/<forget>-fig5-tradeoff.png      forget drop vs retain / celebrity accuracy
    figures/<forget>-fig6-activations.png   activation histograms (needs `activations`)
    figures/<forget>-selected-neurons.png   selected neurons at the chosen α (needs `selected`)
    report.md     the tables (Table 1; Table 2 and Table 7 when the results have them) and the figures, linked
    report.html   the same, with the images embedded: one file to mail or open anywhere

Tables follow the paper: Table 1 = methods x sets x metrics, per form and averaged, each MANU scoring
mode followed by its random control (family "random": the same number of neurons per tower drawn
uniformly, one run per seed, shown as mean [min–max] over the seeds); Table 2 = MANU at each pruning
ratio α, a row block per scoring mode; Table 7 = MANU with each importance function left out, at one
α. The figures draw each random control as one method, the mean over its seeds.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from manu_core import figures as F
from manu_core.io import atomic_file
from manu_core.vocab import EVAL_SETS

RESULTS_SCHEMA = {"forget": pl.String, "method": pl.String, "family": pl.String, "alpha": pl.Float64,
                  "lr": pl.Float64, "without": pl.String, "mode": pl.String, "seed": pl.Int64, "shadows": pl.String,
                  "set": pl.String, "form": pl.String, "task": pl.String,
                  "metric": pl.String, "scorer": pl.String, "value": pl.Float64, "n": pl.Int64}
# alpha: MANU's (and its random control's) pruning ratio; lr: a gradient baseline's learning rate in a
# sweep (its strength axis); mode: MANU's scoring mode (manu, random); seed: the random control's seed;
# shadows: the MANU label a random run shadows. Null where they do not apply.


def results_frame(rows: list[dict]) -> pl.DataFrame:
    """The results table from summary rows (missing optional columns become null)."""
    return pl.DataFrame([{k: r.get(k) for k in RESULTS_SCHEMA} for r in rows], schema=RESULTS_SCHEMA)


FAMILY_ORDER = ("vanilla", "prompting", "ga", "grad_diff", "kl", "npo", "manu", "random", "attribution")
MODE_ORDER = ("paper", "released", "selective")


def _mode_rank(mode: str | None) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode or "")


def method_order(results: pl.DataFrame) -> list[str]:
    """Method labels in report order: vanilla, the baselines, MANU by scoring mode and α, MANU's
    ablations, then the random controls (by mode, α and seed)."""
    fam = {f: i for i, f in enumerate(FAMILY_ORDER)}
    keys = {}
    for r in (results.select("method", "family", "alpha", "lr", "without", "mode", "seed").unique(maintain_order=True)
              .iter_rows(named=True)):
        keys.setdefault(r["method"], (fam.get(r["family"], len(fam)), r["without"] is not None,
                                      _mode_rank(r["mode"]), r["alpha"] or r["lr"] or 0.0, r["without"] or "",
                                      r["seed"] if r["seed"] is not None else -1, r["method"]))
    return sorted(keys, key=keys.get)


def random_groups(results: pl.DataFrame) -> dict[str, list[str]]:
    """The random controls of `results` grouped over seeds: {group label: its runs' method labels,
    by seed}, in report order. A group is the MANU variant the runs shadow (`shadows`; else mode and
    α); its label, e.g. 'random(manu[paper] α=0.1), seeds 0,1,2'."""
    rnd = results.filter(pl.col("family") == "random")
    members: dict[str, list[tuple[int, str]]] = {}
    for r in rnd.select("method", "alpha", "mode", "seed", "shadows").unique(maintain_order=True).iter_rows(named=True):
        shadow = r["shadows"] or f"manu[{r['mode'] or 'paper'}] α={(r['alpha'] or 0):g}"
        members.setdefault(shadow, [])
        if r["method"] not in [m for _, m in members[shadow]]:
            members[shadow].append((r["seed"] if r["seed"] is not None else -1, r["method"]))
    order = {m: i for i, m in enumerate(method_order(results))}
    out = {}
    for shadow, runs in sorted(members.items(), key=lambda kv: min(order[m] for _, m in kv[1])):
        runs = sorted(runs)
        seeds = [str(s) for s, _ in runs if s >= 0]
        label = f"random({shadow})" + (f", seed{'s' if len(seeds) > 1 else ''} {','.join(seeds)}" if seeds else "")
        out[label] = [m for _, m in runs]
    return out


def _shadow_of(results: pl.DataFrame, group: list[str]) -> str | None:
    rows = results.filter(pl.col("method") == group[0])
    return rows["shadows"][0] if rows.height else None


def seed_means(results: pl.DataFrame) -> pl.DataFrame:
    """`results` with each random control's runs replaced by one method (its `random_groups`
    label), the mean over its seeds (seed null): what the figures draw."""
    groups = random_groups(results)
    if not groups:
        return results
    label = {m: g for g, ms in groups.items() for m in ms}
    keys = [c for c in RESULTS_SCHEMA if c not in ("seed", "value", "n")]
    rnd = (results.filter(pl.col("method").is_in(list(label)))
           .with_columns(method=pl.col("method").replace_strict(label, return_dtype=pl.String))
           .group_by(keys, maintain_order=True).agg(value=pl.col("value").mean(), n=pl.col("n").first()))
    rnd = rnd.with_columns(seed=pl.lit(None, dtype=pl.Int64)).select(list(RESULTS_SCHEMA)).cast(RESULTS_SCHEMA)
    return pl.concat([results.filter(~pl.col("method").is_in(list(label))), rnd])


def _in_order(frame: pl.DataFrame, order: list[str]) -> pl.DataFrame:
    rank = {m: i for i, m in enumerate(order)}
    return frame.sort(pl.col("method").replace_strict(rank, default=len(rank), return_dtype=pl.Int64), maintain_order=True)


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if metric in ("accuracy", "rougeL_f1") else f"{v:.2f}"


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        return (f"<table><caption>{html.escape(self.caption)}</caption><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")


SHORT = {("mc", "accuracy"): "MC", ("gen", "rougeL_f1"): "ROUGE-L", ("gen", "factuality"): "Fact",
         ("cloze", "accuracy"): "Cloze"}


def _cell(metric: str, vals: list[float]) -> str:
    """One run's value, or a group's (random seeds) mean [min–max]."""
    if len(vals) <= 1:
        return _fmt(metric, vals[0] if vals else None)
    return f"{_fmt(metric, sum(vals) / len(vals))} [{_fmt(metric, min(vals))}–{_fmt(metric, max(vals))}]"


def metric_table(results: pl.DataFrame, methods: list[str], form: str | None, caption: str,
                 first: str = "method", groups: dict[str, list[str]] | None = None) -> Table:
    """Rows `methods`, columns set x metric (F.METRICS order); `form` None = average of both forms.
    Accuracy and ROUGE-L in %, factuality on its 1-10 scale. A row named in `groups` aggregates its
    member methods (each run's value first, then mean [min–max] over the runs)."""
    sets = [s for s in EVAL_SETS if s in results["set"].to_list()]
    metrics = F._metrics_present(results)
    header = [first] + [f"{s} {SHORT[(task, metric)]}" for s in sets for task, metric, _, _ in metrics]
    rows = []
    for m in methods:
        cells = [m]
        for s in sets:
            for task, metric, _, _ in metrics:
                per_run = []
                for run in (groups or {}).get(m, [m]):
                    vals = [F._value(results, run, s, f, task, metric) for f in ([form] if form else F.FORMS)]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        per_run.append(sum(vals) / len(vals))
                cells.append(_cell(metric, per_run))
        rows.append(cells)
    return Table(caption, header, rows)


def paper_tables(results: pl.DataFrame, chosen_alpha: float | None = None) -> list[Table]:
    """Table 1 (image+text, text only, average; each random control right after the MANU variant it
    shadows, as mean [min–max] over its seeds), and Tables 2 and 7 when the results have them, for
    one forget split's rows."""
    methods = method_order(results)
    manu = results.filter(pl.col("family") == "manu")
    ablated = set(manu.filter(pl.col("without").is_not_null())["method"].to_list())
    groups = random_groups(results)
    in_group = {m for ms in groups.values() for m in ms}
    main = [m for m in methods if m not in ablated and m not in in_group]
    for label, runs in groups.items():  # after the MANU variant it shadows, else at the end
        shadow = _shadow_of(results, runs)
        main.insert(main.index(shadow) + 1 if shadow in main else len(main), label)
    note = "; random: mean [min–max] over seeds" if any(len(r) > 1 for r in groups.values()) else ""
    tables = [metric_table(results, main, form, f"Table 1 ({name}): methods x sets x metrics{note}", groups=groups)
              for form, name in (("multimodal", "image+text"), ("text", "text only"), (None, "average of both forms"))]
    full = manu.filter(pl.col("without").is_null())
    variants = full.select("mode", "alpha", "method").unique(maintain_order=True).drop_nulls("alpha")
    modes = sorted(set(variants["mode"].to_list()), key=_mode_rank)
    if any(variants.filter(pl.col("mode").eq_missing(m))["alpha"].n_unique() > 1 for m in modes):
        keyed = sorted(variants.iter_rows(named=True), key=lambda r: (_mode_rank(r["mode"]), r["alpha"]))
        keyed = list({(r["mode"], r["alpha"]): r for r in keyed}.values())
        named = any(m is not None for m in modes)
        t = metric_table(results, [r["method"] for r in keyed], None,
                         "Table 2: MANU at each pruning ratio α" + (", per scoring mode" if named else "")
                         + " (average of both forms)", first="α")
        for row, r in zip(t.rows, keyed):
            row[0] = f"{r['alpha']:g}"
            if named:
                row.insert(0, r["mode"] or "-")
        if named:
            t.header.insert(0, "scoring")
        tables.append(t)
    if ablated:
        abl = manu.filter(pl.col("without").is_not_null())
        a, mode = abl["alpha"][0], abl["mode"][0]
        ref = full.filter((pl.col("alpha") == a) & pl.col("mode").eq_missing(mode))["method"].to_list()[:1]
        rows = ref + [m for m in methods if m in ablated]
        t = metric_table(results, rows, None, f"Table 7: importance ablation at α={a:g}"
                         + (f", {mode} scoring" if mode else "") + " (average of both forms)", first="importance")
        for row in t.rows:
            w = manu.filter(pl.col("method") == row[0])["without"].to_list()
            row[0] = f"without {w[0]}" if w and w[0] else "all four"
        tables.append(t)
    return tables


# ----------------------------------------------------------------------------------------------
# The report document


@dataclass
class Section:
    heading: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG path)


def _image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_markdown(title: str, sections: list[Section], root: Path) -> str:
    """Markdown with each figure linked relative to `root` (the folder report.md is written to)."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        if s.text:
            out += [s.text, ""]
        for t in s.tables:
            out += [t.markdown(), ""]
        for caption, p in s.figures:
            out += [f"![{p.stem}]({p.relative_to(root).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(out)


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}th:first-child,td:first-child{text-align:left}caption{font-weight:bold;text-align:left;"
        "padding:4px 0}img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;font-size:13px}")


def _inline(text: str) -> str:
    """The little markdown the report's prose uses: `code` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page: the tables, and the figures embedded as base64 PNG."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{html.escape(s.heading)}</h2>")
        out += [f"<p>{_inline(p)}</p>" for p in s.text.split("\n\n") if p.strip()]
        out += [t.html() for t in s.tables]
        out += [f"<figure><img src='{_image_uri(p)}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}"
                "</figcaption></figure>" for c, p in s.figures]
    out.append("</body></html>")
    return "\n".join(out)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


FIGURE_NOTES = {
    "fig2": "Mean probability of the ground-truth answer tokens decoded from each language layer's output "
            "(logit lens: final norm + LM head), teacher-forced, per method and layer.",
    "fig4": "Change vs vanilla for each method; blue image+text, orange text only. A balanced method moves both "
            "bars of the forget set alike and leaves retain/celebrity near 0.",
    "fig5": "x: forget multiple-choice accuracy drop vs vanilla; y: retain / celebrity accuracy (both forms "
            "averaged). Top right is better.",
    "fig6": "Distributions of the stored per-sample neuron activations, forget vs retain, per form.",
}


def build_report(out_dir: str | Path, title: str, results: pl.DataFrame, *, lens: pl.DataFrame | None = None,
                 activations: dict[str, str | Path] | None = None, selected: dict[str, pl.DataFrame] | None = None,
                 chosen_alpha: float | None = None, notes: str = "") -> dict[str, Path]:
    """Figures, tables, report.md and report.html under `out_dir`, one section per forget split.
    `lens` has columns forget, method, split, form, layer, prob; `activations` and `selected` are keyed
    by forget split (the selected-neuron count per tower and layer of the chosen MANU variant)."""
    out_dir = Path(out_dir)
    figs = out_dir / "figures"
    sections = [Section("About this report", notes)] if notes else []
    forgets = list(dict.fromkeys(results["forget"].to_list()))
    for forget in forgets:
        res = results.filter(pl.col("forget") == forget)
        sec = Section(f"Forget split: {forget}", tables=paper_tables(res, chosen_alpha))
        res = seed_means(res)  # the figures draw a random control once, its mean over seeds
        order = method_order(res)
        res = _in_order(res, order)  # the figures draw methods in order of first appearance
        tag = _safe(forget)
        sub = _in_order(lens.filter(pl.col("forget") == forget), order) if lens is not None else None
        if sub is not None and sub.height:
            sec.figures.append((f"Fig. 2 · {FIGURE_NOTES['fig2']}",
                                F.plot_logit_lens(sub, figs / f"{tag}-fig2-logit-lens.png",
                                                  title=f"Knowledge across layers (logit lens), {forget}")))
        sec.figures.append((f"Fig. 4 · {FIGURE_NOTES['fig4']}",
                            F.plot_form_bars(res, figs / f"{tag}-fig4-form-bars.png",
                                             title=f"Change vs vanilla per form, {forget}")))
        sec.figures.append((f"Fig. 5 · {FIGURE_NOTES['fig5']}",
                            F.plot_tradeoff(res, figs / f"{tag}-fig5-tradeoff.png",
                                            title=f"Forgetting vs utility, {forget}")))
        if activations and forget in activations:
            sec.figures.append((f"Fig. 6 · {FIGURE_NOTES['fig6']}",
                                F.plot_activations(activations[forget], figs / f"{tag}-fig6-activations.png",
                                                   title=f"Activation distributions (vanilla model), {forget}")))
        if selected and forget in selected and selected[forget].height:
            at = f" at α={chosen_alpha:g}" if chosen_alpha is not None else ""
            sec.figures.append((f"Neurons MANU selected{at}, per tower and layer.",
                                F.plot_selected(selected[forget], figs / f"{tag}-selected-neurons.png",
                                                title=f"Selected neurons{at}, {forget}")))
        sections.append(sec)
    with atomic_file(out_dir / "report.md") as tmp:
        tmp.write_text(render_markdown(title, sections, out_dir))
    with atomic_file(out_dir / "report.html") as tmp:
        tmp.write_text(render_html(title, sections))
    paths = {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html"}
    paths.update({p.name: p for s in sections for _, p in s.figures})
    return paths


def artifact_markdown(report_dir: str | Path) -> str:
    """report.md with its figures embedded as base64 (Prefect markdown artifacts show them inline)."""
    report_dir = Path(report_dir)
    md = (report_dir / "report.md").read_text()
    return re.sub(r"!\[([^\]]*)\]\((figures/[^)]+\.png)\)",
                  lambda m: f"![{m.group(1)}]({_image_uri(report_dir / m.group(2))})", md)
