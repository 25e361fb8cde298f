"""MLLMU-Bench-lite: real profiles, name substitution, splits, stand-in evaluation items."""

import hashlib
import re

import numpy as np
import pytest

from manu_core import data as mdata
from manu_core.vocab import EVAL_SETS, FORMS
from manu_core.portraits import image_for, portrait

SHA256 = {  # the copied files, byte for byte (data/mllmu_bench/PROVENANCE.md)
    "train_qa.jsonl": "95f2cb3c4d530270a005e5c2d84e73ca66fa45b62f4d27a7ab3840700fd33a9d",
    "splits/forget_5.json": "afab68514adf53b2c3824ce31d2d82fbfd8af0a70543c5a91a6f47569caa989d",
    "splits/forget_10.json": "632cf8c9369f08ee9052288931296905a12e032df0951d3f4b642c9aef0b0a99",
    "splits/forget_15.json": "76276ba6d9738a99b57c8db488b5f393f214fbeb24ff1fd1a7a5b8b9f190ebe1",
    "splits/retain_85.json": "3bb5a43518ac2e02899d506ef628261019dc8d9049e7024f0c591e61cbd05e6d",
    "splits/retain_90.json": "1d5a3b2ef9a14d0068e63868fb44b35f28e9e79f1bfb6b49800434832c971ab0",
    "splits/retain_95.json": "dc3ee24a98663217dc32bbbf3101201df807f2fa44530b9b0902f7cdd9dcd12d",
}


