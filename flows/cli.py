"""`manu`: the command a person types.

Commands that only read or compute (presets, train, evaluate, inspect, importance) import nothing
from Prefect; the pipeline commands import the flows lazily.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


SCORING_HELP = "scoring mode: paper (the paper's formulas) | released (the authors' code) | selective (Pochinkov & Schoots)"
OPTION_HELP = ("a scoring mode's option as key=value, repeatable: released pool_layers=true, clamp=10 (or none), "
               "per_position=true (the released code's per-position statistics; pair with --extract-batch-size 4, "
               "its batch size), linear_outputs=true (score and prune the MLP Linears' outputs, as the released "
               "code does), sites=authors|uniform (the released code's Linears and layers per architecture, the "
               "default, or the same on every one); selective statistic=abs|freq|std|rms")


def _option_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text) if low.lstrip("+-").isdigit() else float(text)
    except ValueError:
        return text.strip()


def parse_scoring_options(items: list[str] | None) -> dict:
    """['pool_layers=true', 'clamp=10'] -> {'pool_layers': True, 'clamp': 10}: true/false, none and
    numbers are converted, anything else stays a string; the scoring mode checks names and values."""
    out = {}
    for item in items or []:
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--scoring-option takes key=value, e.g. --scoring-option statistic=rms; got {item!r}.")
        if key in out:
            raise ValueError(f"--scoring-option {key} is given twice; give each option once.")
        out[key] = _option_value(value)
    return out


RESUME_HINT = ("interrupted: finished steps are cached and nothing half-written is kept; "
               "run the same command again to resume.")


def exit_on_interrupt() -> None:
    """One Ctrl-C stops `manu run` within a second: the temporary Prefect server is stopped, in-flight
    tasks are abandoned (every write is atomic, so what they leave is a temporary the rerun removes)
    and the process exits 130 with one line saying how to resume. Without this, Prefect's client
    waits minutes at exit to hand its events to a server the same Ctrl-C already stopped."""
    import signal
    import sys

    def stop(signum, frame):
        sys.stdout.flush()
        sys.stderr.write("\n" + RESUME_HINT + "\n")
        sys.stderr.flush()
        try:
            from prefect.server.api.server import SubprocessASGIServer

            for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
                proc = getattr(server, "server_process", None)
                if proc is not None and proc.poll() is None:
                    proc.kill()
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, stop)


def check_not_damaged(activations_dir: Path) -> None:
    """An activations folder the pipeline wrote (its extract folder has a completion record) must
    still be what was written: a file changed since fails here instead of scoring silently wrong."""
    from tasks.cache import DONE, check_done

    for folder in (activations_dir, activations_dir.parent):
        if (folder / DONE).is_file():
            why = check_done(folder)
            if why:
                raise ValueError(f"{activations_dir} is damaged: {why}. Rerun the pipeline, which recomputes a "
                                 "damaged stage, or extract again.")
            return


def check_artifacts_writable() -> None:
    """The artifacts folder must take writes before a run trains or extracts for minutes."""
    import tempfile

    from tasks.cache import artifacts_dir

    root = artifacts_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"the artifacts folder {root} is not writable ({e.strerror}); set MANU_ARTIFACTS to a "
                         "folder you can write, e.g. MANU_ARTIFACTS=$HOME/manu-artifacts.") from None


def parse_caps(text: str) -> dict[str, int]:
    """'retain=25,test=10' -> {'retain': 25, 'test': 10}; the sets themselves are checked by EvalSettings."""
    caps = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not sep or not key or n < 0:
            raise ValueError(f"--cap takes set=N pairs (N >= 0 profiles, 0: no cap), e.g. --cap retain=25,test=10; "
                             f"got {item!r}.")
        if key in caps:
            raise ValueError(f"--cap {key} is given twice; give each set once.")
        caps[key] = n
    return caps


def check_device(device: str) -> None:
    """Fail before any task when the device does not exist here (a run would fail in its first model load)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (index.isdigit() and int(index) >= n):
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s)"
                             + (f" (cuda:0 to cuda:{n - 1})" if n else "") + "; use --device cpu"
                             + (" or one of them." if n else ", or run on the GPU server."))
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")


