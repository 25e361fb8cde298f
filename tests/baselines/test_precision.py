"""Training over half-precision weights (manu_core/train.py, "Precision").

What is asserted, and the tolerance:
  merge      a merged bfloat16 weight is *bit for bit* the float32 reference, (W.float() + scaling·B@A).to(bf16):
             tolerance 0 ulp, since both are the same float32 sum rounded once. It is also within half a
             bfloat16 ulp of the exact (float64) W + ΔW, i.e. the nearest bfloat16. The naive merge, ΔW cast
             to bfloat16 and then added in bfloat16, rounds twice: the hand-computed case below loses the
             whole update, and on random weights some elements land one ulp off.
  adapters   over bfloat16/float16 frozen weights the LoRA adapters are float32, get finite nonzero
             gradients, and an update far below a bfloat16 ulp still moves them.
  full       full training of a bfloat16 model equals training its float32 copy and casting once.
  float16    the loss is scaled: a gradient that underflows float16 without scaling reaches the weight.
fp16 runs on the CPU in torch (slowly, which does not matter at these sizes), so both half dtypes are covered.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model

import manu_core.train as mtrain
from manu_core import data as mdata
from manu_core.arch import mlp_sites
from manu_core.baselines import BaselineConfig, add_lora, merge_lora, unlearn_gradient
from manu_core.models import TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prompts import encode_samples
from manu_core.prune import prune_units, pruned_weights_are_zero
from manu_core.relearn import relearn
from manu_core.train import (StageConfig, answer_loss, float32_master_weights, loss_scaler, optimizer_step,
                             train_stage)

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_ULP_AT_1 = 2.0**-7  # bfloat16 keeps 8 significant bits: the spacing of [1, 2)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (x = m·2^e with m in [0.5, 1): ulp = 2^(e-8))."""
    _, e = torch.frexp(x.double())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 8)


@pytest.fixture(scope="module")
def tiny():
    """(samples, tokenizer, spec): an untrained tiny LLaVA's ingredients (built per test: it trains in place)."""
    ds = mdata.build_dataset(forget=["001", "002"], n_profiles=4, n_celebrities=0)
    samples = [s for p in ds.profiles for s in mdata.samples(p)]
    tok = train_tokenizer([f"{s.question} {s.answer}" for s in samples], 512)
    spec = TinySpec(arch="llava", hidden=32, intermediate=64, layers=2, vision_hidden=32, vision_intermediate=64)
    return samples, tok, spec


def model_in(tiny, dtype):
    samples, tok, spec = tiny
    return build_tiny_model(spec, tok, seed=1).to(dtype).eval(), build_processor(spec, tok)


def lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def reference_merge(layer) -> torch.Tensor:
    """The float32 reference: W upcast, plus scaling·B@A in float32, cast once to W's dtype."""
    w = layer.get_base_layer().weight
    delta = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    return (w.float() + delta * layer.scaling["default"]).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# Merge


