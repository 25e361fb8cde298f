"""The pipeline's Prefect tasks: thin wrappers over manu_core, paths in and paths out.

    prepare_data -> vanilla_model -> extract -> importance_sums -> select [-> random_select] -> prune
                 -> evaluate (set x form) -> report, and logit_lens (per model)
    (tasks/reporting.py: figures, the run/sweep report drawn from the reports and logit lenses)

Every task is cached by content (`tasks.cache.ManuCache`), writes into its own `stage_dir()` and
returns that folder's path as a string. Tasks that run the model hold a device slot
(tasks/devices.py): one per device (`device="cuda"`: every visible GPU) by default, each with its own
loaded model and judge, so parallel evaluations spread over the GPUs and queue for a free one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task

from manu_core import data as mdata
from manu_core.vocab import FORMS, OFFICIAL_SPLITS, forget_name
from manu_core.io import atomic_dir, atomic_file, atomic_write_json
from tasks.cache import ManuCache, content_digest, finish, key_lock, models_dir, results_dir, stage_dir
from tasks.devices import device_slot, judge_on, load, release

_RUN_IGNORE = ("progress",)


def manu_task(*, paths: tuple[str, ...] = (), ignore: tuple[str, ...] = (), presentation: bool = False, **kwargs):
    """A Prefect task cached by content, with its result (a path) persisted under `results_dir()` as
    JSON, never pickled: whoever can write a shared results folder must not get code run on a cache hit.
    `presentation`: the task draws figures or reports (its key hashes tasks.cache.PRESENTATION too)."""
    def deco(fn):
        results = results_dir()
        policy = ManuCache(paths=paths, ignore=_RUN_IGNORE + ignore, results=results, presentation=presentation)

        @functools.wraps(fn)
        def locked(*args, **kwargs):  # one writer per cache key at a time (tasks.cache.key_lock)
            with key_lock():
                return fn(*args, **kwargs)

        return task(locked, cache_policy=policy,
                    persist_result=True, result_storage=results, result_serializer="json",
                    cache_result_in_memory=False, **kwargs)
    return deco


# ----------------------------------------------------------------------------------------------
# Data


def dataset_of(spec: dict) -> mdata.Dataset:
    learn = spec.get("learn")
    return mdata.build_dataset(forget=spec["forget"] if isinstance(spec["forget"], str) else tuple(spec["forget"]),
                               n_profiles=spec.get("n_profiles"), n_celebrities=spec.get("n_celebrities", 50),
                               seed=spec.get("seed", 0),
                               learn=tuple(e if isinstance(e, str) else tuple(e) for e in learn) if learn else None,
                               validation_size=spec.get("validation_size"))


def benchmark_forget(spec: dict) -> str | tuple[str, ...]:
    """What the local MLLMU-Bench is read with: an official split by name, any other forget set (the
    validation set, a list of ids) by the ids `dataset_of(spec)` resolves it to."""
    if isinstance(spec["forget"], str) and spec["forget"] in OFFICIAL_SPLITS:
        return spec["forget"]
    return dataset_of(spec).split.forget_ids


BENCH_SETS = ("forget", "test", "retain", "celebrity")


@lru_cache(maxsize=8)
def _benchmark(root: str, forget: str | tuple[str, ...], seed: int, _files: tuple):
    from manu_core.benchmark import load_mllmu_bench

    return load_mllmu_bench(root, forget, seed=seed, sets=BENCH_SETS)


def benchmark_of(spec: dict):
    """The local MLLMU-Bench of a run (`spec["benchmark"]`), all four sets, parsed once per process and
    state of its files (a file edited since is read again): every task of a run reads this one."""
    forget = benchmark_forget(spec)
    root = Path(spec["benchmark"])
    files = tuple(sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in root.rglob("*") if p.is_file())) if root.is_dir() else ()
    return _benchmark(str(root), forget if isinstance(forget, str) else tuple(forget), spec.get("seed", 0), files)


def images_of(data_dir: str | Path):
    """The image resolver of a run's samples: the local benchmark's own images when the run reads one,
    else None (the embedded portraits)."""
    spec = json.loads((Path(data_dir) / "split.json").read_text())["spec"]
    return benchmark_of(spec).image if spec.get("benchmark") else None


def _image_digest(image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def _items_frame(items: list[mdata.EvalItem]) -> pl.DataFrame:
    return pl.DataFrame([{**asdict(it), "options": list(it.options)} for it in items],
                        schema_overrides={"options": pl.List(pl.String), "image": pl.String})


def read_items(path: str | Path) -> list[mdata.EvalItem]:
    return [mdata.EvalItem(**{**row, "options": tuple(row["options"] or ())})
            for row in pl.read_parquet(path).iter_rows(named=True)]


def read_streams(data_dir: str | Path) -> dict[tuple[str, str], list[mdata.Sample]]:
    """The four (split, form) streams `prepare_data` wrote."""
    fields = list(mdata.Sample.__dataclass_fields__)
    streams: dict[tuple[str, str], list[mdata.Sample]] = {}
    for row in pl.read_parquet(Path(data_dir) / "streams.parquet").iter_rows(named=True):
        streams.setdefault((row["split"], row["form"]), []).append(mdata.Sample(**{k: row[k] for k in fields}))
    return streams


def _labelled(task: str):
    """A task run name: the task and what it works on (its `label` parameter, set by the flow)."""
    return lambda parameters: f"{task}-{parameters['label']}" if parameters.get("label") else task


@manu_task(name="prepare_data", paths=("profiles", "benchmark"),
           task_run_name=lambda parameters: f"prepare_data-{forget_name(parameters['spec']['forget'])}")
def prepare_data(spec: dict, profiles: str, benchmark: str | None = None) -> str:
    """Split the profiles into forget/retain and each sample into its two forms (method.md, "Data
    forms"): `streams.parquet` (what extraction reads), `eval_items.parquet` (what evaluation asks)
    and `split.json`; from the local MLLMU-Bench when `spec["benchmark"]` is set. `profiles` (the
    embedded data folder: profiles and official split lists) and `benchmark` (that folder) are passed
    for their content: a changed file reruns this and everything after it."""
    from manu_core.extract import build_streams, match_retain

    out = stage_dir()
    ds = dataset_of(spec)
    retain_size, seed = spec.get("retain_size", "match"), spec.get("seed", 0)
    ids = {"forget_ids": list(ds.split.forget_ids), "retain_ids": list(ds.split.retain_ids),
           "celebrity_ids": [c.id for c in ds.celebrities]}
    if spec.get("benchmark"):  # the benchmark's own rows and images: streams, evaluation, ids
        bench = benchmark_of(spec)
        streams, items = match_retain(bench.streams(), retain_size, seed), bench.items
        ids = {f"{s}_ids": sorted({it.profile_id for it in items if it.set == s}) for s in ("forget", "retain", "celebrity")}
    else:
        streams, items = build_streams(ds, retain_size=retain_size, seed=seed), mdata.eval_items(ds)
    rows = [{"split": split, "form": form, **asdict(s)} for (split, form), ss in sorted(streams.items()) for s in ss]
    frame = pl.DataFrame(rows)
    if spec.get("benchmark"):  # which image each sample was shown: checkable against the benchmark's files
        frame = frame.with_columns(pl.Series("image_sha256", [None if r["image"] is None else
                                                              _image_digest(bench.image(r["image"])) for r in rows],
                                             dtype=pl.String))
    with atomic_dir(out) as tmp:
        frame.write_parquet(tmp / "streams.parquet")
        _items_frame(items).write_parquet(tmp / "eval_items.parquet")
        atomic_write_json(tmp / "split.json", {
            "spec": spec, "split": ds.split.name, **ids,
            "streams": {f"{k[0]}/{k[1]}": len(v) for k, v in sorted(streams.items())}, "n_eval_items": len(items),
        })
    get_run_logger().info("data: %s forget / %s retain profiles, streams %s -> %s", len(ids["forget_ids"]),
                          len(ids["retain_ids"]), {f"{k[0]}/{k[1]}": len(v) for k, v in streams.items()}, out)
    return str(finish(out))


@manu_task(name="vanilla_model", task_run_name=lambda parameters: f"vanilla_model-{Path(parameters['model']).name}")
def vanilla_model(model: str) -> str:
    """An embedded preset's trained vanilla model (trained on first use), or a local checkpoint, whose
    weights are checked here (a truncated file fails this task, named, not every model task after it)."""
    from manu_core.models import check_weights
    from manu_core.presets import resolve_model

    path = resolve_model(model, models=models_dir())
    check_weights(path)
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "model.json", {"model": model, "path": str(path)})
    finish(out, outputs=[path])
    get_run_logger().info("vanilla model: %s", path)
    return str(path)


@manu_task(name="never_learned_model", paths=("data_dir",),
           task_run_name=lambda parameters: f"never-learned-{Path(parameters['model']).name}")
def never_learned_model(model: str, data_dir: str) -> str:
    """The never-learned reference of an embedded preset for the run's forget set: the preset's recipe
    trained without those people (cached like a preset), or, for a planted preset's planted set, the
    planted units zeroed (presets.resolve_reference). A checkpoint's reference is a folder the user
    names (RunConfig.never_learned), never trained here."""
    from manu_core.presets import resolve_reference

    forget = json.loads((Path(data_dir) / "split.json").read_text())["spec"]["forget"]
    path = resolve_reference(model, forget if isinstance(forget, str) else tuple(forget), models=models_dir())
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "model.json", {"model": model, "forget": forget, "path": str(path)})
    finish(out, outputs=[path])
    get_run_logger().info("never-learned reference for forget %s: %s", forget, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# MANU


@manu_task(name="extract", paths=("model_dir", "data_dir"), ignore=("device", "label"), task_run_name=_labelled("extract"))
def extract(model_dir: str, data_dir: str, aggregation: str = "mean", batch_size: int = 32, device: str = "cpu",
            dtype: str | None = None, seed: int = 0, label: str = "", progress: bool = True,
            position_stats: bool = False, linear_outputs: bool = False) -> str:
    """Per-layer activations of the four streams, Parquet (manu_core/store.py); with `position_stats`
    also the released code's per-position statistics per batch (the released mode's per_position);
    with `linear_outputs` also the MLP Linears' outputs, in activations/linear_outputs/ (its
    linear_outputs option)."""
    from manu_core.extract import extract_activations

    streams = read_streams(data_dir)
    out = stage_dir()
    with device_slot(device) as slot:
        model, processor = load(model_dir, slot, dtype, device)
        acts = extract_activations(model, processor, streams, out / "activations", aggregation=aggregation,
                                   batch_size=batch_size, device=slot.device, seed=seed, progress=progress,
                                   position_stats=position_stats, linear_outputs=linear_outputs,
                                   images=images_of(data_dir))
    get_run_logger().info("activations (Parquet): %s", acts)
    return str(finish(out))


@manu_task(name="importance_sums", paths=("activations_dir",), ignore=("label",),
           task_run_name=_labelled("importance_sums"))
def importance_sums(activations_dir: str, tau: float = 0.1, label: str = "", linear_outputs: bool = False) -> str:
    """The five sums per neuron and stream (method.md, "Importance functions"), in Polars; with
    `linear_outputs`, of the MLP Linears' outputs (the store's linear_outputs/ sub-store)."""
    from manu_core.importance import neuron_sums
    from manu_core.store import OUTPUTS_DIR

    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(activations_dir) / "activations"
    with atomic_file(out / "sums.parquet") as tmp:
        neuron_sums(root / OUTPUTS_DIR if linear_outputs else root, tau).write_parquet(tmp, statistics=False)
    return str(finish(out, meta={"tau": tau, "linear_outputs": linear_outputs}))


def _select_run_name(parameters: dict) -> str:
    """select-<mode>-alpha<α> (one-shot), or the flow's label (an iterative step)."""
    return parameters.get("label") or f"select-{parameters.get('mode') or 'paper'}-alpha{parameters['alpha']:g}"


