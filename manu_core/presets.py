"""Embedded presets: a tiny model + MLLMU-Bench-lite configuration that trains on a laptop CPU.

`resolve_model("lite", models=folder)` returns the folder of the trained vanilla model of a preset
(under `folder`, which the caller chooses: tasks.cache.models_dir() in the pipeline), training it
the first time (content-addressed: the folder name hashes the preset, the data and the training
code, so a change retrains instead of reusing a stale model). Anything that is not a preset name
is taken as a local checkpoint path (a real LLaVA-1.5 / Idefics2).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from manu_core import data as mdata
from manu_core.evaluate import evaluate_basic, format_summaries
from manu_core.io import atomic_dir, atomic_write_json, file_lock
from manu_core.models import (
    IDEFICS2_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    ModelError,
    TinySpec,
    build_processor,
    build_tiny_model,
    tiny_config,
    train_tokenizer,
)
from manu_core.train import StageConfig, torch_threads, train_stage
from manu_core.vocab import OFFICIAL_SPLITS, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    spec: TinySpec
    n_profiles: int | None  # None: all 500 fictitious profiles
    n_celebrities: int
    base: StageConfig  # pretraining on the celebrity stand-ins
    finetune: StageConfig  # vanilla fine-tune on the fictitious profiles
    # Keep rehearsing the celebrity samples during the fine-tune. A tiny model forgets its
    # "pretraining" within a few epochs of new data, which a 7B model does not: without this the
    # Real-Celebrity set would measure the fine-tune's forgetting, not the unlearning's.
    rehearse_celebrities: bool = True
    forget: str | tuple[str, ...] = "forget_5"  # the default forget set of a run (`make demo`)
    # What the model learns: every profile of these splits (names or id tuples; None: `forget`), then
    # seeded others up to n_profiles. A run may forget any of them; retain = learned - forget.
    learn: tuple[str | tuple[str, ...], ...] | None = None
    validation_size: int | None = None  # the seeded validation forget set (data.validation_ids); None: none
    seed: int = 0
    threads: int = 2
    eval_profiles: int = 0  # per set, for the recall/MC check written beside the model (0: all)
    alpha: float = 0.05  # MANU's α when a run sets none (RunConfig.resolved_alpha; documented per preset in the README)
    description: str = ""

    def key(self) -> str:
        """Content hash of everything that determines the trained weights: the training fields of
        the preset, the profiles file and the code that builds data, model and training."""
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_TRAINING}
        h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
        h.update((mdata.MLLMU_DIR / "train_qa.jsonl").read_bytes())
        for mod in ("data", "prompts", "portraits", "train"):
            h.update((Path(__file__).with_name(f"{mod}.py")).read_bytes())
        for obj in (TinySpec, train_tokenizer, build_processor, tiny_config, build_tiny_model, _train_vanilla):
            h.update(inspect.getsource(obj).encode())
        h.update((LLAVA_CHAT_TEMPLATE + IDEFICS2_CHAT_TEMPLATE).encode())
        return h.hexdigest()[:12]


# Preset fields that do not change the trained weights (so editing them keeps the cached model).
_NOT_TRAINING = frozenset({"name", "description", "eval_profiles", "alpha", "validation_size"})


OFFICIAL_LEARN = OFFICIAL_SPLITS

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="for tests: 16 profiles incl. 3 forget, 4 celebrities, a 2-layer LLaVA; trains in ~35 s",
            spec=TinySpec(layers=2, vision_hidden=32, vision_intermediate=128, vision_heads=2, vocab_size=1024),
            n_profiles=16, n_celebrities=4, forget=("093", "279", "303"), validation_size=3,
            base=StageConfig(epochs=15, lr=2e-3), finetune=StageConfig(epochs=15, lr=2e-3),
        ),
        Preset(
            name="tiny-idefics2",
            description="the `tiny` preset on a tiny Idefics2 (Mistral text model, perceiver connector)",
            spec=TinySpec(arch="idefics2", layers=2, vision_hidden=32, vision_intermediate=128, vision_heads=2,
                          vocab_size=1024),
            n_profiles=16, n_celebrities=4, forget=("093", "279", "303"),
            base=StageConfig(epochs=15, lr=2e-3), finetune=StageConfig(epochs=15, lr=2e-3),
        ),
        Preset(
            name="lite-v1",
            description="round 1's default: 150 profiles (forget_5 + 125 seeded retain), memorised (15 full epochs)",
            spec=TinySpec(),
            n_profiles=150, n_celebrities=30,
            base=StageConfig(epochs=20), finetune=StageConfig(epochs=15),
            eval_profiles=50, alpha=0.1,
        ),
        # The recipe grid (docs/embedded.md, "Recipe grid"), declared before any unlearning result
        # on them: each learns the 138 profiles of forget_5/10/15 plus 62 seeded others, and differs
        # only in how the vanilla fine-tune is done. The default is chosen by benchmark-likeness.
        *(
            Preset(
                name=f"lite-{tag}",
                description=f"recipe grid: {what}",
                spec=spec, n_profiles=200, n_celebrities=30, learn=OFFICIAL_LEARN, validation_size=25,
                base=StageConfig(epochs=20), finetune=finetune, eval_profiles=50, alpha=0.1,
            )
            for tag, what, spec, finetune in (
                ("memorise", "15 full epochs at lr 1e-3 (round 1's regime)", TinySpec(), StageConfig(epochs=15)),
                ("short", "3 full epochs at lr 1e-3", TinySpec(), StageConfig(epochs=3)),
                ("lora", "LoRA r16 on the language model, 5 epochs at lr 1e-3 (the benchmark's recipe, tiny lr)",
                 TinySpec(), StageConfig(epochs=5, lora_r=16)),
                ("lora-hi", "LoRA r16 on the language model, 5 epochs at lr 3e-3",
                 TinySpec(), StageConfig(epochs=5, lr=3e-3, lora_r=16)),
                ("wide", "MLP twice as wide (1024), 3 full epochs at lr 1e-3",
                 TinySpec(intermediate=1024), StageConfig(epochs=3)),
            )
        ),
    )
}


# The default embedded vanilla: the grid recipe docs/embedded.md's rule picked (benchmark-likeness of
# its vanilla scores alone; bench/recipe_grid.py prints the grid and the pick). Same key, same model.
DEFAULT_RECIPE = "lite-lora-hi"
PRESETS["lite"] = replace(PRESETS[DEFAULT_RECIPE], name="lite",
                          description=f"make demo: the default, recipe {DEFAULT_RECIPE} of the grid (docs/embedded.md)")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        hint = did_you_mean(name, PRESETS)
        raise ModelError(f"Unknown preset {name!r}.{hint} Available: {', '.join(PRESETS)} (`manu presets`).")
    return PRESETS[name]


def preset_dataset(preset: Preset, forget=None) -> mdata.Dataset:
    return mdata.build_dataset(**preset_data_spec(preset, forget))


def preset_data_spec(preset: Preset, forget=None) -> dict:
    """`build_dataset`'s arguments for a run of `preset` that forgets `forget` (None: its default)."""
    return {"forget": preset.forget if forget is None else forget, "n_profiles": preset.n_profiles,
            "n_celebrities": preset.n_celebrities, "seed": preset.seed,
            "learn": preset.learn if preset.learn is not None else (preset.forget,),  # what it was trained on
            "validation_size": preset.validation_size}


