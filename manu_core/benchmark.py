"""The real MLLMU-Bench, read from a local folder in the dataset hub's parquet layout.

    <root>/forget_5/train-00000-of-00001.parquet     forget_{5,10,15}: the Forget set
    <root>/retain_95/train-*.parquet                 retain_{95,90,85}: the Retain set
    <root>/Test_Set/train-*.parquet                  transformed portraits + paraphrased questions
    <root>/Retain_Set/train-*.parquet                the hub's name for the 153 Real-Celebrity profiles
    (Full_Set, ft_Data: the fine-tuning data; not needed to evaluate)

(what `huggingface-cli download MLLMMU/MLLMU-Bench --repo-type dataset --local-dir <root>` leaves).
Each row is one profile: `ID`, `image` (or `images`, a list, in Test_Set), `Classification_Task`
{Image_Textual_Questions, Pure_Text_Questions: [{Question, Options{A..D}, Correct_Answer}]},
`Generation_Task` and `Mask_Task` ([{Question, Ground_Truth, Type: Image_Textual | Pure_Text}]).
Files are read with the `datasets` library; every question becomes an `EvalItem` with
`source="mllmu-bench"`, and images stay encoded in memory until a batch needs them.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

from manu_core.data import EvalItem, Sample
from manu_core.vocab import FORMS, forget_name
from manu_core.scoring import LETTERS

FORGET_CONFIGS = ("forget_5", "forget_10", "forget_15")
TASK_COLUMNS = ("Classification_Task", "Generation_Task", "Mask_Task")
_FORM_OF_TYPE = {"Image_Textual": "multimodal", "Pure_Text": "text"}
_MC_KEYS = {"multimodal": "Image_Textual_Questions", "text": "Pure_Text_Questions"}


class BenchmarkError(ValueError):
    """The local MLLMU-Bench folder is missing a config, a file or a column: says which and the fix."""


@dataclass
class Benchmark:
    """Evaluation items of the four sets and the images they refer to (`image(key)`)."""

    root: Path
    forget: str
    items: list[EvalItem]
    _images: dict[str, object] = field(default_factory=dict, repr=False)

    def image(self, key: str) -> Image.Image:
        return _decode(self._images, key)

    @property
    def forget_ids(self) -> tuple[str, ...]:
        return tuple(sorted({it.profile_id for it in self.items if it.set == "forget"}))

    def streams(self) -> dict[tuple[str, str], list[Sample]]:
        """MANU's four activation streams (split, form) from the benchmark itself: the forget and
        retain profiles' generation QA pairs, the image+text ones with the profile's own image, the
        text-only ones as the benchmark words them (the person named, no image). Load the forget and
        retain sets for this. The i-th question of each form of a profile share a pair id
        (`<profile>/<i>`), which the retain subsample keeps together (extract.match_retain)."""
        out: dict[tuple[str, str], list[Sample]] = {(s, f): [] for s in ("forget", "retain") for f in FORMS}
        for it in self.items:
            if it.task == "gen" and it.set in ("forget", "retain"):
                i = it.item_id.split("/")[2]
                out[(it.set, it.form)].append(Sample(f"{it.profile_id}/{i}/{it.form}", it.profile_id,
                                                     it.form, it.question, it.answer, it.image))
        empty = [k for k, v in out.items() if not v]
        if empty:
            raise BenchmarkError(f"no generation QA pairs for the streams {empty} under {self.root}: load the forget "
                                 "and retain sets (sets=('forget', 'retain', ...)), whose rows have Generation_Task.")
        return out


def _decode(store: dict, key: str) -> Image.Image:
    try:
        value = store[key]
    except KeyError:
        raise BenchmarkError(f"no image {key!r} in this benchmark folder") from None
    return _decode_cached(id(store), key, value)


@lru_cache(maxsize=256)
def _decode_cached(_store: int, _key: str, value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    return Image.open(io.BytesIO(value)).convert("RGB")


def _image_value(value, where: str):
    """Encoded bytes (hashable, cheap to keep) from what `datasets` gives for an image cell."""
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, dict) and value.get("path") and Path(value["path"]).is_file():
        return Path(value["path"]).read_bytes()
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BenchmarkError(f"{where}: image cell holds neither bytes nor a readable path ({type(value).__name__}).")


def read_config(root: str | Path, config: str, required: tuple[str, ...] = ("ID", *TASK_COLUMNS)):
    """One config as a `datasets.Dataset` (images left encoded)."""
    import datasets

    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"MLLMU-Bench folder not found: {root}. Download it on a machine with network "
                             "access (huggingface-cli download MLLMMU/MLLMU-Bench --repo-type dataset --local-dir "
                             "<folder>) and pass that folder.")
    files = sorted((root / config).glob("*.parquet"))
    if not files:
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        raise BenchmarkError(f"config {config!r} is missing under {root} (expected {root / config}/train-*.parquet); "
                             f"configs found: {have or 'none'}.")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise BenchmarkError(f"config {config!r} ({root / config}) lacks column(s) {missing}; it has "
                             f"{ds.column_names}. Is this the MLLMU-Bench parquet layout?")
    for col in ("image", "images"):  # keep images encoded: decoded only when a batch needs one
        feat = ds.features.get(col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


def _items_of_row(row: dict, set_: str, image_key: str, where: str) -> list[EvalItem]:
    pid = str(row["ID"])
    items: list[EvalItem] = []
    common = dict(set=set_, profile_id=pid, source="mllmu-bench")
    cls = row["Classification_Task"] or {}
    for form, key in _MC_KEYS.items():
        for i, q in enumerate(cls.get(key) or []):
            opts = q["Options"]
            letters = [k for k in LETTERS if opts.get(k) is not None]
            if q["Correct_Answer"] not in letters:
                raise BenchmarkError(f"{where}, profile {pid}, {key}[{i}]: Correct_Answer {q['Correct_Answer']!r} "
                                     f"is not one of the options {letters}.")
            correct = letters.index(q["Correct_Answer"])
            items.append(EvalItem(f"{set_}/{pid}/{i:02d}/{form}/mc", form=form, task="mc", question=q["Question"],
                                  answer=opts[letters[correct]], key_fact=opts[letters[correct]],
                                  options=tuple(opts[k] for k in letters), correct=correct,
                                  image=image_key if form == "multimodal" else None, **common))
    for column, task in (("Generation_Task", "gen"), ("Mask_Task", "cloze")):
        seen = {"multimodal": 0, "text": 0}
        for q in row[column] or []:
            form = _FORM_OF_TYPE.get(q["Type"])
            if form is None:
                raise BenchmarkError(f"{where}, profile {pid}, {column}: Type {q['Type']!r} is not one of "
                                     f"{sorted(_FORM_OF_TYPE)}.")
            i = seen[form]
            seen[form] += 1
            items.append(EvalItem(f"{set_}/{pid}/{i:02d}/{form}/{task}", form=form, task=task,
                                  question=q["Question"], answer=q["Ground_Truth"],
                                  key_fact=q["Ground_Truth"] if task == "cloze" else "",
                                  image=image_key if form == "multimodal" else None, **common))
    return items


def load_mllmu_bench(root: str | Path, forget: str | Sequence[str] = "forget_5", *, seed: int = 0,
                     sets: tuple[str, ...] = ("forget", "test", "retain", "celebrity")) -> Benchmark:
    """The four sets for one forget set. `forget` is an official split (forget_N, with retain_(100-N))
    or a list of profile ids (e.g. the validation forget set): then forget is those profiles' rows of
    Full_Set and retain every other profile of Full_Set (the benchmark's vanilla learned all of them).
    Test set: the forget profiles' rows of Test_Set, one of their transformed portraits chosen per
    profile with `seed` (the released code picks at random)."""
    root = Path(root)
    if isinstance(forget, str):
        if forget not in FORGET_CONFIGS:
            raise BenchmarkError(f"forget split must be one of {FORGET_CONFIGS} or a list of profile ids; "
                                 f"got {forget!r}.")
        forget_ds = read_config(root, forget)
        forget_ids = {str(i) for i in forget_ds["ID"]}
        retain = f"retain_{100 - int(forget.split('_')[1])}"
        sources = {"forget": (forget, forget_ds, None), "retain": (retain, None, None)}
        name = forget
    else:
        forget_ids = {str(i) for i in forget}
        full = read_config(root, "Full_Set")
        missing = sorted(forget_ids - {str(i) for i in full["ID"]})
        if not forget_ids or missing:
            raise BenchmarkError(f"forget ids must be profiles of Full_Set ({root / 'Full_Set'}); "
                                 + (f"{len(missing)} are not: {missing[:10]}" if missing else "got none")
                                 + ". Pass ids of the benchmark's 500 fictitious profiles.")
        sources = {"forget": ("Full_Set", full, True), "retain": ("Full_Set", full, False)}
        name = forget_name(forget_ids)
    sources |= {"test": ("Test_Set", None, True), "celebrity": ("Retain_Set", None, None)}
    bench = Benchmark(root, name, [])
    for set_ in sets:
        config, ds, of_forget = sources[set_]  # of_forget: keep only (True) or none of (False) the forget ids
        ds = ds if ds is not None else read_config(root, config)
        where = f"{root / config}"
        has_one, has_many = "image" in ds.column_names, "images" in ds.column_names
        if not (has_one or has_many):
            raise BenchmarkError(f"config {config!r} ({where}) has no `image` or `images` column; it has "
                                 f"{ds.column_names}.")
        for row in ds:
            pid = str(row["ID"])
            if of_forget is not None and (pid in forget_ids) != of_forget:
                continue
            if set_ == "test" and has_many and row["images"]:
                k = random.Random(f"test-view/{seed}/{pid}").randrange(len(row["images"]))
                value, key = row["images"][k], f"mllmu:{config}:{pid}:{k}"
            else:
                value, key = row["image"], f"mllmu:{config}:{pid}"
            bench._images[key] = _image_value(value, f"{where}, profile {pid}")
            bench.items += _items_of_row(row, set_, key, where)
    if "test" in sets and not any(it.set == "test" for it in bench.items):
        raise BenchmarkError(f"Test_Set under {root} has none of the {len(forget_ids)} profiles of {name}.")
    return bench


def check_layout(root: str | Path, forget: str | Sequence[str] = "forget_5") -> None:
    """The checks `load_mllmu_bench` would fail on, in a second and before any model loads: the folder,
    every config the forget set needs with its parquet files, the columns, and (for a list of ids) that
    each id is a profile of Full_Set. Reads parquet schemas and the ID column only."""
    import pyarrow.parquet as pq

    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"MLLMU-Bench folder not found: {root}. Download it on a machine with network access "
                             "(huggingface-cli download MLLMMU/MLLMU-Bench --repo-type dataset --local-dir <folder>) "
                             "and pass that folder; its layout: <folder>/{forget_5,retain_95,...,Full_Set,Test_Set,"
                             "Retain_Set}/*.parquet.")
    if isinstance(forget, str):
        if forget not in FORGET_CONFIGS:
            raise BenchmarkError(f"forget split must be one of {FORGET_CONFIGS} or a list of profile ids; got {forget!r}.")
        configs = [forget, f"retain_{100 - int(forget.split('_')[1])}"]
    else:
        configs = ["Full_Set"]
    have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    for config in configs + ["Test_Set", "Retain_Set"]:
        files = sorted((root / config).glob("*.parquet"))
        if not files:
            raise BenchmarkError(f"config {config!r} is missing under {root} (expected {root / config}/train-*.parquet); "
                                 f"configs found: {have or 'none'}.")
        names = pq.read_schema(files[0]).names
        missing = [c for c in ("ID", *TASK_COLUMNS) if c not in names]
        if missing or not {"image", "images"} & set(names):
            raise BenchmarkError(f"config {config!r} ({root / config}) lacks column(s) "
                                 f"{missing or ['image or images']}; it has {names}. Is this the MLLMU-Bench parquet "
                                 "layout?")
    if not isinstance(forget, str):
        ids = {str(i) for f in sorted((root / "Full_Set").glob("*.parquet"))
               for i in pq.read_table(f, columns=["ID"]).column("ID").to_pylist()}
        missing = sorted({str(i) for i in forget} - ids)
        if not forget or missing:
            raise BenchmarkError(f"forget ids must be profiles of Full_Set ({root / 'Full_Set'}); "
                                 + (f"{len(missing)} are not: {missing[:10]}" if missing else "got none")
                                 + ". Pass ids of the benchmark's 500 fictitious profiles.")
