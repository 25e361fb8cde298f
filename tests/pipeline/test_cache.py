"""The content-addressed cache policy (and, where said, its key lock in a flow)."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.cache import check_done, code_digest, content_digest, finish, stage_key


def test_content_digest_follows_bytes_not_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.bin").write_bytes(b"same")
    assert content_digest(a) == content_digest(b)
    (b / "x.bin").write_bytes(b"diff")
    assert content_digest(a) != content_digest(b)
    f = tmp_path / "f.txt"
    f.write_text("1")
    d1 = content_digest(f)
    f.write_text("2")  # rewritten in place: another digest
    assert content_digest(f) != d1
    with pytest.raises(FileNotFoundError, match="must be an existing file or folder"):
        content_digest(tmp_path / "missing")


def test_finished_folder_is_named_by_its_record(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    extra = tmp_path / "model"
    extra.mkdir()
    (extra / "w.safetensors").write_bytes(b"weights")
    finish(out, outputs=[extra])
    record = json.loads((out / "_manu_done.json").read_text())
    assert {f["path"] for f in record["files"]} == {"sub/p.parquet", str(extra / "w.safetensors")}
    assert content_digest(out).startswith("done:")
    assert check_done(out) is None
    (out / "sub" / "p.parquet").write_bytes(b"ab")  # damaged (truncated)
    assert "has 2 bytes, 3 were written" in check_done(out)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    assert check_done(out) is None  # rewritten with the same bytes: content checked, still whole
    (out / "sub" / "p.parquet").write_bytes(b"abd")  # damaged, same size
    assert "was changed after it was written (its sha256 differs" in check_done(out)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    (extra / "w.safetensors").unlink()  # an output elsewhere deleted
    assert "was deleted" in check_done(out)
    assert "is missing" in check_done(tmp_path)


def test_stage_key_covers_parameters_paths_and_code(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("x")
    k = stage_key("t", {"p": f"{f}", "alpha": 0.1, "progress": True}, paths=("p",), ignore=("progress",))
    assert k.startswith("t-") and k == stage_key("t", {"p": str(f), "alpha": 0.1, "progress": False},
                                                 paths=("p",), ignore=("progress",))
    assert k != stage_key("t", {"p": str(f), "alpha": 0.2}, paths=("p",))
    assert k != stage_key("u", {"p": str(f), "alpha": 0.1}, paths=("p",))
    f.write_text("y")
    assert k != stage_key("t", {"p": str(f), "alpha": 0.1}, paths=("p",))
    assert len(code_digest()) == 64


def test_presentation_code_is_hashed_only_by_the_report_tasks(tmp_path):
    """Restyling a figure must not rerun extraction or evaluation: the figure/report modules are
    left out of every other task's code digest (and each listed file exists, so a rename can't
    silently put one back)."""
    from tasks.cache import PRESENTATION, REPO

    assert all((REPO / p).is_file() for p in PRESENTATION)
    assert code_digest(False) != code_digest(True)
    inputs = {"alpha": 0.1}
    assert stage_key("t", inputs) == stage_key("t", inputs, presentation=False) != stage_key("t", inputs, presentation=True)


@pytest.mark.usefixtures("prefect_harness")
def test_two_runs_of_one_key_write_one_at_a_time(tmp_path):
    """Two task runs with the same cache key at once (two users, or a retry beside a slow first
    attempt): the key lock lets one write at a time, and both end with the same complete folder."""
    import threading
    import time

    from prefect import flow

    from tasks.cache import stage_dir
    from tasks.stages import manu_task

    guard, active, peak = threading.Lock(), [0], [0]

    @manu_task(name="lock_probe")
    def probe(x: int, token: str) -> str:
        out = stage_dir()
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        (out / "value.txt").write_text(str(x))
        with guard:
            active[0] -= 1
        return str(finish(out))

    @flow
    def twice(token: str):
        a, b = probe.submit(7, token), probe.submit(7, token)
        return a.result(), b.result()

    first, second = twice(str(tmp_path))  # a fresh key per test session
    assert first == second and peak[0] == 1
    assert (Path(first) / "value.txt").read_text() == "7" and check_done(first) is None


class Payload:
    """What a planted pickle record holds: unpickling it writes `marker` (stands for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "the planted record's code ran")


