"""Forgetting against a never-learned reference (manu_core/forget_quality.py) on hand-built answer
frames, and the option log-likelihoods the likelihood scorer keeps for it (manu_core/evaluate.py)."""

import io
import math

import numpy as np
import polars as pl
import pytest
import torch

import manu_core.evaluate as ev
from manu_core.data import EvalItem
from manu_core.forget_quality import (HEADROOM_SCHEMA, QUALITY_SCHEMA, TRUTH_SCHEMA, ForgetQualityError, forget_quality,
                                      headroom, truth_ratios)


def answers(scores: dict[str, list[float]], *, set_="forget", form="text", task="mc", scorer="likelihood",
            logprobs: dict[str, list[list[float]]] | None = None, correct: str = "A") -> pl.DataFrame:
    """One row per item: profile p's k-th item is f"{set_}-{form}-{p}-{k}", scored scores[p][k]; with
    `logprobs`, the mc items carry four options and those option log-likelihoods."""
    rows = []
    for p, ss in scores.items():
        for k, s in enumerate(ss):
            lp = logprobs[p][k] if logprobs else None
            rows.append({"item_id": f"{set_}-{form}-{p}-{k}", "set": set_, "form": form, "task": task,
                         "profile_id": p, "score": float(s), "scorer": scorer,
                         "options": ["o1", "o2", "o3", "o4"], "correct": correct, "option_logprobs": lp})
    return pl.DataFrame(rows, schema={"item_id": pl.String, "set": pl.String, "form": pl.String, "task": pl.String,
                                      "profile_id": pl.String, "score": pl.Float64, "scorer": pl.String,
                                      "options": pl.List(pl.String), "correct": pl.String,
                                      "option_logprobs": pl.List(pl.Float64)})


def ipc_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc(buf)
    return buf.getvalue()


# Vanilla knows the forget profiles (mostly right), the reference never learned them (mostly wrong).
VANILLA = {"p1": [1, 1, 1], "p2": [1, 1, 0], "p3": [1, 1, 1], "p4": [1, 0, 1], "p5": [1, 1, 1]}
REFERENCE = {"p1": [0, 0, 1], "p2": [0, 0, 0], "p3": [1, 0, 0], "p4": [0, 0, 0], "p5": [0, 1, 0]}
HALFWAY = {"p1": [1, 0, 1], "p2": [1, 0, 0], "p3": [1, 1, 0], "p4": [0, 0, 1], "p5": [1, 0, 0]}


# ----------------------------------------------------------------------------------------------
# headroom


def test_headroom_of_a_model_identical_to_the_reference_is_fully_closed():
    h = headroom(answers(VANILLA), answers(REFERENCE), answers(REFERENCE), n_boot=200)
    assert h.schema == pl.Schema(HEADROOM_SCHEMA) and h.height == 1
    r = h.row(0, named=True)
    assert (r["set"], r["form"], r["task"], r["scorer"]) == ("forget", "text", "mc", "likelihood")
    assert r["vanilla"] == pytest.approx(100 * 13 / 15) and r["reference"] == pytest.approx(100 * 3 / 15)
    assert r["headroom"] == pytest.approx(100 * 10 / 15) and r["drop"] == pytest.approx(r["headroom"])
    assert r["share"] == 1.0 and r["share_lo"] == 1.0 and r["share_hi"] == 1.0
    assert r["headroom_excludes_0"] and r["headroom_lo"] > 0
    assert r["share_undefined_draws"] == 0 and (r["n_profiles"], r["n_items"]) == (5, 15)


def test_headroom_of_a_model_identical_to_vanilla_is_not_closed_at_all():
    r = headroom(answers(VANILLA), answers(VANILLA), answers(REFERENCE), n_boot=200).row(0, named=True)
    assert r["drop"] == 0 and r["drop_lo"] == 0 and r["drop_hi"] == 0
    assert r["share"] == 0 and r["share_lo"] == 0 and r["share_hi"] == 0


