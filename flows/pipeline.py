"""The `manu` Prefect flow: one unlearning run, or a sweep, as a DAG of cached tasks.

    prefect deployment run manu/smoke        # the embedded preset, small caps (prefect.yaml)
    prefect deployment run manu/full-sweep   # forget_{5,10,15} x scoring mode x α {2,5,10,20%}, random controls,
                                             # importance ablations, the baselines
    manu run [--preset lite] [--alpha 0.1] [--scoring released] [--method random]   # from the command line

Parameters are validated pydantic models (`RunConfig`, `SweepConfig`; the UI renders them as
forms). A sweep reuses one extraction and one set of importance sums per forget split for every
scoring mode (manu_core.importance.SCORING_MODES: paper, released, selective) and α; every method
is an entry of `METHODS`, so a baseline joins the sweep by adding one. `random` is the control of
each full-weight MANU variant: as many neurons per tower, drawn uniformly, per seed. Variants are
unlearned one after another, each one's evaluations queued as soon as its model exists
(`start_one`), and collected in order afterwards (`finish_one`), so the device evaluates while the
next variant is pruned.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Union

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manu_core.data import MLLMU_DIR, VALIDATION
from manu_core.importance import SCORING_MODES, WEIGHT_NAMES, ImportanceParams, mode_defaults
from manu_core.relearn import ATTACKS as RELEARN_ATTACKS, MASKS as RELEARN_MASKS, VANILLA_ATTACKED
from manu_core.relearn import check as relearn_check
from manu_core.vocab import EVAL_SETS, FORMS, NEVER_LEARNED, OFFICIAL_SPLITS, did_you_mean, forget_name
from tasks import reporting, stages
from tasks.devices import quiet_library_bars

DEFAULT_WEIGHTS = {k: 1.0 for k in WEIGHT_NAMES}
SCORINGS = ("paper", "released", "selective")  # the modes of manu_core.importance.SCORING_MODES, in report order
# manu_core.models.DTYPES, which imports torch (tests/pipeline/test_deployment.py keeps the two equal)
DTYPES = ("float32", "bfloat16", "float16")


def _form(default=None, **keys) -> Callable[[dict], None]:
    """A field's `json_schema_extra` for the run form of the Prefect UI (Parameters -> custom run), the
    schema only: validation stays with the validators, whose errors name the rule, the value and the fix.
    `keys` (bounds, `enum`, `items`) go on the field's own type, or on the non-null branch of an
    Optional, where the form's inputs read them (a number input's min/max, a select's choices);
    `default` shows a `default_factory`'s value, which pydantic leaves out of the schema (the form would
    show an empty list). A callable is called when the schema is built (names defined later in this file)."""
    def extra(schema: dict) -> None:
        target = next((b for b in schema.get("anyOf", []) if b.get("type") != "null"), schema)
        target.update({k: v() if callable(v) else v for k, v in keys.items()})
        if default is not None:
            schema["default"] = default() if callable(default) else default
    return extra


def _choices(values) -> Callable[[dict], None]:
    """A list field whose items are chosen from `values` (a callable: read when the schema is built),
    its default the whole list."""
    return _form(default=lambda: list(values() if callable(values) else values),
                 items=lambda: {"type": "string", "enum": list(values() if callable(values) else values)})


class Strict(BaseModel):
    """A config model that refuses a key it does not know, naming the nearest known one: a misspelled
    field (`benchmrk`) would otherwise be dropped and the run go on without it."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            fields = list(cls.model_fields)
            for k in data:
                if k not in fields:
                    raise ValueError(f"unknown {cls.__name__} key {k!r}.{did_you_mean(k, fields)} Known keys: "
                                     f"{', '.join(fields)}.")
        return data


class EvalSettings(Strict):
    """How every (set, form) unit is evaluated (manu_core/evaluate.py, `EvalConfig`)."""

    mc_scorer: Optional[Literal["letter", "likelihood"]] = Field(
        None, description="None: likelihood for the embedded tiny models, letter for real checkpoints")
    instructions: Optional[bool] = Field(None, description="None: bare questions for tiny models, else on")
    few_shot: bool = Field(False, description="multiple choice with worked examples before each question")
    judge: str = Field("offline", description="factuality judge (1-10): offline (key-fact overlap, no LLM) | "
                                              "openai:<base url>#<model> | hf:<local path>")
    max_new_tokens: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        50, description='token budget of each generated answer; "auto": from each unit\'s generation answers '
                        '(docs/evaluation.md, manu_core.evaluate.answer_token_cap)')
    batch_size: int = Field(32, ge=1, description="questions per generation batch")
    sets: list[str] = Field(default_factory=lambda: list(EVAL_SETS), json_schema_extra=_choices(EVAL_SETS),
                            description="the benchmark's sets to evaluate: forget, test (transformed portraits, "
                                        "paraphrased questions), retain, celebrity")
    forms: list[str] = Field(default_factory=lambda: list(FORMS), json_schema_extra=_choices(FORMS),
                             description="multimodal (the image and the question) and/or text (the name in the "
                                         "question, no image)")
    max_profiles: dict[str, int] = Field(default_factory=dict, json_schema_extra=_form(default={}),
                                         description="per set: at most N seeded profiles, e.g. {forget: 15} "
                                                     "(empty or 0: every profile)")
    tasks: Optional[list[Literal["mc", "gen", "cloze"]]] = Field(
        None, description="only these tasks (e.g. [mc]: the cheap signal a sweep's curves read); None: every task")
    seed: int = Field(0, description="seed of the profile caps' draw and the multiple-choice option order")

    @field_validator("sets", "forms")
    @classmethod
    def _subset(cls, v, info):
        allowed = EVAL_SETS if info.field_name == "sets" else FORMS
        if not v or any(x not in allowed for x in v):
            raise ValueError(f"{info.field_name} must be a non-empty subset of {list(allowed)}; got {v}")
        return v

    @field_validator("max_profiles")
    @classmethod
    def _caps(cls, v):
        bad = {k: n for k, n in v.items() if k not in EVAL_SETS or n < 0}
        if bad:
            raise ValueError(f"max_profiles takes {{set: N >= 0}} for sets {list(EVAL_SETS)}; got {bad}")
        return v

    def config_for(self, model_dir: str) -> dict:
        """The EvalConfig fields for one model (automatic scorer and prompts resolved)."""
        from manu_core.presets import default_eval_settings

        auto = default_eval_settings(model_dir)
        return {"mc_scorer": self.mc_scorer or auto.get("mc_scorer", "letter"),
                "instructions": auto.get("instructions", True) if self.instructions is None else self.instructions,
                "few_shot": self.few_shot, "judge": self.judge, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "seed": self.seed}


class BaselineSettings(Strict):
    """Gradient baselines (manu_core/baselines.py). None: the benchmark's defaults on a real checkpoint
    (LoRA, lr 2e-5, 1 epoch, batch 4), `EMBEDDED_BASELINE` on the tiny models."""

    lr: Optional[float] = Field(None, json_schema_extra=_form(exclusiveMinimum=0),
                                description="learning rate; None: the preset's fine-tune lr, 2e-5 on a checkpoint")
    epochs: Optional[int] = Field(None, json_schema_extra=_form(minimum=1),
                                  description="passes over the forget set; None: 1")
    batch_size: Optional[int] = Field(None, json_schema_extra=_form(minimum=1), description="None: 4")
    lora: Optional[bool] = Field(None, description="None: full fine-tune of a tiny model, LoRA of a checkpoint")
    forms: list[str] = Field(default_factory=lambda: ["multimodal"],
                             json_schema_extra=_form(default=["multimodal"],
                                                     items={"type": "string", "enum": list(FORMS)}),
                             description="forms the baselines train on (the benchmark: image + text only)")
    beta: float = Field(0.4, gt=0, description="NPO's β (benchmark code 0.4, paper 0.9)")

    def base_lr(self, preset) -> float:
        """The lr a run uses (and a sweep's strength axis scales): the configured one, else the preset's
        fine-tune lr on a tiny model, else the benchmark's 2e-5."""
        if self.lr is not None:
            return self.lr
        return preset.finetune.lr if preset is not None else 2e-5

    def params_for(self, model_dir: str) -> dict:
        from manu_core.presets import preset_of

        preset = preset_of(model_dir)
        base = {**EMBEDDED_BASELINE, "lr": preset.finetune.lr} if preset else {}
        for k in ("lr", "epochs", "batch_size", "lora"):
            if getattr(self, k) is not None:
                base[k] = getattr(self, k)
        return {**base, "forms": tuple(self.forms), "beta": self.beta}


