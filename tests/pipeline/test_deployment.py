"""The product as a user runs it, and the Prefect UI a colleague opens on it: one real `prefect server
start` with its UI, backed by PostgreSQL as on a shared lab server (a throwaway cluster,
tests/pipeline/postgres.py; SQLite where PostgreSQL cannot run here, and the Postgres test skips and
says why), a process work pool, `prefect deploy --all` from prefect.yaml, a worker and `prefect
deployment run manu/smoke --watch` (twice: as deployed, then with one field overridden from the
command line). Then headless Chromium at 1400x900 (and 1000 px, the dark theme, the V1 UI) on the first
flow run, its task runs, its artifacts, a task run and the run form. Every browser assertion reads the
rendered page (the DOM after the UI's JavaScript ran), not the API; the tour is docs/make_ui_shots.py's,
which also writes docs/ui/*.png. The browser tests are marked `browser` and skipped where there is no
Chromium (`.ci/run` installs Debian's where apt is available); the deployment tests and the run form's
schema need no browser. One server and one pair of runs serve every test here (module fixture)."""

import importlib.util
import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_shots():
    spec = importlib.util.spec_from_file_location("make_ui_shots", REPO / "docs" / "make_ui_shots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


shots = _load_shots()
CHROMIUM = shots.chromium_path()


def in_browser(test):
    """A test that reads the UI in Chromium: marked `browser` and `slow`, skipped where there is none."""
    for mark in (pytest.mark.browser, pytest.mark.slow,
                 pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium, or set "
                                                             "CHROMIUM=/path/to/chrome): the UI is not opened")):
        test = mark(test)
    return test


# ----------------------------------------------------------------------------------------------
# The run form's schema (what `prefect deploy` sends and the UI renders as Parameters -> custom run)


def _schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import manu

    return parameter_schema(manu).model_dump_for_openapi()  # as `prefect deploy` computes it (cli/deploy/_core.py)


def _fields(schema: dict):
    """(where, name, property, its definition or None) for every field of the form, at every depth."""
    defs = schema["definitions"]

    def ref(prop):
        r = prop.get("$ref") or next((b["$ref"] for b in prop.get("anyOf", []) if "$ref" in b), None)
        return defs[r.rsplit("/", 1)[-1]] if r else None

    for name, prop in schema["properties"].items():
        yield "flow", name, prop, ref(prop)
    for model, d in defs.items():
        for name, prop in d["properties"].items():
            yield model, name, prop, ref(prop)


def test_every_run_form_field_says_what_it_is_and_shows_its_default():
    from flows import pipeline
    from manu_core.importance import SCORING_MODES
    from manu_core.models import DTYPES

    schema = _schema()
    undescribed = [f"{where}.{name}" for where, name, prop, d in _fields(schema)
                   if not (prop.get("description") or "").strip()]
    assert not undescribed, f"run form fields without a description: {undescribed}"
    # Every field shows the value a run gets when it is left alone: a nested settings object shows its
    # fields' defaults; a list from a default_factory (pydantic leaves it out) would show as an empty list.
    models = {name: getattr(pipeline, name) for name in schema["definitions"]}  # RunConfig, EvalSettings, ...
    assert {"RunConfig", "SweepConfig", "EvalSettings", "ImportanceWeights"} <= set(models)
    for where, name, prop, d in _fields(schema):
        if where == "flow" or d is not None:
            continue
        assert "default" in prop, f"{where}.{name} shows no default in the run form"
        run_gets = models[where]().model_dump(mode="json")[name]
        assert prop["default"] == run_gets, f"{where}.{name}: the form shows {prop['default']!r}, a run {run_gets!r}"
    # the scoring mode is a choice, α and ε are bounded, the dtype and the evaluated sets are choices
    props = schema["definitions"]["RunConfig"]["properties"]
    assert props["scoring"]["enum"] == list(SCORING_MODES) and props["scoring"]["default"] == "paper"
    [alpha] = [b for b in props["alpha"]["anyOf"] if b.get("type") == "number"]
    assert (alpha["exclusiveMinimum"], alpha["exclusiveMaximum"], alpha["minimum"], alpha["maximum"]) == (0, 1, 0, 1)
    assert [b for b in props["eps"]["anyOf"] if b.get("type") == "number"][0]["exclusiveMinimum"] == 0
    assert [b for b in props["dtype"]["anyOf"] if b.get("type") == "string"][0]["enum"] == list(DTYPES)
    ev = schema["definitions"]["EvalSettings"]["properties"]
    assert ev["sets"]["items"]["enum"] == ev["sets"]["default"] == ["forget", "test", "retain", "celebrity"]
    weights = schema["definitions"]["ImportanceWeights"]["properties"]
    assert sorted(weights) == ["abs", "freq", "rms", "var"] and all(w["default"] is None for w in weights.values())
    methods = schema["definitions"]["SweepConfig"]["properties"]["methods"]["items"]["enum"]
    assert methods == list(pipeline.METHODS)