@manu_task(name="select", paths=("sums_dir", "previous_dir"), ignore=("label",), task_run_name=_select_run_name)
def select(sums_dir: str, alpha: float, weights: dict[str, float] | None = None, eps: float | None = None,
           tau: float = 0.1, scope: str | None = None, mode: str = "paper", options: dict | None = None,
           previous_dir: str | None = None, label: str | None = None, model_type: str | None = None) -> str:
    """Importances, score and the top-α selection with scoring mode `mode` (manu_core.importance.
    SCORING_MODES; weights/eps/scope None = the mode's defaults): `importance.parquet`, one row per
    neuron. `previous_dir`: a previous select folder (iterative selective pruning) whose selected
    neurons stay selected; ⌊α·N⌋ new ones are added. `model_type`: the vanilla model's architecture
    (config.json), which the released mode's per-architecture sites read (docs/method.md)."""
    from manu_core.importance import ImportanceParams, importance_table, require_selection, write_importance

    params = ImportanceParams(alpha=alpha, eps=eps, tau=tau, weights=weights, scope=scope, mode=mode,
                              options=options)
    already = pl.read_parquet(Path(previous_dir) / "importance.parquet") if previous_dir else None
    table = importance_table(pl.read_parquet(Path(sums_dir) / "sums.parquet"), params, already=already,
                             model_type=model_type)
    require_selection(table, params)  # an α that prunes nothing is an error, not a result
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_importance(table, out / "importance.parquet")
    n = int(table["selected"].sum())
    before = int(already["selected"].sum()) if already is not None else 0
    get_run_logger().info("selected %d of %d neurons (%d new; mode=%s, α=%s, scope=%s, eps=%s, weights=%s, "
                          "options=%s)", n, table.height, n - before, mode, alpha, params.scope, params.eps,
                          params.weights, options)
    return str(finish(out, meta={"n_selected": n, "n_new": n - before, "n_units": table.height, "mode": mode}))