def tokenizer_corpus(ds: mdata.Dataset) -> list[str]:
    texts = []
    for p in ds.profiles + ds.celebrities:
        texts += [f"{s.question} {s.answer}" for s in mdata.samples(p)]
    texts += sorted({it.question for it in mdata.eval_items(ds)})
    return texts


def train_vanilla(preset: Preset, out: Path, *, progress: bool = True) -> Path:
    """Train the preset's vanilla model into `out` (atomic): base on celebrities, then fine-tune on
    all fictitious profiles, both forms. Writes config, loss curve and recall beside the weights.
    torch's thread count is the preset's while it trains, and restored after."""
    with torch_threads(preset.threads):
        return _train_vanilla(preset, out, progress=progress)


def _train_vanilla(preset: Preset, out: Path, *, progress: bool) -> Path:
    ds = preset_dataset(preset)
    tokenizer = train_tokenizer(tokenizer_corpus(ds), preset.spec.vocab_size)
    processor = build_processor(preset.spec, tokenizer)
    model = build_tiny_model(preset.spec, tokenizer, seed=preset.seed)
    celeb = [s for p in ds.celebrities for s in mdata.samples(p)]
    fict = [s for p in ds.profiles for s in mdata.samples(p)]
    replay = celeb if preset.rehearse_celebrities else []
    t0 = time.perf_counter()
    curve = train_stage(model, processor, celeb, preset.base, seed=preset.seed, name="base", progress=progress)
    curve += train_stage(model, processor, fict + replay, preset.finetune, seed=preset.seed, name="vanilla",
                         progress=progress)
    train_seconds = time.perf_counter() - t0
    items = check_items(ds, preset)
    summaries, _ = evaluate_basic(model, processor, items, progress=progress)
    log.info("vanilla model of preset %s:\n%s", preset.name, format_summaries(summaries))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "manu_preset.json", {"preset": asdict(preset), "key": preset.key(),
                                                     "learned_ids": list(ds.meta["learned_ids"]),
                                                     "train_seconds": round(train_seconds, 1),
                                                     "n_train_samples": {"base": len(celeb), "vanilla": len(fict),
                                                                         "replay": len(replay)}})
        atomic_write_json(tmp / "loss_curve.json", curve)
        atomic_write_json(tmp / "recall.json", [asdict(s) for s in summaries])
    return out


