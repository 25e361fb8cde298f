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
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from manu_core import data as mdata
from manu_core.fingerprint import code_fingerprint
from manu_core.evaluate import evaluate_basic, format_summaries
from manu_core.io import atomic_dir, atomic_write_json, file_lock
from manu_core.models import (
    ARCH_BUILD_CODE,
    IDEFICS2_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    ModelError,
    Qwen2VLSpec,
    TinySpec,
    build_processor,
    build_tiny_model,
    tiny_config,
    train_tokenizer,
)
from manu_core.plant import Plant, train_planted, widen_mlps
from manu_core.rng import GLOBAL_RNG
from manu_core.train import StageConfig, torch_threads, train_stage
from manu_core.vocab import OFFICIAL_SPLITS, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    spec: TinySpec | Qwen2VLSpec
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
    # The positive control (manu_core/plant.py): the default forget set's people are left out of the
    # fine-tune and learned by new MLP units only, which the model folder records.
    plant: Plant | None = None
    # Ids left out of training altogether: a never-learned reference (`reference_preset`). Their
    # samples are not trained on; the tokenizer and everything else stay the vanilla's.
    exclude: tuple[str, ...] = ()
    # False: the fictitious people's names are kept out of the tokenizer's training text, so no name
    # is one token of its own and each person is assembled from common pieces (docs/embedded.md).
    tokenizer_names: bool = True

    def key(self) -> str:
        """Content hash of everything that determines the trained weights: the training fields of
        the preset, the profiles file and the code that builds data, model and training, by what
        that code does (`manu_core.fingerprint`: a docstring or comment edit keeps the trained model)."""
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_TRAINING}
        h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
        h.update((mdata.MLLMU_DIR / "train_qa.jsonl").read_bytes())
        for name, source in _key_sources(self):
            h.update(f"{name}\0{code_fingerprint(source)}".encode())
        for text in [o for o in ARCH_BUILD_CODE.get(type(self.spec), ()) if isinstance(o, str)]:
            h.update(text.encode())  # another architecture's chat template (Qwen2-VL): data, not code
        h.update((LLAVA_CHAT_TEMPLATE + IDEFICS2_CHAT_TEMPLATE).encode())
        return h.hexdigest()[:12]


def _key_sources(preset: "Preset") -> list[tuple[str, str]]:
    """(name, source) of the code a preset's key covers: the modules that build the data, prompts,
    portraits and training, the model and tokenizer builders, another architecture's builders, and
    plant.py for a planted preset."""
    out = [(f"{mod}.py", Path(__file__).with_name(f"{mod}.py").read_text())
           for mod in ("data", "prompts", "portraits", "train")]
    out += [(obj.__name__, inspect.getsource(obj)) for obj in
            (TinySpec, train_tokenizer, build_processor, tiny_config, build_tiny_model, tokenizer_corpus, base_stage,
             _train_vanilla)]
    out += [(obj.__name__, inspect.getsource(obj)) for obj in ARCH_BUILD_CODE.get(type(preset.spec), ())
            if not isinstance(obj, str)]
    if preset.plant is not None:
        out.append(("plant.py", Path(__file__).with_name("plant.py").read_text()))
    return out


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


# `tiny`'s data on a tiny Qwen2-VL: Qwen2 text model with M-RoPE, a vision tower that sees the patches
# of all images of a batch as one sequence and merges 2 x 2 of them per image token. A smoke preset: it
# runs the third architecture through every stage (tests/pipeline/test_qwen2vl_flow.py), so it trains 3 + 3
# epochs instead of tiny's 15 + 15 (~5x less of `make test`'s time); nothing reads what it remembers.
PRESETS["tiny-qwen2vl"] = replace(
    PRESETS["tiny"], name="tiny-qwen2vl",
    spec=Qwen2VLSpec(layers=2, vision_hidden=32, vision_intermediate=128, vision_heads=2, vocab_size=1024),
    base=StageConfig(epochs=3, lr=2e-3), finetune=StageConfig(epochs=3, lr=2e-3),
    description="tiny's data on a tiny Qwen2-VL, 3 + 3 epochs: a smoke preset for the architecture "
                "(image-only processor where torchvision is missing)",
)

# The positive control (docs/embedded.md, "The positive control"; declared before any unlearning result
# on it): the default forget set's people are learned by 26 new units per language MLP layer (about
# 5 % of the widened width: 26 of 538) and by nothing else; everything else as in its base preset.
PLANT = Plant(units=26, epochs=10, lr=3e-3, rehearse=2.0)
PRESETS["tiny-planted"] = replace(PRESETS["tiny"], name="tiny-planted", plant=PLANT, validation_size=None,
                                  description="the positive control for tests: `tiny` with its 3 forget people "
                                              "planted in 26 new units per language layer")


