"""The evaluation runner on the tiny model: batching, resumption, few-shot, folders and reports."""

import json

import polars as pl
import pytest

from manu_core import data as mdata
from manu_core.vocab import EVAL_SETS, FORMS
from manu_core.evaluate import (MAX_NEW_TOKENS, EvalConfig, EvaluationError, Request, answer_token_cap,
                                by_prompt_length, cap_profiles, evaluate, evaluate_unit, format_report, generate_texts,
                                read_answers, units_of)
from manu_core.portraits import image_for
from manu_core.presets import get_preset, preset_dataset
from manu_core.prompts import build_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def items():
    return mdata.eval_items(preset_dataset(get_preset("tiny")))


def _unit(items, set_="forget", form="multimodal", n_profiles=2):
    unit = [it for it in items if it.set == set_ and it.form == form]
    keep = sorted({it.profile_id for it in unit})[:n_profiles]
    return [it for it in unit if it.profile_id in keep]


@pytest.mark.parametrize("form", ["multimodal", "text"])
def test_batched_generation_equals_one_at_a_time(tiny_model, items, form):
    model, processor = tiny_model
    gen = [it for it in _unit(items, "retain", form, 3) if it.task == "gen"]
    reqs = [Request(build_prompt(processor, it.question, image=it.image is not None),
                    (image_for(it.image),) if it.image else ()) for it in gen]
    batched = generate_texts(model, processor, reqs, batch_size=16, max_new_tokens=24)
    single = generate_texts(model, processor, reqs, batch_size=1, max_new_tokens=24)
    assert len(batched) == len(gen) >= 10
    assert batched == single
    # The model was trained on these: its answers are the ground truth (sanity of the decode path).
    assert sum(b == it.answer for b, it in zip(batched, gen)) >= len(gen) * 0.8


