"""The real MLLMU-Bench loader on a small fixture in the hub's parquet layout."""

import shutil

import pytest

from manu_core.benchmark import BenchmarkError, load_mllmu_bench
from manu_core.evaluate import EvalConfig, evaluate, format_report

from . import mllmu_fixture as fx


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("mllmu"))


def test_loads_four_sets_two_forms_three_tasks(root):
    b = load_mllmu_bench(root, "forget_5")
    assert b.forget_ids == tuple(fx.FORGET)
    by = {}
    for it in b.items:
        by.setdefault((it.set, it.form, it.task), []).append(it)
    assert set(by) == {(s, f, t) for s in ("forget", "test", "retain", "celebrity")
                       for f in ("multimodal", "text") for t in ("mc", "gen", "cloze")}
    assert {it.profile_id for it in b.items if it.set == "test"} == set(fx.FORGET)
    assert {it.profile_id for it in b.items if it.set == "retain"} == {"002", "003", "004"}
    assert {it.profile_id for it in b.items if it.set == "celebrity"} == set(fx.CELEBS)
    mc = by[("forget", "multimodal", "mc")][0]
    assert mc.options == ("Riga", "City 001", "Oslo", "Lima") and mc.correct == 1
    assert mc.source == "mllmu-bench" and mc.image == "mllmu:forget_5:001"
    assert by[("forget", "text", "mc")][0].image is None
    assert by[("test", "multimodal", "mc")][0].question.startswith("In which city")
    cloze = by[("retain", "text", "cloze")][0]
    assert cloze.question == "Person 002 was born in __." and cloze.answer == "City 002"
    # Images decode, and a Test-set view is one of the transformed portraits, chosen by the seed.
    img = b.image(by[("test", "multimodal", "gen")][0].image)
    assert img.mode == "RGB" and img.size == fx.portrait("001").size
    assert load_mllmu_bench(root, "forget_5").items == b.items


def test_a_forget_set_of_ids_reads_full_set(root):
    """Any forget set that is not an official split (the validation set, a list of ids): forget is its
    profiles' rows of Full_Set, retain every other profile of Full_Set, test their Test_Set rows."""
    b = load_mllmu_bench(root, ["003"])
    assert b.forget_ids == ("003",)
    assert {it.profile_id for it in b.items if it.set == "retain"} == {"001", "002", "004"}
    assert {it.profile_id for it in b.items if it.set == "test"} == {"003"}
    assert {it.profile_id for it in b.items if it.set == "celebrity"} == set(fx.CELEBS)
    forget_mc = next(it for it in b.items if (it.set, it.form, it.task) == ("forget", "multimodal", "mc"))
    assert forget_mc.image == "mllmu:Full_Set:003" and b.image(forget_mc.image).size == fx.portrait("003").size
    with pytest.raises(BenchmarkError, match=r"forget ids must be profiles of Full_Set .*1 are not: \['999'\]"):
        load_mllmu_bench(root, ["003", "999"])


def test_streams_are_the_benchmarks_own_questions_and_images(root):
    """MANU's activation streams on a real benchmark: the forget/retain profiles' generation pairs,
    image+text with the profile's own image key, text only without one; never an embedded portrait."""
    from manu_core.extract import match_retain
    from manu_core.portraits import image_for

    b = load_mllmu_bench(root, "forget_5", sets=("forget", "retain"))
    streams = b.streams()
    assert [s.sample_id for s in streams[("forget", "multimodal")]] == ["001/00/multimodal"]
    [mm], [txt] = streams[("forget", "multimodal")], streams[("forget", "text")]
    assert mm.image == "mllmu:forget_5:001" and mm.question == "What does this person do?"
    assert txt.image is None and txt.question == "What does Person 001 do?" and txt.answer == "Person 001 is a baker."
    assert {s.profile_id for s in streams[("retain", "text")]} == {"002", "003", "004"}
    matched = match_retain(streams, "match", seed=0)
    assert len(matched[("retain", "multimodal")]) == len(matched[("retain", "text")]) == 1
    # the retain pair kept is the same question in both forms
    pair = [matched[("retain", f)][0].sample_id.rsplit("/", 1) for f in ("multimodal", "text")]
    assert pair[0][0] == pair[1][0] and [p[1] for p in pair] == ["multimodal", "text"]
    import io

    from PIL import Image

    assert b.image(mm.image).tobytes() == Image.open(io.BytesIO(fx._png("001"))).convert("RGB").tobytes()
    with pytest.raises(ValueError, match="is not an embedded portrait"):
        image_for(mm.image)
    with pytest.raises(BenchmarkError, match="no generation QA pairs for the streams"):
        load_mllmu_bench(root, "forget_5", sets=("celebrity",)).streams()


def test_missing_config_and_column_are_named(root, tmp_path):
    with pytest.raises(BenchmarkError, match="folder not found"):
        load_mllmu_bench(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    shutil.rmtree(partial / "Retain_Set")
    with pytest.raises(BenchmarkError, match=r"config 'Retain_Set' is missing.*configs found: \['Full_Set', "):
        load_mllmu_bench(partial)
    assert load_mllmu_bench(partial, sets=("forget", "test", "retain")).items  # the other sets still load
    fx.write_config(partial, "retain_95", [{**fx._row("002"), "image": {"bytes": fx._png("002"), "path": None}}],
                    drop="Mask_Task")
    with pytest.raises(BenchmarkError, match=r"config 'retain_95' .* lacks column\(s\) \['Mask_Task'\]"):
        load_mllmu_bench(partial, sets=("retain",))
    with pytest.raises(BenchmarkError, match="forget split must be one of"):
        load_mllmu_bench(root, "forget_7")


@pytest.mark.usefixtures("one_thread")
def test_evaluates_the_real_layout_end_to_end(root, tiny_model, tmp_path):
    model, processor = tiny_model
    b = load_mllmu_bench(root)
    summaries = evaluate(model, processor, b.items, tmp_path, EvalConfig(mc_scorer="letter", max_new_tokens=8),
                         images=b.image, progress=False)
    report = format_report(summaries)
    assert [l.split(" | ")[0] for l in report.splitlines() if l.startswith("| ")][1:] == [
        "| forget", "| test", "| retain", "| celebrity"] and "MC `letter`" in report
    assert {s.n for s in summaries if s.set == "retain" and s.task == "mc"} == {3}
