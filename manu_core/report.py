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

Tables follow the paper, laid out to fit Prefect's artifact pane: every cell holds both forms,
"image+text / text only". Table 1 = methods x metrics, one table per set, each MANU scoring mode
followed by its random control (family "random": the same number of neurons per tower drawn
uniformly, one run per seed, shown as the mean over the seeds and, in the row below, their min–max);
Table 2 = MANU at each pruning ratio α, a row block per set; Table 7 = MANU with each importance
function left out, at one α. The figures draw each random control as one method, the mean over its seeds.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from manu_core import figures as F
from manu_core.io import atomic_file
from manu_core.vocab import EVAL_SETS, FORMS, METRIC_LABELS, NEVER_LEARNED, fmt_change, fmt_metric, fmt_range

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


FAMILY_ORDER = ("vanilla", "reference", "prompting", "ga", "grad_diff", "kl", "npo", "manu", "random", "attribution")
# Family "reference": the forget set's never-learned reference (row NEVER_LEARNED), right under vanilla in
# the forget set's tables. It is evaluated on the forget set only (the run's tasks), so other sets' tables
# have no such row and the figures leave it out.
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


# Every results table of the project is built here (the sweep report's Tables 1, 2 and 7, a run's
# vanilla-vs-unlearned table, `manu evaluate`'s table): rows are methods (or sets), columns the metrics,
# and each cell holds both forms, "image+text / text only", so a table stays five or six columns wide
# (it fits Prefect's artifact pane) and the two forms of one metric sit side by side.
CELL_NOTE = "each cell: image+text / text only; accuracy and ROUGE-L in %, factuality 1-10"


def _per_form(results: pl.DataFrame, runs: list[str], set_name: str, task: str, metric: str) -> list[list[float]]:
    return [[v for r in runs if (v := F._value(results, r, set_name, form, task, metric)) is not None]
            for form in FORMS]


def form_cells(results: pl.DataFrame, runs: list[str], set_name: str) -> tuple[list[str], list[str] | None]:
    """Per metric "image+text / text only" (the mean over `runs`, usually one), and when there are
    several runs (a random control's seeds) their spread "min–max / min–max"."""
    main, spread = [], []
    for task, metric, _, _ in F._metrics_present(results):
        vals = _per_form(results, runs, set_name, task, metric)
        main.append(" / ".join(fmt_metric(metric, sum(v) / len(v) if v else None) for v in vals))
        spread.append(" / ".join(fmt_range(metric, min(v), max(v)) if v else "-" for v in vals))
    return main, (spread if len(runs) > 1 else None)


def change_cells(results: pl.DataFrame, base: str, other: str, set_name: str) -> list[str]:
    """Per metric, `other` minus `base` per form (points for accuracy and ROUGE-L)."""
    cells = []
    for task, metric, _, _ in F._metrics_present(results):
        b, o = (_per_form(results, [m], set_name, task, metric) for m in (base, other))
        cells.append(" / ".join(fmt_change(metric, y[0] - x[0]) if x and y else "-" for x, y in zip(b, o)))
    return cells


def metric_header(results: pl.DataFrame) -> list[str]:
    return [METRIC_LABELS[(task, metric)] for task, metric, _, _ in F._metrics_present(results)]


def sets_of(results: pl.DataFrame) -> list[str]:
    return [s for s in EVAL_SETS if s in results["set"].to_list()]


def set_tables(results: pl.DataFrame, methods: list[str], caption: str, *, groups: dict[str, list[str]] | None = None,
               change: tuple[str, str] | None = None) -> list[Table]:
    """One table per evaluated set: a row per method (a row named in `groups`: the mean of its runs,
    then a "seeds min–max" row), and with `change` = (base, other) a last row `other` minus `base`."""
    tables = []
    for s in sets_of(results):
        rows = []
        evaluated = set(results.filter(pl.col("set") == s)["method"].to_list())
        for m in methods:
            if m == NEVER_LEARNED and m not in evaluated:
                continue
            main, spread = form_cells(results, (groups or {}).get(m, [m]), s)
            rows.append([m, *main])
            if spread:
                rows.append(["↳ seeds min–max", *spread])
        if change:
            rows.append(["change", *change_cells(results, *change, s)])
        tables.append(Table(f"{caption} · {s} ({CELL_NOTE})", ["method", *metric_header(results)], rows))
    return tables


def by_set_table(results: pl.DataFrame, keyed: list[tuple[list[str], str]], left: list[str], caption: str) -> Table:
    """One table, a row block per set: a row per (label cells, method) of `keyed`."""
    rows = [[s, *labels, *form_cells(results, [m], s)[0]] for s in sets_of(results) for labels, m in keyed]
    return Table(f"{caption} ({CELL_NOTE})", ["set", *left, *metric_header(results)], rows)