class RelearnSettings(Strict):
    """Relearning attacks on every unlearned model of a run (manu_core/relearn.py): a brief fine-tune
    on an attack set, then the held-out half of the forget profiles evaluated in both forms. Off by
    default (it adds a fine-tune and two evaluations per attack, mask and model)."""

    enabled: bool = Field(False, description="attack every unlearned model (off: no relearning stage)")
    attacks: list[str] = Field(default_factory=lambda: list(RELEARN_ATTACKS),
                               json_schema_extra=_choices(RELEARN_ATTACKS),
                               description="forget-text | forget-multimodal (the attack half of the forget profiles, "
                                           "one form) | retain (retain profiles only)")
    masks: list[str] = Field(default_factory=lambda: list(RELEARN_MASKS), json_schema_extra=_choices(RELEARN_MASKS),
                             description="free (every weight trains) | frozen (pruned units held at 0; pruning "
                                         "methods only)")
    steps: int = Field(20, ge=1, description="optimizer steps of the fine-tune")
    lr: Optional[float] = Field(None, gt=0, description="None: the preset's fine-tune lr (tiny models), else 2e-5")
    batch_size: int = Field(4, ge=1, description="examples per optimizer step")
    lora: Optional[bool] = Field(None, description="None: full fine-tune of a tiny model, LoRA (r 16) of a checkpoint")
    tasks: list[str] = Field(default_factory=lambda: ["mc"],
                             json_schema_extra=_form(default=["mc"],
                                                     items={"type": "string", "enum": ["mc", "gen", "cloze"]}),
                             description="evaluation tasks of the held-out half")
    attack_vanilla: bool = Field(True, description="also attack the vanilla model (free mask, each attack): the "
                                                   "attack's own effect, which every attacked method is read against")

    @model_validator(mode="after")
    def _check(self):
        for a in self.attacks:
            relearn_check(attack=a)
        for m in self.masks:
            relearn_check(mask=m)
        if not self.attacks or not self.masks:
            raise ValueError("relearn.attacks and relearn.masks must each name at least one; "
                             f"got attacks={self.attacks}, masks={self.masks}.")
        return self

    def params_for(self, model_dir: str) -> dict:
        """The fine-tune's StageConfig fields for this model."""
        from manu_core.presets import preset_of

        preset = preset_of(model_dir)
        lora = self.lora if self.lora is not None else preset is None
        lr = self.lr or (preset.finetune.lr if preset else 2e-5)
        return {"epochs": 10_000, "max_steps": self.steps, "lr": lr, "batch_size": self.batch_size,
                "lora_r": 16 if lora else 0}


# The tiny models train fully (no LoRA). The benchmark unlearns at the learning rate its vanilla
# model was fine-tuned with (2e-5); the same rule on a tiny model gives its preset's fine-tune lr
# (1e-3): at 2e-5 or 1e-4 for one epoch a tiny model does not move. Not tuned on the evaluation sets.
EMBEDDED_BASELINE = {"lora": False, "epochs": 1, "batch_size": 4}


class ImportanceWeights(BaseModel):
    """The weights of the four importance functions in MANU's score (docs/method.md, "Scores"). A
    field left empty takes the scoring mode's default: paper 1 each; released abs 2, freq 0, var 2,
    rms 2; selective scores one statistic (scoring_options.statistic) and ignores them. Given
    weights replace the defaults; a field left empty beside given ones is 1 (0 drops a function)."""

    model_config = ConfigDict(extra="forbid")
    abs: Optional[float] = Field(None, ge=0, description="mean |activation| ratio; empty: the mode's default")
    freq: Optional[float] = Field(None, ge=0, description="share of activations above τ; empty: the mode's default")
    var: Optional[float] = Field(None, ge=0, description="variance ratio; empty: the mode's default")
    rms: Optional[float] = Field(None, ge=0, description="root mean square ratio; empty: the mode's default")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        for k in data if isinstance(data, dict) else ():
            if k not in WEIGHT_NAMES:
                raise ValueError(f"unknown importance weight {k!r}: the weights are {', '.join(WEIGHT_NAMES)}."
                                 f"{did_you_mean(k, WEIGHT_NAMES)}")
        return data

    def given(self) -> Optional[dict[str, float]]:
        """The weights set, or None when none is (the mode's defaults)."""
        return {k: v for k, v in self.model_dump().items() if v is not None} or None