def test_headroom_share_between_and_beyond_the_reference():
    r = headroom(answers(VANILLA), answers(HALFWAY), answers(REFERENCE), n_boot=500).row(0, named=True)
    assert r["unlearned"] == pytest.approx(100 * 7 / 15)
    assert r["share"] == pytest.approx((13 - 7) / (13 - 3))  # ratio of sums, not a mean of ratios
    assert r["share_lo"] <= r["share"] <= r["share_hi"]
    # Below the reference: forgot more than a model that never learned them (over-unlearning).
    zero = {p: [0] * 3 for p in VANILLA}
    r = headroom(answers(VANILLA), answers(zero), answers(REFERENCE), n_boot=200).row(0, named=True)
    assert r["share"] == pytest.approx(13 / 10) and r["share"] > 1


def test_headroom_interval_excludes_zero_only_when_it_should():
    # Retain-like: the reference learned these too; vanilla and reference differ only by noise.
    v = {"p1": [1, 1], "p2": [0, 0], "p3": [1, 0], "p4": [0, 1], "p5": [1, 1], "p6": [0, 0]}
    r = {"p1": [0, 0], "p2": [1, 1], "p3": [1, 0], "p4": [0, 1], "p5": [0, 0], "p6": [1, 1]}
    noisy = {"p1": [1, 0], "p2": [0, 1], "p3": [1, 1], "p4": [0, 1], "p5": [1, 0], "p6": [0, 1]}
    row = headroom(answers(v, set_="retain"), answers(noisy, set_="retain"), answers(r, set_="retain"),
                   n_boot=500).row(0, named=True)
    assert row["headroom"] == 0 and math.isnan(row["share"])
    assert row["headroom_lo"] <= 0 <= row["headroom_hi"] and not row["headroom_excludes_0"]
    assert row["share_undefined_draws"] > 0
    # Forget set: a clear gap.
    row = headroom(answers(VANILLA), answers(HALFWAY), answers(REFERENCE), n_boot=500).row(0, named=True)
    assert row["headroom_excludes_0"] and row["headroom_lo"] > 0
    # Reference above vanilla everywhere: the interval excludes 0 on the negative side.
    row = headroom(answers(REFERENCE), answers(REFERENCE), answers(VANILLA), n_boot=500).row(0, named=True)
    assert row["headroom_excludes_0"] and row["headroom_hi"] < 0


def test_headroom_groups_and_determinism():
    rng = np.random.default_rng(0)  # ROUGE-like scores in [0, 1], 12 profiles of 3 items
    v, u, r = ({f"p{i:02d}": (lo + 0.3 * rng.random(3)).tolist() for i in range(12)} for lo in (0.7, 0.4, 0.1))

    def three(seed):
        frames = [pl.concat([answers(s, form="text"), answers(s, form="multimodal"),
                             answers(s, form="text", task="gen", scorer="rouge-score")])
                  for s in (v, u, r)]
        return headroom(*frames, n_boot=300, seed=seed)

    a, b = three(7), three(7)
    assert a.height == 3 and ipc_bytes(a) == ipc_bytes(b)
    other = three(8)
    assert (a["headroom_lo"] != other["headroom_lo"]).all() and (a["share_hi"] != other["share_hi"]).all()
    assert (a["headroom"] == other["headroom"]).all()  # the point estimates do not depend on the seed
    # A group's interval does not depend on which other groups are present.
    alone = headroom(answers(v), answers(u), answers(r), n_boot=300, seed=7)
    same = a.filter((pl.col("form") == "text") & (pl.col("task") == "mc"))
    assert ipc_bytes(alone) == ipc_bytes(same)