@manu_task(name="attribution", paths=("model_dir", "data_dir"), ignore=("device", "label"),
           task_run_name=_labelled("attribution"))
def attribution(model_dir: str, data_dir: str, batch_size: int = 8, device: str = "cpu",
                dtype: str | None = None, label: str = "") -> str:
    """The attribution upper bound's per-unit effects (manu_core/attribution.py): mean Σ|a·∂L/∂a| of
    each MLP unit on the forget and on the retain stream, both forms: `attribution.parquet`."""
    from manu_core.attribution import attribution_frame

    streams = read_streams(data_dir)
    forget = streams[("forget", "multimodal")] + streams[("forget", "text")]
    retain = streams[("retain", "multimodal")] + streams[("retain", "text")]
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    with device_slot(device) as slot:
        model, processor = load(model_dir, slot, dtype, device)
        frame = attribution_frame(model, processor, forget, retain, batch_size=batch_size, device=slot.device,
                                  progress=False, images=images_of(data_dir))
    with atomic_file(out / "attribution.parquet") as tmp:
        frame.write_parquet(tmp)
    return str(finish(out))


@manu_task(name="attribution_select", paths=("attribution_dir",), task_run_name="attribution-select-alpha{alpha}")
def attribution_select(attribution_dir: str, alpha: float, eps: float = 1e-5, scope: str = "tower") -> str:
    """Score F/(R+ε) and the top α per tower of the attribution effects: `importance.parquet` (pruned
    like MANU's selection)."""
    from manu_core.attribution import select_attribution

    table = select_attribution(pl.read_parquet(Path(attribution_dir) / "attribution.parquet"), alpha=alpha, eps=eps,
                               scope=scope)
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "importance.parquet") as tmp:
        table.write_parquet(tmp)
    return str(finish(out, meta={"n_selected": int(table["selected"].sum()), "n_units": table.height}))