def paper_tables(results: pl.DataFrame, chosen_alpha: float | None = None) -> list[Table]:
    """Table 1 (a table per set; each random control right after the MANU variant it shadows, as the
    mean over its seeds and their spread), and Tables 2 and 7 when the results have them, for one
    forget split's rows."""
    methods = method_order(results)
    manu = results.filter(pl.col("family") == "manu")
    ablated = set(manu.filter(pl.col("without").is_not_null())["method"].to_list())
    groups = random_groups(results)
    in_group = {m for ms in groups.values() for m in ms}
    main = [m for m in methods if m not in ablated and m not in in_group]
    for label, runs in groups.items():  # after the MANU variant it shadows, else at the end
        shadow = _shadow_of(results, runs)
        main.insert(main.index(shadow) + 1 if shadow in main else len(main), label)
    tables = set_tables(results, main, "Table 1", groups=groups)
    full = manu.filter(pl.col("without").is_null())
    variants = full.select("mode", "alpha", "method").unique(maintain_order=True).drop_nulls("alpha")
    modes = sorted(set(variants["mode"].to_list()), key=_mode_rank)
    if any(variants.filter(pl.col("mode").eq_missing(m))["alpha"].n_unique() > 1 for m in modes):
        keyed = sorted(variants.iter_rows(named=True), key=lambda r: (_mode_rank(r["mode"]), r["alpha"]))
        keyed = list({(r["mode"], r["alpha"]): r for r in keyed}.values())
        named = any(m is not None for m in modes)
        tables.append(by_set_table(
            results, [([r["mode"] or "-"] * named + [f"{r['alpha']:g}"], r["method"]) for r in keyed],
            ["scoring"] * named + ["α"],
            "Table 2: MANU at each pruning ratio α" + (", per scoring mode" if named else "")))
    if ablated:
        abl = manu.filter(pl.col("without").is_not_null())
        a, mode = abl["alpha"][0], abl["mode"][0]
        ref = full.filter((pl.col("alpha") == a) & pl.col("mode").eq_missing(mode))["method"].to_list()[:1]
        rows = ref + [m for m in methods if m in ablated]

        def label(m: str) -> str:
            w = manu.filter(pl.col("method") == m)["without"].to_list()
            return f"without {w[0]}" if w and w[0] else "all four"

        tables.append(by_set_table(results, [([label(m)], m) for m in rows], ["importance"],
                                   f"Table 7: importance ablation at α={a:g}" + (f", {mode} scoring" if mode else "")))
    return tables


def relearn_tables(relearn: pl.DataFrame, methods: list[str], note: str = "") -> list[Table]:
    """Relearning: a table per mask, a row per method, a column per stage (vanilla, unlearned, each
    attack), each cell the held-out forget MC accuracy "image+text / text only" (%). A `vanilla` row
    (relearn.control_rows) is the vanilla model attacked alike: the attack's control."""
    stages = F.relearn_stages(relearn)
    tables = []
    for mask in [m for m in ("free", "frozen") if any(s.endswith(f"/{m}") for s in stages)]:
        cols = [s for s in stages if "/" not in s or s.endswith(f"/{mask}")]
        rows = []
        attacked = set(relearn.filter(pl.col("stage").str.ends_with(f"/{mask}"))["method"].to_list())
        for m in [m for m in methods if m in attacked]:  # a method that prunes nothing has no frozen attack
            cells = [" / ".join(fmt_metric("accuracy", F.relearn_value(relearn, m, st, f)) for f in FORMS) for st in cols]
            rows.append([m, *cells])
        tables.append(Table(f"Relearning ({mask}): held-out forget MC accuracy after each attack (each cell: "
                            f"image+text / text only, %){note}", ["method", *[c.split("/")[0] for c in cols]], rows))
    return tables


def run_tables(results: pl.DataFrame, label: str) -> list[Table]:
    """A run's table per set: vanilla, the unlearned model (`label`) and the change."""
    return set_tables(results, ["vanilla", label], "Results", change=("vanilla", label))


def model_table(results: pl.DataFrame, method: str, caption: str = "Results") -> Table:
    """One model's results, a row per set (`manu evaluate`)."""
    return by_set_table(results, [([], method)], [], caption)


def summaries_frame(named: dict[str, list]) -> pl.DataFrame:
    """The results table of evaluation summaries (`evaluate.Summary` or their dicts) per method name."""
    return results_frame([{"method": m, "family": m, **(s if isinstance(s, dict) else asdict(s))}
                          for m, ss in named.items() for s in ss])


