"""The gradient baselines' losses on hand-made batches, LoRA merging, and the prompting baseline."""

import copy

import pytest
import torch

from manu_core import data as mdata
from manu_core.baselines import (LOSSES, BaselineConfig, BaselineError, add_lora, merge_lora,
                                 nll, npo_loss, retain_kl, sequence_logprob, unlearn_gradient)
from manu_core.presets import get_preset, preset_dataset
from manu_core.prompts import encode_samples
from manu_core.vocab import PROMPTING_SYSTEM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(tiny_model):
    _, processor = tiny_model
    ds = preset_dataset(get_preset("tiny"))
    forget = [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid)) if s.form == "multimodal"]
    retain = [s for pid in ds.split.retain_ids for s in mdata.samples(ds.profile(pid)) if s.form == "multimodal"]
    return forget, retain, encode_samples(processor, forget[:4]), encode_samples(processor, retain[:4])


def fresh(tiny_model):
    model, _ = tiny_model
    return copy.deepcopy(model).eval()


def test_nll_is_the_language_modelling_loss(tiny_model, batches):
    model = fresh(tiny_model)
    _, _, f, _ = batches
    with torch.no_grad():
        ref = model(**{k: v for k, v in f.items() if k != "answer_mask"}).loss
        assert nll(model, f, "cpu") == pytest.approx(float(ref), rel=1e-5)


def test_loss_signs(tiny_model, batches):
    model = fresh(tiny_model)
    _, _, f, r = batches
    cfg = BaselineConfig("ga", lora=False)
    with torch.no_grad():
        nf, nr = nll(model, f, "cpu"), nll(model, r, "cpu")
        assert LOSSES["ga"].fn(model, f, None, None, cfg, "cpu") == pytest.approx(float(-nf))
        assert LOSSES["grad_diff"].fn(model, f, r, None, cfg, "cpu") == pytest.approx(float(-nf + nr), rel=1e-5)
        # KL against an identical frozen copy is 0, so kl = ga there.
        assert float(retain_kl(model, copy.deepcopy(model), r, "cpu")) == pytest.approx(0.0, abs=1e-6)
        # NPO against itself: (2/β) log 2, whatever the batch.
        assert LOSSES["npo"].fn(model, f, None, copy.deepcopy(model), BaselineConfig("npo", beta=0.4),
                                "cpu") == pytest.approx(2 / 0.4 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_npo_loss_shape_and_reduction():
    lm, lr = torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -5.0])
    want = (2 / 0.9) * torch.log1p(torch.exp(0.9 * (lm - lr))).mean()
    assert npo_loss(lm, lr, 0.9) == pytest.approx(float(want))
    assert npo_loss(lm + 1, lr, 0.9) > npo_loss(lm, lr, 0.9)  # more likely forget answers cost more


def test_npo_small_beta_points_where_ga_points(tiny_model, batches):
    """β -> 0: ∇ NPO -> ∇ log π_θ(y|x), the direction gradient ascent moves (one sample)."""
    _, _, f, _ = batches
    one = {k: v[:1] for k, v in f.items()}

    def grad(loss_fn):
        model = fresh(tiny_model)
        model.zero_grad()
        loss_fn(model).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref = fresh(tiny_model)
    with torch.no_grad():
        ref_lp = sequence_logprob(ref, one, "cpu")
    g_npo = grad(lambda m: npo_loss(sequence_logprob(m, one, "cpu"), ref_lp, 1e-4))
    g_ga = grad(lambda m: -nll(m, one, "cpu"))
    cos = torch.nn.functional.cosine_similarity(g_npo, g_ga, dim=0)
    assert float(cos) > 0.999


def test_ga_raises_the_forget_loss(tiny_model, batches):
    forget, retain, f, r = batches
    model, processor = fresh(tiny_model), tiny_model[1]
    before = float(nll(model, f, "cpu").detach())
    out, curve = unlearn_gradient(model, processor, forget[:8], retain, BaselineConfig("ga", lora=False, lr=1e-3),
                                  progress=False)
    assert curve and all(c["method"] == "ga" for c in curve)
    assert float(nll(out, f, "cpu").detach()) > before


@pytest.mark.parametrize("method", ["grad_diff", "kl", "npo"])
def test_each_gradient_method_runs_and_is_deterministic(tiny_model, batches, method):
    forget, retain, _, _ = batches
    processor = tiny_model[1]
    frozen = fresh(tiny_model) if LOSSES[method].frozen else None
    runs = [unlearn_gradient(fresh(tiny_model), processor, forget[:8], retain, BaselineConfig(method, lr=1e-3),
                             frozen=frozen, progress=False) for _ in range(2)]
    (m1, c1), (m2, c2) = runs
    assert c1 == c2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not any("lora" in k for k in m1.state_dict())  # adapters merged