@manu_task(name="random_select", paths=("importance_dir",), task_run_name="random-select-seed{seed}")
def random_select(importance_dir: str, seed: int, scope: str = "tower") -> str:
    """The random control of a selection: `importance.parquet` of `importance_dir` with its `selected`
    column replaced by `manu_core.unlearn.random_selection` (as many units per tower, or per
    (tower, layer) with scope "layer", drawn uniformly with `seed`); prune it with `prune`."""
    from manu_core.importance import NEURON, write_importance
    from manu_core.unlearn import random_selection

    table = pl.read_parquet(Path(importance_dir) / "importance.parquet")
    drawn = random_selection(table, seed, scope)
    if not drawn.select(NEURON).equals(table.select(NEURON)):  # random_selection keeps the row order
        raise RuntimeError(f"random_selection reordered the neurons of {importance_dir}")
    table = table.with_columns(selected=drawn["selected"])
    out = stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_importance(table, out / "importance.parquet")
    per_tower = dict(table.group_by("tower").agg(pl.col("selected").sum()).sort("tower").iter_rows())
    get_run_logger().info("random control (seed %d, per %s): %s units per tower, from %s", seed, scope, per_tower,
                          importance_dir)
    return str(finish(out, meta={"seed": seed, "scope": scope, "n_selected": int(table["selected"].sum())}))