def test_headroom_refuses_mismatched_rows_missing_columns_and_nan_scores():
    v, u, r = answers(VANILLA), answers(HALFWAY), answers(REFERENCE)
    with pytest.raises(ForgetQualityError, match=r"vanilla and reference must hold the same \(item_id, scorer\) rows; "
                                                 r"1 only in vanilla"):
        headroom(v, u, r.filter(pl.col("item_id") != "forget-text-p1-0"))
    with pytest.raises(ForgetQualityError, match="vanilla and unlearned must hold the same"):
        headroom(v, u.with_columns(scorer=pl.lit("letter")), r)
    with pytest.raises(ForgetQualityError, match=r"needs columns .*\['profile_id'\] missing"):
        headroom(v, u.drop("profile_id"), r)
    with pytest.raises(ForgetQualityError, match="'score' must be finite; 1 null/NaN/inf"):
        headroom(v, u, r.with_columns(score=pl.when(pl.col("item_id") == "forget-text-p2-1").then(float("nan"))
                                      .otherwise(pl.col("score"))))
    with pytest.raises(ForgetQualityError, match="has profile_id='p1' in vanilla but 'p9' in reference"):
        headroom(v, u, r.with_columns(profile_id=pl.when(pl.col("profile_id") == "p1").then(pl.lit("p9"))
                                      .otherwise(pl.col("profile_id"))))
    with pytest.raises(ForgetQualityError, match=r"each \(item_id, scorer\) must appear once"):
        headroom(pl.concat([v, v]), u, r)
    with pytest.raises(ForgetQualityError, match="empty table"):
        headroom(v.clear(), u, r)
    with pytest.raises(ForgetQualityError, match="n_boot must be >= 1"):
        headroom(v, u, r, n_boot=0)
    with pytest.raises(ForgetQualityError, match=r"level must be in \(0, 1\)"):
        headroom(v, u, r, level=1.0)


# ----------------------------------------------------------------------------------------------
# truth ratios


def test_truth_ratio_of_a_four_option_item_by_hand():
    lp = [-1.0, -2.0, -0.5, -3.0]
    tr = truth_ratios(answers({"p1": [1]}, logprobs={"p1": [lp]}, correct="A"))
    assert tr.schema == pl.Schema(TRUTH_SCHEMA)
    # R = mean over wrong options of P(w)^(1/len) / P(c)^(1/len) = mean exp(l_w - l_c)
    expected = (math.exp(-2.0 + 1.0) + math.exp(-0.5 + 1.0) + math.exp(-3.0 + 1.0)) / 3
    assert tr["truth_ratio"][0] == pytest.approx(expected, rel=1e-12)
    assert tr["truth_ratio"][0] == pytest.approx(0.717311, abs=1e-6)
    assert tr["log_truth_ratio"][0] == pytest.approx(math.log(expected), rel=1e-12)
    assert tr.row(0, named=True)["item_id"] == "forget-text-p1-0" and tr["profile_id"][0] == "p1"
    # The correct option is the third: R compares the other three with it.
    tr = truth_ratios(answers({"p1": [1]}, logprobs={"p1": [lp]}, correct="C"))
    assert tr["truth_ratio"][0] == pytest.approx((math.exp(-0.5) + math.exp(-1.5) + math.exp(-2.5)) / 3)
    # Equal likelihoods: no preference, R = 1. Huge gaps stay finite on the log scale.
    assert truth_ratios(answers({"p1": [0]}, logprobs={"p1": [[-2.0] * 4]}))["truth_ratio"][0] == pytest.approx(1.0)
    big = truth_ratios(answers({"p1": [0]}, logprobs={"p1": [[-900.0, 0.0, -900.0, -900.0]]}))
    assert big["log_truth_ratio"][0] == pytest.approx(900 - math.log(3))


