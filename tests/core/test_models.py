"""Tiny models: build, train, save/load, preset resolution and bad input."""

import json

import pytest
import torch

from manu_core import data as mdata
from manu_core.models import ARCHS, ModelError, TinySpec, build_processor, build_tiny_model, load_model, save_model, train_tokenizer
from manu_core.presets import PRESETS, get_preset, preset_dataset, resolve_model
from manu_core.prompts import encode_samples
from manu_core.train import answer_loss
from tests.core.helpers import SMALL



@pytest.fixture(scope="module")
def tokenizer():
    ds = mdata.build_dataset(n_profiles=30, n_celebrities=2)
    return train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512), ds


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_identical_logits(tmp_path, tokenizer, arch):
    tok, ds = tokenizer
    spec = TinySpec(arch=arch, **SMALL)
    model, proc = build_tiny_model(spec, tok, seed=1).eval(), build_processor(spec, tok)
    batch = encode_samples(proc, [s for s in mdata.samples(ds.profiles[0]) if s.image][:4])
    save_model(model, proc, tmp_path / "m")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "m").iterdir())
    model2, proc2 = load_model(tmp_path / "m")
    assert type(proc2).__name__ == type(proc).__name__
    batch2 = encode_samples(proc2, [s for s in mdata.samples(ds.profiles[0]) if s.image][:4])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k not in ("labels", "answer_mask")}).logits
        b = model2(**{k: v for k, v in batch2.items() if k not in ("labels", "answer_mask")}).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights(tokenizer, arch):
    tok, _ = tokenizer
    spec = TinySpec(arch=arch, **SMALL)
    a, b = build_tiny_model(spec, tok, seed=7), build_tiny_model(spec, tok, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_answer_loss_equals_model_loss(tokenizer):
    tok, ds = tokenizer
    spec = TinySpec(**SMALL)
    model, proc = build_tiny_model(spec, tok).eval(), build_processor(spec, tok)
    batch = encode_samples(proc, [s for s in mdata.samples(ds.profiles[1]) if s.image is None][:5])
    ref = model(**{k: v for k, v in batch.items() if k not in ("labels", "answer_mask")}, labels=batch["labels"]).loss
    assert torch.allclose(answer_loss(model, batch), ref, atol=1e-6)


@pytest.mark.slow
def test_training_is_deterministic_and_learns(tmp_path):
    """Twice the same bytes: once alone, once in a thread while baselines run in a second one, as the
    flow trains a never-learned reference beside phase one's baselines. Torch's random generator is the
    process's (each baseline seeds it; LoRA's dropout draws from it every step): trainings take turns on
    it (manu_core/rng.py), so the baselines beside it give the bytes they give alone too."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from manu_core.baselines import BaselineConfig, unlearn_gradient
    from manu_core.presets import train_vanilla
    from manu_core.train import StageConfig

    p = replace(get_preset("tiny"), n_profiles=6, n_celebrities=1, forget=("001",), threads=1,
                base=StageConfig(epochs=1), finetune=StageConfig(epochs=2, lora_r=4))
    a = train_vanilla(p, tmp_path / "a", progress=False)
    forget = [s for s in mdata.samples(preset_dataset(p).profiles[0]) if s.image][:8]

    def baseline() -> list[torch.Tensor]:  # gradient ascent with LoRA (the baselines' default): seeds, draws
        model, processor = load_model(a)
        out, _ = unlearn_gradient(model, processor, forget, [], BaselineConfig("ga", lr=1e-3), progress=False)
        return list(out.state_dict().values())

    alone = baseline()
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(lambda: [baseline() for _ in range(3)])
        b = pool.submit(train_vanilla, p, tmp_path / "b", progress=False).result()
        beside = beside.result()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert all(torch.equal(x, y) for run in beside for x, y in zip(run, alone))
    curve = json.loads((a / "loss_curve.json").read_text())
    epochs = [r for r in curve if "mean_loss" in r and r["stage"] == "vanilla"]
    assert epochs[-1]["mean_loss"] < epochs[0]["mean_loss"]
    for name in ("config.json", "manu_preset.json", "recall.json", "processor_config.json"):
        assert (a / name).is_file(), name


# Before the tests that need `tiny`: under `make test` another worker trains `tiny` meanwhile
# (tests/conftest.py, LONG_FILES), so this one trains its own preset instead of waiting.
@pytest.mark.slow
def test_tiny_idefics2_preset_learns_both_forms():
    from tasks.cache import models_dir

    path = resolve_model("tiny-idefics2", models=models_dir(), progress=False)
    assert json.loads((path / "config.json").read_text())["model_type"] == "idefics2"
    recall = json.loads((path / "recall.json").read_text())
    for r in recall:
        if r["set"] in ("forget", "retain"):
            assert r["value"] >= 0.8, r


def test_bad_inputs():
    with pytest.raises(ModelError, match="Unknown preset 'lit'. Did you mean 'lite'"):
        get_preset("lit")
    with pytest.raises(ModelError, match="neither a preset"):
        resolve_model("/no/such/model")
    with pytest.raises(ModelError, match="model path is not a folder: /no/such/model"):
        load_model("/no/such/model")
    with pytest.raises(ModelError, match="Did you mean the preset 'tiny'"):
        resolve_model("tyny")
    with pytest.raises(ValueError, match=r"needs the folder of trained presets: resolve_model\(name, models=...\)"):
        resolve_model("tiny")
    with pytest.raises(ModelError, match="Unknown arch 'qwen'"):
        TinySpec(arch="qwen")


@pytest.mark.slow  # two interpreters importing torch: ~10 s
def test_a_preset_resolved_by_two_processes_at_once_is_trained_once(tmp_path):
    """Two processes resolving the same untrained preset: one trains, the other waits for its lock and
    takes that model (the fake training writes what a trained folder holds and records itself)."""
    import subprocess
    import sys

    code = f"""
import os, time, json, sys
from pathlib import Path
import manu_core.presets as presets
def fake(preset, out, progress=True):
    with open({str(tmp_path / "trained.log")!r}, "a") as f:
        f.write(str(os.getpid()) + "\\n")
    time.sleep(1.0)
    out.mkdir(parents=True)
    (out / "manu_preset.json").write_text("{{}}")
    return out
presets.train_vanilla = fake
print(presets.resolve_model("tiny", models=Path({str(tmp_path / "models")!r}), progress=False))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].startswith(str(tmp_path / "models" / "tiny-"))
    assert len((tmp_path / "trained.log").read_text().split()) == 1  # trained once


