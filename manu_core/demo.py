"""The main job on an embedded preset as one plain function, without Prefect (for tests and notebooks).

vanilla model (trained on first use) -> evaluate -> MANU (extract, importance, prune) -> evaluate ->
a results table (vanilla vs unlearned, per set, metric and form) and where every output went.
Runs are the `manu` flow's job (`manu run`, `make demo`), which does the same steps as cached tasks.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from manu_core import data as mdata
from manu_core.evaluate import EvalConfig, evaluate
from manu_core.importance import ImportanceParams
from manu_core.io import atomic_write_json, atomic_write_text
from manu_core.models import load_model
from manu_core.presets import EMBEDDED_EVAL, Preset, get_preset, preset_dataset, resolve_model
from manu_core.prune import save_pruned
from manu_core.report import counts_note, run_tables, summaries_frame, tables_markdown
from manu_core.unlearn import manu_unlearn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    report: str
    results: dict


def demo_items(ds: mdata.Dataset, preset: Preset, retain_profiles: int = 25) -> list[mdata.EvalItem]:
    """Forget, Test and Celebrity in full; Retain capped to `retain_profiles` seeded profiles."""
    retain = set(random.Random(f"demo-retain/{preset.seed}").sample(list(ds.split.retain_ids),
                                                                    min(retain_profiles, len(ds.split.retain_ids))))
    return [it for it in mdata.eval_items(ds) if it.set != "retain" or it.profile_id in retain]


def run_demo(preset_name: str, *, models: Path, runs: Path, alpha: float | None = None,
             progress: bool = True) -> DemoResult:
    """Vanilla vs MANU on `preset_name` (its model trained under `models` on first use), written
    under `runs`/demo-<model>-alpha<α>/."""
    preset = get_preset(preset_name)
    params = ImportanceParams(alpha=preset.alpha if alpha is None else alpha)
    t0 = time.perf_counter()
    model_dir = resolve_model(preset.name, models=models, progress=progress)
    ds = preset_dataset(preset)
    items = demo_items(ds, preset)
    out = Path(runs) / f"demo-{model_dir.name}-alpha{params.alpha:g}"
    out.mkdir(parents=True, exist_ok=True)
    log.info("run folder: %s", out)

    model, processor = load_model(model_dir)
    config = EvalConfig(**EMBEDDED_EVAL, max_new_tokens=32, seed=preset.seed)
    before = evaluate(model, processor, items, out / "eval-vanilla", config, model_id=str(model_dir),
                      progress=progress)
    res = manu_unlearn(model, processor, ds, out, params, seed=preset.seed, progress=progress)
    pruned_dir = save_pruned(model, processor, pl.read_parquet(res.importance), out / "model", report=res.report)
    after = evaluate(model, processor, items, out / "eval-manu", config, model_id=str(pruned_dir), progress=progress)

    frame = summaries_frame({"vanilla": before, "MANU": after})
    table = tables_markdown(run_tables(frame, "MANU"))
    report = "\n".join([
        f"# MANU demo: preset `{preset.name}` (embedded MLLMU-Bench-lite, stand-in images and items)",
        "",
        f"Forget split {ds.split.name} ({len(ds.split.forget_ids)} profiles), α = {params.alpha:g} "
        f"(scope {params.scope}): {res.report.n_pruned} of {res.report.n_units} MLP units zeroed. "
        f"Vanilla model: `{model_dir}` ({preset.finetune.epochs} fine-tune epochs).",
        "Scorers: `likelihood` = option with the highest mean log-probability (the tiny models cannot follow the "
        "benchmark's letter instruction); `substring` = fill-in-the-blank rule; `rouge-score` = ROUGE-L F1 with "
        "stemming; factuality by the deterministic offline judge `offline-keyfact-overlap` (not an LLM). Prompts "
        "are the bare questions the tiny models were trained on. Retain: 25 seeded profiles.",
        "",
        table,
        "",
        counts_note(frame),
        "",
        "Outputs:",
        f"- activations (Parquet): `{res.activations}`",
        f"- importance table: `{res.importance}`",
        f"- pruned model + selection.parquet: `{pruned_dir}`",
        f"- every answer (Parquet, per set and form): `{out / 'eval-vanilla'}`, `{out / 'eval-manu'}`",
        f"- results: `{out / 'results.json'}`",
        "",
        f"Wall time: {time.perf_counter() - t0:.0f} s.",
    ])
    results = {
        "preset": preset.name, "model": str(model_dir), "alpha": params.alpha, "scope": params.scope,
        "split": ds.split.name, "forget_ids": list(ds.split.forget_ids), "prune": res.report.as_dict(),
        "vanilla": [asdict(s) for s in before], "manu": [asdict(s) for s in after],
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report + "\n")
    return DemoResult(out, report, results)