def test_truth_ratios_refuse_what_cannot_give_them():
    lp = {"p1": [[-1.0, -2.0, -3.0, -4.0]]}
    with pytest.raises(ForgetQualityError, match=r"scored by \['letter'\], which keep no option likelihoods"):
        truth_ratios(answers({"p1": [1]}, scorer="letter"))
    with pytest.raises(ForgetQualityError, match="no option_logprobs column"):
        truth_ratios(answers({"p1": [1]}, logprobs=lp).drop("option_logprobs"))
    with pytest.raises(ForgetQualityError, match="1 of 1 likelihood-scored answers .* have no option_logprobs"):
        truth_ratios(answers({"p1": [1]}))
    with pytest.raises(ForgetQualityError, match="no multiple-choice answers"):
        truth_ratios(answers({"p1": [1]}, task="cloze", scorer="substring"))
    with pytest.raises(ForgetQualityError, match="one option log-likelihood per option"):
        truth_ratios(answers({"p1": [1]}, logprobs={"p1": [[-1.0, -2.0]]}))
    with pytest.raises(ForgetQualityError, match="non-finite option log-likelihoods"):
        truth_ratios(answers({"p1": [1]}, logprobs={"p1": [[-1.0, float("-inf"), -2.0, -3.0]]}))
    with pytest.raises(ForgetQualityError, match="correct='E'"):
        truth_ratios(answers({"p1": [1]}, logprobs=lp, correct="E"))
    with pytest.raises(ForgetQualityError, match=r"needs columns .*\['correct'\] missing"):
        truth_ratios(answers({"p1": [1]}, logprobs=lp).drop("correct"))


# ----------------------------------------------------------------------------------------------
# forget quality