class WordTokenizer:
    """A tokenizer with one token per word: lengths to check on paper."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [t.split() for t in texts]}


def test_answer_token_cap_is_the_99th_percentile_and_half_again():
    tok = WordTokenizer()
    # 100 answers of 1..100 words: n = words + 1 (end of turn) = 2..101; nearest-rank p99 = 100.
    answers = [" ".join(["w"] * k) for k in range(1, 101)]
    assert answer_token_cap(tok, answers, ceiling=1000) == 100 + 50
    assert answer_token_cap(tok, answers) == MAX_NEW_TOKENS  # never above the benchmark's budget
    # 10 answers of 4 words and one of 30: p99 of 11 is the 11th smallest, the long one.
    assert answer_token_cap(tok, ["a b c d"] * 10 + [" ".join(["w"] * 30)]) == min(MAX_NEW_TOKENS, 31 + 16)
    assert answer_token_cap(tok, ["a b c d"] * 10 + ["x " * 30], percentile=90) == 5 + 3  # the long one left out
    assert answer_token_cap(tok, []) == MAX_NEW_TOKENS  # nothing to measure: the benchmark's budget
    with pytest.raises(EvaluationError, match=r"percentile must be in \(0, 100\]; got 0"):
        answer_token_cap(tok, answers, percentile=0)


def test_by_prompt_length_is_longest_first_and_stable():
    reqs = [Request(p) for p in ("a b", "a b c d", "a", "c d", "e f g h")]
    assert by_prompt_length(WordTokenizer(), reqs) == [1, 4, 0, 3, 2]


@pytest.mark.parametrize("form", ["multimodal", "text"])
def test_batching_by_prompt_length_keeps_every_answer(tiny_model, items, form, monkeypatch):
    """Sorting changes which questions share a batch, never an answer, and answers come back in order."""
    model, processor = tiny_model
    gen = [it for it in _unit(items, "retain", form, 4) if it.task in ("gen", "cloze")]
    reqs = [Request(build_prompt(processor, it.question, image=it.image is not None),
                    (image_for(it.image),) if it.image else ()) for it in gen]
    order = by_prompt_length(processor.tokenizer, reqs)
    assert order != list(range(len(reqs)))  # the sort does regroup these questions
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    sorted_ = generate_texts(model, processor, reqs, batch_size=8, max_new_tokens=24)
    unsorted = generate_texts(model, processor, reqs, batch_size=8, max_new_tokens=24, sort_by_length=False)
    assert sorted_ == unsorted
    assert all(kw["use_cache"] is True for kw in calls)  # the KV cache, whatever the model's config says
    # Batches of sorted prompts pad less: fewer input positions in all.
    widths = [kw["input_ids"].numel() for kw in calls]
    assert sum(widths[: len(widths) // 2]) < sum(widths[len(widths) // 2 :])


def test_auto_budget_comes_from_the_units_answers_and_only_cuts_longer_answers(tiny_model, items, tmp_path):
    model, processor = tiny_model
    unit = [it for it in _unit(items, "forget", "text", 2) if it.task in ("gen", "cloze")]
    fixed = EvalConfig(mc_scorer="likelihood", instructions=False)
    auto = EvalConfig(mc_scorer="likelihood", instructions=False, max_new_tokens="auto")
    evaluate_unit(model, processor, unit, tmp_path / "fixed", fixed, progress=False)
    evaluate_unit(model, processor, unit, tmp_path / "auto", auto, progress=False)
    cap = answer_token_cap(processor.tokenizer, [it.answer for it in unit if it.task == "gen"])
    assert 1 <= cap < MAX_NEW_TOKENS
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["max_new_tokens"] == cap and manifest["config"]["max_new_tokens"] == "auto"
    # A fixed budget's manifest is what it was before "auto" existed: its folders still resume.
    assert "max_new_tokens" not in json.loads((tmp_path / "fixed" / "manifest.json").read_text())
    a, b = (pl.read_parquet(tmp_path / d / "answers.parquet") for d in ("fixed", "auto"))
    n_tokens = [len(processor.tokenizer(" " + p, add_special_tokens=False)["input_ids"]) for p in a["prediction"]]
    short = [n < cap for n in n_tokens]
    assert sum(short) >= len(unit) * 0.9  # the vanilla model answers within the cap
    for keep, x, y in zip(short, a.iter_rows(named=True), b.iter_rows(named=True)):
        if keep:  # greedy decoding is the same token by token up to the cap
            assert x == y
        else:
            assert len(processor.tokenizer(" " + y["prediction"], add_special_tokens=False)["input_ids"]) <= cap + 1
    for bad in (0, "50", True, 2.5):
        with pytest.raises(EvaluationError, match="max_new_tokens must be an integer >= 1, or 'auto'"):
            EvalConfig(max_new_tokens=bad)


def test_resume_after_interruption_gives_the_same_answers(tiny_model, items, tmp_path, monkeypatch):
    model, processor = tiny_model
    unit = _unit(items, "forget", "text", 2)
    cfg = EvalConfig(mc_scorer="likelihood", instructions=False, chunk_size=7, batch_size=4, max_new_tokens=16)
    whole = evaluate_unit(model, processor, unit, tmp_path / "whole", cfg, progress=False)

    import manu_core.evaluate as ev
    real, calls = ev.generate_texts, {"n": 0}

    def dies_on_third_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(ev, "generate_texts", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        evaluate_unit(model, processor, unit, tmp_path / "resumed", cfg, progress=False)
    parts = sorted((tmp_path / "resumed" / "parts").glob("*.parquet"))
    assert parts and not (tmp_path / "resumed" / "answers.parquet").exists()
    assert not list((tmp_path / "resumed").rglob("*.tmp*"))  # nothing half-written left behind
    monkeypatch.setattr(ev, "generate_texts", real)
    resumed = evaluate_unit(model, processor, unit, tmp_path / "resumed", cfg, progress=False)
    assert resumed.resumed_chunks == len(parts)
    assert resumed.summaries == whole.summaries
    a = pl.read_parquet(tmp_path / "whole" / "answers.parquet")
    b = pl.read_parquet(tmp_path / "resumed" / "answers.parquet")
    assert a.equals(b)
    assert a.height == len(unit)
    # A finished unit is only read again.
    again = evaluate_unit(model, processor, unit, tmp_path / "whole", cfg, progress=False)
    assert again.summaries == whole.summaries and again.resumed_chunks == -1


def test_answers_are_readable_rows(tiny_model, items, tmp_path):
    model, processor = tiny_model
    unit = _unit(items, "celebrity", "multimodal", 1)
    cfg = EvalConfig(mc_scorer="likelihood", instructions=False, max_new_tokens=24)
    res = evaluate_unit(model, processor, unit, tmp_path, cfg, progress=False)
    a = pl.read_parquet(tmp_path / "answers.parquet")
    assert set(a["task"]) == {"mc", "cloze", "gen"}
    assert {"question", "form", "prediction", "ground_truth", "score"} <= set(a.columns)
    gen = a.filter(pl.col("task") == "gen")
    assert gen["factuality"].min() >= 1 and gen["factuality"].max() <= 10
    assert set(gen["judge"]) == {"offline-keyfact-overlap"}
    mc = a.filter(pl.col("task") == "mc")
    assert set(mc["scorer"]) == {"likelihood"} and mc["choice"].is_in(list("ABCD")).all()
    # The trained model knows its celebrities: multiple choice and generation are near perfect.
    by = {(s.task, s.metric): s for s in res.summaries}
    assert by[("mc", "accuracy")].value >= 0.9
    assert by[("gen", "rougeL_f1")].value >= 0.8
    assert by[("gen", "factuality")].scorer == "offline-keyfact-overlap"
    assert json.loads((tmp_path / "summary.json").read_text())[0]["set"] == "celebrity"


def test_letter_scorer_with_few_shot_excludes_the_example_profile(tiny_model, items, tmp_path):
    model, processor = tiny_model
    unit = [it for it in _unit(items, "retain", "multimodal", 3) if it.task == "mc"]
    cfg = EvalConfig(mc_scorer="letter", few_shot=True, letter_tokens=4)
    evaluate_unit(model, processor, unit, tmp_path, cfg, progress=False)
    a = pl.read_parquet(tmp_path / "answers.parquet")
    assert a["profile_id"].n_unique() == 2  # one of three profiles became the examples
    per_profile = {p: sum(it.profile_id == p for it in unit) for p in {it.profile_id for it in unit}}
    assert a.height == len(unit) - per_profile[(set(per_profile) - set(a["profile_id"])).pop()]
    assert set(a["scorer"]) == {"letter+few-shot"}


def test_a_unit_folder_refuses_another_evaluation(tiny_model, items, tmp_path):
    model, processor = tiny_model
    unit = [it for it in _unit(items, "forget", "text", 1) if it.task == "mc"]
    evaluate_unit(model, processor, unit, tmp_path, EvalConfig(mc_scorer="likelihood"), progress=False)
    with pytest.raises(EvaluationError, match=r"differs in: config.*Delete the folder"):
        evaluate_unit(model, processor, unit, tmp_path, EvalConfig(mc_scorer="letter"), progress=False)
    with pytest.raises(EvaluationError, match="one \\(set, form\\)"):
        evaluate_unit(model, processor, _unit(items, "forget", "text") + _unit(items, "retain", "text"),
                      tmp_path / "x", progress=False)
    with pytest.raises(EvaluationError, match="few_shot applies to the letter scorer"):
        EvalConfig(mc_scorer="likelihood", few_shot=True)
    with pytest.raises(EvaluationError, match="batch_size must be >= 1"):
        EvalConfig(batch_size=0)


def test_evaluate_all_units_and_report(tiny_model, items, tmp_path):
    model, processor = tiny_model
    capped = [it for it in cap_profiles(items, 1, seed=0) if it.task != "gen"]
    assert {(s, f) for s, f in units_of(capped)} == {(s, f) for s in EVAL_SETS for f in FORMS}
    assert all(len({it.profile_id for it in v}) == 1 for v in units_of(capped).values())
    summaries = evaluate(model, processor, capped, tmp_path, EvalConfig(mc_scorer="likelihood", instructions=False,
                                                                        max_new_tokens=16), progress=False)
    report = format_report(summaries)
    table = [l for l in report.splitlines() if l.startswith("|")]
    assert table[0] == "| set | MC | Cloze |" and [l.split(" | ")[0] for l in table[2:]] == [
        "| forget", "| test", "| retain", "| celebrity"]  # a row per set, both forms in each cell
    mc = {(s.set, s.form): s.value for s in summaries if s.task == "mc"}
    assert table[2].split(" | ")[1] == f"{100 * mc['forget', 'multimodal']:.1f} / {100 * mc['forget', 'text']:.1f}"
    assert "MC `likelihood`" in report and "Cloze `substring`" in report
    assert read_answers(tmp_path).height == len(capped)
    assert cap_profiles(items, 1, seed=0) == cap_profiles(items, 1, seed=0)


def test_cli_evaluate(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    args = ["evaluate", str(tiny_model_dir), "--out", str(tmp_path / "ev"), "--max-profiles", "1",
            "--sets", "forget,retain", "--tasks", "mc,cloze"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "| set | MC | Cloze |" in out.output and "MC `likelihood`" in out.output  # embedded: likelihood by default
    assert "bare questions" in out.output and "`offline-keyfact-overlap` (deterministic, not an LLM)" in out.output
    assert (tmp_path / "ev" / "report.md").is_file()
    assert sorted(p.name for p in (tmp_path / "ev").iterdir() if p.is_dir()) == [
        "forget-multimodal", "forget-text", "retain-multimodal", "retain-text"]
    # The same folder with another scorer: refused, nothing overwritten.
    again = runner.invoke(app, args + ["--mc-scorer", "letter"])
    assert again.exit_code == 2 and "holds answers of another evaluation" in again.output
    bad = runner.invoke(app, ["evaluate", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--sets", "forget,tset"])
    assert bad.exit_code == 2 and "--sets takes a comma-separated subset of forget,test,retain,celebrity" in bad.output
    real = tmp_path / "real-model"
    real.mkdir()
    bad = runner.invoke(app, ["evaluate", str(real), "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "pass --benchmark" in bad.output