@manu_task(name="prune", paths=("model_dir", "importance_dir"), ignore=("label",), task_run_name=_labelled("prune"))
def prune(model_dir: str, importance_dir: str, label: str = "") -> str:
    """Zero the selected neurons' weights and save the unlearned model with `selection.parquet`."""
    from manu_core.models import load_model
    from manu_core.prune import prune_units, save_pruned

    table = pl.read_parquet(Path(importance_dir) / "importance.parquet")
    model, processor = load_model(model_dir)  # a private copy: the cached vanilla model stays intact
    report = prune_units(model, table)
    out = stage_dir()
    save_pruned(model, processor, table, out / "model", report=report)
    get_run_logger().info("unlearned model: %s (%d of %d units zeroed)", out / "model", report.n_pruned,
                          report.n_units)
    return str(finish(out)) + "/model"


# ----------------------------------------------------------------------------------------------
# Evaluation and report


@manu_task(name="evaluate", paths=("model_dir", "data_dir"), ignore=("device", "label"),
           task_run_name="evaluate-{label}-{set_name}-{form}")
def evaluate(model_dir: str, data_dir: str, set_name: str, form: str, settings: dict, max_profiles: int = 0,
             device: str = "cpu", dtype: str | None = None, label: str = "model", progress: bool = True,
             held_out: bool = False, tasks: list[str] | None = None) -> str:
    """One (set, form) unit of MLLMU-Bench (manu_core/evaluate.py): answers.parquet + summary.json.
    `held_out`: only the held-out half of the forget profiles (relearning, manu_core/relearn.py);
    `tasks`: only these tasks (None: all)."""
    from manu_core.evaluate import EvalConfig, cap_profiles, evaluate_unit
    from manu_core.portraits import image_for
    from manu_core.relearn import halves

    items = [it for it in read_items(Path(data_dir) / "eval_items.parquet") if it.set == set_name and it.form == form
             and (tasks is None or it.task in tasks)]
    if held_out:
        _, keep = halves(json.loads((Path(data_dir) / "split.json").read_text())["forget_ids"], settings.get("seed", 0))
        items = [it for it in items if it.profile_id in keep]
    items = cap_profiles(items, max_profiles, settings.get("seed", 0))
    spec = json.loads((Path(data_dir) / "split.json").read_text())["spec"]
    images = image_for
    if spec.get("benchmark"):
        images = benchmark_of(spec).image
    config = EvalConfig(**settings)
    out = stage_dir()
    with device_slot(device) as slot:
        model, processor = load(model_dir, slot, dtype, device)
        evaluate_unit(model, processor, items, out / "unit", config, images=images, device=slot.device,
                      judge=judge_on(config.judge, slot, device), progress=progress,
                      # the model's content, as in the cache key: two folders with the same weights (e.g. a free
                      # and a frozen relearning that trained alike) are one evaluation, whichever runs first
                      model_id=content_digest(model_dir))
    return str(finish(out)) + "/unit"


@manu_task(name="relearn", paths=("model_dir", "data_dir"), ignore=("device", "label"),
           task_run_name="relearn-{label}-{attack}-{mask}")
def relearn(model_dir: str, data_dir: str, attack: str, mask: str, params: dict, seed: int = 0, device: str = "cpu",
            dtype: str | None = None, label: str = "model", progress: bool = True) -> str:
    """A relearning attack on an unlearned model (manu_core/relearn.py): a private copy fine-tuned on
    the attack set and saved here; the unlearned model on disk is never touched. Loaded in `dtype` (None:
    the checkpoint's); half-precision weights train as float32 copies or float32 adapters (manu_core/train.py)."""
    from manu_core.models import load_model, save_model
    from manu_core.relearn import attack_samples, halves, relearn as relearn_model
    from manu_core.train import StageConfig

    forget, retain, split = _split_samples(data_dir)
    attack_ids, held = halves(split["forget_ids"], seed)
    samples = attack_samples(attack, forget, retain, attack_ids, seed)
    selection = pl.read_parquet(Path(model_dir) / "selection.parquet") if mask == "frozen" else None
    with device_slot(device) as slot:
        release(slot)  # the slot's cached model and judge make room for the copy trained here
        model, processor = load_model(model_dir, device=slot.device, dtype=dtype)  # a private copy to train
        curve = relearn_model(model, processor, samples, StageConfig(**params), selection=selection, seed=seed,
                              device=slot.device, images=images_of(data_dir), progress=progress)
    out = stage_dir()
    save_model(model, processor, out / "model")
    atomic_write_json(out / "loss_curve.json", curve)
    get_run_logger().info("relearn %s (%s): %d samples of %d profiles, %d steps -> %s", attack, mask, len(samples),
                          len(attack_ids), sum("step" in r for r in curve), out / "model")
    return str(finish(out, meta={"model": model_dir, "attack": attack, "mask": mask, "attack_ids": list(attack_ids),
                                 "held_out_ids": list(held), "samples": len(samples), "params": params})) + "/model"