def counts_note(results: pl.DataFrame) -> str:
    """Questions and scorers behind the numbers: n per set (image+text / text only), scorer per metric."""
    first = results.filter(pl.col("method") == results["method"][0])
    n = [f"{s} {' / '.join(str(first.filter((pl.col('set') == s) & (pl.col('form') == f))['n'].max() or 0) for f in FORMS)}"
         for s in sets_of(results)]
    scorers = (results.select("task", "metric", "scorer").unique().sort("task", "metric").iter_rows())
    return ("Questions per set (image+text / text only): " + ", ".join(n) + ". Scorers: "
            + ", ".join(f"{METRIC_LABELS.get((t, m), m)} `{sc}`" for t, m, sc in scorers) + ".")


def tables_markdown(tables: list[Table]) -> str:
    return "\n\n".join(t.markdown() for t in tables)


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


ABOUT = "About this report"  # the notes' section, first in report.md, last in the UI artifact

FIGURE_NOTES = {
    "fig2": "Mean probability of the ground-truth answer tokens decoded from each language layer's output "
            "(logit lens: final norm + LM head), teacher-forced, per method and layer.",
    "fig4": "Change vs vanilla for each method; blue image+text, orange text only. A balanced method moves both "
            "bars of the forget set alike and leaves retain/celebrity near 0.",
    "fig5": "x: forget multiple-choice accuracy drop vs vanilla; y: retain / celebrity accuracy (both forms "
            "averaged). Top right is better.",
    "fig6": "Distributions of the stored per-sample neuron activations, forget vs retain, per form.",
    "relearn": "Held-out half of the forget profiles, multiple-choice accuracy per form, after unlearning and "
               "after each relearning attack (free: every weight trains); dashed: the vanilla model; the vanilla "
               "row, when present: the vanilla model attacked alike (what the attack does by itself).",
}


def build_report(out_dir: str | Path, title: str, results: pl.DataFrame, *, lens: pl.DataFrame | None = None,
                 activations: dict[str, str | Path] | None = None, selected: dict[str, pl.DataFrame] | None = None,
                 chosen_alpha: float | None = None, notes: str = "", relearn: pl.DataFrame | None = None,
                 relearn_note: str = "") -> dict[str, Path]:
    """Figures, tables, report.md and report.html under `out_dir`, one section per forget split.
    `lens` has columns forget, method, split, form, layer, prob; `activations` and `selected` are keyed
    by forget split (the selected-neuron count per tower and layer of the chosen MANU variant)."""
    from manu_core.relearn import control_rows  # torch-free callers of report stay torch-free

    out_dir = Path(out_dir)
    figs = out_dir / "figures"
    sections = [Section(ABOUT, notes)] if notes else []
    forgets = list(dict.fromkeys(results["forget"].to_list()))
    for forget in forgets:
        res = results.filter(pl.col("forget") == forget)
        sec = Section(f"Forget split: {forget}", tables=paper_tables(res, chosen_alpha))
        res = seed_means(res.filter(pl.col("family") != "reference"))  # the figures: a random control once
        # (its mean over seeds); no never-learned reference (evaluated on the forget set only: no retain score)
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
        rel = control_rows(relearn.filter(pl.col("forget") == forget)) if relearn is not None else None
        if rel is not None and rel.height:
            sec.tables += relearn_tables(rel, method_order(results.filter(pl.col("forget") == forget)), relearn_note)
            sec.figures.append((f"Relearning · {FIGURE_NOTES['relearn']}",
                                F.plot_relearn(rel, figs / f"{tag}-relearn.png", title=f"Relearning (free), {forget}")))
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
    """report.md with its figures embedded as base64 (Prefect markdown artifacts show them inline), and
    its "About this report" notes moved to the end behind a one-line pointer: in the Prefect UI's
    artifact pane (about 690 px wide) the notes filled the first screen at 1400x900 and pushed the
    forget set's table below it (tests/pipeline/test_deployment.py checks that table is on the first screen)."""
    report_dir = Path(report_dir)
    md = (report_dir / "report.md").read_text()
    about = re.search(rf"^## {ABOUT}\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M)
    if about:
        md = (md[:about.start()] + f"*The model, scorers and evaluation caps: \"{ABOUT}\", at the end.*\n\n"
              + md[about.end():].rstrip("\n") + "\n\n" + about.group(0).rstrip("\n") + "\n")
    return re.sub(r"!\[([^\]]*)\]\((figures/[^)]+\.png)\)",
                  lambda m: f"![{m.group(1)}]({_image_uri(report_dir / m.group(2))})", md)
