"""Content-addressed caching for the pipeline's Prefect tasks.

A task's cache key is `<task>-<sha256>` of
  - its parameters (JSON),
  - the *content* of its path parameters: a folder written by another task is named by its
    completion record (`_manu_done.json`: every file's size and sha256); any other file or folder
    (a model checkpoint, a profiles file) by the sha256 of its bytes, remembered per (path, size, mtime),
  - the code it runs: every source file of `manu_core/` and `tasks/` (Prefect's TASK_SOURCE would
    only see the task function itself), except the presentation modules (`PRESENTATION`: figures
    and report layout), which only the report tasks that draw them hash: restyling a figure
    redraws the figures, it does not rerun extraction, training or evaluation.
The task writes its outputs into `stage_dir()` = `<artifacts>/pipeline/<task>/<key>/`, atomically,
and `finish()` writes the completion record last. Before Prefect looks up a cached record, the policy
checks that record's outputs: when the completion record is missing, or a file it lists is gone,
has another size, or was modified and has another sha256, the stale cache record is deleted, so the
task reruns instead of handing a dangling or damaged path downstream.

A cached record is data, never code: Prefect decodes a record with whatever serializer the record
itself names, so a pickle record planted in a shared (group-writable) results folder would be
unpickled on the next cache hit. Before Prefect reads a record, the policy refuses and deletes any
record that is not plain JSON data (`unsafe_record`): the task reruns and writes a JSON record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from manu_core.io import atomic_write_json, file_lock

log = logging.getLogger(__name__)
DONE = "_manu_done.json"
REPO = Path(__file__).resolve().parent.parent


def artifacts_dir() -> Path:
    """Where outputs go: $MANU_ARTIFACTS, else `artifacts/` of the checkout when running from one,
    else `artifacts/` in the current folder (an installed wheel has no checkout to write into)."""
    if os.environ.get("MANU_ARTIFACTS"):
        return Path(os.environ["MANU_ARTIFACTS"]).resolve()
    in_checkout = (REPO / "pyproject.toml").is_file() and (REPO / "manu_core").is_dir()
    return ((REPO if in_checkout else Path.cwd()) / "artifacts").resolve()


def models_dir() -> Path:
    """Where the presets' trained vanilla models live (presets.resolve_model(name, models=...))."""
    return artifacts_dir() / "models"


def pipeline_dir() -> Path:
    return artifacts_dir() / "pipeline"


def results_dir() -> Path:
    """Where Prefect keeps the task results (the paths the tasks return): fixed, absolute."""
    return Path(os.environ.get("MANU_PREFECT_RESULTS") or artifacts_dir() / "prefect-results").resolve()


PRESENTATION = ("manu_core/figures.py", "manu_core/report.py", "manu_core/tradeoff.py", "tasks/reporting.py")


@lru_cache(maxsize=2)
def code_digest(presentation: bool = False) -> str:
    """sha256 of the project's sources, each by what it does (`manu_core.fingerprint`: a docstring or
    comment edit reruns nothing); the `PRESENTATION` modules only when `presentation`."""
    from manu_core.fingerprint import code_fingerprint

    h = hashlib.sha256()
    for pkg in ("manu_core", "tasks"):
        for f in sorted((REPO / pkg).glob("*.py")):
            if not presentation and f"{pkg}/{f.name}" in PRESENTATION:
                continue
            h.update(f"{pkg}/{f.name}".encode())
            h.update(code_fingerprint(f.read_text()).encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo] = _sha256(path)
    return _FILE_DIGESTS[memo]


def _is_temporary(p: Path, root: Path) -> bool:
    """Left by a write that never finished (manu_core.io's `.name.XXXX.tmp` siblings)."""
    return any(part.startswith(".") and part.endswith((".tmp", ".old")) for part in p.relative_to(root).parts)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != DONE and not _is_temporary(p, root))


def content_digest(path: str | Path) -> str:
    """What a path argument contributes to a cache key (see the module docstring)."""
    path = Path(path)
    if (path / DONE).is_file():  # its record's content digests (not the mtimes: same bytes, same key)
        record = json.loads((path / DONE).read_text())
        stable = {"files": [{k: f[k] for k in ("path", "size", "sha256")} for f in record["files"]],
                  "meta": record.get("meta", {})}
        return "done:" + hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        return "file:" + file_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in _files(path):
            h.update(str(f.relative_to(path)).encode() + b"\0" + file_digest(f).encode())
        return "dir:" + h.hexdigest()
    raise FileNotFoundError(f"{path} does not exist; a pipeline input must be an existing file or folder.")