def model_logprobs(kind: str, n_profiles: int = 10, n_items: int = 4, seed: int = 0) -> dict[str, list[list[float]]]:
    """Option log-likelihoods (correct option first) of a model that `knows` the answers, `never`
    learned them (no preference, noise) or was `over`-unlearned (avoids the correct one)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in range(n_profiles):
        items = []
        for _ in range(n_items):
            lp = -2.0 + 0.3 * rng.standard_normal(4)
            lp[0] += {"knows": 2.0, "never": 0.0, "over": -2.0}[kind]
            items.append(lp.tolist())
        out[f"p{p:02d}"] = items
    return out


def fq_answers(logprobs: dict[str, list[list[float]]], form: str = "text", **kw) -> pl.DataFrame:
    scores = {p: [float(np.argmax(lp) == 0) for lp in items] for p, items in logprobs.items()}
    return answers(scores, form=form, logprobs=logprobs, **kw)


def test_forget_quality_of_a_model_identical_to_the_reference():
    ref = pl.concat([fq_answers(model_logprobs("never"), form) for form in ("multimodal", "text")])
    q = forget_quality(ref, ref, n_boot=200)
    assert q.schema == pl.Schema(QUALITY_SCHEMA)
    assert q["form"].to_list() == ["multimodal", "text"] and q["available"].all()
    assert (q["paired_diff"] == 0).all() and (q["paired_lo"] == 0).all() and (q["paired_hi"] == 0).all()
    assert (q["ks_statistic"] == 0).all() and q["p_value"].to_list() == pytest.approx([1.0, 1.0])
    assert set(q["verdict"]) == {"not told apart"}
    assert q["n_items"].to_list() == [40, 40] and q["n_profiles"].to_list() == [10, 10]
    assert q["reason"].is_null().all()


def test_forget_quality_tells_under_and_over_forgetting_apart():
    ref = fq_answers(model_logprobs("never", seed=1))
    under = forget_quality(fq_answers(model_logprobs("knows", seed=2)), ref, n_boot=300).row(0, named=True)
    assert under["verdict"] == "under-forgotten" and under["paired_hi"] < 0
    assert under["paired_diff"] == pytest.approx(under["log_tr_unlearned"] - under["log_tr_reference"])
    assert under["p_value"] < 1e-6 and under["ks_statistic"] > 0.5
    over = forget_quality(fq_answers(model_logprobs("over", seed=2)), ref, n_boot=300).row(0, named=True)
    assert over["verdict"] == "over-forgotten" and over["paired_lo"] > 0 and over["p_value"] < 1e-6
    # Another draw of a never-learned model: not told apart from the reference.
    same = forget_quality(fq_answers(model_logprobs("never", seed=3)), ref, n_boot=300).row(0, named=True)
    assert same["verdict"] == "not told apart" and same["p_value"] > 0.05


def test_forget_quality_is_deterministic_and_reads_only_its_set():
    ref = fq_answers(model_logprobs("never", seed=1))
    un = fq_answers(model_logprobs("knows", seed=2))
    extra = answers({"q1": [1, 0]}, set_="retain", logprobs={"q1": [[-1.0] * 4, [-2.0] * 4]})
    a = forget_quality(pl.concat([un, extra]), ref, n_boot=300, seed=5)
    b = forget_quality(un, pl.concat([ref, extra]), n_boot=300, seed=5)
    assert ipc_bytes(a) == ipc_bytes(b)
    assert not a.equals(forget_quality(un, ref, n_boot=300, seed=6))
    r = forget_quality(pl.concat([un, extra]), pl.concat([ref, extra]), set_name="retain", n_boot=50)
    assert r.row(0, named=True)["n_items"] == 2 and r["paired_diff"][0] == 0


def test_forget_quality_is_unavailable_without_option_likelihoods():
    ref = fq_answers(model_logprobs("never"))
    letter = answers({p: [1] * 4 for p in model_logprobs("never")}, scorer="letter")
    q = forget_quality(letter, ref)
    assert q.height == 1 and not q["available"][0]
    assert "the unlearned answers were scored by ['letter']" in q["reason"][0]
    assert q["n_items"][0] == 40
    assert q.select("paired_diff", "paired_lo", "paired_hi", "verdict", "ks_statistic", "p_value").row(0) == (None,) * 6
    old = forget_quality(ref, ref.drop("option_logprobs"))
    assert not old["available"][0] and "reference answers have no option_logprobs column" in old["reason"][0]


def test_forget_quality_refuses_mismatched_items_and_missing_sets():
    ref = fq_answers(model_logprobs("never"))
    with pytest.raises(ForgetQualityError, match=r"unlearned and reference must hold the same \(item_id, scorer\)"):
        forget_quality(ref.head(30), ref)
    with pytest.raises(ForgetQualityError, match=r"no multiple-choice items of set 'test' \(sets: \['forget'\]\)"):
        forget_quality(ref, ref, set_name="test")
    with pytest.raises(ForgetQualityError, match=r"needs columns .*\['form'\] missing"):
        forget_quality(ref.drop("form"), ref)
    with pytest.raises(ForgetQualityError, match="n_boot must be >= 1"):
        forget_quality(ref, ref, n_boot=0)


# ----------------------------------------------------------------------------------------------
# evaluate.py: the likelihood scorer keeps its option log-likelihoods


def test_span_mean_logprobs_by_hand():
    # Three options of one item, 5 positions: the answers share position 1, differ from position 2.
    ids = torch.tensor([[9, 7, 1, 2, 0], [9, 7, 3, 0, 0], [9, 7, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    lp = torch.tensor([[-9.0, -0.5, -1.0, -2.0, -9.0], [-9.0, -0.5, -4.0, -9.0, -9.0],
                       [-9.0, -0.5, -1.0, -1.0, -4.0]])
    assert ev.span_mean_logprobs(ids, mask, lp) == pytest.approx([-1.5, -4.0, -2.0])
    # Identical options: every answer token counts.
    same = ids[:1].repeat(2, 1)
    assert ev.span_mean_logprobs(same, mask[:1].repeat(2, 1), lp[:1].repeat(2, 1)) == pytest.approx(
        [-3.5 / 3, -3.5 / 3])


def _item(k: int, task: str) -> EvalItem:
    return EvalItem(item_id=f"i{k}-{task}", set="forget", profile_id="p1", form="text", task=task,
                    question=f"question {k}", answer="fact", key_fact="fact",
                    options=("fact", "b", "c", "d") if task == "mc" else (), correct=0 if task == "mc" else -1,
                    cloze_answer="it is __")


class _Model:
    def eval(self) -> None:
        pass


def test_likelihood_rows_keep_option_logprobs_and_old_parts_still_resume(tmp_path, monkeypatch):
    fake = {"i0-mc": [-2.0, -0.5, -1.0, -1.5], "i1-mc": [-0.1, -2.0, -2.5, -3.0]}
    monkeypatch.setattr(ev, "option_logprobs", lambda model, processor, chunk, **kw: {it.item_id: fake[it.item_id]
                                                                                     for it in chunk})
    monkeypatch.setattr(ev, "generate_texts", lambda model, processor, reqs, **kw: ["fact"] * len(reqs))
    monkeypatch.setattr(ev, "build_prompt", lambda *a, **k: "prompt")
    items = [_item(k, t) for t in ("mc", "cloze") for k in (0, 1)]
    cfg = ev.EvalConfig(mc_scorer="likelihood", instructions=False, chunk_size=1)
    # A part written before option_logprobs existed (the old schema), then the rest.
    parts = tmp_path / "unit" / "parts"
    parts.mkdir(parents=True)
    score = ev._Scorer(_Model(), None, cfg, ev.make_judge("offline"), lambda key: None, "cpu", [])
    old = pl.DataFrame(score("mc", items[:1]), schema=ev.ANSWER_SCHEMA).drop("option_logprobs")
    ev.evaluate_unit(_Model(), None, items, tmp_path / "unit", cfg, images=lambda key: None, progress=False)
    old.write_parquet(parts / "mc-00000.parquet")  # replace the first part by its old-schema twin
    (tmp_path / "unit" / "answers.parquet").unlink()
    (tmp_path / "unit" / "summary.json").unlink()
    res = ev.evaluate_unit(_Model(), None, items, tmp_path / "unit", cfg, images=lambda key: None, progress=False)
    assert res.resumed_chunks == 4
    a = pl.read_parquet(tmp_path / "unit" / "answers.parquet")
    assert a.schema == pl.Schema(ev.ANSWER_SCHEMA)
    by = {r["item_id"]: r for r in a.iter_rows(named=True)}
    assert by["i0-mc"]["option_logprobs"] is None  # the old part: null, not invented
    assert by["i1-mc"]["option_logprobs"] == fake["i1-mc"]
    assert by["i1-mc"]["choice"] == "ABCD"[int(np.argmax(fake["i1-mc"]))] == "A" and by["i1-mc"]["score"] == 1.0
    assert a.filter(pl.col("task") == "cloze")["option_logprobs"].is_null().all()
    # A fresh unit: every likelihood row has them, consistent with its choice (the argmax).
    ev.evaluate_unit(_Model(), None, items, tmp_path / "fresh", cfg, images=lambda key: None, progress=False)
    assert ev.read_answers(tmp_path).height == 8  # an old-vintage unit and a new one read together
    fresh = pl.read_parquet(tmp_path / "fresh" / "answers.parquet")
    mc = fresh.filter(pl.col("task") == "mc").sort("item_id")
    assert mc["option_logprobs"].to_list() == [fake["i0-mc"], fake["i1-mc"]]
    assert [r["choice"] for r in mc.iter_rows(named=True)] == ["ABCD"[int(np.argmax(fake[i]))] for i in mc["item_id"]]
    tr = truth_ratios(fresh).sort("item_id")
    assert tr["item_id"].to_list() == ["i0-mc", "i1-mc"] and tr["truth_ratio"][1] < 1 < tr["truth_ratio"][0]
    # The letter scorer's rows have none.
    letter = ev._Scorer(_Model(), None, ev.EvalConfig(), ev.make_judge("offline"), lambda key: None, "cpu", [])
    assert letter("mc", items[:1])[0]["option_logprobs"] is None