class RunConfig(Strict):
    """One MANU run: model, data, scoring mode, importance and selection, evaluation.

    `scoring` picks the scoring mode over the one extraction (manu_core.importance.SCORING_MODES):
    `paper` (the paper's formulas, the default), `released` (the authors' released code),
    `selective` (Pochinkov & Schoots' selective pruning). `weights`, `eps`, `scope` and
    `scoring_options` are that mode's settings (None / {}: the mode's defaults); in a sweep the
    other modes use their defaults."""

    model: str = Field("lite", description="embedded preset (manu presets) or a local checkpoint folder")
    forget: Optional[Union[str, list[str]]] = Field(
        None, description="forget_5/10/15 or a list of profile ids; None: the preset's split (forget_5 for a checkpoint)")
    # bounds in the schema only: RunConfig._check refuses α outside (0, 1) with the rule and the fix
    alpha: Optional[float] = Field(None, json_schema_extra=_form(exclusiveMinimum=0, exclusiveMaximum=1, minimum=0,
                                                                 maximum=1),
                                   description="pruning ratio α in (0, 1), e.g. 0.05 for 5% of the units; None: the "
                                               "preset's documented α")
    scoring: Literal["paper", "released", "selective"] = Field(
        "paper", description="scoring mode: paper (default) | released (the authors' code) | selective (Pochinkov & Schoots)")
    scoring_options: dict = Field(default_factory=dict, json_schema_extra=_form(default={}),
                                  description="the mode's options: released {pool_layers: bool, "
                                  "clamp: float|null, linear_outputs: bool (scores and prunes the outputs of the MLP Linears, "
                                  "as the released code; extracts them too), sites: authors|uniform (authors: the released code's "
                                  "Linears and layers per architecture, the default), per_position: bool (extracts per-batch "
                                  "position statistics; "
                                  "they depend on extract_batch_size: the released code's is 4)}; "
                                  "selective {statistic: abs|freq|std|rms}")
    weights: ImportanceWeights = Field(default_factory=ImportanceWeights,
                                       description="importance weights abs/freq/var/rms; empty: the mode's defaults")
    eps: Optional[float] = Field(None, json_schema_extra=_form(exclusiveMinimum=0),
                                 description="ε of the ratios and the score; None: the mode's (1e-5; selective 1e-3)")
    tau: float = Field(0.1, description="τ: an activation counts as firing above it (the freq importance function)")
    scope: Optional[Literal["global", "tower", "layer"]] = Field(
        None, description="top-α over global | tower | layer; None: the mode's (released: tower, else global)")
    iterative: bool = Field(False, description="selective only: prune in steps of `step`, extracting again on the "
                            "pruned model before each step (one-shot when false)")
    step: float = Field(0.02, gt=0, lt=1, description="iterative selective pruning: α per step (the last step takes "
                        "the remainder)")
    random_seeds: list[int] = Field(default_factory=lambda: [0], json_schema_extra=_form(default=[0]),
                                    description="seeds of the random control "
                                    "(method='random' in a single run; a sweep uses SweepConfig.random_seeds)")
    aggregation: Literal["mean", "answer", "last"] = Field(
        "mean", description="a sample's activation per neuron: mean over its tokens | answer tokens only | last token")
    extract_batch_size: int = Field(32, ge=1, description="samples per forward pass of the activation extraction")
    device: str = Field("cpu", description="cpu | cuda | cuda:N (model tasks; a Dask worker claims its own GPU)")
    dtype: Optional[str] = Field(None, json_schema_extra=_form(enum=list(DTYPES)),
                                 description="float32 | bfloat16 | float16; None: the checkpoint's own")
    benchmark: Optional[str] = Field(None, description="local MLLMU-Bench folder (hub parquet layout): the activation "
                                     "streams, baselines, logit lens and evaluation read its own questions and images")
    stand_in_data: bool = Field(False, description="a checkpoint without a benchmark: run on the embedded stand-in "
                                "data (procedural portraits, stand-in questions, synthetic celebrities) to check the "
                                "plumbing; every result says so. Without it such a run is refused.")
    seed: int = Field(0, description="seed of the data (validation split, stand-ins) and of sampling")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="how each (set, form) is evaluated")
    baselines: BaselineSettings = Field(default_factory=BaselineSettings,
                                        description="the gradient baselines (method ga, grad_diff, kl, npo)")
    reference: Optional[str] = Field(None, description="NPO's reference model (fine-tuned on retain only); "
                                     "None: the forget set's never-learned reference (trained here for an "
                                     "embedded preset)")
    lens_samples: int = Field(32, ge=0, description="logit lens (report Fig. 2): QA pairs per (split, form); 0 = all")
    relearn: RelearnSettings = Field(default_factory=RelearnSettings,
                                     description="relearning attacks on every unlearned model (off by default)")
    never_learned: Union[Literal["auto", "train", "none"], dict[str, str]] = Field(
        "auto", description="the never-learned reference each forget set is judged against (docs/evaluation.md): "
                            "train (an embedded preset's recipe without the forget set, cached like a preset), "
                            "auto (only where it is free: a planted preset's planted units zeroed), none, or "
                            "{forget set name: model folder} for a checkpoint")

    @model_validator(mode="after")
    def _check(self):
        ImportanceParams(alpha=self.alpha if self.alpha is not None else 0.5, eps=self.eps, tau=self.tau,
                         weights=self.weights.given(), scope=self.scope, mode=self.scoring,
                         options=self.scoring_options or None)  # raises with the rule, the value and the fix
        if not self.random_seeds or len(set(self.random_seeds)) != len(self.random_seeds):
            raise ValueError(f"random_seeds must be a non-empty list of distinct integers; got {self.random_seeds}. "
                             "E.g. [0, 1, 2].")
        return self

    def preset(self):
        from manu_core.presets import PRESETS

        return PRESETS.get(self.model)

    def extraction(self) -> dict[str, bool]:
        """What the run's extraction records beyond the defaults (`ImportanceParams.extraction`)."""
        return ImportanceParams(alpha=0.5, mode=self.scoring, options=self.scoring_options or None).extraction()

    def needs_linear_outputs(self) -> bool:
        """The extraction also hooks the MLP Linears' outputs: the released mode's linear_outputs option
        (a sweep's released variants take the config's options)."""
        return self.extraction()["linear_outputs"]

    def needs_position_stats(self) -> bool:
        """The extraction also records per-position statistics: the released mode's per_position option
        reads them (a sweep's released variants take the config's options)."""
        return self.extraction()["position_stats"]

    def resolved_alpha(self) -> float:
        p = self.preset()
        return self.alpha if self.alpha is not None else (p.alpha if p else 0.05)

    def data_spec(self, forget: Union[str, list[str], None] = None) -> dict:
        """What `prepare_data` builds: the forget set (None: the config's, else the preset's) among
        the profiles the model learned (a preset's `learn` + n_profiles; a checkpoint: all 500)."""
        from manu_core.presets import preset_data_spec

        p = self.preset()
        forget = forget if forget is not None else self.forget
        if forget is None:
            forget = (list(p.forget) if not isinstance(p.forget, str) else p.forget) if p else "forget_5"
        if p is None:  # the benchmark's vanilla learned all 500 profiles
            return {"forget": forget, "n_profiles": None, "n_celebrities": 50, "seed": self.seed,
                    "learn": list(OFFICIAL_SPLITS), "validation_size": 25, "benchmark": self.benchmark}
        spec = preset_data_spec(p, forget)
        spec["learn"] = [e if isinstance(e, str) else list(e) for e in spec["learn"]] if spec["learn"] else None
        return {**spec, "benchmark": self.benchmark}

    def preflight(self, methods: list[str], splits: list) -> list[str]:
        """Everything a run can get wrong before its first task, checked in seconds and before any server
        or model load: the model folder and its weights, the data (a checkpoint needs a benchmark, its
        layout and forget ids), the dtype, the judge (reachable), NPO's reference and the never-learned
        folders. Raises ValueError with the rule, the value and the fix; returns the notes to log."""
        from manu_core.benchmark import check_layout
        from manu_core.models import ModelError, as_dtype, check_weights
        from manu_core.presets import PRESETS, default_eval_settings
        from tasks.devices import check_judge

        notes = []
        as_dtype(self.dtype)
        if self.preset() is None:
            if not Path(self.model).exists():
                raise ModelError(f"model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                                 f"folder.{did_you_mean(self.model, PRESETS, prefix='the preset ')}")
            check_weights(self.model)
            if not self.benchmark and not self.stand_in_data:
                raise ValueError(f"the checkpoint {self.model} needs its benchmark: pass --benchmark <local "
                                 "MLLMU-Bench folder> (config.benchmark). Without it the run would unlearn and "
                                 "evaluate on the embedded stand-in data; --stand-in-data (stand_in_data: true) "
                                 "does that on purpose, for a plumbing check.")
            if self.stand_in_data:
                notes.append("STAND-IN DATA: this checkpoint is unlearned and evaluated on the embedded stand-in "
                             "data (procedural portraits, stand-in questions), not on MLLMU-Bench: a plumbing "
                             "check, not a result.")
            named = self.never_learned if isinstance(self.never_learned, dict) else {}
            if {"npo"} & set(methods) and not self.reference and not all(
                    isinstance(s, str) and s in named for s in splits):
                raise ValueError(f"NPO on the checkpoint {self.model} needs its reference model (the checkpoint "
                                 "fine-tuned on the retain profiles only): pass --reference <folder> "
                                 "(config.reference) or name each forget set's never-learned model "
                                 "(config.never_learned), or leave npo out of the methods.")
            if self.reference:
                check_weights(self.reference)
        if self.benchmark:
            from tasks.stages import benchmark_forget

            for forget in splits:
                check_layout(self.benchmark, benchmark_forget(self.data_spec(forget)))
        for folder in (self.never_learned.values() if isinstance(self.never_learned, dict) else ()):
            check_weights(folder)
        check_judge(self.eval.judge)
        if self.preset() is None and default_eval_settings(self.model):
            settings = self.eval.config_for(self.model)
            notes.append(f"{self.model} was trained here (manu_preset.json): it is evaluated as embedded models are "
                         f"(multiple choice {settings['mc_scorer']}, bare questions), whatever its data; set "
                         "eval.mc_scorer / eval.instructions to change that.")
        return notes

    def check_data(self, forget: Union[str, list[str], None] = None) -> None:
        """Raise DataError (naming the ids and the fix) when the forget set is not among the learned
        profiles, before any task runs."""
        from tasks.stages import dataset_of

        dataset_of(self.data_spec(forget))


class SweepConfig(Strict):
    """A grid on one model: forget splits x methods x their variants (MANU: α x importance ablations)."""

    forget_splits: list[Union[str, list[str]]] = Field(
        default_factory=lambda: ["validation", "forget_5", "forget_10", "forget_15"],
        json_schema_extra=_form(default=["validation", "forget_5", "forget_10", "forget_15"]),
        description="split names or lists of ids; `validation` (learned profiles outside the official splits, "
                    "drawn by seed) is where each method's headline setting is chosen")
    alphas: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2],
                                json_schema_extra=_form(default=[0.02, 0.05, 0.1, 0.2],
                                                        items={"type": "number", "exclusiveMinimum": 0,
                                                               "exclusiveMaximum": 1, "minimum": 0, "maximum": 1}),
                                description="MANU's pruning ratios α, each in (0, 1): one variant per (mode, α)")
    scorings: list[str] = Field(default_factory=lambda: list(SCORINGS), json_schema_extra=_choices(SCORINGS),
                                description="MANU's scoring modes, one variant per (mode, α): paper, released, selective")
    ablations: bool = Field(True, description="paper-mode MANU with each importance function's weight zeroed in turn "
                            "(at the middle α)")
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], json_schema_extra=_form(default=[0, 1, 2]),
                                    description="the random control: one run per full-weight MANU variant and seed")
    random_scorings: Optional[list[str]] = Field(
        None, json_schema_extra=_form(items={"type": "string", "enum": list(SCORINGS)}),
        description="scoring modes whose MANU variants get a random control (None: every mode of `scorings`); "
                          "each mode selects different per-tower counts, so each has its own control")
    methods: list[str] = Field(default_factory=lambda: list(ALL_METHODS),
                               json_schema_extra=_form(default=lambda: list(ALL_METHODS),
                                                       items=lambda: {"type": "string", "enum": list(METHODS)}),
                               description="manu, random, prompting, ga, grad_diff, kl, npo; attribution (the "
                                           "upper bound, not a method) when named")
    retain_budget: float = Field(5.0, gt=0, description="the retain multiple-choice drop (points) a method may "
                                 "spend: settings are chosen on the validation forget set by this budget")
    two_phase: bool = Field(True, description="with the validation split and others: phase one evaluates every "
                            "variant on validation with multiple choice only (forget, retain, celebrity; both forms), "
                            "the rule chooses each method's setting, and phase two evaluates only the chosen settings, "
                            "fully, on the other splits (false: every variant fully on every split)")
    fan_out: Optional[str] = Field(
        None, description="a deployment of the manu-part flow (prefect.yaml: manu-part/sweep-part) that runs each "
                          "(forget split x method group) as its own flow run, on whichever worker of its pool is "
                          "free; this flow run gathers them into the one comparison. None: all in this flow run")
    baseline_scales: list[float] = Field(
        default_factory=lambda: [0.03, 0.1, 0.3, 1.0],
        json_schema_extra=_form(default=[0.03, 0.1, 0.3, 1.0], items={"type": "number", "exclusiveMinimum": 0}),
        description="the gradient baselines' strength axis: their learning rate times each scale (a log grid; "
                    "steps fixed by epochs), one variant per scale, swept like MANU's α")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        bad = [m for m in v if m not in METHODS]
        if bad or not v:
            raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}; got {v}")
        return v

    @field_validator("forget_splits")
    @classmethod
    def _splits(cls, v):
        names = [forget_name(f) for f in v]  # what tables show
        same = sorted({n for n in names if names.count(n) > 1})
        if same:
            raise ValueError(f"forget_splits must have distinct names; {same} name more than one "
                             f"(a list of ids is named by its size): {v}. Give id lists of different sizes, "
                             "or run them as separate sweeps.")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        bad = [a for a in v if not 0 < a < 1]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"alphas must be distinct pruning ratios in (0, 1); got {v}"
                             + (f" ({bad} outside (0, 1))" if bad else "")
                             + ". Give fractions, e.g. [0.02, 0.05, 0.1, 0.2] for 2, 5, 10 and 20%.")
        return v

    @field_validator("scorings")
    @classmethod
    def _scorings(cls, v):
        bad = [m for m in v if m not in SCORING_MODES]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"scorings must be distinct scoring modes of {sorted(SCORING_MODES)}; got {v}"
                             + (f" (unknown: {bad})" if bad else "") + ". E.g. [\"paper\", \"released\", \"selective\"].")
        return v

    @field_validator("baseline_scales")
    @classmethod
    def _scales(cls, v):
        if not v or len(set(v)) != len(v) or any(x <= 0 for x in v):
            raise ValueError(f"baseline_scales must be distinct positive multipliers of the baselines' lr; got {v}. "
                             "E.g. [0.03, 0.1, 0.3, 1.0].")
        return v

    @model_validator(mode="after")
    def _random_scorings(self):
        bad = [m for m in self.random_scorings or [] if m not in self.scorings]
        if bad:
            raise ValueError(f"random_scorings must be modes of scorings {self.scorings}; got {bad}. "
                             "Leave it unset for a control of every mode.")
        return self

    @field_validator("random_seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"random_seeds must be a non-empty list of distinct integers; got {v}. E.g. [0, 1, 2].")
        return v


# ----------------------------------------------------------------------------------------------
# Methods: how one variant turns the vanilla model into an unlearned one


@dataclass(frozen=True)
class Shared:
    """What one forget split's runs share: data, vanilla model, activations, importance sums."""

    config: RunConfig
    data: str
    model_dir: str
    activations: Optional[str] = None
    sums: Optional[str] = None
    output_sums: Optional[str] = None  # sums of the MLP Linears' outputs (released option linear_outputs)
    reference_units: tuple[str, ...] = ()  # the never-learned reference's forget-set evaluations

    @property
    def model_type(self) -> Optional[str]:
        """The vanilla model's architecture (config.json's model_type: llava, idefics2, ...)."""
        return json.loads((Path(self.model_dir) / "config.json").read_text()).get("model_type")

    @property
    def forget(self) -> str:
        """The forget set's name: forget_5, validation, or 'N ids'."""
        return forget_name(self.config.data_spec()["forget"])


@dataclass(frozen=True)
class Method:
    name: str
    variants: Callable[[RunConfig, Optional[SweepConfig]], list[dict]]
    unlearn: Callable[[Shared, dict], tuple[str, Optional[str]]]  # -> (unlearned model dir, importance dir)
    needs_activations: bool = False
    eval_overrides: Optional[dict] = None  # evaluation settings of this method (prompting: the system prompt)
    lens: bool = True  # a logit lens (report Fig. 2) of its models; the random control has none


def _variant(cfg: RunConfig, mode: str, alpha: float) -> dict:
    """A full-weight MANU variant: the config's importance settings for its own scoring mode, the
    mode's defaults (None) for the other modes of a sweep."""
    own = mode == cfg.scoring
    v = {"mode": mode, "alpha": alpha, "weights": cfg.weights.given() if own else None, "eps": cfg.eps if own else None,
         "scope": cfg.scope if own else None, "options": (cfg.scoring_options or None) if own else None}
    if mode == "selective" and cfg.iterative:
        v.update(iterative=True, step=cfg.step)
    return v


def _full_variants(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    """MANU's variants without the ablations: the run's, or a sweep's (mode x α)."""
    if sweep is None:
        return [_variant(cfg, cfg.scoring, cfg.resolved_alpha())]
    return [_variant(cfg, mode, a) for mode in sweep.scorings for a in sweep.alphas]


def _manu_variants(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    """The full variants, then (a sweep with `ablations` and the paper mode) the paper mode at the
    middle α with each importance weight zeroed in turn."""
    out = _full_variants(cfg, sweep)
    if sweep is not None and sweep.ablations and "paper" in sweep.scorings:
        mid = sorted(sweep.alphas)[len(sweep.alphas) // 2]
        base = (cfg.weights.given() if cfg.scoring == "paper" else None) or DEFAULT_WEIGHTS
        out += [{**_variant(cfg, "paper", mid), "weights": {**base, k: 0.0}} for k in WEIGHT_NAMES if base.get(k)]
    return out


def iterative_steps(alpha: float, step: float) -> list[float]:
    """Iterative selective pruning's α per step: ⌊α/step⌋ steps (at least one) of `step`, the last
    taking the remainder (α = 0.05, step 0.02: [0.02, 0.03]); exact on α and step as written."""
    a, s = Fraction(repr(alpha)), Fraction(repr(step))
    n = max(1, math.floor(a / s))
    return [float(s)] * (n - 1) + [float(a - (n - 1) * s)]


def _select(shared: Shared, sums: str, variant: dict, alpha: float, previous: Optional[str] = None,
            label: Optional[str] = None) -> str:
    return stages.select(sums, alpha, variant.get("weights"), eps=variant.get("eps"), tau=shared.config.tau,
                         scope=variant.get("scope"), mode=variant.get("mode", "paper"), options=variant.get("options"),
                         previous_dir=previous, label=label, model_type=shared.model_type)


def _manu_importance(shared: Shared, variant: dict) -> str:
    """The importance folder of a MANU variant: one select on the shared sums, or (selective,
    iterative) a loop of extract on the current model -> importance_sums -> select(step, previous)
    -> prune(vanilla, cumulative selection), each step a cached task run; returns the last selection."""
    if not variant.get("iterative"):
        params = ImportanceParams(alpha=variant["alpha"], mode=variant.get("mode", "paper"),
                                  options=variant.get("options"))
        sums = shared.output_sums if params.extraction()["linear_outputs"] else shared.sums
        return _select(shared, sums, variant, variant["alpha"])
    c = shared.config
    steps = iterative_steps(variant["alpha"], variant["step"])
    imp, sums = None, shared.sums
    for i, a in enumerate(steps, 1):
        if i > 1:  # the model pruned so far, measured again
            label = f"{shared.forget} step {i} of {len(steps)}"
            model = stages.prune(shared.model_dir, imp, label=label)
            acts = on_device(stages.extract, model, shared.data, aggregation=c.aggregation,
                             batch_size=c.extract_batch_size, device=c.device, dtype=c.dtype, seed=c.seed, label=label)
            sums = stages.importance_sums(acts, tau=c.tau, label=label)
        imp = _select(shared, sums, variant, a, previous=imp,
                      label=f"select-{variant['mode']}-alpha{variant['alpha']:g}-step{i}of{len(steps)}")
    return imp


def _manu_unlearn(shared: Shared, variant: dict) -> tuple[str, Optional[str]]:
    imp = _manu_importance(shared, variant)
    return stages.prune(shared.model_dir, imp, label=_run_label(shared, "manu", variant)), imp


def _random_variants(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    """The random control: each MANU variant of the run or sweep but the ablations (mode x α; a sweep's
    `random_scorings` only, when set) x each seed."""
    seeds = sweep.random_seeds if sweep is not None else cfg.random_seeds
    shadows = _full_variants(cfg, sweep)
    if sweep is not None and sweep.random_scorings is not None:
        shadows = [v for v in shadows if v["mode"] in sweep.random_scorings]
    return [{**v, "seed": seed, "shadows": variant_label("manu", v)} for v in shadows for seed in seeds]


def _random_unlearn(shared: Shared, variant: dict) -> tuple[str, Optional[str]]:
    """The shadowed MANU variant's selection (the same cached tasks), redrawn uniformly per tower
    (per layer when that variant selects per layer) with the variant's seed, then pruned."""
    manu_variant = {k: v for k, v in variant.items() if k not in ("seed", "shadows")}
    imp = _manu_importance(shared, manu_variant)
    scope = variant.get("scope") or mode_defaults(variant.get("mode", "paper"))["scope"]
    drawn = stages.random_select(imp, variant["seed"], scope="layer" if scope == "layer" else "tower")
    return stages.prune(shared.model_dir, drawn, label=_run_label(shared, "random", variant)), drawn


def _attribution_variants(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    """The attribution upper bound at the run's α, or at each α of a sweep (per tower, like `released`)."""
    return [{"alpha": a} for a in (sweep.alphas if sweep is not None else [cfg.resolved_alpha()])]


def _attribution_unlearn(shared: Shared, variant: dict) -> tuple[str, Optional[str]]:
    c = shared.config
    effects = on_device(stages.attribution, shared.model_dir, shared.data, device=c.device, dtype=c.dtype,
                        label=shared.forget)
    imp = stages.attribution_select(effects, variant["alpha"])
    return stages.prune(shared.model_dir, imp, label=_run_label(shared, "attribution", variant)), imp


def _single(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    return [{}]


def _baseline_variants(cfg: RunConfig, sweep: Optional[SweepConfig]) -> list[dict]:
    """A run: the configured baseline. A sweep: its strength axis, lr × each of `baseline_scales`."""
    if sweep is None:
        return [{}]
    return [{"lr": float(f"{cfg.baselines.base_lr(cfg.preset()) * s:.6g}")} for s in sorted(sweep.baseline_scales)]


def _gradient(method: str) -> Callable[[Shared, dict], tuple[str, Optional[str]]]:
    def unlearn(shared: Shared, variant: dict) -> tuple[str, Optional[str]]:
        from manu_core.baselines import LOSSES

        c = shared.config
        ref = _npo_reference(shared) if LOSSES[method].frozen == "reference" else None
        params = {**c.baselines.params_for(shared.model_dir), **({"lr": variant["lr"]} if "lr" in variant else {})}
        return on_device(stages.baseline, shared.model_dir, shared.data, method, params, reference_dir=ref,
                         device=c.device, dtype=c.dtype), None
    return unlearn


def _npo_reference(shared: Shared) -> str:
    """NPO's π_ref for the forget set: config.reference, else the forget set's never-learned reference
    (a folder named in config.never_learned, or an embedded preset's recipe without the forget set). It
    is the model MLLMU-Bench's NPO asks for, "fine-tuned on the retain set only", so one training
    serves both NPO and the forget-quality comparison."""
    c = shared.config
    if c.reference:
        return c.reference
    if isinstance(c.never_learned, dict) and shared.forget in c.never_learned:
        return c.never_learned[shared.forget]
    return stages.never_learned_model(c.model, shared.data)


def _prompting_system() -> dict:
    from manu_core.vocab import PROMPTING_SYSTEM

    return {"system": PROMPTING_SYSTEM}


METHODS: dict[str, Method] = {
    "manu": Method("manu", _manu_variants, _manu_unlearn, needs_activations=True),
    "random": Method("random", _random_variants, _random_unlearn, needs_activations=True, lens=False),
    # a diagnostic beside the methods, not one of them: the best a neuron selection can do when it
    # measures each unit's effect on the forget answers directly (not in ALL_METHODS; add it to a sweep)
    "attribution": Method("attribution", _attribution_variants, _attribution_unlearn, lens=False),
    "prompting": Method("prompting", _single, lambda shared, v: (shared.model_dir, None),
                        eval_overrides=_prompting_system()),
    **{m: Method(m, _baseline_variants, _gradient(m)) for m in ("ga", "grad_diff", "kl", "npo")},
}
ALL_METHODS = ["manu", "random", "prompting", "ga", "grad_diff", "kl", "npo"]


def variant_label(method: str, variant: dict) -> str:
    """'manu[paper] α=0.1', 'manu[paper] α=0.05 without var', 'manu[selective iterative] α=0.1',
    'random(manu[paper] α=0.1) seed=1'; a method without variants: its name."""
    if "lr" in variant:
        return f"{method} lr={variant['lr']:g}"
    if "alpha" not in variant:
        return method
    if "seed" in variant:
        return f"{method}({variant['shadows']}) seed={variant['seed']}"
    if method == "attribution":
        return f"attribution α={variant['alpha']:g}"
    mode = variant.get("mode", "paper") + (" iterative" if variant.get("iterative") else "")
    dropped = reporting.dropped_weights(variant)
    return f"{method}[{mode}] α={variant['alpha']:g}" + (f" without {'+'.join(dropped)}" if dropped else "")


# ----------------------------------------------------------------------------------------------
# The flow


def task_runner():
    """Threads by default ($MANU_TASK_WORKERS, default 4); $MANU_TASK_RUNNER=dask for a local Dask
    cluster (on a GPU server one worker process per GPU, each claiming its own: tasks/devices.py), or
    dask://host:8786 for an existing scheduler (several GPUs or machines)."""
    kind = os.environ.get("MANU_TASK_RUNNER", "threads")
    if kind.startswith("dask"):
        from prefect_dask import DaskTaskRunner

        address = kind.split("://", 1)[1] if "://" in kind else None
        if address:
            return DaskTaskRunner(address=f"tcp://{address}")
        import torch  # a local cluster: one single-threaded worker process per GPU slot (each claims its own)

        slots = torch.cuda.device_count() * max(1, int(os.environ.get("MANU_DEVICE_SLOTS") or 1))
        return DaskTaskRunner(cluster_kwargs={"n_workers": slots, "threads_per_worker": 1} if slots else None)
    return ThreadPoolTaskRunner(max_workers=int(os.environ.get("MANU_TASK_WORKERS", "4")))


def on_device(task, *args, **kwargs):
    """Run a model task through the task runner and wait for it: under Dask it runs on a worker, which
    owns a device (tasks/devices.py), never in the flow's own process, which would claim one too."""
    return task.submit(*args, **kwargs).result()


def _evaluate_all(model_dir: str, shared: "Shared", label: str, overrides: Optional[dict] = None) -> list:
    """One evaluation task per (set, form), submitted at once; the vanilla model's settings apply to
    every model of the run (an unlearned tiny model is evaluated as its vanilla model was)."""
    cfg, data = shared.config, shared.data
    settings = {**cfg.eval.config_for(shared.model_dir), **(overrides or {})}
    return [stages.evaluate.submit(model_dir, data, s, f, settings, cfg.eval.max_profiles.get(s, 0),
                                   device=cfg.device, dtype=cfg.dtype, label=label, progress=False,
                                   tasks=cfg.eval.tasks)
            for s in cfg.eval.sets for f in cfg.eval.forms]


def _held_out(model_dir: str, shared: "Shared", label: str, overrides: Optional[dict] = None) -> list:
    """The held-out half of the forget profiles (relearn.halves), both forms, the relearning tasks
    (task runs `evaluate-<label>-held-out-forget-<form>`)."""
    cfg = shared.config
    settings = {**cfg.eval.config_for(shared.model_dir), **(overrides or {})}
    return [stages.evaluate.submit(model_dir, shared.data, "forget", f, settings, 0, device=cfg.device, dtype=cfg.dtype,
                                   label=f"{label}-held-out", progress=False, held_out=True, tasks=cfg.relearn.tasks)
            for f in cfg.eval.forms]


def _relearn(shared: "Shared", unlearned: str, label: str, overrides: Optional[dict],
             controls: dict[str, dict[str, list]]) -> dict[str, list[str]]:
    """Every attack x mask on the unlearned model, then the held-out half evaluated; with the vanilla
    and the unlearned model on the same questions, and (relearn.attack_vanilla) the vanilla model after
    each attack: {stage: [evaluation unit folders]}. The stages that do not depend on the method come
    from `controls`, the flow's memo for this forget set: submitted by the first run that needs them."""
    cfg = shared.config
    key = json.dumps(overrides or {}, sort_keys=True)
    if key not in controls:
        controls[key] = _relearn_controls(shared, overrides)
    prunes = (Path(unlearned) / "selection.parquet").is_file()
    runs = {"vanilla": controls[key]["vanilla"], "unlearned": _held_out(unlearned, shared, label, overrides)}
    params = cfg.relearn.params_for(shared.model_dir)
    for attack in cfg.relearn.attacks:
        for mask in cfg.relearn.masks:
            if mask == "frozen" and not prunes:
                continue
            model = on_device(stages.relearn, unlearned, shared.data, attack, mask, params, seed=cfg.seed,
                              device=cfg.device, dtype=cfg.dtype, label=label, progress=False)
            runs[f"{attack}/{mask}"] = _held_out(model, shared, f"{label}-{attack}-{mask}", overrides)
    runs.update({k: v for k, v in controls[key].items() if k != "vanilla"})
    return {stage: _results(fs) for stage, fs in runs.items()}


def _relearn_controls(shared: "Shared", overrides: Optional[dict]) -> dict[str, list]:
    """The relearning stages every method run of a forget set shares: the vanilla model's held-out
    evaluation and, with relearn.attack_vanilla, the vanilla model after each attack (the attack's
    control), as {stage: [evaluation futures]}. Submitted once per flow run and forget set."""
    cfg = shared.config
    runs = {"vanilla": _held_out(shared.model_dir, shared, "vanilla", overrides)}
    if cfg.relearn.attack_vanilla:
        params = cfg.relearn.params_for(shared.model_dir)
        for attack in cfg.relearn.attacks:
            model = on_device(stages.relearn, shared.model_dir, shared.data, attack, "free", params, seed=cfg.seed,
                              device=cfg.device, dtype=cfg.dtype, label="attacked-vanilla", progress=False)
            runs[f"{VANILLA_ATTACKED}{attack}"] = _held_out(model, shared, f"attacked-vanilla-{attack}", overrides)
    return runs


def _results(futures: list) -> list[str]:
    wait(futures)
    return [f.result() for f in futures]


def _prepare(cfg: RunConfig, forget) -> Shared:
    data = stages.prepare_data(cfg.data_spec(forget), profiles=str(MLLMU_DIR), benchmark=cfg.benchmark)
    return Shared(cfg, data, stages.vanilla_model(cfg.model))


def _with_activations(shared: Shared) -> Shared:
    c = shared.config
    acts = on_device(stages.extract, shared.model_dir, shared.data, aggregation=c.aggregation,
                     batch_size=c.extract_batch_size, device=c.device, dtype=c.dtype, seed=c.seed, label=shared.forget,
                     **c.extraction())
    outputs = (stages.importance_sums(acts, tau=c.tau, label=f"{shared.forget} linear outputs", linear_outputs=True)
               if c.needs_linear_outputs() else None)
    return replace(shared, activations=acts, sums=stages.importance_sums(acts, tau=c.tau, label=shared.forget),
                   output_sums=outputs)


def _never_learned(shared: Shared) -> list:
    """The never-learned reference of the forget set (RunConfig.never_learned), evaluated on the forget
    set in every form with the vanilla model's settings and caps: its evaluation futures, or [] where
    the run has none."""
    cfg, log = shared.config, get_run_logger()
    choice, preset = cfg.never_learned, cfg.preset()
    if isinstance(choice, dict):
        if shared.forget not in choice:
            log.warning("no never-learned reference named for forget set %s (never_learned has %s)", shared.forget,
                        sorted(choice))
            return []
        model = choice[shared.forget]
    elif choice == "none" or preset is None or (choice == "auto" and preset.plant is None):
        return []
    else:
        model = stages.never_learned_model.submit(cfg.model, shared.data)
    settings = cfg.eval.config_for(shared.model_dir)
    return [stages.evaluate.submit(model, shared.data, "forget", f, settings, cfg.eval.max_profiles.get("forget", 0),
                                   device=cfg.device, dtype=cfg.dtype, label=NEVER_LEARNED, progress=False,
                                   tasks=cfg.eval.tasks)
            for f in cfg.eval.forms]


def _lens(model_dir: str, shared: Shared, label: str, system: Optional[str] = None):
    c = shared.config
    return stages.logit_lens.submit(model_dir, shared.data, max_samples=c.lens_samples, system=system, seed=c.seed,
                                    device=c.device, dtype=c.dtype, label=label, progress=False)


def artifact_url(path: Path) -> Optional[str]:
    """The URL of an output when the artifacts folder is served over http ($MANU_ARTIFACTS_URL, e.g. a
    lab's static file server at the folder's root), else None: a file:// link is dead from any other
    machine and blocked by browsers on an http page."""
    from tasks.cache import artifacts_dir

    base = os.environ.get("MANU_ARTIFACTS_URL")
    try:
        rel = Path(path).resolve().relative_to(artifacts_dir())
    except ValueError:
        return None
    return f"{base.rstrip('/')}/{rel.as_posix()}" if base else None


def publish_path(key: str, path: Path, description: str) -> None:
    """An output as an artifact: a link when `artifact_url` has one, else its path as copyable text."""
    url = artifact_url(path)
    if url:
        create_link_artifact(key=key, link=url, link_text=Path(path).name, description=description)
    else:
        create_markdown_artifact(key=key, markdown=f"`{Path(path).resolve()}`",
                                 description=f"{description} (a path on the machine that ran the flow; set "
                                             "MANU_ARTIFACTS_URL to link a web server of the artifacts folder)")


def _publish_report(report_dir: str, key: str, description: str) -> None:
    """The report task's report.md as a Prefect markdown artifact (figures embedded) plus a link."""
    from manu_core.report import artifact_markdown

    create_markdown_artifact(key=key, markdown=artifact_markdown(report_dir), description=description)
    publish_path(f"{key}-html", Path(report_dir) / "report.html", "the same report as one self-contained HTML file")
    get_run_logger().info("report with figures: %s", Path(report_dir) / "report.html")


def _publish(results_dir: str, shared: Shared, unlearned: str, importance: Optional[str], slug: str) -> None:
    log = get_run_logger()
    rep = Path(results_dir)
    create_markdown_artifact(key=f"{slug}-results", markdown=(rep / "results.md").read_text(),
                             description="vanilla vs unlearned per set, task, metric and form")
    if importance:
        rows = pl.read_parquet(rep / "selected_per_layer.parquet").to_dicts()
        create_table_artifact(key=f"{slug}-selected-neurons", table=rows,
                              description="selected neurons per tower and layer")
        publish_path(f"{slug}-importance", Path(importance) / "importance.parquet",
                     "importance table (Parquet, one row per neuron)")
    if shared.activations:
        publish_path(f"{slug}-activations", Path(shared.activations) / "activations",
                     "per-layer activations (Parquet; `manu inspect` it)")
    publish_path(f"{slug}-model", Path(unlearned), "unlearned model")
    log.info("results: %s | unlearned model: %s | importance: %s | activations: %s", rep / "results.md", unlearned,
             importance, shared.activations)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _run_label(shared: Shared, method: str, variant: dict) -> str:
    return f"{variant_label(method, variant)} on {shared.forget}"


@dataclass(frozen=True)
class Started:
    """A variant unlearned, its evaluations (and logit lens) submitted: what `finish_one` collects."""
    method: str
    variant: dict
    unlearned: str
    importance: Optional[str]
    evaluations: list
    lens: Optional[PrefectFuture]


def start_one(shared: Shared, method: str, variant: dict, lens: bool = True) -> Started:
    """Unlearn one variant and submit its evaluations and logit lens without waiting for them, so the
    next variant's selection and pruning (or training) run while the device evaluates this one."""
    unlearned, imp = METHODS[method].unlearn(shared, variant)
    label = _slug(variant_label(method, variant))
    overrides = METHODS[method].eval_overrides or {}
    lens = _lens(unlearned, shared, label, overrides.get("system")) if lens and METHODS[method].lens else None
    return Started(method, variant, unlearned, imp, _evaluate_all(unlearned, shared, label, overrides), lens)


def finish_one(shared: Shared, started: Started, vanilla_units: list,
               relearn_controls: dict[str, dict[str, list]], phase: Optional[int] = None) -> tuple[str, Optional[str]]:
    """Wait for a started variant's evaluations, run its relearning attacks (when enabled) and record
    it: (results folder, logit-lens folder or None). `relearn_controls`: the forget set's memo of the
    relearning stages every method shares (`_relearn`)."""
    cfg, method, variant, unlearned, imp = shared.config, started.method, started.variant, started.unlearned, started.importance
    label = variant_label(method, variant)
    overrides = METHODS[method].eval_overrides or {}
    units = _results(started.evaluations)
    split = shared.forget
    title = f"{label} on {cfg.model}, forget {split}"
    run = {"config": cfg.model_dump(), "method": method, "variant": variant, "label": label, "model": unlearned,
           "vanilla_model": shared.model_dir, "data": shared.data,
           # a method's own inputs only: a baseline's record does not depend on the sweep running MANU beside it
           "activations": shared.activations if METHODS[method].needs_activations else None,
           "system": overrides.get("system"), "mode": variant.get("mode"), "seed": variant.get("seed"),
           "shadows": variant.get("shadows"), **({"phase": phase} if phase else {})}
    relearn = _relearn(shared, unlearned, _slug(label), overrides, relearn_controls) if cfg.relearn.enabled and method != "prompting" else {}
    rep = stages.results(vanilla_units, units, imp, title, run=run,
                         relearn_units=[u for us in relearn.values() for u in us],
                         relearn_labels=[stage for stage, us in relearn.items() for _ in us],
                         reference_units=list(shared.reference_units) or None)
    _publish(rep, shared, unlearned, imp, _slug(f"{cfg.model}-{split}-{label}"))
    return rep, started.lens.result() if started.lens is not None else None


def _phase_one(config: RunConfig) -> RunConfig:
    """A two-phase sweep's first phase: multiple choice on the forget, retain and celebrity sets (what
    the setting rule and the trade-off curves read); no relearning attacks and no never-learned
    reference (the headroom is judged on the reported splits)."""
    sets = [s for s in config.eval.sets if s in ("forget", "retain", "celebrity")]
    return config.model_copy(update={"eval": config.eval.model_copy(update={"tasks": ["mc"], "sets": sets}),
                                     "relearn": config.relearn.model_copy(update={"enabled": False}),
                                     "never_learned": "none"})


def curve_of(method: str, variant: dict) -> tuple[str, Optional[float]]:
    """The trade-off curve a variant is a point of and its strength (tradeoff.curve_name): what the
    setting rule chooses among."""
    from manu_core.tradeoff import curve_name

    strength = variant.get("alpha", variant.get("lr"))
    return curve_name(method, variant.get("mode"), variant.get("iterative", False)), strength


def _kept(method: str, variant: dict, keep: set) -> bool:
    """Phase two runs a variant whose (curve, strength) the rule chose; a random control also when the
    MANU variant it shadows is kept (the report sets each beside its control). Ablations stay in phase one."""
    if reporting.dropped_weights(variant):
        return False
    if (curve_of(method, variant)) in keep:
        return True
    if method == "random":
        shadow = {k: v for k, v in variant.items() if k not in ("seed", "shadows")}
        return curve_of("manu", shadow) in keep
    return False


def _run_splits(config: RunConfig, sweep: Optional[SweepConfig], splits: list, methods: list[str],
                phase: Optional[int] = None, keep: Optional[set] = None) -> tuple[list[str], list[str]]:
    """Every variant of `methods` (with `keep`, only those `_kept`) on each forget split: unlearned,
    evaluated, recorded; returns the results folders and the logit-lens folders. Phase one of a sweep
    draws no logit lens."""
    runs, lenses = _run_splits_keyed(config, sweep, splits, methods, phase, keep)
    return [path for _, path in runs], [path for _, path in lenses]


Key = tuple[int, int, int]  # (forget split's position, method's position in the sweep, variant's position)


def _run_splits_keyed(config: RunConfig, sweep: Optional[SweepConfig], splits: list, methods: list[str],
                      phase: Optional[int] = None, keep: Optional[set] = None
                      ) -> tuple[list[tuple[Key, str]], list[tuple[Key, str]]]:
    """`_run_splits` with each folder's place in the sweep's order (the vanilla model's lens: method
    and variant -1), so that the parts of a fanned-out sweep (flows/fanout.py) gather in the order one
    flow run makes them."""
    order = sweep.methods if sweep is not None else methods
    runs, lenses = [], []
    for s, forget in enumerate(splits):
        cfg = config.model_copy(update={"forget": forget})
        shared = _prepare(cfg, forget)
        vanilla = _evaluate_all(shared.model_dir, shared, "vanilla")
        reference = _never_learned(shared)
        vanilla_lens = _lens(shared.model_dir, shared, "vanilla") if phase != 1 else None
        variants = [((s, order.index(m), i), m, v) for m in methods
                    for i, v in enumerate(METHODS[m].variants(cfg, sweep)) if keep is None or _kept(m, v, keep)]
        if any(METHODS[m].needs_activations for _, m, _ in variants):
            shared = _with_activations(shared)
        # every variant unlearned and its evaluations queued first, then collected in order: the device
        # evaluates one variant while the next is selected, pruned and saved
        started = [(key, start_one(shared, m, v, lens=phase != 1)) for key, m, v in variants]
        vanilla_units = _results(vanilla)
        shared = replace(shared, reference_units=tuple(_results(reference)))
        if vanilla_lens is not None:
            lenses.append(((s, -1, -1), vanilla_lens.result()))
        relearn_controls: dict[str, dict[str, list]] = {}
        for key, one in started:
            rep, lens = finish_one(shared, one, vanilla_units, relearn_controls, phase=phase)
            runs.append((key, rep))
            if lens is not None:
                lenses.append((key, lens))
    return runs, lenses


def _sweep_splits(config: RunConfig, sweep: Optional[SweepConfig], splits: list, methods: list[str],
                  phase: Optional[int] = None, keep: Optional[set] = None) -> tuple[list[str], list[str]]:
    """`_run_splits` in this flow run, or, with `sweep.fan_out`, as one child flow run per (forget split ×
    method group) of that deployment, on whichever worker of its pool is free (flows/fanout.py)."""
    if sweep is None or not sweep.fan_out:
        return _run_splits(config, sweep, splits, methods, phase, keep)
    from flows.fanout import fan_out

    return fan_out(config, sweep, splits, methods, phase, keep)


def validation_message(e: ValidationError) -> str:
    """A pydantic ValidationError as one line: per field the rule, the value and the fix, without
    pydantic's echo of every input."""
    return "; ".join((".".join(map(str, err["loc"])) + ": " if err["loc"] else "")
                     + err["msg"].removeprefix("Value error, ") for err in e.errors())


def one_line(e: BaseException) -> str:
    """An error's cause in one line (a flow run's state message, the last log line of a failed run)."""
    text = validation_message(e) if isinstance(e, ValidationError) else str(e)
    return f"{type(e).__name__}: {' '.join(text.split())}"


# Parameters are validated in the flow (validate_parameters=False), not by Prefect before it starts: a
# deployment's parameters are then merged with the run's (`with_deployment_defaults`) before the check,
# and a bad key fails the run with its one-line cause as the state message and the last log line.
@flow(name="manu", task_runner=task_runner(), log_prints=True, validate_parameters=False)
def manu(config: RunConfig = RunConfig(), sweep: Optional[SweepConfig] = None, method: str = "manu") -> str:
    """One run of `method` (MANU by default; returns its report folder) or, with `sweep`, a grid of
    methods and variants (returns the sweep table).

    Args:
        config: the run: model, forget set, scoring mode, α, evaluation (merged into a deployment's own)
        sweep: a grid on the model (forget splits x methods x variants); empty: one run of `method`
        method: manu | random | attribution | prompting | ga | grad_diff | kl | npo (a sweep: sweep.methods)
    """
    try:
        try:
            config, sweep = with_deployment_defaults(config, sweep)
        except ValidationError as e:
            raise ValueError(validation_message(e)) from None
        return _manu(config, sweep, method)
    except Exception as e:
        from prefect.exceptions import MissingContextError

        try:
            log = get_run_logger()
        except MissingContextError:  # called as a plain function (manu.fn)
            import logging

            log = logging.getLogger(__name__)
        log.error("the run failed: %s", one_line(e))
        raise


def _manu(config: RunConfig, sweep: Optional[SweepConfig], method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    if sweep is None and config.iterative and config.scoring != "selective":
        raise ValueError(f"iterative pruning is a mode of selective scoring; got scoring={config.scoring!r} with "
                         "iterative=true. Set scoring='selective', or iterative=false.")
    log = get_run_logger()
    quiet_library_bars()  # no carriage-return progress from transformers/datasets in a worker's log
    splits = [config.data_spec()["forget"]] if sweep is None else sweep.forget_splits
    methods = [method] if sweep is None else sweep.methods
    for note in config.preflight(methods, splits):  # model, data, dtype, judge, references: before any task
        log.warning(note)
    for forget in splits:  # every forget set among the learned profiles, before the first task
        config.check_data(forget)
    started, estimated = time.time(), _announce_plan(config, sweep, method) if sweep is not None else None
    if sweep is not None and sweep.two_phase and VALIDATION in splits and len(splits) > 1:
        # phase one: every variant on validation, the cheap signal the rule and the curves read
        first = _phase_one(config)
        runs, lenses = _sweep_splits(first, sweep, [VALIDATION], methods, phase=1)
        chosen = json.loads((Path(reporting.choose(runs, budget=sweep.retain_budget)) / "chosen.json").read_text())
        log.info("phase one chose (on validation, multiple choice): %s", chosen)
        # phase two: the chosen settings, fully, on the reported splits
        keep = {(c["method"], c["strength"]) for c in chosen}
        more, more_lenses = _sweep_splits(config, sweep, [f for f in splits if f != VALIDATION], methods, phase=2,
                                          keep=keep)
        runs, lenses = runs + more, lenses + more_lenses
    else:
        runs, lenses = _sweep_splits(config, sweep, splits, methods)
    last = runs[-1]
    alpha = _chosen_alpha(config, sweep)
    if sweep is None:
        title = json.loads((Path(last) / "results.json").read_text())["run"]["label"]
        report = reporting.report(runs, lenses, f"{title} on {config.model}", chosen_alpha=alpha)
        _publish_report(report, _slug(f"report-{config.model}-{title}"), "tables and figures of this run")
        log.info("results: %s | report with figures: %s", Path(last) / "results.md", Path(report) / "report.html")
        print((Path(last) / "results.md").read_text())
        return last
    drawn = reporting.report.submit(runs, lenses, f"Sweep on {config.model}", chosen_alpha=alpha)
    comp = reporting.comparison(runs, budget=sweep.retain_budget)  # meanwhile
    report = drawn.result()
    phases = sweep.two_phase and VALIDATION in splits and len(splits) > 1
    note = (f"Two phases: every variant on validation with multiple choice only (forget, retain, celebrity), "
            f"then only the settings the rule chose there ({sweep.retain_budget:g}-point retain budget), every "
            f"task, on {', '.join(str(f) for f in splits if f != VALIDATION)}. A validation row is a phase-one "
            "number; the importance ablations are phase one only." if phases else "")
    out = reporting.sweep_table(report, comp, _slug(f"{config.model}-{'-'.join(map(str, splits))}"), note=note)
    create_markdown_artifact(key=_slug(f"sweep-{config.model}"), markdown="# Sweep\n\n" + (Path(out) / "sweep.md").read_text(),
                             description="every method and variant per forget set")
    create_markdown_artifact(key=_slug(f"comparison-{config.model}"),
                             markdown=(Path(out) / "comparison" / "comparison.md").read_text().split("\n![")[0],
                             description="drops with 95% intervals, trade-off curves, settings chosen on validation")
    _publish_report(str(Path(out) / "report"), _slug(f"sweep-report-{config.model}"), "tables and figures of the sweep")
    took = time.time() - started
    log.info("the sweep took %.1f min wall (estimated before it started: %s)", took / 60,
             f"{estimated / 60:.1f} min" if estimated is not None else "unknown")
    create_markdown_artifact(key=_slug(f"timing-{config.model}"), description="the plan's estimate beside the wall time",
                             markdown=f"| estimated | took |\n|---|---|\n| "
                                      f"{f'{estimated / 60:.1f} min' if estimated is not None else 'unknown'} | "
                                      f"{took / 60:.1f} min |\n")
    return out


def _announce_plan(config: RunConfig, sweep: SweepConfig, method: str) -> Optional[float]:
    """The sweep's plan (flows/plan.py) as its first log line and a UI artifact; its estimate (s)."""
    from flows.plan import plan as make_plan, plan_markdown

    p = make_plan(config, sweep, method)
    runs = ", ".join(f"{n} {stage}" for stage, n in p.runs.items() if n)
    get_run_logger().info("plan: %s; estimated wall time %s", runs,
                          f"{p.total / 60:.1f} min" if p.total is not None else "unknown (no measured costs)")
    create_markdown_artifact(key=_slug(f"plan-{config.model}"), markdown=plan_markdown(p, f"sweep on {config.model}"),
                             description="what this sweep will run and its estimated wall time")
    return p.total


def deep_merge(base: dict, given: dict) -> dict:
    """`given` over `base`, key by key at every depth (a dict value merges, anything else replaces)."""
    out = dict(base)
    for k, v in given.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_deployment_defaults(config: RunConfig, sweep: Optional[SweepConfig]) -> tuple[RunConfig, Optional[SweepConfig]]:
    """A deployment run's config and sweep: the deployment's parameters with the run's own merged in
    at every depth. Prefect replaces a whole parameter (`--param config='{"alpha": 0.1}'` would drop the
    deployment's evaluation caps); here a run that sets one field keeps every other the deployment set.
    (A cap is lifted by setting it to 0.) Outside a deployment run: unchanged."""
    from prefect.context import FlowRunContext

    config = RunConfig(**config) if isinstance(config, dict) else config
    sweep = SweepConfig(**sweep) if isinstance(sweep, dict) else sweep
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    if run is None or run.deployment_id is None:
        return config, sweep
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(run.deployment_id).parameters or {}
    given = run.parameters or {}

    def merged(name: str, model, value):
        d, g = defaults.get(name), given.get(name)
        return model(**deep_merge(d, g)) if isinstance(d, dict) and isinstance(g, dict) else value

    return merged("config", RunConfig, config), merged("sweep", SweepConfig, sweep)


def _chosen_alpha(config: RunConfig, sweep: Optional[SweepConfig]) -> Optional[float]:
    """The α whose selected neurons the report draws: the run's; in a sweep the configured α when the
    sweep has it, else the middle one (the one the ablations use)."""
    alpha = config.resolved_alpha()
    if sweep is None or not sweep.alphas or alpha in sweep.alphas:
        return alpha
    return sorted(sweep.alphas)[len(sweep.alphas) // 2]
