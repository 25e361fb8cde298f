"""Logit lens: per-layer answer probability; at the last layer it is the model's own probability."""

import numpy as np
import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import ArchError
from manu_core.lens import _answer_targets, language_readout, lens_table, logit_lens
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prompts import encode_samples, model_inputs
from tests.core.helpers import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def own_probability(model, processor, samples) -> float:
    """The model's own mean answer-token probability (the final logits), per sample then averaged."""
    batch = encode_samples(processor, samples, with_answers=True)
    rows, pos, tok = _answer_targets(batch, 1)
    with torch.no_grad():
        probs = torch.softmax(model(**model_inputs(batch)).logits.double(), -1)
    p = probs[rows, pos].gather(-1, tok[:, None])[:, 0]
    per_sample = torch.zeros(len(samples), dtype=torch.float64).index_add_(0, rows, p) / torch.bincount(rows)
    return float(per_sample.mean())


@pytest.fixture(scope="module")
def tiny_samples(tiny_model_dir):
    from manu_core.presets import get_preset, preset_dataset

    ds = preset_dataset(get_preset("tiny"))
    return [s for p in ds.profiles[:3] for s in mdata.samples(p)]


def test_last_layer_equals_the_models_own_probability(tiny_model, tiny_samples):
    model, processor = tiny_model
    for form in ("multimodal", "text"):
        samples = [s for s in tiny_samples if s.form == form][:6]
        lens = logit_lens(model, processor, samples, batch_size=4)
        assert lens.shape == (model.config.text_config.num_hidden_layers,)
        assert lens[-1] == pytest.approx(own_probability(model, processor, samples), abs=1e-9)
        assert np.all((lens > 0) & (lens < 1))


def test_trained_model_carries_the_answer_more_in_later_layers(tiny_model, tiny_samples):
    model, processor = tiny_model
    lens = logit_lens(model, processor, tiny_samples[:8])
    assert lens[-1] > lens[0] and lens[-1] > 0.5  # the tiny model learned these QA pairs


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_holds_on_each_architecture(arch):
    ds = mdata.build_dataset(forget=["001"], n_profiles=3, n_celebrities=0)
    samples = [s for p in ds.profiles for s in mdata.samples(p)][:6]
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 400)
    spec = TinySpec(arch=arch, **SMALL)
    model, processor = build_tiny_model(spec, tok, seed=1).eval(), build_processor(spec, tok)
    for form in ("multimodal", "text"):
        sub = [s for s in samples if s.form == form]
        assert logit_lens(model, processor, sub)[-1] == pytest.approx(own_probability(model, processor, sub), abs=1e-9)


def test_lens_table_caps_samples_per_stream_with_a_seed(tiny_model, tiny_samples):
    model, processor = tiny_model
    streams = {("forget", "text"): [s for s in tiny_samples if s.form == "text"],
               ("forget", "multimodal"): [s for s in tiny_samples if s.form == "multimodal"]}
    a = lens_table(model, processor, streams, max_samples=3, seed=1)
    assert a.columns == ["split", "form", "layer", "prob", "samples"]
    assert a.height == 2 * model.config.text_config.num_hidden_layers and set(a["samples"]) == {3}
    assert a.equals(lens_table(model, processor, streams, max_samples=3, seed=1))
    assert not a.equals(lens_table(model, processor, streams, max_samples=3, seed=2))


def test_errors_name_the_problem(tiny_model):
    model, processor = tiny_model
    with pytest.raises(ValueError, match="at least one sample"):
        logit_lens(model, processor, [])
    with pytest.raises(ArchError, match="Unknown architecture"):
        language_readout(torch.nn.Linear(2, 2))