def finish(out_dir: str | Path, *, outputs: list[str | Path] | None = None, meta: dict | None = None) -> Path:
    """Write the completion record of a task's output folder (last, atomically): every file under
    `out_dir` and under `outputs` (folders elsewhere, e.g. a trained model) with size, sha256 and
    modification time."""
    out_dir = Path(out_dir)
    roots = [out_dir] + [Path(p).resolve() for p in outputs or []]
    files = []
    for root in roots:
        for f in ([root] if root.is_file() else _files(root)):
            st = f.stat()
            files.append({"path": str(f.relative_to(out_dir)) if root == out_dir else str(f),
                          "size": st.st_size, "sha256": file_digest(f), "mtime_ns": st.st_mtime_ns})
    atomic_write_json(out_dir / DONE, {"files": files, "meta": meta or {}})
    return out_dir


def check_done(out_dir: str | Path) -> str | None:
    """None when `out_dir` is complete and unchanged, else why not. Every file must exist with the size
    it was written with; a file modified since (another mtime) must also have the same sha256, so a
    damaged file of the same size is caught. Cost: a stat per file, and hashing only the files
    whose mtime changed (a touched but identical file passes)."""
    out_dir = Path(out_dir)
    record = out_dir / DONE
    if not record.is_file():
        return f"{record} is missing"
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{record} is unreadable ({e})"
    for f in files:
        p = Path(f["path"]) if Path(f["path"]).is_absolute() else out_dir / f["path"]
        if not p.is_file():
            return f"{p} was deleted"
        st = p.stat()
        if st.st_size != f["size"]:
            return f"{p} has {st.st_size} bytes, {f['size']} were written"
        if "mtime_ns" in f and st.st_mtime_ns != f["mtime_ns"] and file_digest(p) != f["sha256"]:
            return f"{p} was changed after it was written (its sha256 differs from the record's)"
    return None


# Prefect's JSON serializer as the pipeline's tasks write it (result_serializer="json"): a record
# naming any other serializer, JSON library or object hook is refused.
JSON_SERIALIZER = {"type": "json", "jsonlib": "json",
                   "object_decoder": "prefect.serializers.prefect_json_object_decoder"}


def _tagged(value: Any) -> bool:
    """Whether a decoded JSON value holds an object Prefect's JSON decoder would rebuild by importing
    a class named in the data (`{"__class__": ...}`, `{"__exc_type__": ...}`)."""
    if isinstance(value, dict):
        return "__class__" in value or "__exc_type__" in value or any(_tagged(v) for v in value.values())
    if isinstance(value, list):
        return any(_tagged(v) for v in value)
    return False


def unsafe_record(record: Path) -> str | None:
    """Why Prefect must not decode the cached result record at `record`, or None when it is plain JSON
    data: a JSON object whose metadata names Prefect's JSON serializer with its defaults, and whose
    result decodes (with the standard `json`) to plain values, no class Prefect would import and build.
    (A record Prefect wrote for a pipeline task holds one path.) A file that is not JSON at all (being
    written, truncated) is left to Prefect, which reads it as a miss without decoding anything."""
    try:
        data = json.loads(record.read_bytes())
    except (OSError, ValueError):  # gone, unreadable or not JSON (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(data, dict):
        return "it is not a result record"
    # Prefect reads a legacy record ({"serializer", "data"}) too, and a record without a serializer as pickle
    meta = data.get("metadata") if "metadata" in data else {"serializer": data.get("serializer")}
    serializer = meta.get("serializer") if isinstance(meta, dict) else None
    if not isinstance(serializer, dict):
        return "it names no serializer (Prefect would unpickle it)"
    if serializer.get("type") != "json":
        return f"its serializer is {serializer.get('type')!r}, not 'json'"
    changed = {k: serializer[k] for k in ("jsonlib", "object_decoder") if k in serializer
               and serializer[k] != JSON_SERIALIZER[k] and not (k == "object_decoder" and serializer[k] is None)}
    if changed or serializer.get("loads_kwargs"):
        return f"its JSON serializer is not Prefect's default ({changed or serializer['loads_kwargs']})"
    result = data.get("result", data.get("data"))
    try:
        value = json.loads(result) if isinstance(result, (str, bytes)) else result
    except ValueError:
        return None  # Prefect's own decoding fails the same way: a miss
    if _tagged(value):
        return "its result names a class to import and build"
    return None