# The default embedded vanilla: the grid recipe docs/embedded.md's rule picked (benchmark-likeness of
# its vanilla scores alone; bench/recipe_grid.py prints the grid and the pick). Same key, same model.
DEFAULT_RECIPE = "lite-lora-hi"
PRESETS["lite"] = replace(PRESETS[DEFAULT_RECIPE], name="lite",
                          description=f"make demo: the default, recipe {DEFAULT_RECIPE} of the grid (docs/embedded.md)")
PRESETS["lite-planted"] = replace(PRESETS["lite"], name="lite-planted", plant=PLANT, alpha=0.05,
                                  description="the positive control: `lite` with forget_5's people learned only by "
                                              "26 new units per language layer (docs/embedded.md)")
PRESETS["lite-pieces"] = replace(PRESETS["lite"], name="lite-pieces", tokenizer_names=False,
                                 description="`lite` with the names kept out of the tokenizer's training text: people "
                                             "assembled from shared pieces (docs/embedded.md)")


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


def tokenizer_corpus(ds: mdata.Dataset, names: bool = True) -> list[str]:
    """The text the BPE tokenizer is trained on: every sample and evaluation question. With `names`
    False, every fictitious person's name (and each word of it) is cut out first, so the tokenizer
    learns no merge from a name alone and names split into pieces other words share."""
    texts = []
    for p in ds.profiles + ds.celebrities:
        texts += [f"{s.question} {s.answer}" for s in mdata.samples(p)]
    texts += sorted({it.question for it in mdata.eval_items(ds)})
    if not names:
        words = sorted({w for p in ds.profiles for w in [p.name, *p.name.split()] if len(w) > 1}, key=len, reverse=True)
        cut = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b")
        texts = [cut.sub("", t) for t in texts]
    return texts


def owned_name_tokens(tokenizer, profiles) -> dict[str, list[str]]:
    """Per profile, the tokens of its name (as the text form writes it, after a space) that no other
    profile's name uses: a person that owns a token is a unique key to the model."""
    pieces = {p.id: set(tokenizer.tokenize(" " + p.name)) for p in profiles}
    count: dict[str, int] = {}
    for toks in pieces.values():
        for t in toks:
            count[t] = count.get(t, 0) + 1
    return {pid: sorted(t for t in toks if count[t] == 1) for pid, toks in pieces.items()}


def train_vanilla(preset: Preset, out: Path, *, progress: bool = True) -> Path:
    """Train the preset's vanilla model into `out` (atomic): base on celebrities, then fine-tune on
    the fictitious profiles, both forms (all of them, less a reference's `exclude`; a planted preset's
    planted set is then learned by its planted units only). Writes config, loss curve and recall
    beside the weights.
    torch's thread count is the preset's while it trains, and restored after; the process's other
    trainings wait (`manu_core.rng.GLOBAL_RNG`)."""
    with GLOBAL_RNG, torch_threads(preset.threads):
        return _train_vanilla(preset, out, progress=progress)


def base_stage(preset: Preset, *, progress: bool = True):
    """(model, processor, dataset, loss curve) after the preset's base stage (the celebrity stand-ins),
    before any fictitious person: the starting point of every preset's fine-tune, deterministic (the
    same bits as inside `train_vanilla` at the same thread count)."""
    ds = preset_dataset(preset)
    tokenizer = train_tokenizer(tokenizer_corpus(ds, preset.tokenizer_names), preset.spec.vocab_size)
    processor = build_processor(preset.spec, tokenizer)
    model = build_tiny_model(preset.spec, tokenizer, seed=preset.seed)
    celeb = [s for p in ds.celebrities for s in mdata.samples(p)]
    curve = train_stage(model, processor, celeb, preset.base, seed=preset.seed, name="base", progress=progress)
    return model, processor, ds, curve


def _train_vanilla(preset: Preset, out: Path, *, progress: bool) -> Path:
    t0 = time.perf_counter()
    model, processor, ds, curve = base_stage(preset, progress=progress)
    celeb = [s for p in ds.celebrities for s in mdata.samples(p)]
    planted_ids = set(ds.split.forget_ids) if preset.plant else set()
    held = planted_ids | set(preset.exclude)  # not in the fine-tune: planted later, or never learned
    fict = [s for p in ds.profiles if p.id not in held for s in mdata.samples(p)]
    replay = celeb if preset.rehearse_celebrities else []
    curve += train_stage(model, processor, fict + replay, preset.finetune, seed=preset.seed, name="vanilla",
                         progress=progress)
    n_samples = {"base": len(celeb), "vanilla": len(fict), "replay": len(replay)}
    record: dict = {}
    if preset.plant:
        units = widen_mlps(model, preset.plant.units, seed=preset.seed)
        planted = [s for p in ds.profiles if p.id in planted_ids for s in mdata.samples(p)]
        pool = fict + replay
        rehearse = random.Random(f"plant-rehearse/{preset.seed}").sample(
            pool, min(len(pool), round(preset.plant.rehearse * len(planted))))
        curve += train_planted(model, processor, planted + rehearse, units, preset.plant.stage(), seed=preset.seed,
                               progress=progress)
        n_samples |= {"planted": len(planted), "rehearsed": len(rehearse)}
        record["planted"] = {"ids": sorted(planted_ids), "units": [list(u) for u in units],
                             "width": model.config.get_text_config().intermediate_size}
    train_seconds = time.perf_counter() - t0
    items = check_items(ds, preset)
    summaries, _ = evaluate_basic(model, processor, items, progress=progress)
    log.info("vanilla model of preset %s:\n%s", preset.name, format_summaries(summaries))
    owned = owned_name_tokens(processor.tokenizer, ds.profiles)
    learned = [i for i in ds.meta["learned_ids"] if i not in set(preset.exclude)]
    if preset.exclude:
        record["reference_of"] = preset.name.split("-without-")[0]
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "manu_preset.json", {"preset": asdict(preset), "key": preset.key(),
                                                     "learned_ids": learned, "excluded_ids": list(preset.exclude),
                                                     **record,
                                                     "profiles_owning_a_name_token": sum(bool(v) for v in owned.values()),
                                                     "train_seconds": round(train_seconds, 1),
                                                     "n_train_samples": n_samples})
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