@app.command()
def presets() -> None:
    """List the embedded presets (tiny models trained here on MLLMU-Bench-lite)."""
    from manu_core.presets import PRESETS

    for p in PRESETS.values():
        typer.echo(f"{p.name:<14} {p.spec.arch:<9} {p.description}")


@app.command()
def train(preset: str = typer.Argument("lite", help="preset name (see `manu presets`)"),
          verbose: bool = False) -> None:
    """Train (or find) the vanilla model of a preset and print its folder."""
    _setup_logging(verbose)
    from manu_core.models import ModelError
    from manu_core.presets import get_preset, resolve_model
    from tasks.cache import models_dir

    try:
        get_preset(preset)
        path = resolve_model(preset, models=models_dir())
    except ModelError as e:
        _fail(e)
    typer.echo(str(path))


@app.command()
def inspect(activations_dir: Path) -> None:
    """What an activations folder holds: splits, forms, towers, layers, sample counts, widths."""
    from manu_core.store import ActivationStoreError, format_summary, inspect_activations

    try:
        typer.echo(format_summary(inspect_activations(activations_dir)))
    except ActivationStoreError as e:
        _fail(e)


@app.command()
def importance(
    activations_dir: Path,
    out: Path = typer.Option(..., "--out", help="Parquet file to write (one row per neuron)"),
    alpha: float = typer.Option(0.05, help="pruning ratio α in (0, 1)"),
    scoring: str = typer.Option("paper", help=SCORING_HELP),
    scoring_option: Optional[list[str]] = typer.Option(None, "--scoring-option", help=OPTION_HELP),
    eps: Optional[float] = typer.Option(None, help="ε in the importance ratios and the score (default: the mode's, "
                                        "1e-5; selective 1e-3)"),
    tau: float = typer.Option(0.1, help="activation threshold τ of the frequency importance"),
    weights: Optional[str] = typer.Option(None, help="importance weights, e.g. abs=1,freq=0,var=1,rms=1; 0 drops "
                                          "one (default: the mode's)"),
    scope: Optional[str] = typer.Option(None, help="top-α over: global | tower | layer (default: the mode's)"),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="the model's architecture (llava | idefics2 "
                                             "| qwen2_vl: config.json's model_type): the released mode's sites "
                                             "per architecture (default: as on LLaVA)"),
) -> None:
    """Score every neuron of an activations folder (MANU, method.md §3.1-3.2) and select the top α."""
    from manu_core.importance import (ImportanceParams, compute_importance, parse_weights, require_selection,
                                      write_importance)
    from manu_core.store import ActivationStoreError

    try:
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; --out names the Parquet file to write, e.g. "
                             f"--out {out / 'importance.parquet'}.")
        check_not_damaged(activations_dir)
        params = ImportanceParams(alpha=alpha, eps=eps, tau=tau, weights=parse_weights(weights) if weights else None,
                                  scope=scope, mode=scoring, options=parse_scoring_options(scoring_option) or None)
        t0 = time.perf_counter()
        table = compute_importance(activations_dir, params, model_type=model_type)
        require_selection(table, params)
        write_importance(table, out)
    except (ValueError, ActivationStoreError) as e:
        _fail(e)
    n_sel = int(table["selected"].sum())
    typer.echo(f"{table.height} neurons scored, {n_sel} selected ({scoring} scoring, α={alpha}, scope={params.scope}) "
               f"in {time.perf_counter() - t0:.1f}s -> {out}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="preset name (embedded) or a local model folder"),
    out: Path = typer.Option(..., "--out", help="folder for answers (<set>-<form>/answers.parquet) and report.md"),
    benchmark: Optional[Path] = typer.Option(None, "--benchmark", help="local MLLMU-Bench folder (hub parquet "
                                             "layout); default: the embedded MLLMU-Bench-lite of the model's preset"),
    forget: str = typer.Option("forget_5", help="forget split of the real benchmark (forget_5/10/15)"),
    sets: str = typer.Option("forget,test,retain,celebrity", help="comma-separated sets"),
    forms: str = typer.Option("multimodal,text", help="comma-separated forms"),
    tasks: str = typer.Option("mc,cloze,gen", help="comma-separated tasks"),
    mc_scorer: Optional[str] = typer.Option(None, help="letter | likelihood (default: likelihood for embedded "
                                            "models, letter otherwise)"),
    few_shot: bool = typer.Option(False, help="letter scorer: one profile's questions as examples"),
    instructions: Optional[bool] = typer.Option(None, "--instructions/--bare", help="the benchmark's task "
                                                "instructions (default: on, off for embedded models)"),
    judge: str = typer.Option("offline", help="offline | openai:<base url>#<model> | hf:<local path>"),
    max_profiles: int = typer.Option(0, help="at most N seeded profiles per set (0: all)"),
    batch_size: int = typer.Option(32, help="questions per generate call"),
    max_new_tokens: int = typer.Option(50),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(0),
    verbose: bool = False,
) -> None:
    """Evaluate a model the MLLMU-Bench way (evaluation.md); resumes an interrupted run in --out."""
    _setup_logging(verbose)
    from manu_core.benchmark import load_mllmu_bench
    from manu_core.data import eval_items
    from manu_core.vocab import EVAL_SETS, FORMS
    from manu_core.evaluate import TASKS, EvalConfig, EvaluationError, cap_profiles, format_report
    from manu_core.evaluate import evaluate as run_evaluation
    from manu_core.io import atomic_write_text
    from manu_core.judge import JudgeError
    from manu_core.models import load_model
    from manu_core.portraits import image_for
    from manu_core.presets import default_eval_settings, preset_dataset, preset_of, resolve_model
    from tasks.cache import models_dir
    from tasks.devices import check_judge, judge_for

    def pick(value: str, allowed: tuple[str, ...], what: str) -> set[str]:
        chosen = {v.strip() for v in value.split(",") if v.strip()}
        bad = chosen - set(allowed)
        if bad or not chosen:
            raise EvaluationError(f"--{what} takes a comma-separated subset of {','.join(allowed)}; got {value!r}.")
        return chosen

    try:
        want_sets, want_forms, want_tasks = pick(sets, EVAL_SETS, "sets"), pick(forms, FORMS, "forms"), \
            pick(tasks, TASKS, "tasks")
        model_dir = resolve_model(model, models=models_dir())
        settings = default_eval_settings(model_dir)
        if mc_scorer is not None:
            settings["mc_scorer"] = mc_scorer
        if instructions is not None:
            settings["instructions"] = instructions
        config = EvalConfig(**settings, few_shot=few_shot, judge=judge, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, seed=seed)
        if benchmark is not None:
            bench = load_mllmu_bench(benchmark, forget, seed=seed, sets=tuple(s for s in EVAL_SETS if s in want_sets))
            items, images, source = bench.items, bench.image, f"MLLMU-Bench at {benchmark} ({forget})"
        else:
            preset = preset_of(model_dir)
            if preset is None:
                raise EvaluationError(f"{model_dir} is not an embedded model, so there is no embedded data for it; "
                                      "pass --benchmark <local MLLMU-Bench folder>.")
            items, images = eval_items(preset_dataset(preset)), image_for
            source = f"embedded MLLMU-Bench-lite of preset {preset.name!r} (stand-in images and items)"
        items = [it for it in items if it.set in want_sets and it.form in want_forms and it.task in want_tasks]
        items = cap_profiles(items, max_profiles, seed)
        check_device(device)
        check_judge(judge)  # an endpoint that does not answer fails now, not after the first generated chunk
        the_judge = judge_for(judge, device=device)
        net, processor = load_model(model_dir, device=device)
        t0 = time.perf_counter()
        summaries = run_evaluation(net, processor, items, out, config, images=images, device=device,
                                   model_id=str(model_dir), judge=the_judge)
    except (ValueError, JudgeError) as e:  # ModelError, DataError, BenchmarkError, EvaluationError are ValueErrors
        _fail(e)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the units finished so far are kept in {out}; run the same command again to "
                   "resume from them.", err=True)
        raise typer.Exit(130) from None
    report = "\n".join([
        f"# Evaluation of `{model_dir}`", "",
        f"Data: {source}. Multiple choice scorer: `{config.mc_scorer_name}`; prompts: "
        f"{'the benchmark instructions' if config.instructions else 'bare questions'}; factuality judge: "
        f"`{the_judge.name}`{' (deterministic, not an LLM)' if judge == 'offline' else ''}. {len(items)} questions, {time.perf_counter() - t0:.0f} s.", "",
        format_report(summaries), "",
    ])
    atomic_write_text(out / "report.md", report)
    typer.echo(report)
    typer.echo(f"answers: {out}/<set>-<form>/answers.parquet; report: {out / 'report.md'}")