def drop_unsafe_record(record: Path, task_name: str) -> bool:
    """Delete the record at `record` if `unsafe_record` refuses it (logged with the reason); True when
    it did. When it cannot be deleted, raise: Prefect must not read it (the task then fails, with
    this error in its log, instead of running the record's code)."""
    why = unsafe_record(record)
    if why is None:
        return False
    try:
        record.unlink(missing_ok=True)
    except OSError as e:
        raise RuntimeError(f"refusing the cached result of {task_name} at {record}: {why}, and it cannot be "
                           f"deleted ({e}). A cached record must be JSON data; delete that file, and check who "
                           f"can write the results folder.") from e
    log.warning("refused the cached result of %s at %s: %s. A cached record must be JSON data, never code "
                "to run: it was deleted and the task reruns. Check who can write the results folder.",
                task_name, record, why)
    return True


_KEY_ERRORS: dict[Any, BaseException] = {}  # task run id -> why its cache key could not be computed


def _no_key(what: str) -> RuntimeError:
    """The error of a pipeline task that has no cache key: the reason its key failed (a missing input
    folder, an unreadable file, a refused record), else the misuse."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    cause = _KEY_ERRORS.pop(ctx.task_run.id, None) if ctx is not None else None
    if cause is not None:
        return RuntimeError(f"{ctx.task.name}: its cache key could not be computed, so it does not run: "
                            f"{type(cause).__name__}: {cause}")
    return RuntimeError(f"{what}() is for pipeline tasks running with the ManuCache policy")


@dataclass
class ManuCache(CachePolicy):
    """Cache key = task name + parameters + content of `paths` parameters + project code."""

    paths: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()  # parameters that do not change the output (progress bars, devices)
    results: Path | None = None  # the task's result storage folder (default: results_dir())
    presentation: bool = False  # the task draws figures/reports: its key also hashes PRESENTATION

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        try:
            return self._key(task_ctx, inputs)
        except Exception as e:  # Prefect logs it and runs the task uncached: the task itself then fails with it
            _KEY_ERRORS[task_ctx.task_run.id] = e
            raise

    def _key(self, task_ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
        key = stage_key(task_ctx.task.name, inputs, paths=self.paths, ignore=self.ignore,
                        presentation=self.presentation)
        out = pipeline_dir() / task_ctx.task.name / key
        record = (self.results or results_dir()) / key
        if record.exists() and not drop_unsafe_record(record, task_ctx.task.name):
            why = check_done(out)
            if why:
                log.warning("cached result of %s is stale (%s): recomputing", task_ctx.task.name, why)
                record.unlink(missing_ok=True)
        return key


def stage_key(task_name: str, inputs: dict[str, Any], *, paths: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
              presentation: bool = False) -> str:
    h = hashlib.sha256(task_name.encode())
    h.update(code_digest(presentation).encode())
    for name in sorted(inputs):
        if name in ignore:
            continue
        value = inputs[name]
        if name in paths and value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            digest = [content_digest(v) for v in values]
            h.update(json.dumps([name, digest]).encode())
        else:
            h.update(json.dumps([name, value], sort_keys=True, default=str).encode())
    return f"{task_name}-{h.hexdigest()[:20]}"


@contextmanager
def key_lock():
    """Hold the running task's key: a second process (or thread) running the same task on the same
    inputs waits here until the first is done, then writes the same bytes again, instead of both
    writing, and cleaning up, one folder at once: `manu_core.io.file_lock` on
    `<artifacts>/pipeline/<task>/.<key>.lock`."""
    from prefect.context import TaskRunContext
    from prefect.transactions import get_transaction

    txn, ctx = get_transaction(), TaskRunContext.get()
    if txn is None or ctx is None or not txn.key:
        raise _no_key("key_lock")
    with file_lock(pipeline_dir() / ctx.task.name / f".{txn.key}.lock"):
        yield


def stage_dir() -> Path:
    """The output folder of the running task: `<artifacts>/pipeline/<task>/<cache key>/`, created,
    without what a killed earlier attempt left (its completion record and unfinished temporaries)."""
    import shutil

    from prefect.context import TaskRunContext
    from prefect.transactions import get_transaction

    txn, ctx = get_transaction(), TaskRunContext.get()
    if txn is None or ctx is None or not txn.key:
        raise _no_key("stage_dir")
    out = pipeline_dir() / ctx.task.name / txn.key
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)
    for p in out.iterdir():
        if _is_temporary(p, out):
            log.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return out