def test_load_rejects_a_folder_without_config_and_a_file(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        load_model(tmp_path / "file")


def test_dtype_names_are_parsed_once_and_checked():
    from manu_core.models import as_dtype

    assert as_dtype("bfloat16") is torch.bfloat16 and as_dtype(torch.float16) is torch.float16 and as_dtype(None) is None
    for bad in ("float33", "Tensor", "nn"):  # not a name, or a torch attribute that is not a dtype
        with pytest.raises(ModelError, match=f"dtype must be one of float32, bfloat16, float16 .*; got '{bad}'"):
            as_dtype(bad)


@pytest.mark.slow
def test_load_rejects_bad_dtype_before_reading_weights(tiny_model_dir):
    with pytest.raises(ModelError, match="dtype must be one of float32, bfloat16, float16"):
        load_model(tiny_model_dir, dtype="float33")


@pytest.mark.slow
def test_a_bfloat16_model_stays_bfloat16_through_prune_and_baseline(tiny_model_dir, tmp_path):
    """Loading keeps the saved dtype, so the pruned and the unlearned model are saved in bfloat16,
    as the prune and baseline tasks do it (load_model without a dtype, then save)."""
    import polars as pl
    from safetensors import safe_open

    from manu_core.baselines import BaselineConfig, unlearn_gradient
    from manu_core.data import samples
    from manu_core.models import save_model
    from manu_core.presets import preset_dataset
    from manu_core.prune import prune_units, save_pruned

    model, processor = load_model(tiny_model_dir, dtype="bfloat16")
    save_model(model, processor, tmp_path / "bf16")

    def saved_dtypes(folder):
        with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
            return {str(f.get_tensor(k).dtype) for k in f.keys()}

    assert saved_dtypes(tmp_path / "bf16") == {"torch.bfloat16"}
    model, processor = load_model(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    table = pl.DataFrame({"tower": ["language"], "layer": [0], "unit": [0], "selected": [True]})
    save_pruned(model, processor, table, tmp_path / "pruned", report=prune_units(model, table))
    assert saved_dtypes(tmp_path / "pruned") == {"torch.bfloat16"}
    assert load_model(tmp_path / "pruned")[0].dtype == torch.bfloat16
    model, processor = load_model(tmp_path / "bf16")
    ds = preset_dataset(PRESETS["tiny"])
    forget = samples(ds.profile(ds.split.forget_ids[0]))[:4]
    unlearned, _ = unlearn_gradient(model, processor, forget, [], BaselineConfig("ga", lr=1e-4, lora=False),
                                    progress=False)
    save_model(unlearned, processor, tmp_path / "ga")
    assert saved_dtypes(tmp_path / "ga") == {"torch.bfloat16"}


def test_presets_keep_forget_profiles():
    for preset in PRESETS.values():
        ds = preset_dataset(preset)
        assert set(ds.split.forget_ids) <= {p.id for p in ds.profiles}


@pytest.mark.slow
def test_tiny_preset_learns_both_forms(tiny_model_dir):
    recall = json.loads((tiny_model_dir / "recall.json").read_text())
    by = {(r["set"], r["form"], r["metric"]): r["value"] for r in recall}  # metrics: accuracy (mc), recall (gen)
    for set_ in ("forget", "retain"):
        for form in ("multimodal", "text"):
            assert by[(set_, form, "accuracy")] >= 0.9, (set_, form, by)
            assert by[(set_, form, "recall")] >= 0.9, (set_, form, by)


def test_loading_loads_and_resolving_without_train_never_trains(tmp_path):
    """`load_model` takes a folder (a preset name is the presets' to resolve, said in the error);
    `resolve_model(train=False)` finds a trained preset or says how to train it, training nothing."""
    with pytest.raises(ModelError, match=r"presets.resolve_model\(name, models=...\) or `manu train <preset>`"):
        load_model("tiny")
    with pytest.raises(ModelError, match=r"preset 'tiny' has no trained model .* presets.resolve_model\('tiny', models"):
        resolve_model("tiny", models=tmp_path, train=False)
    assert not any(tmp_path.iterdir())


def test_a_preset_trained_with_fewer_threads_has_its_own_key():
    from manu_core.presets import as_trained_here
    from manu_core.train import torch_threads

    lite = PRESETS["lite"]
    with torch_threads(1):
        here = as_trained_here(lite)
    assert here.threads == 1 and here.key() != lite.key()
    with torch_threads(lite.threads):
        assert as_trained_here(lite) is lite


def test_torch_threads_are_restored_also_on_error():
    from manu_core.train import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