@manu_task(name="results", paths=("vanilla_units", "unlearned_units", "importance_dir", "relearn_units",
                                  "reference_units"),
           task_run_name=lambda parameters: f"results-{parameters['title']}")
def results(vanilla_units: list[str], unlearned_units: list[str], importance_dir: str | None, title: str,
            run: dict, relearn_units: list[str] | None = None, relearn_labels: list[str] | None = None,
            reference_units: list[str] | None = None) -> str:
    """One run's results: results.json (every summary, the run's settings and its evaluation
    folders), results.md (the table, vanilla vs unlearned per set, task and form) and the selected
    neurons per tower/layer. The report people read (figures, report.html) is tasks.reporting.report. `relearn_units` (with their stage in `relearn_labels`: vanilla,
    unlearned, <attack>/<mask>) are the held-out forget evaluations of the relearning attacks.
    `reference_units`: the never-learned reference's forget-set evaluations, which add its scores, the
    headroom, each drop's share of it and the forget-quality statistic (`reference` in results.json).
    A vanilla model that records planted units (manu_core/plant.py) adds the selection's planted recall
    and precision per tower (`planted`)."""
    from manu_core.evaluate import Summary
    from manu_core.forget_quality import reference_block, reference_markdown
    from manu_core.plant import planted_ids, planted_recall, planted_units, recall_markdown
    from manu_core.report import counts_note, run_tables, summaries_frame, tables_markdown

    def summaries(units):
        return [Summary(**s) for u in units for s in json.loads((Path(u) / "summary.json").read_text())]

    before, after = summaries(vanilla_units), summaries(unlearned_units)
    per_layer = pl.DataFrame(schema={"tower": pl.String, "layer": pl.Int64, "units": pl.UInt32,
                                     "selected": pl.UInt32})
    if importance_dir:  # a neuron-selecting method (MANU); the baselines change weights otherwise
        table = pl.read_parquet(Path(importance_dir) / "importance.parquet")
        per_layer = (table.group_by("tower", "layer").agg(units=pl.len(), selected=pl.col("selected").sum())
                     .sort("tower", "layer"))
    planted, plant = planted_units(run.get("vanilla_model") or ""), None
    if planted and importance_dir:
        recall = planted_recall(table, planted)
        plant = {"ids": list(planted_ids(run["vanilla_model"])), "n_units": len(planted), "recall": recall.to_dicts()}
    reference = None
    if reference_units:
        def answers(units):
            return pl.concat([pl.read_parquet(Path(u) / "answers.parquet") for u in units], how="diagonal_relaxed")
        reference = reference_block(answers(vanilla_units), answers(unlearned_units), answers(reference_units),
                                    [Summary(**s) for u in reference_units
                                     for s in json.loads((Path(u) / "summary.json").read_text())])
    out = stage_dir()
    frame = summaries_frame({"vanilla": before, "unlearned": after})
    md = f"# {title}\n\n"
    if (run.get("config") or {}).get("stand_in_data"):
        md += ("> **Stand-in data, not a result.** This checkpoint was unlearned and evaluated on the embedded "
               "stand-in data (procedural portraits, stand-in questions), not on MLLMU-Bench: a plumbing check "
               "(stand_in_data: true).\n\n")
    md += f"{tables_markdown(run_tables(frame, 'unlearned'))}\n\n{counts_note(frame)}\n"
    if plant:
        md += "\n" + recall_markdown(pl.DataFrame(plant["recall"]), plant["ids"]) + "\n"
    if reference:
        md += "\n" + reference_markdown(reference) + "\n"
    with atomic_dir(out) as tmp:
        (tmp / "results.md").write_text(md)
        per_layer.write_parquet(tmp / "selected_per_layer.parquet")
        atomic_write_json(tmp / "results.json", {"run": run, "vanilla": [asdict(s) for s in before],
                                                 "unlearned": [asdict(s) for s in after],
                                                 "units": {"vanilla": list(vanilla_units),
                                                           "unlearned": list(unlearned_units)},
                                                 "relearn": [{"stage": stage, **asdict(s)} for stage, unit in
                                                             zip(relearn_labels or [], relearn_units or [])
                                                             for s in summaries([unit])],
                                                 "planted": plant, "reference": reference})
    return str(finish(out))