def test_lora_merge_gives_the_unmerged_logits(tiny_model, batches):
    _, _, f, _ = batches
    peft_model = add_lora(fresh(tiny_model), BaselineConfig("ga"))
    names = [n for n, _ in peft_model.named_parameters() if "lora_B" in n]
    assert names and all("language_model" in n for n in names)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # nonzero adapters (B starts at 0)
        peft_model.eval()
        inputs = {k: v for k, v in f.items() if k not in ("labels", "answer_mask")}
        unmerged = peft_model(**inputs).logits
        merged = merge_lora(peft_model)(**inputs).logits
    assert not torch.allclose(unmerged, fresh(tiny_model)(**inputs).logits, atol=1e-3)
    assert torch.allclose(unmerged, merged, atol=1e-4)


def test_config_errors():
    with pytest.raises(BaselineError, match="unknown gradient baseline 'prompting'"):
        BaselineConfig("prompting")
    with pytest.raises(BaselineError, match="beta must be > 0"):
        BaselineConfig("npo", beta=0)
    with pytest.raises(BaselineError, match="forms must be"):
        BaselineConfig("ga", forms=("audio",))


def test_prompting_reaches_the_model_input(tiny_model, monkeypatch, tmp_path):
    import manu_core.evaluate as ev

    model, processor = tiny_model
    items = [it for it in mdata.eval_items(preset_dataset(get_preset("tiny")))
             if it.set == "forget" and it.form == "text" and it.task == "gen"][:3]
    seen = []
    real = ev.generate_texts

    def spy(m, p, requests, **kw):
        seen.extend(requests)
        return real(m, p, requests, **kw)

    monkeypatch.setattr(ev, "generate_texts", spy)
    ev.evaluate_unit(model, processor, items, tmp_path, ev.EvalConfig(mc_scorer="likelihood", instructions=False,
                                                                    system=PROMPTING_SYSTEM, max_new_tokens=4),
                     progress=False)
    assert seen and all(r.prompt.startswith(PROMPTING_SYSTEM) for r in seen)
    ids = processor.tokenizer(seen[0].prompt)["input_ids"]
    sys_ids = processor.tokenizer(PROMPTING_SYSTEM, add_special_tokens=False)["input_ids"]
    assert any(ids[i:i + len(sys_ids)] == sys_ids for i in range(len(ids)))


@pytest.mark.parametrize("arch", ["llava", "idefics2"])
def test_lora_targets_the_language_model_of_each_architecture(arch):
    """LoRA sits on every attention and MLP projection of the language model, none in the vision tower
    or the connector (Idefics2's connector has gate/up/down projections too)."""
    from manu_core import data as mdata
    from manu_core.arch import get_adapter
    from manu_core.models import TinySpec, build_tiny_model, train_tokenizer
    from tests.core.helpers import SMALL

    ds = mdata.build_dataset(forget=["001"], n_profiles=2, n_celebrities=0)
    tok = train_tokenizer([s.question for p in ds.profiles for s in mdata.samples(p)], 256)
    model = build_tiny_model(TinySpec(arch=arch, **SMALL), tok, seed=0)
    layers = get_adapter(model).language.layers
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                and any(n.startswith(p + ".") for p in layers)
                and n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    peft_model = add_lora(model, BaselineConfig("ga"))
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert expected and wrapped == expected
    merged = merge_lora(peft_model)
    assert not any("lora" in k for k in merged.state_dict())


@pytest.mark.slow
def test_npo_reference_is_the_recipe_on_retain_only(tmp_path, monkeypatch):
    """NPO's π_ref on an embedded preset is the forget set's never-learned reference (flows/pipeline.py,
    _npo_reference): the preset's two stages (celebrity base, then the fine-tune) on every learned
    profile but the forget set, saved as a loadable model. (Two steps a stage here: what is checked is
    what it trains on and what it writes, not how well.)"""
    from dataclasses import replace

    import manu_core.presets as presets
    import manu_core.train as mtrain
    from manu_core.models import load_model
    from manu_core.presets import PRESETS, preset_dataset, reference_preset

    preset = PRESETS["tiny"]
    short = replace(preset, base=replace(preset.base, max_steps=2), finetune=replace(preset.finetune, max_steps=2))
    seen, real = {}, mtrain.train_stage
    spy = lambda model, processor, samples, cfg, **kw: (  # noqa: E731
        seen.__setitem__(kw["name"], {s.profile_id for s in samples}), real(model, processor, samples, cfg, **kw))[1]
    monkeypatch.setattr(presets, "train_stage", spy)
    forget = list(preset.forget)
    out = presets.train_vanilla(reference_preset(short, forget), tmp_path / "reference", progress=False)
    ds = preset_dataset(preset)
    assert seen["base"] == {p.id for p in ds.celebrities}
    assert seen["vanilla"] == {p.id for p in ds.profiles} - set(forget) | (
        {p.id for p in ds.celebrities} if preset.rehearse_celebrities else set())
    assert load_model(out)[0].config.model_type == "llava"