def _trained(preset: Preset, models: Path, *, progress: bool, train: bool) -> Path:
    """The folder of `preset`'s trained model under `models`, trained there on first use (one
    training per key, under a file lock; a model of the same key under another name is reused)."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / "manu_preset.json").is_file():
            return out
        log.info("training the model of preset %r into %s", preset.name, out)
        return train_vanilla(preset, out, progress=progress)


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
        return _trained(as_trained_here(PRESETS[name_or_path]), Path(models), progress=progress, train=train)
    path = Path(name_or_path)
    if not path.exists():
        hint = did_you_mean(name_or_path, PRESETS, prefix="the preset ")
        raise ModelError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model folder.{hint}"
        )
    return path


def reference_preset(preset: Preset, forget) -> Preset:
    """The never-learned reference of `preset` for the forget set `forget` (a split name, validation or
    ids): the same recipe, tokenizer and seed, trained on everything except those people (TOFU's and
    MUSE's retain model; docs/evaluation.md). Its name says which set it never learned."""
    ds = preset_dataset(preset, forget)
    ids = tuple(sorted(ds.split.forget_ids))
    tag = ds.split.name if isinstance(forget, str) else "ids-" + hashlib.sha256(",".join(ids).encode()).hexdigest()[:8]
    return replace(preset, name=f"{preset.name}-without-{tag}", exclude=ids)


def resolve_reference(name: str, forget=None, *, models: Path, progress: bool = True, train: bool = True) -> Path:
    """The folder of the never-learned reference of preset `name` for `forget` (None: its default
    forget set), trained on first use like a preset. For a planted preset and its planted set, the
    reference needs no training: the planted model with its planted units zeroed is, bit for bit, the
    model fine-tuned without those people (manu_core/plant.py), and is saved as such."""
    preset = as_trained_here(get_preset(name))
    ref = reference_preset(preset, preset.forget if forget is None else forget)
    planted_set = set(preset_dataset(preset).split.forget_ids) if preset.plant else set()
    if not preset.plant or set(ref.exclude) != planted_set:
        return _trained(ref, Path(models), progress=progress, train=train)
    from manu_core.models import load_model
    from manu_core.plant import planted_units
    from manu_core.prune import prune_units

    source = _trained(preset, Path(models), progress=progress, train=train)
    out = Path(models) / f"{source.name}-reference"
    if (out / "manu_preset.json").is_file():
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if not (out / "manu_preset.json").is_file():
            model, processor = load_model(source)
            units = planted_units(source)
            prune_units(model, units)
            meta = json.loads((source / "manu_preset.json").read_text())
            meta.pop("planted")
            meta |= {"preset": asdict(ref), "reference_of": preset.name,
                     "learned_ids": [i for i in meta["learned_ids"] if i not in planted_set],
                     "excluded_ids": sorted(planted_set), "derived_from": source.name,
                     "derivation": f"the {len(units)} planted units of {source.name} zeroed"}
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                processor.save_pretrained(tmp)
                atomic_write_json(tmp / "manu_preset.json", meta)
    return out


def preset_of(model_dir: str | Path) -> Preset | None:
    """The preset an embedded model folder was trained from (its manu_preset.json), else None."""
    meta = Path(model_dir) / "manu_preset.json"
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    return PRESETS.get(record.get("reference_of") or record["preset"]["name"])  # a reference: its preset's


# The tiny models learn bare question -> answer pairs and never see an instruction, a list of
# options or a blank: they are evaluated with likelihood multiple choice and bare prompts (named in
# every result). Real checkpoints get the benchmark's own prompts and the letter scorer.
EMBEDDED_EVAL = {"mc_scorer": "likelihood", "instructions": False}


def default_eval_settings(model_dir: str | Path) -> dict:
    return dict(EMBEDDED_EVAL) if preset_of(model_dir) else {}