@app.command()
def plan(
    deployment: Optional[str] = typer.Option(None, help="a deployment of prefect.yaml (full-sweep, paper-grid, ...): "
                                             "its parameters"),
    model: str = typer.Option("lite", "--model", "--preset", help="without --deployment: one run's model"),
    method: str = typer.Option("manu", help="without --deployment: one run's method"),
    alpha: Optional[float] = typer.Option(None, help="without --deployment: MANU's pruning ratio"),
    device: str = typer.Option("cpu", help="the device the run would use (the costs are per machine class)"),
) -> None:
    """What a run or a deployment's sweep will do (models, extractions, evaluation units and questions,
    trainings) and its estimated wall time on this machine class, before it starts."""
    from pydantic import ValidationError

    from flows.pipeline import RunConfig, validation_message
    from flows.plan import deployment_parameters, plan as make_plan, plan_markdown

    try:
        if deployment:
            config, sweep = deployment_parameters(deployment)
            config = config.model_copy(update={"device": device})
        else:
            config, sweep = RunConfig(model=model, alpha=alpha, device=device), None
        typer.echo(plan_markdown(make_plan(config, sweep, method), deployment or f"{method} on {model}"))
    except ValidationError as e:
        _fail(ValueError(validation_message(e)))
    except ValueError as e:
        _fail(e)