def check_items(ds: mdata.Dataset, preset: Preset) -> list[mdata.EvalItem]:
    """Forget, retain and celebrity items (both forms) for the post-training check; retain capped
    to `eval_profiles` seeded profiles."""
    keep = set(ds.split.forget_ids) | {c.id for c in ds.celebrities}
    retain = list(ds.split.retain_ids)
    if preset.eval_profiles:
        retain = random.Random(f"check/{preset.seed}").sample(retain, min(len(retain), preset.eval_profiles))
    keep |= set(retain)
    return [it for it in mdata.eval_items(ds) if it.set in ("forget", "retain", "celebrity") and it.profile_id in keep]


def eval_subset(ds: mdata.Dataset, preset: Preset, retain_profiles: int = 25) -> list[mdata.EvalItem]:
    """Every evaluation item of Forget, Test and Celebrity; Retain capped to `retain_profiles` seeded
    profiles (the benchmarks' quick evaluation)."""
    retain = set(random.Random(f"demo-retain/{preset.seed}").sample(list(ds.split.retain_ids),
                                                                    min(retain_profiles, len(ds.split.retain_ids))))
    return [it for it in mdata.eval_items(ds) if it.set != "retain" or it.profile_id in retain]


def as_trained_here(preset: Preset) -> Preset:
    """The preset as this process trains it: never more torch threads than the process has."""
    threads = min(preset.threads, torch.get_num_threads())
    return replace(preset, threads=threads) if threads < preset.threads else preset


def resolve_model(name_or_path: str | Path, *, models: Path | None = None, progress: bool = True,
                  train: bool = True) -> Path:
    """A preset name -> its trained vanilla model folder under `models` (trained on first use; with
    `train` False, a ModelError instead of training); a path -> itself.

    Training never uses more torch threads than the process has (`as_trained_here`): a process
    limited to one thread (a test worker) trains with one, and since the thread count changes the
    bytes, that model gets its own key instead of posing as the two-thread one."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        if models is None:
            raise ValueError(f"resolving the preset {name_or_path!r} needs the folder of trained presets: "
                             "resolve_model(name, models=...) (the pipeline's is tasks.cache.models_dir()).")
        preset = as_trained_here(PRESETS[name_or_path])
        key = preset.key()
        out = Path(models) / f"{preset.name}-{key}"
        if (out / "manu_preset.json").is_file():
            return out
        # the same key is the same training, bit for bit: reuse a model another name of it trained
        same = sorted(p for p in out.parent.glob(f"*-{key}") if (p / "manu_preset.json").is_file())
        if same:
            return same[0]
        if not train:
            raise ModelError(f"preset {preset.name!r} has no trained model under {out.parent} yet. Train it first: "
                             f"presets.resolve_model({preset.name!r}, models=...) (or `manu train {preset.name}`).")
        # One training per folder: a second process resolving the same preset (another flow, a test
        # worker) waits for the first and takes its model instead of training it again.
        with file_lock(out.parent / f".{out.name}.lock"):
            if (out / "manu_preset.json").is_file():
                return out
            log.info("training the vanilla model of preset %r into %s", preset.name, out)
            return train_vanilla(preset, out, progress=progress)
    path = Path(name_or_path)
    if not path.exists():
        hint = did_you_mean(name_or_path, PRESETS, prefix="the preset ")
        raise ModelError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model folder.{hint}"
        )
    return path


def preset_of(model_dir: str | Path) -> Preset | None:
    """The preset an embedded model folder was trained from (its manu_preset.json), else None."""
    meta = Path(model_dir) / "manu_preset.json"
    if not meta.is_file():
        return None
    name = json.loads(meta.read_text())["preset"]["name"]
    return PRESETS.get(name)


# The tiny models learn bare question -> answer pairs and never see an instruction, a list of
# options or a blank: they are evaluated with likelihood multiple choice and bare prompts (named in
# every result). Real checkpoints get the benchmark's own prompts and the letter scorer.
EMBEDDED_EVAL = {"mc_scorer": "likelihood", "instructions": False}


def default_eval_settings(model_dir: str | Path) -> dict:
    return dict(EMBEDDED_EVAL) if preset_of(model_dir) else {}