def test_the_deployments_parameters_satisfy_the_form_and_a_bad_alpha_does_not():
    """The server checks a run's parameters against this schema (enforce_parameter_schema): the bounds and
    choices added for the form must accept every deployment of prefect.yaml as written."""
    import yaml
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    schema = _schema()
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    for dep in deployments:
        validate(dep.get("parameters") or {}, schema, raise_on_error=True)
    for bad in ({"config": {"alpha": 1.5}}, {"config": {"scoring": "papre"}}, {"config": {"eval": {"sets": ["tset"]}}}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True)


def test_the_report_artifact_opens_on_the_tables_and_keeps_its_notes(tmp_path):
    """The report artifact (the UI's copy of report.md) puts the notes last, behind a pointer, so the
    forget set's table is on the first screen of the artifact pane (checked in the browser below)."""
    import base64

    from manu_core.report import artifact_markdown

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.png").write_bytes(base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="))
    (tmp_path / "report.md").write_text("# Title\n\n## About this report\n\nModel `tiny`; notes.\n\n"
                                        "## Forget split: forget_5\n\n| method | MC |\n|---|---|\n| vanilla | 1 |\n\n"
                                        "![f](figures/f.png)\n\n*Fig. 1*\n")
    md = artifact_markdown(tmp_path)
    assert md.index("| vanilla |") < md.index("data:image/png;base64,") < md.index("## About this report")
    assert md.index('"About this report", at the end') < md.index("## Forget split")
    assert md.rstrip().endswith("Model `tiny`; notes.") and md.count("notes.") == 1


# ----------------------------------------------------------------------------------------------
# The UI in Chromium: one server, one smoke run and one tour shared by the tests below


