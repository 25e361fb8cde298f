"""Likelihood multiple choice reads each question once (its KV cache serves every option): the scores
must be those of one forward per option over the whole prompt + answer, on every architecture."""

import pytest
import torch

from manu_core import data as mdata
from manu_core.evaluate import _by_form, option_logprobs, span_mean_logprobs
from manu_core.models import ARCHS, Qwen2VLSpec, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.portraits import image_for
from manu_core.prompts import build_prompt, encode, model_inputs
from tests.core.helpers import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def whole_sequence_scores(model, processor, items) -> dict[str, list[float]]:
    """The plain way: every option row is the whole prompt (image included) + its answer, one by one."""
    out = {}
    for it in items:
        prompt = build_prompt(processor, it.question, image=it.image is not None)
        im = image_for(it.image) if it.image else None
        answers = [it.cloze_answer.replace("__", o) if "__" in it.cloze_answer else o for o in it.options]
        enc = encode(processor, [prompt] * len(answers), [im] * len(answers), answers)
        logp = torch.log_softmax(model(**model_inputs(enc)).logits.float()[:, :-1], -1)
        target = enc["input_ids"][:, 1:]
        tok_lp = logp.gather(-1, target[..., None])[..., 0]
        out[it.item_id] = span_mean_logprobs(target, enc["answer_mask"][:, 1:], tok_lp)
    return out


def _model(arch: str, texts: list[str]):
    tok = train_tokenizer(texts, 400)
    spec = Qwen2VLSpec(hidden=32, intermediate=64, layers=2, heads=2, vision_hidden=32, vision_intermediate=64,
                       vision_heads=2, mrope_section=(2, 3, 3)) if arch == "qwen2_vl" else TinySpec(arch=arch, **SMALL)
    return build_tiny_model(spec, tok, seed=3).eval(), build_processor(spec, tok)


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2_vl"])
def test_cached_prompt_scores_equal_whole_sequence_scores(arch):
    ds = mdata.build_dataset(forget=["001"], n_profiles=4, n_celebrities=0)
    texts = [f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)]
    texts += [it.question for it in mdata.eval_items(ds)]
    model, processor = _model(arch, texts)
    mc = [it for it in mdata.eval_items(ds) if it.task == "mc"]
    mc = [it for form in _by_form(mc) for it in form[:6]]  # both forms; prompts of several lengths per batch
    assert {it.form for it in mc} == {"multimodal", "text"} and len({len(it.question) for it in mc}) > 3
    fast = option_logprobs(model, processor, mc, batch_size=4, progress=False)
    slow = whole_sequence_scores(model, processor, mc)
    assert fast.keys() == slow.keys()
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-5), key
    # The scores separate the options (an untrained model is not flat), so the comparison has teeth.
    assert max(max(s) - min(s) for s in slow.values()) > 1e-3


def test_trained_model_picks_the_same_options(tiny_model):
    model, processor = tiny_model
    from manu_core.presets import get_preset, preset_dataset

    items = [it for it in mdata.eval_items(preset_dataset(get_preset("tiny"))) if it.task == "mc"]
    items = [it for form in _by_form(items) for it in form[:16]]
    fast = option_logprobs(model, processor, items, batch_size=8, progress=False)
    slow = whole_sequence_scores(model, processor, items)
    for key, s in slow.items():
        assert fast[key] == pytest.approx(s, abs=1e-4), key
        assert max(range(len(s)), key=s.__getitem__) == max(range(len(s)), key=fast[key].__getitem__)