class One(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(x)


def test_merge_keeps_an_update_of_just_over_half_an_ulp_that_the_naive_merge_loses():
    """On paper: W = 1, ΔW = 2^-8 + 2^-16 (just over half the ulp 2^-7 of [1, 2)). Nearest bfloat16 to
    1 + ΔW is 1 + 2^-7. Naive: ΔW in bfloat16 is 2^-8 (8 significant bits), and 1 + 2^-8 is a tie that
    rounds to even, 1: the update is gone."""
    d = 2.0**-8 + 2.0**-16
    peft_model = get_peft_model(One(torch.ones(2, 2, dtype=torch.bfloat16)),
                                LoraConfig(r=1, lora_alpha=2, target_modules=["lin"]))  # scaling α/r = 2
    (layer,) = lora_layers(peft_model).values()
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters autocast to float32
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(d / 2)  # ΔW = 2 · (d/2) · 1 = d
    naive = torch.ones(2, 2, dtype=torch.bfloat16) + torch.full((2, 2), d).to(torch.bfloat16)
    assert torch.equal(naive, torch.ones(2, 2, dtype=torch.bfloat16))  # the teeth: double rounding loses it
    merged = merge_lora(peft_model)
    assert isinstance(merged, One) and merged.lin.weight.dtype == torch.bfloat16
    assert torch.equal(merged.lin.weight, torch.full((2, 2), 1 + BF16_ULP_AT_1, dtype=torch.bfloat16))


def test_merge_of_random_adapters_is_the_float32_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = (1 + torch.rand(64, 48, generator=g)).to(torch.bfloat16)  # weights ~1: ulp 2^-7
    peft_model = get_peft_model(One(w), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    (layer,) = lora_layers(peft_model).values()
    with torch.no_grad():  # ΔW of a few ulps and less: every element sits near a rounding boundary somewhere
        layer.lora_A["default"].weight.copy_(torch.randn(4, 48, generator=g) * 0.03)
        layer.lora_B["default"].weight.copy_(torch.randn(64, 4, generator=g) * 0.03)
    delta = 2 * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    ref = reference_merge(layer)
    exact = w.double() + delta.double()
    naive = w + delta.to(torch.bfloat16)
    merged = merge_lora(peft_model).lin.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, ref)  # tolerance: 0 ulp
    assert ((merged.double() - exact).abs() <= 0.5 * bf16_ulp(exact) * (1 + 2.0**-16)).all()  # the nearest bfloat16
    assert (merged != w).any()  # the update is there
    assert (naive != ref).any()  # and the naive merge is one ulp off somewhere (teeth)
    assert ((naive.double() - ref.double()).abs() <= bf16_ulp(ref)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_on_a_tiny_half_precision_llava_equals_the_float32_reference(tiny, dtype):
    model, _ = model_in(tiny, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, BaselineConfig("ga"))
    layers = lora_layers(peft_model)
    assert layers and {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.01)  # B starts at 0: make ΔW nonzero
    refs = {n.removeprefix("base_model.model.") + ".weight": reference_merge(m) for n, m in layers.items()}
    merged = merge_lora(peft_model)
    assert merged is model
    state = merged.state_dict()
    assert not any("lora" in k for k in state) and {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    assert refs.keys() <= state.keys()
    for k, v in state.items():
        if k in refs:
            assert torch.equal(v, refs[k]), k  # tolerance: 0 ulp of the float32 reference
        else:
            assert torch.equal(v, before[k]), k  # no other weight moves
    assert any(not torch.equal(state[k], before[k]) for k in refs)


# ----------------------------------------------------------------------------------------------
# Training: float32 adapters, loss scaling, float32 master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_adapters_are_float32_over_half_weights_with_finite_nonzero_gradients(tiny, dtype):
    samples, _, _ = tiny
    model, proc = model_in(tiny, dtype)
    peft_model = add_lora(model, BaselineConfig("ga"))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert {p.dtype for p in peft_model.parameters() if not p.requires_grad} == {dtype}  # the base stays half
    peft_model.train()
    loss = answer_loss(model, encode_samples(proc, [s for s in samples if s.form == "multimodal"][:4]))
    loss.backward()
    grads = {n: p.grad for n, p in trainable.items()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (A's are 0 while B is 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_stage_on_half_weights_trains_float32_adapters_and_merges_them_exactly(tiny, dtype, monkeypatch):
    """train_stage (the relearning attacks' and presets' loop) with LoRA at lr 1e-4: an AdamW step of
    ~1e-4 on an A entry of ~0.1 is under half a bfloat16 ulp (2.4e-4), so bfloat16 adapters would not
    move; float32 ones do. The merge seen from inside equals the float32 reference."""
    samples, _, _ = tiny
    model, proc = model_in(tiny, dtype)
    seen = {}
    real = mtrain.merge_lora

    def spy(peft_model):
        layers = lora_layers(peft_model)
        seen["dtypes"] = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
        seen["a_moved"] = [not torch.equal(m.lora_A["default"].weight, seen["a0"][n]) for n, m in layers.items()]
        seen["refs"] = {n.removeprefix("base_model.model.") + ".weight": reference_merge(m) for n, m in layers.items()}
        return real(peft_model)

    real_lora = mtrain.lora_model

    def lora_spy(*a, **kw):
        peft_model = real_lora(*a, **kw)
        seen["a0"] = {n: m.lora_A["default"].weight.detach().clone() for n, m in lora_layers(peft_model).items()}
        return peft_model

    monkeypatch.setattr(mtrain, "merge_lora", spy)
    monkeypatch.setattr(mtrain, "lora_model", lora_spy)
    curve = train_stage(model, proc, samples, StageConfig(epochs=1, lr=1e-4, batch_size=4, max_steps=3, lora_r=4),
                        seed=0, progress=False)
    losses = [r["loss"] for r in curve if "step" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert seen["dtypes"] == {torch.float32} and all(seen["a_moved"])
    state = model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    assert all(torch.equal(state[k], ref) for k, ref in seen["refs"].items())


def test_float16_loss_scaling_rescues_a_gradient_that_underflows():
    """loss = 1e-8 · Σ W·a with W float16 (frozen, ones) and a float32 (trainable, like an adapter):
    ∂loss/∂(W·a) = 1e-8 is under float16's smallest subnormal (6e-8) and flushes to 0 unscaled; scaled
    by 2^16 it survives, and after unscaling ∂loss/∂a = 4e-8 per entry."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(4, 4, bias=False, dtype=torch.float16).requires_grad_(False)
            torch.nn.init.ones_(self.frozen.weight)
            self.a = torch.nn.Parameter(torch.zeros(4))

        def loss(self):
            return 1e-8 * self.frozen(self.a.half()).float().sum()

    def step(scaled: bool) -> torch.Tensor:
        toy = Toy()
        opt = torch.optim.SGD([toy.a], lr=1.0)
        scaler = loss_scaler(toy) if scaled else torch.amp.GradScaler("cpu", enabled=False)
        optimizer_step(toy.loss(), opt, [toy.a], scaler)
        return toy.a.detach()

    assert loss_scaler(Toy()).is_enabled()
    assert not loss_scaler(Toy().to(torch.bfloat16)).is_enabled() and not loss_scaler(torch.nn.Linear(2, 2)).is_enabled()
    assert torch.equal(step(scaled=False), torch.zeros(4))  # the teeth: unscaled, the update underflows away
    assert torch.allclose(step(scaled=True), torch.full((4,), -4e-8), rtol=1e-2)


def test_float32_master_weights_accumulate_updates_a_bfloat16_weight_would_round_away():
    """Ten SGD steps of +0.4 ulp each on a bfloat16 weight of 1: in bfloat16 each one rounds away
    (1 + 0.4 ulp -> 1); on the float32 master weight they add up to 4 ulp, cast once at the end."""

    def train(master: bool) -> torch.Tensor:
        lin = torch.nn.Linear(1, 1, bias=False, dtype=torch.bfloat16)
        torch.nn.init.ones_(lin.weight)
        with float32_master_weights(lin) if master else nullcontext():
            opt = torch.optim.SGD(lin.parameters(), lr=0.4 * BF16_ULP_AT_1)
            for _ in range(10):
                (-lin.weight.sum()).backward()  # gradient -1: each step adds lr
                opt.step()
                opt.zero_grad()
            if master:
                assert lin.weight.dtype == torch.float32
        return lin.weight.detach()

    assert train(master=False).item() == 1.0  # the teeth
    master = train(master=True)
    assert master.dtype == torch.bfloat16 and master.item() == 1 + 4 * BF16_ULP_AT_1


def test_full_training_of_a_bfloat16_model_equals_its_float32_copy_cast_once(tiny):
    samples, _, _ = tiny
    model, proc = model_in(tiny, torch.bfloat16)
    ref = copy.deepcopy(model).float()
    cfg = StageConfig(epochs=1, lr=1e-3, batch_size=4, max_steps=3)
    train_stage(model, proc, samples, cfg, seed=0, progress=False)
    train_stage(ref, proc, samples, cfg, seed=0, progress=False)
    got, want = model.state_dict(), ref.to(torch.bfloat16).state_dict()
    assert {v.dtype for v in got.values() if v.is_floating_point()} == {torch.bfloat16}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("lora", [False, True])
def test_baseline_on_bfloat16_trains_in_float32_and_returns_bfloat16(tiny, lora):
    """unlearn_gradient: full training equals the float32 copy's cast once; LoRA comes back merged."""
    samples, _, _ = tiny
    forget = [s for s in samples if s.form == "multimodal"][:8]
    model, proc = model_in(tiny, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BaselineConfig("ga", lora=lora, lr=1e-3, lora_r=4)
    out, curve = unlearn_gradient(copy.deepcopy(model), proc, forget, [], cfg, progress=False)
    state = out.state_dict()
    assert curve and all(torch.isfinite(torch.tensor(c["loss"])) for c in curve)
    assert not any("lora" in k for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}
    assert any(not torch.equal(state[k], before[k]) for k in state)
    if not lora:
        ref, _ = unlearn_gradient(copy.deepcopy(model).float(), proc, forget, [], cfg, progress=False)
        want = ref.to(torch.bfloat16).state_dict()
        assert all(torch.equal(state[k], want[k]) for k in state)


def test_kl_baseline_with_lora_over_float16_runs_with_loss_scaling(tiny):
    samples, _, _ = tiny
    forget = [s for s in samples if s.form == "multimodal" and s.profile_id in ("001", "002")]
    retain = [s for s in samples if s.form == "multimodal" and s.profile_id not in ("001", "002")]
    model, proc = model_in(tiny, torch.float16)
    out, curve = unlearn_gradient(copy.deepcopy(model), proc, forget, retain, BaselineConfig("kl", lr=1e-3, lora_r=4),
                                  frozen=copy.deepcopy(model), progress=False)
    assert curve and all(torch.isfinite(torch.tensor(c["loss"])) for c in curve)
    assert {v.dtype for v in out.state_dict().values() if v.is_floating_point()} == {torch.float16}


def test_relearn_frozen_mask_holds_on_a_bfloat16_model_trained_as_float32(tiny):
    """relearn's full fine-tune of a pruned bfloat16 model: trained as float32 (the gradient masks are
    hooks on the Parameter objects, which the upcast keeps), pruned units exactly zero, bfloat16 after."""
    samples, _, _ = tiny
    model, proc = model_in(tiny, torch.bfloat16)
    selection = [(s.tower, s.layer, u) for s in mlp_sites(model) for u in (0, 5, 9)]
    prune_units(model, selection)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    relearn(model, proc, [s for s in samples if s.form == "text"], StageConfig(epochs=1, lr=1e-2, batch_size=4,
                                                                                max_steps=3),
            selection=selection, progress=False)
    assert pruned_weights_are_zero(model, selection)
    state = model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}
    assert any(not torch.equal(before[k], v) for k, v in state.items())