class Served:
    """The module's server stack and what ran on it."""

    def __init__(self, stack, work: Path, artifacts: Path, flow_run: str, overridden: str, seconds: float,
                 postgres: str | None, no_postgres: str | None):
        self.stack, self.work, self.artifacts = stack, work, artifacts
        self.flow_run, self.overridden, self.seconds = flow_run, overridden, seconds
        self.postgres, self.no_postgres = postgres, no_postgres  # the database's URL, or why it is SQLite


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A server with its UI, every deployment of prefect.yaml on `manu-pool`, a process worker, and two
    runs of manu/smoke. An artifacts folder of its own (the trained tiny model copied in): the first run
    computes every stage, whichever test ran the same stages first, so the worker log always has the
    extraction's progress. The second overrides one field from the command line: the deployment's
    other settings (α, its evaluation caps and token budget) must still apply, where Prefect alone would
    replace the whole config. The field is the logit lens's sample count: only the lens tasks and the
    tables rerun."""
    from tests.pipeline import postgres
    from tests.pipeline.flow_helpers import isolated_env

    work = tmp_path_factory.mktemp("served")
    arts, env = isolated_env(work, tiny_model_dir)
    t0 = time.time()
    with postgres.cluster() as (url, why_not):
        if url is not None:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
        with shots.prefect_stack(work, env=env, deploy=("--all",)) as stack:
            first = shots.run_smoke(stack)
            overridden = shots.run_smoke(stack, "--param", 'config={"lens_samples": 7}')
            yield Served(stack, work, arts, first, overridden, time.time() - t0, url, why_not)


def test_prefect_deploy_registers_every_deployment_with_a_form_of_labelled_fields(served):
    names = {d["name"] for d in served.stack.post("deployments/filter")}
    assert {"smoke", "full-sweep"} <= names, names
    # The run form (the deployment's parameter schema, as the UI reads it): the importance weights are
    # four labelled number fields, each saying what empty means, not an empty JSON editor.
    [smoke] = served.stack.post("deployments/filter", {"deployments": {"name": {"any_": ["smoke"]}}})
    schema = smoke["parameter_openapi_schema"]
    weights = schema["definitions"]["RunConfig"]["properties"]["weights"]
    fields = schema["definitions"][weights["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert sorted(fields) == ["abs", "freq", "rms", "var"]
    assert all("the mode's default" in f["description"] and f["default"] is None for f in fields.values())


def test_smoke_deployment_runs_on_a_real_server_and_one_field_overrides(served):
    states = {r["id"]: r["state"]["type"] for r in served.stack.post(
        "flow_runs/filter", {"flow_runs": {"id": {"any_": [served.flow_run, served.overridden]}}})}
    assert states == {served.flow_run: "COMPLETED", served.overridden: "COMPLETED"}, states
    runs = [json.loads(p.read_text())["run"] for p in (served.artifacts / "pipeline").glob("results/*/results.json")]
    [overridden] = [r for r in runs if r["config"]["lens_samples"] == 7]
    assert overridden["config"]["model"] == "tiny" and overridden["config"]["alpha"] == 0.05
    assert overridden["config"]["eval"]["max_new_tokens"] == 16
    assert overridden["config"]["eval"]["max_profiles"] == {"forget": 2, "test": 2, "retain": 2, "celebrity": 2}
    task_runs = served.stack.post("task_runs/filter", {"flow_runs": {"id": {"any_": [served.overridden]}}})
    reran = {t["name"].split("-")[0].split(" ")[0] for t in task_runs if t["state"]["type"] == "COMPLETED"
             and t["state"]["name"] != "Cached"}
    assert "extract" not in reran and "prune" not in reran, reran

    artifacts = served.stack.post("artifacts/filter")
    keys = {a["key"] for a in artifacts if a.get("key")}
    assert any(k.endswith("-results") for k in keys), keys
    assert any(k.endswith("-selected-neurons") for k in keys), keys
    # Without MANU_ARTIFACTS_URL an output is its path as copyable text (no dead file:// link).
    paths = {a["key"]: a["data"] for a in artifacts if (a.get("key") or "").endswith(("-activations", "-importance", "-model"))}
    assert len(paths) == 3, paths  # activations, importance and model (the two runs share them)
    for key, data in paths.items():
        assert "file://" not in data and Path(data.strip("`")).exists(), (key, data)


@pytest.mark.postgres
def test_the_runs_live_in_postgres(served):
    """The server ran on PostgreSQL (a shared lab server's setup, README "Prefect's server on PostgreSQL"):
    both smoke runs and their task runs are read back from Postgres itself, each task run Completed
    (computed here) or Cached, and no SQLite file was made."""
    if served.postgres is None:
        pytest.skip(served.no_postgres)
    from tests.pipeline.postgres import query

    assert not list((served.work / "prefect-home").rglob("*.db")), list((served.work / "prefect-home").rglob("*.db"))
    flows = query(served.postgres, "SELECT d.name, f.state_type FROM flow_run f JOIN deployment d ON d.id = f.deployment_id")
    assert sorted(flows) == [("smoke", "COMPLETED")] * 2, flows
    tasks = dict(query(served.postgres, "SELECT state_name, count(*) FROM task_run GROUP BY state_name"))
    assert tasks and set(tasks) <= {"Completed", "Cached"}, tasks


@pytest.fixture(scope="module")
def ui(served):
    """What the pages of the first smoke run showed (`make_ui_shots.tour`) and where the screenshots went."""
    if CHROMIUM is None:
        pytest.skip("no Chromium")
    t0 = time.time()
    with shots.Browser(CHROMIUM) as browser:
        facts = shots.tour(browser, served.stack, served.flow_run, out=served.work / "shots")
    facts["timing"] = {"server_and_smoke_runs": served.seconds, "tour": time.time() - t0}
    print(f"browser tour: server + two smoke runs {served.seconds:.0f} s, tour {time.time() - t0:.0f} s")
    return facts, served.work / "shots"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@in_browser
@pytest.mark.parametrize("page", ["results", "results-1000", "v1-results", "report", "report-1000", "v1-report",
                                  "artifact:*-selected-neurons"])
def test_every_column_header_is_seen_without_scrolling_sideways(ui, page):
    facts, _ = ui
    [name] = [k for k in facts if re.fullmatch(page.replace("*", ".*"), k)]
    tables = facts[name]["tables"]
    assert tables, f"{name}: no table rendered"
    for t in tables:
        assert t["headers"] and not t["hidden"] and not t["scrolls_sideways"], (name, t)
    assert not facts[name]["page_scrolls_sideways"], name


@in_browser
@pytest.mark.parametrize("page", ["report", "report-1000", "v1-report"])
def test_the_report_figures_load(ui, page):
    facts, _ = ui
    figures = facts[page]["figures"]
    assert len(figures) == facts["api"]["n_figures"] == 5, figures
    assert all(f["loaded"] and f["natural_width"] > 0 and f["shown_width"] > 0 for f in figures), figures
    if page != "report-1000":  # a readability fix: wide figures were shown at 62-70 %, their labels ~8 px;
        # each now fits the 1400 px window's artifact pane at 80 % of its size or more (manu_core/figures.py)
        small = [f for f in figures if f["shown_width"] < 0.8 * f["natural_width"]]
        assert not small, small


@in_browser
def test_the_report_opens_on_the_forget_tables_numbers(ui):
    """A readability fix: the report's notes filled the first screen of the artifact pane and pushed the
    forget set's table below it; they now come last (manu_core.report.artifact_markdown)."""
    facts, _ = ui
    for page in ("report", "report-1000", "v1-report"):
        first = facts[page]["tables"][0]
        assert first["first_row_bottom"] is not None and first["first_row_bottom"] <= 900, (page, first)
        text = facts[page]["text"]  # the notes are still there, after the tables and figures
        assert text.index("Table 1 · forget") < text.index("Fig. 2") < text.index("methods evaluated on MLLMU-Bench")


@in_browser
def test_task_runs_carry_the_names_the_flow_gives_them(ui):
    facts, _ = ui
    shown = facts["task-runs"]["names"]
    names = set(facts["api"]["task_run_names"])
    assert len(shown) >= 10 and {s["name"] for s in shown} <= names, shown
    assert not [s for s in shown if re.fullmatch(r"[a-z_]+-[0-9a-f]{3}", s["name"]) or s["cut"]], shown
    for readable in ("extract-3 ids", "select-paper-alpha0.05", "report-manu[paper] α=0.05 on tiny"):
        assert readable in names  # what they say: what the task works on
    assert facts["api"]["task_run"] in facts["task-run"]["heading"], facts["task-run"]["heading"]
    assert all(k in " ".join(facts["flow-run"]["artifact_cards"]) for k in facts["api"]["artifact_keys"])


@in_browser
def test_no_artifact_shows_a_dead_file_link(ui):
    facts, _ = ui
    pages = [k for k, v in facts.items() if isinstance(v, dict) and "links" in v]
    assert len([p for p in pages if p.startswith("artifact:")]) == len(facts["api"]["artifact_keys"]) - 2
    dead = {p: facts[p]["links"] for p in pages if facts[p]["links"]}
    assert not dead, dead
    for key in facts["api"]["artifact_keys"]:  # an output path is shown as text to copy, not a link
        if key.endswith(("-model", "-activations", "-importance", "-html")):
            assert re.search(r"\n/\S+", facts[f"artifact:{key}"]["text"]), facts[f"artifact:{key}"]["text"][-500:]


@in_browser
def test_no_page_logs_a_javascript_error(ui):
    facts, _ = ui
    errors = {page: e for page, e in facts["errors"].items() if e}
    assert not errors, errors
    assert {"results", "report", "report-dark", "v1-report", "run-form"} <= set(facts["errors"])


@in_browser
def test_the_report_is_legible_in_both_themes(ui):
    facts, _ = ui
    for page in ("report", "report-dark", "v1-report"):
        assert facts[page]["contrast"]["ratio"] >= 4.5, (page, facts[page]["contrast"])  # WCAG AA


@in_browser
def test_the_run_form_shows_descriptions_choices_and_bounds(ui):
    facts, _ = ui
    form = facts["run-form"]
    assert form["alpha"] == {"min": "0", "max": "1", "value": "0.05"}, form["alpha"]  # the smoke deployment's α
    assert form["scoring"].strip().splitlines()[-1] == "paper", form["scoring"]  # a select, showing the default
    text = form["text"]
    for described in ("pruning ratio α in (0, 1)", "τ: an activation counts as firing above it",
                      "the benchmark's sets to evaluate", "mean |activation| ratio; empty: the mode's default"):
        assert described in text, described
    assert "No items in this list" not in text  # default lists shown, not an empty list
    assert form["sets"] == ["forget", "test", "retain", "celebrity"], form["sets"]  # chosen, as a run gets them


@in_browser
def test_the_screenshots_are_written_at_1400_by_900(ui):
    facts, out = ui
    names = sorted(p.stem for p in out.glob("*.png"))
    assert names == ["flow-run", "report", "report-figures", "results", "run-form", "task-run", "task-runs"], names
    assert all(_png_size(out / f"{n}.png") == (1400, 900) for n in names)
    assert "Upgrade" not in facts["flow-run"]["text"]  # a lab server: no promotional banners in the shots
    assert facts["timing"]["tour"] < 300



@in_browser
def test_a_workers_log_gets_progress_as_plain_lines(ui):
    """The worker relays the flow run's output to a log, not a terminal: the extraction's progress comes as
    a line each 10% (manu_core/progress.py), not tqdm's carriage-return redraws."""
    _, out = ui
    log = (out.parent / "worker.log").read_text()
    lines = [line for line in log.splitlines() if re.match(r"extract (forget|retain)/(multimodal|text):", line)]
    assert lines and all(re.fullmatch(r"extract \S+: +\d+% \(\d+/\d+ batch, .*\)", line) for line in lines), lines
    assert any(line.split(": ", 1)[1].lstrip().startswith("100%") for line in lines), lines