@manu_task(name="logit_lens", paths=("model_dir", "data_dir"), ignore=("device", "label"),
           task_run_name="logit-lens-{label}")
def logit_lens(model_dir: str, data_dir: str, max_samples: int = 32, system: str | None = None, seed: int = 0,
               device: str = "cpu", dtype: str | None = None, label: str = "model", progress: bool = True) -> str:
    """Knowledge across layers (manu_core/lens.py) on at most `max_samples` seeded QA pairs of each
    (split, form) stream: `lens.parquet` (split, form, layer, prob, samples) and `lens.json`."""
    from manu_core.lens import lens_table

    streams = read_streams(data_dir)
    out = stage_dir()
    with device_slot(device) as slot:
        model, processor = load(model_dir, slot, dtype, device)
        table = lens_table(model, processor, streams, max_samples=max_samples, seed=seed, device=slot.device,
                           system=system, progress=progress, images=images_of(data_dir))
    with atomic_dir(out) as tmp:
        table.write_parquet(tmp / "lens.parquet")
        atomic_write_json(tmp / "lens.json", {"model_dir": model_dir, "data_dir": data_dir, "system": system,
                                              "max_samples": max_samples, "seed": seed})
    return str(finish(out))


# ----------------------------------------------------------------------------------------------
# Baselines (manu_core/baselines.py)


def _split_samples(data_dir: str) -> tuple[list, list, dict]:
    """Every QA pair of the forget and of the retain profiles, both forms (the baselines' data; the
    local benchmark's own rows when the run reads one)."""
    split = json.loads((Path(data_dir) / "split.json").read_text())
    if split["spec"].get("benchmark"):
        streams = benchmark_of(split["spec"]).streams()
        return ([s for f in FORMS for s in streams[("forget", f)]],
                [s for f in FORMS for s in streams[("retain", f)]], split)
    ds = dataset_of(split["spec"])
    forget = [s for pid in split["forget_ids"] for s in mdata.samples(ds.profile(pid))]
    retain = [s for pid in split["retain_ids"] for s in mdata.samples(ds.profile(pid))]
    return forget, retain, split


@manu_task(name="baseline", paths=("model_dir", "data_dir", "reference_dir"), ignore=("device",),
           task_run_name=lambda parameters: f"baseline-{parameters['method']}"
                                            + (f" lr={parameters['params']['lr']:g}" if parameters["params"].get("lr") else ""))
def baseline(model_dir: str, data_dir: str, method: str, params: dict, reference_dir: str | None = None,
             device: str = "cpu", dtype: str | None = None, progress: bool = True) -> str:
    """A gradient baseline's unlearned model (merged when trained with LoRA) and its loss curve. Loaded in
    `dtype` (None: the checkpoint's); LoRA adapters train in float32 over half-precision weights and merge
    in float32, cast once (manu_core/train.py)."""
    from manu_core.baselines import LOSSES, BaselineConfig, unlearn_gradient
    from manu_core.models import load_model, save_model

    cfg = BaselineConfig(method, **params)
    forget, retain, _ = _split_samples(data_dir)
    frozen = {"vanilla": model_dir, "reference": reference_dir}.get(LOSSES[method].frozen)
    with device_slot(device) as slot:
        device = slot.device
        release(slot)  # the slot's cached model and judge make room for the two copies loaded here
        model, processor = load_model(model_dir, device=device, dtype=dtype)  # a private copy to train
        frozen_model = load_model(frozen, device=device, dtype=dtype)[0] if frozen else None
        out_model, curve = unlearn_gradient(model, processor, forget, retain, cfg, frozen=frozen_model,
                                            device=device, progress=progress, images=images_of(data_dir))
    out = stage_dir()
    save_model(out_model, processor, out / "model")
    atomic_write_json(out / "loss_curve.json", curve)
    get_run_logger().info("%s: %d steps, final loss %.4f -> %s", method, len(curve), curve[-1]["loss"], out / "model")
    return str(finish(out)) + "/model"
