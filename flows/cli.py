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

    try:
        get_preset(preset)
        path = resolve_model(preset)
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
    eps: float = typer.Option(1e-5, help="ε in the importance ratios and the score"),
    tau: float = typer.Option(0.1, help="activation threshold τ of the frequency importance"),
    weights: str = typer.Option("abs=1,freq=1,var=1,rms=1", help="importance weights; 0 drops one"),
    scope: str = typer.Option("global", help="top-α over: global | tower | layer"),
) -> None:
    """Score every neuron of an activations folder (MANU, method.md §3.1-3.2) and select the top α."""
    from manu_core.importance import ImportanceParams, compute_importance, parse_weights, write_importance
    from manu_core.store import ActivationStoreError

    try:
        params = ImportanceParams(alpha=alpha, eps=eps, tau=tau, weights=parse_weights(weights), scope=scope)
        t0 = time.perf_counter()
        table = compute_importance(activations_dir, params)
        write_importance(table, out)
    except (ValueError, ActivationStoreError) as e:
        _fail(e)
    n_sel = int(table["selected"].sum())
    typer.echo(f"{table.height} neurons scored, {n_sel} selected (α={alpha}, scope={scope}) "
               f"in {time.perf_counter() - t0:.1f}s -> {out}")


@app.command()
def demo(
    preset: str = typer.Option("lite", help="embedded preset"),
    alpha: Optional[float] = typer.Option(None, help="MANU pruning ratio (default: the preset's documented α)"),
    verbose: bool = False,
) -> None:
    """The main job on the embedded default: train the vanilla model, unlearn forget_5 with MANU,
    evaluate both, print the results and where the artifacts are."""
    _setup_logging(verbose)
    from manu_core.demo import run_demo

    try:
        result = run_demo(preset, alpha=alpha)
    except ValueError as e:
        _fail(e)
    typer.echo(result.report)
    typer.echo(f"\nartifacts: {result.out_dir}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