@app.command()
def run(
    model: str = typer.Option("lite", "--model", "--preset", help="embedded preset or a local checkpoint folder"),
    alpha: Optional[float] = typer.Option(None, help="MANU pruning ratio (default: the preset's documented α)"),
    scoring: str = typer.Option("paper", help=SCORING_HELP),
    scoring_option: Optional[list[str]] = typer.Option(None, "--scoring-option", help=OPTION_HELP),
    iterative: bool = typer.Option(False, "--iterative", help="selective scoring: prune in steps of --step, "
                                   "extracting again on the pruned model before each step"),
    step: float = typer.Option(0.02, help="--iterative: α per step (the last step takes the remainder)"),
    method: str = typer.Option("manu", help="manu | random (MANU's random control: as many neurons per tower, "
                               "drawn uniformly) | prompting | ga | grad_diff | kl | npo"),
    seeds: str = typer.Option("0", help="--method random: comma-separated seeds, one run each"),
    forget: Optional[str] = typer.Option(None, help="forget_5/10/15, validation (a seeded held-out forget set of "
                                         "the preset) or comma-separated profile ids the model learned"),
    cap: str = typer.Option("retain=25", help="per-set profile caps for evaluation, e.g. retain=25,test=10"),
    extract_batch_size: int = typer.Option(32, "--extract-batch-size", min=1,
                                           help="samples per forward when extracting activations"),
    device: str = typer.Option("cpu"),
    benchmark: Optional[Path] = typer.Option(None, help="local MLLMU-Bench folder (hub parquet layout): the "
                                             "streams, baselines, logit lens and evaluation read its own questions "
                                             "and images"),
    relearn: bool = typer.Option(False, "--relearn", help="relearning attacks on the unlearned model: a brief "
                                 "fine-tune on half the forget profiles (text only, image+text) or on retain only, "
                                 "then the other half evaluated (manu_core/relearn.py)"),
    relearn_steps: int = typer.Option(20, "--relearn-steps", help="--relearn: optimizer steps per attack"),
    never_learned: str = typer.Option("auto", "--never-learned", help="the never-learned reference the forget set is "
                                      "judged against: auto (free ones only: a planted preset's), train (the preset's "
                                      "recipe without the forget set, cached), none, or a model folder"),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 for the model tasks (default: the "
                                        "checkpoint's own)"),
    judge: str = typer.Option("offline", help="factuality judge: offline | openai:<base url>#<model> | hf:<local path>"),
    reference: Optional[Path] = typer.Option(None, help="--method npo on a checkpoint: its reference model (the "
                                             "checkpoint fine-tuned on the retain profiles only)"),
    stand_in_data: bool = typer.Option(False, "--stand-in-data", help="a checkpoint without --benchmark: run on the "
                                       "embedded stand-in data, a plumbing check (every result says so)"),
) -> None:
    """The `manu` Prefect flow, once: cached tasks, UI artifacts, the results table at the end."""
    from pydantic import ValidationError

    from flows.pipeline import METHODS, SCORINGS, EvalSettings, RunConfig, manu, validation_message
    from manu_core.judge import JudgeError
    from manu_core.vocab import forget_name

    try:
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}.")
        if scoring not in SCORINGS:
            raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}.")
        if iterative and scoring != "selective":
            raise ValueError(f"--iterative is a mode of selective scoring; got --scoring {scoring}. "
                             "Add --scoring selective, or drop --iterative.")
        if relearn_steps != 20 and not relearn:
            raise ValueError("--relearn-steps sets the relearning attacks' budget; add --relearn.")
        if step != 0.02 and not iterative:
            raise ValueError("--step sets the iterative pruning step; add --iterative (with --scoring selective).")
        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {seeds!r}.") from None
        caps = parse_caps(cap)
        check_device(device)
        check_artifacts_writable()
        forget_value = (None if forget is None else forget if forget.startswith("forget_") or forget == "validation"
                        else forget.split(","))
        never = never_learned
        if never_learned not in ("auto", "train", "none"):
            if not Path(never_learned).is_dir():
                raise ValueError(f"--never-learned takes auto, train, none or a model folder; {never_learned!r} is "
                                 "none of these (no such folder).")
            never = {}  # filled below, keyed by the forget set's name once the config resolves it
        config = RunConfig(model=model, alpha=alpha, forget=forget_value, device=device, scoring=scoring,
                           scoring_options=parse_scoring_options(scoring_option), iterative=iterative, step=step,
                           random_seeds=seed_list, benchmark=str(benchmark) if benchmark else None,
                           extract_batch_size=extract_batch_size,
                           eval=EvalSettings(max_profiles=caps, judge=judge),
                           relearn={"enabled": relearn, "steps": relearn_steps}, never_learned=never,
                           dtype=dtype, reference=str(reference) if reference else None, stand_in_data=stand_in_data)
        if isinstance(never, dict):
            name = forget_name(config.data_spec()["forget"])
            config = config.model_copy(update={"never_learned": {name: str(Path(never_learned).resolve())}})
        # the model, its weights, the data, the dtype, the judge and the references, then the forget set among
        # the profiles the model learned: all before any server or task
        for note in config.preflight([method], [config.data_spec()["forget"]]):
            typer.secho(note, fg=typer.colors.YELLOW, err=True)
        config.check_data()
    except ValidationError as e:  # the rule, the value and the fix, without pydantic's echo of every field
        _fail(ValueError(validation_message(e)))
    except (ValueError, JudgeError) as e:
        _fail(e)
    exit_on_interrupt()
    results_dir = manu(config, method=method)
    typer.echo(f"\nresults: {results_dir}/results.md")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # offline: no telemetry from the Prefect client or server
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server `manu run` starts gets 120 s, not Prefect's 20 s: on a busy 2-core machine
    # it often needs more. Raise it further with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    app()


if __name__ == "__main__":
    main()