def test_copied_data_unchanged():
    for name, digest in SHA256.items():
        assert hashlib.sha256((mdata.MLLMU_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module")
def profiles():
    return mdata.load_profiles()


def test_real_profiles_loaded(profiles):
    assert len(profiles) == 500
    assert sum(len(p.all_qa) for p in profiles) == 7704


def test_every_profile_yields_a_name(profiles):
    for p in profiles:
        assert p.name and len(p.name.split()) >= 2, p.id
        assert p.name_qa is not None and p.name in p.name_qa.answer
        assert p.name[0].isupper()
    by_id = {p.id: p.name for p in profiles}
    assert by_id["001"] == "Amelia Kuznetsov"
    assert by_id["352"] == "Laila Arivola"  # a bare-name answer
    assert by_id["277"] == "Maya El Khoury"  # three words


def test_name_pair_dropped_and_no_subject_left_in_text_form(profiles):
    subject = re.compile(r"\b(this|the) (person|individual)\b", re.IGNORECASE)
    for p in profiles:
        text = [s for s in mdata.samples(p) if s.form == "text"]
        mm = [s for s in mdata.samples(p) if s.form == "multimodal"]
        assert len(mm) == len(p.all_qa) and len(text) == len(p.all_qa) - 1  # name pair only with the image
        for s in text:
            assert s.image is None
            assert not subject.search(s.question), s
            assert p.name in s.question or "image" not in s.question
        assert all(s.image == p.id for s in mm)


def test_text_form_substitution_examples():
    assert mdata.to_text_form("Where was this person born?", "Amelia Kuznetsov") == "Where was Amelia Kuznetsov born?"
    assert (mdata.to_text_form("What is this person's profession in the image?", "Ann Lee")
            == "What is Ann Lee's profession?")
    assert mdata.to_text_form("The individual's father is a baker.", "Ann Lee") == "Ann Lee's father is a baker."


def test_official_splits_honoured_and_disjoint(profiles):
    all_ids = tuple(p.id for p in profiles)
    for pct, retain in ((5, 95), (10, 90), (15, 85)):
        split = mdata.make_split(all_ids, f"forget_{pct}")
        assert len(split.forget_ids) == 5 * pct
        assert set(split.forget_ids) == set(mdata.load_official_split(f"forget_{pct}"))
        assert not set(split.forget_ids) & set(split.retain_ids)
        assert set(split.forget_ids) | set(split.retain_ids) == set(all_ids)
        official_retain = set(__import__("json").loads((mdata.MLLMU_DIR / "splits" / f"retain_{retain}.json").read_text()))
        assert set(split.retain_ids) == official_retain


def test_custom_forget_list_and_subset_keeps_forget(profiles):
    ds = mdata.build_dataset(forget=["001", "002"], n_profiles=10, n_celebrities=3)
    assert ds.split.forget_ids == ("001", "002")
    assert len(ds.profiles) == 10 and len(ds.split.retain_ids) == 8
    ds5 = mdata.build_dataset(forget="forget_5", n_profiles=40, n_celebrities=0)
    assert set(ds5.split.forget_ids) <= {p.id for p in ds5.profiles}


@pytest.mark.parametrize(
    "forget, message",
    [
        ([], "forget set is empty"),
        (["001", "999"], "unknown profile id"),
        (["1"], "unknown profile id"),
        ("forget_7", "Unknown split 'forget_7'"),
        (["001", "001"], "repeats ids"),
    ],
)
def test_bad_forget_lists(profiles, forget, message):
    with pytest.raises(mdata.DataError, match=message):
        mdata.make_split(tuple(p.id for p in profiles), forget)


def test_missing_profiles_file(tmp_path):
    with pytest.raises(mdata.DataError, match="not found"):
        mdata.load_profiles(tmp_path / "nope.jsonl")


def test_eval_items_shape_and_determinism():
    ds = mdata.build_dataset(n_profiles=40, n_celebrities=5, seed=3)
    items = mdata.eval_items(ds)
    assert items == mdata.eval_items(mdata.build_dataset(n_profiles=40, n_celebrities=5, seed=3))
    assert {it.set for it in items} == set(EVAL_SETS)
    assert {it.form for it in items} == set(FORMS) and {it.task for it in items} == {"mc", "gen", "cloze"}
    for it in items:
        assert it.source == "stand-in"
        if it.task == "mc":
            assert len(it.options) == 4 and len({o.lower() for o in it.options}) == 4
            assert it.options[it.correct] == it.key_fact
        if it.task == "cloze":
            assert "__" in it.question and it.answer == it.key_fact
        if it.form == "text":
            assert it.image is None
        if it.set == "test" and it.form == "multimodal":
            assert "@view" in it.image
    # Test set: same facts as Forget, other wording
    forget_q = {(it.profile_id, it.key_fact): it.question for it in items if it.set == "forget" and it.task == "gen"}
    test_q = {(it.profile_id, it.key_fact): it.question for it in items if it.set == "test" and it.task == "gen"}
    assert forget_q.keys() == test_q.keys()
    assert sum(forget_q[k] != test_q[k] for k in forget_q) == len(forget_q)


def test_celebrities_are_labelled_stand_ins():
    ds = mdata.build_dataset(n_profiles=30, n_celebrities=6)
    assert len(ds.celebrities) == 6 and len({c.name for c in ds.celebrities}) == 6
    assert all(c.source == "stand-in" and c.id.startswith("celeb-") for c in ds.celebrities)
    fictitious = {p.name for p in mdata.load_profiles()}
    assert not fictitious & {c.name for c in ds.celebrities}


def test_key_fact_examples():
    assert mdata.key_fact("Where was this person born?", "This person was born in Riga, Latvia.") == "Riga, Latvia"
    assert mdata.key_fact("What is this person's annual salary?", "This person's annual salary is $75,000.") == "$75,000"
    assert mdata.key_fact("What is this person's gender?", "This person is female.") == "female"


# ---------------------------------------------------------------------------------------------- portraits


def _digest(img):
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_portraits_deterministic():
    portrait.cache_clear()
    a = _digest(portrait("001"))
    portrait.cache_clear()
    assert _digest(portrait("001")) == a
    assert _digest(image_for("001@view2")) == _digest(portrait("001", 2))


def test_portraits_distinct_across_all_profiles(profiles):
    arrays = np.stack([np.asarray(portrait(p.id), dtype=np.float32) for p in profiles])  # (500, 64, 64, 3)
    assert len({_digest(portrait(p.id)) for p in profiles}) == 500
    flat = arrays.reshape(len(profiles), -1)
    sq = (flat**2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
    np.fill_diagonal(d2, np.inf)
    rms = np.sqrt(np.maximum(d2, 0) / flat.shape[1])
    assert rms.min() > 20, f"two portraits differ by only {rms.min():.1f} grey levels RMS"


def test_test_views_differ_but_resemble_the_person():
    base = np.asarray(portrait("010"), dtype=np.float32)
    other = np.asarray(portrait("011"), dtype=np.float32)
    for view in (1, 2, 3):
        v = np.asarray(portrait("010", view), dtype=np.float32)
        assert not np.array_equal(v, base)
        assert np.abs(v - base).mean() < np.abs(other - base).mean()


OFFICIAL = ("forget_5", "forget_10", "forget_15")


def test_a_model_that_learned_the_official_splits_forgets_any_of_them_retain_is_the_rest():
    union = {i for name in OFFICIAL for i in mdata.load_official_split(name)}
    assert len(union) == 138  # forget_10 and forget_15 are not supersets of forget_5
    learned = None
    for name in OFFICIAL:
        ds = mdata.build_dataset(forget=name, learn=OFFICIAL, n_profiles=200, n_celebrities=0)
        learned = learned or set(ds.meta["learned_ids"])
        assert set(ds.meta["learned_ids"]) == learned and len(learned) == 200 and union <= learned
        assert set(ds.split.forget_ids) == set(mdata.load_official_split(name))
        assert set(ds.split.retain_ids) == learned - set(ds.split.forget_ids)  # retain = learned - forget
        assert {p.id for p in ds.profiles} == learned


def test_forgetting_people_the_model_never_learned_is_refused_with_the_ids():
    with pytest.raises(mdata.DataError, match=r"never learned: \['001', '002'\].*ids among its 16 learned"):
        mdata.build_dataset(forget=["001", "002"], learn=(("093", "279", "303"),), n_profiles=16, n_celebrities=0)
    with pytest.raises(mdata.DataError, match=r"never learned.*one of the splits it learned \(forget_5\)"):
        mdata.build_dataset(forget="forget_10", learn=("forget_5",), n_profiles=150, n_celebrities=0)
    with pytest.raises(mdata.DataError, match="unknown profile id"):  # a typo is an unknown id, not "not learned"
        mdata.build_dataset(forget=["0933"], learn=(("093",),), n_profiles=16, n_celebrities=0)


def test_validation_forget_set_is_seeded_learned_and_outside_every_official_split():
    kw = dict(learn=OFFICIAL, n_profiles=200, n_celebrities=0, validation_size=25)
    ds = mdata.build_dataset(forget=mdata.VALIDATION, **kw)
    union = {i for name in OFFICIAL for i in mdata.load_official_split(name)}
    assert ds.split.name == "validation" and len(ds.split.forget_ids) == 25
    assert not set(ds.split.forget_ids) & union and set(ds.split.forget_ids) <= set(ds.meta["learned_ids"])
    assert ds.split.forget_ids == mdata.build_dataset(forget="validation", **kw).split.forget_ids
    assert ds.split.forget_ids != mdata.build_dataset(forget="validation", **{**kw, "seed": 1}).split.forget_ids
    with pytest.raises(mdata.DataError, match="needs 76 learned profiles outside the official splits"):
        mdata.build_dataset(forget="validation", **{**kw, "validation_size": 75})
    with pytest.raises(mdata.DataError, match="drawn from what a preset learned"):
        mdata.build_dataset(forget="validation", n_profiles=200, n_celebrities=0)