@contextmanager
def logged(*names: str):
    """The messages (with tracebacks) logged to these loggers meanwhile: a handler of their own, since
    Prefect's logging setup, run by the first flow of a process, replaces the root's (caplog's) handlers."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logging.Formatter())
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield lines
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)


def record_bytes(value, serializer) -> bytes:
    """A result record as Prefect writes one for a task with `result_serializer=serializer`."""
    from prefect.results import ResultRecord, ResultRecordMetadata

    return ResultRecord(metadata=ResultRecordMetadata(serializer=serializer), result=value).serialize()


def test_only_plain_json_records_are_accepted(tmp_path):
    """`unsafe_record` accepts a record Prefect's JSON serializer wrote for a path, and refuses every
    record Prefect would decode by running code: pickle (also compressed, legacy or with no serializer
    named, which Prefect reads as pickle), a JSON serializer with another library or object hook, and
    a JSON result naming a class for Prefect's decoder to import and build. A file that is not JSON
    (a record being written) is left to Prefect, which reads it as a miss."""
    import base64

    import cloudpickle
    from prefect.serializers import CompressedSerializer, JSONSerializer, PickleSerializer

    from tasks.cache import unsafe_record

    marker = tmp_path / "ran"
    path = tmp_path / "record"

    def check(content: bytes | str) -> str | None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return unsafe_record(path)

    assert check(record_bytes("/artifacts/pipeline/x/x-123", JSONSerializer())) is None
    assert check(record_bytes("/a", JSONSerializer(object_decoder=None))) is None
    assert check(b'{"metadata": {"serializer": {"type": "js') is None  # half-written: not JSON yet
    assert unsafe_record(tmp_path / "missing") is None
    assert "'pickle', not 'json'" in check(record_bytes(Payload(marker), PickleSerializer()))
    assert "'compressed', not 'json'" in check(record_bytes(Payload(marker), CompressedSerializer(serializer="pickle")))
    pickled = base64.encodebytes(cloudpickle.dumps(Payload(marker))).decode()
    assert "names no serializer" in check(json.dumps({"metadata": {}, "result": pickled}))
    assert "'pickle'" in check(json.dumps({"serializer": {"type": "pickle"}, "data": pickled}))  # legacy blob
    plain = json.loads(record_bytes("/a", JSONSerializer()))

    def edited(result=plain["result"], **serializer) -> str:
        return json.dumps({"metadata": {**plain["metadata"], "serializer": {**plain["metadata"]["serializer"],
                                                                          **serializer}}, "result": result})

    assert check(edited()) is None
    assert "not Prefect's default" in check(edited(jsonlib="jsonpickle"))  # any module with a `loads`
    assert "not Prefect's default" in check(edited(object_decoder="os.system"))
    assert "not Prefect's default" in check(edited(loads_kwargs={"cls": "x"}))
    tagged = JSONSerializer().dumps([{"__class__": "pathlib.PurePosixPath", "data": "/a"}]).decode()
    assert "names a class" in check(edited(result=tagged))
    assert "not a result record" in check("[1, 2]")
    assert not marker.exists()


@pytest.mark.usefixtures("prefect_harness")
def test_a_planted_pickle_record_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    """A pickle record placed in the results folder at a task's cache key (anyone who can
    write a group-writable folder can) is unpickled by Prefect on the next lookup: shown first with
    the refusal switched off. With it on, the record is refused and deleted before Prefect reads it,
    its payload never runs, the task recomputes its true value and a JSON record replaces it."""
    from prefect import flow
    from prefect.serializers import PickleSerializer

    import tasks.cache
    from tasks.cache import results_dir, stage_dir
    from tasks.stages import manu_task

    @manu_task(name="planted_probe")
    def probe(token: str) -> str:
        out = stage_dir()
        (out / "value.txt").write_text("true value")
        return str(finish(out))

    @flow
    def once(token: str):
        state = probe(token, return_state=True)
        return state.name, state.result(raise_on_failure=False)

    token, marker = str(tmp_path), tmp_path / "payload-ran"
    name, first = once(token)  # a fresh key per test
    assert name == "Completed"
    record = results_dir() / Path(first).name  # the output folder is named after the cache key
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"

    def plant():
        record.write_bytes(record_bytes(Payload(marker), PickleSerializer()))

    plant()  # the control: with nothing refusing it, the lookup runs the planted code
    with monkeypatch.context() as m:
        m.setattr(tasks.cache, "drop_unsafe_record", lambda record, task_name: False)
        name, value = once(token)
    assert marker.read_text() == "the planted record's code ran" and name == "Cached" and value != first
    marker.unlink()

    plant()
    with logged("tasks.cache") as lines:
        name, value = once(token)
    assert not marker.exists()  # the payload never ran
    assert (name, value) == ("Completed", first)  # recomputed, not taken from the record
    assert f"refused the cached result of planted_probe at {record}: its serializer is 'pickle'" in "\n".join(lines)
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"  # replaced by JSON
    assert once(token) == ("Cached", first)

    plant()  # a record it may not delete (another user's, in a sticky folder): the task fails, nothing runs
    unlink = Path.unlink

    def not_this_one(self, *args, **kwargs):
        if self == record:
            raise PermissionError("Operation not permitted")
        return unlink(self, *args, **kwargs)

    with monkeypatch.context() as m, logged("prefect.task_runs") as lines:
        m.setattr(Path, "unlink", not_this_one)
        name, error = once(token)
    assert not marker.exists() and name == "Failed", (name, error)
    assert "it cannot be deleted (Operation not permitted)" in "\n".join(lines)
    record.unlink()


def test_a_refused_record_that_cannot_be_deleted_stops_the_lookup(tmp_path, monkeypatch):
    """Raised from the cache policy, the error makes Prefect run the task with no key (it logs the
    error): no lookup, so the record is never decoded, and the pipeline task fails (tasks.cache.key_lock)."""
    from prefect.serializers import PickleSerializer

    from tasks.cache import drop_unsafe_record

    record = tmp_path / "key"
    record.write_bytes(record_bytes(Payload(tmp_path / "ran"), PickleSerializer()))

    def refuse(self, missing_ok=False):
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(RuntimeError, match=r"refusing the cached result of t at .*key: its serializer is 'pickle'.*"
                                           r"cannot be deleted .*delete that file"):
        drop_unsafe_record(record, "t")
    assert not (tmp_path / "ran").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_a_cache_key_that_cannot_be_computed_fails_the_task_with_its_cause(tmp_path):
    """A path input that is gone: Prefect swallows the key's error and would run the task uncached;
    the task fails instead, naming the key's cause, not "key_lock() is for pipeline tasks"."""
    from prefect import flow

    from tasks.cache import stage_dir
    from tasks.stages import manu_task

    @manu_task(name="keyless_probe", paths=("folder",))
    def probe(folder: str) -> str:
        return str(stage_dir())

    @flow
    def one(folder: str):
        return probe(folder)

    state = one(str(tmp_path / "no-such-folder"), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="keyless_probe: its cache key could not be computed, so it does not run: "
                                           ".*no-such-folder"):
        state.result()
