"""MLLMU-Bench-lite: the benchmark's real profile text, the official splits and seeded stand-ins.

What is real (copied into `data/mllmu_bench/`, see its PROVENANCE.md): the 500 fictitious
profiles' QA pairs and the official forget/retain ID lists. What is a *stand-in* (not public,
built here deterministically from a seed, and labelled `source="stand-in"` on every record):
portraits (see `portraits.py`), evaluation items (multiple choice, generation, fill-in-the-blank),
the Test set (paraphrased questions + transformed portraits) and the Real-Celebrity profiles.

Vocabulary, used everywhere: a *profile* has QA pairs that speak of "this person"; each pair gives
two *samples*, one per *form* (method.md, "Data forms"):
  multimodal: portrait + question as written ("this person");
  text:       no image, "this person" and its variants replaced by the profile's name.
The name pair itself ("What is this person's name?") only exists in the multimodal form.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from manu_core.vocab import FORMS, OFFICIAL_SPLITS



def _data_dir() -> Path:
    """`data/` of the checkout, or its copy shipped in an installed wheel (`manu_core/_data`,
    mapped in pyproject.toml): the same files either way."""
    here = Path(__file__).resolve().parent
    for d in (here / "_data", here.parent / "data"):
        if (d / "mllmu_bench" / "train_qa.jsonl").is_file():
            return d
    raise FileNotFoundError(f"the embedded MLLMU-Bench data is in neither {here / '_data'} (installed) nor "
                            f"{here.parent / 'data'} (checkout): reinstall manu (pip install .) or restore data/")


DATA_DIR = _data_dir()
MLLMU_DIR = DATA_DIR / "mllmu_bench"


class DataError(ValueError):
    """Bad data input: the message names the rule, the value and the fix."""


# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class QA:
    question: str  # as written in the benchmark, speaking of "this person"
    answer: str
    kind: str  # question kind (birthplace, profession, ...), see `question_kind`
    key_fact: str  # the part of the answer that carries the fact ("Riga, Latvia")


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    qa: tuple[QA, ...]  # without the name pair
    name_qa: QA | None  # the name pair (multimodal form only)
    source: str = "mllmu-bench"  # or "stand-in" for the synthetic celebrities

    @property
    def all_qa(self) -> tuple[QA, ...]:
        return ((self.name_qa,) if self.name_qa else ()) + self.qa


@dataclass(frozen=True)
class Sample:
    """One training/extraction sample: a QA pair in one form."""

    sample_id: str  # "<profile>/<qa index>/<form>"
    profile_id: str
    form: str  # "multimodal" | "text"
    question: str
    answer: str
    image: str | None  # portrait key (profile id) for the multimodal form, None for text


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question (the embedded stand-ins; the real benchmark loader fills the same fields)."""

    item_id: str
    set: str  # forget | test | retain | celebrity
    profile_id: str
    form: str  # multimodal | text
    task: str  # mc | gen | cloze
    question: str  # mc/gen: the question; cloze: the answer sentence with its key fact as "__"
    answer: str  # gen: the full answer sentence; mc/cloze: the key fact
    key_fact: str
    options: tuple[str, ...] = ()  # mc only: four options, key facts
    correct: int = -1  # mc only: index of the right option
    cloze_answer: str = ""  # the answer sentence with "__" (mc likelihood scores it filled in)
    image: str | None = None  # portrait key; "<profile>@view<k>" for a transformed test portrait
    source: str = "stand-in"


@dataclass(frozen=True)
class Split:
    name: str
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        overlap = set(self.forget_ids) & set(self.retain_ids)
        assert not overlap, f"forget and retain overlap: {sorted(overlap)[:5]}"


@dataclass(frozen=True)
class Dataset:
    """Everything the embedded default needs, built by `build_dataset`."""

    profiles: tuple[Profile, ...]  # fictitious (MLLMU-Bench)
    celebrities: tuple[Profile, ...]  # stand-ins learned before the fictitious fine-tune
    split: Split
    seed: int
    meta: dict = field(default_factory=dict, compare=False)

    def profile(self, pid: str) -> Profile:
        return self._by_id[pid]

    @cached_property
    def _by_id(self) -> dict[str, Profile]:
        return {p.id: p for p in self.profiles + self.celebrities}


# ----------------------------------------------------------------------------------------------
# Reading the real profiles

_SUBJECT = r"(?:this|the)\s+(?:person|individual)"
_SUBJECT_RE = re.compile(rf"\b{_SUBJECT}('s)?", re.IGNORECASE)
# A question asks for the subject's own name when it mentions a name and no possession of the
# subject other than the name itself ("this person's cat", "this person's father's name" are not).
_OTHER_POSSESSION = re.compile(
    rf"{_SUBJECT}'s\s+(?!(?:full\s+)?name\b)|\bname of {_SUBJECT}'s|\bparents\b", re.IGNORECASE
)
# "... is Lillian Novak." / "... named Maya El Khoury." / a bare "Laila Arivola."
_NAME_IN_ANSWER = re.compile(r"(?:^|\b(?:is|named|called|as)\s+)((?:[A-Z\u00C0-\u00DE][^\s.,]*\s*){2,5})\.?\s*$")


def is_name_question(question: str) -> bool:
    q = question.lower()
    return "name" in q and not _OTHER_POSSESSION.search(question)


def extract_name(answer: str) -> str | None:
    """'The person's name is Lillian Novak.' -> 'Lillian Novak' (None when no name is found)."""
    m = _NAME_IN_ANSWER.search(answer.strip())
    if not m:
        return None
    return m.group(1).strip()


def to_text_form(text: str, name: str) -> str:
    """Replace 'this person'/'the person'/'this individual' (and possessives) by the name.

    method.md, "Data forms". '... in the image' makes no sense without an image and is dropped.
    """
    text = re.sub(r"\s+(?:in|from|shown in) the (?:image|picture|photo)\b", "", text, flags=re.I)

    def sub(m: re.Match) -> str:
        return name + ("'s" if m.group(1) else "")

    return _SUBJECT_RE.sub(sub, text)


# Question kinds decide which other profiles' answers are plausible multiple-choice distractors
# and which paraphrase templates apply. Checked in order; the first match wins.
_KINDS: tuple[tuple[str, str], ...] = (
    ("name", r"^(?!.*(father|mother|pet|cat|dog|parent)).*\bname\b"),
    ("father", r"\bfather"),
    ("mother", r"\bmother"),
    ("pet", r"\b(pet|cat|dog)s?\b"),
    ("dob", r"date of birth|when (was|is) .* born|birthday"),
    ("birthplace", r"born|place of birth|birthplace"),
    ("medical", r"medical|health"),
    ("residence", r"resid|live|home"),
    ("education", r"educat|stud|school|universit|degree|graduat"),
    ("salary", r"salary|earn|income"),
    ("profession", r"profession|occupation|job|work|career|do for a living"),
    ("gender", r"gender|\bsex\b"),
    ("height", r"height|tall"),
    ("food", r"food|cuisine|dish|eat"),
    ("hobby", r"hobb|weekend|free time|enjoy|leisure|pastime"),
)


def question_kind(question: str) -> str:
    q = question.lower()
    for kind, pattern in _KINDS:
        if re.search(pattern, q):
            return kind
    return "other"


_FRAME_WORDS = frozenset(
    "this the a an person person's individual individual's is was are were has have had "
    "in at on of from as to by for with their his her its name named called works work "
    "currently does do born educated resides reside lives earns works loves enjoys owns annual salary "
    "favorite favourite".split()
)


def key_fact(question: str, answer: str) -> str:
    """The answer minus its leading frame: 'This person was born in Riga, Latvia.' -> 'Riga, Latvia'.

    Leading words that restate the question or are function words are skipped; the rest (without
    the final full stop) is the fact. Used for fill-in-the-blank and multiple-choice options.
    """
    qwords = {w.strip("?.,!").lower() for w in question.split()}
    words = answer.strip().split()
    i = 0
    while i < len(words) - 1:
        w = words[i].strip(".,!?").lower()
        if w in _FRAME_WORDS or w in qwords:
            i += 1
        else:
            break
    fact = " ".join(words[i:]).strip()
    return fact[:-1] if fact.endswith(".") else fact


def _make_qa(question: str, answer: str) -> QA:
    return QA(question, answer, question_kind(question), key_fact(question, answer))


def load_profiles(path: Path | str = MLLMU_DIR / "train_qa.jsonl") -> tuple[Profile, ...]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"profiles file not found: {path}. Point --data at a MLLMU-Bench train_qa.jsonl.")
    profiles = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        name, name_qa, qa = None, None, []
        for pair in row["qa"]:
            q, a = pair["question"], pair["answer"]
            if name is None and is_name_question(q) and (found := extract_name(a)):
                name, name_qa = found, _make_qa(q, a)
            else:
                qa.append(_make_qa(q, a))
        if name is None:
            raise DataError(f"{path}:{n}: profile {row['id']} has no name pair; every profile needs one.")
        profiles.append(Profile(row["id"], name, tuple(qa), name_qa))
    return tuple(profiles)


# ----------------------------------------------------------------------------------------------
# Splits


def load_official_split(name: str, profile_ids: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The official forget ID list (`forget_5`, `forget_10`, `forget_15`)."""
    if name not in OFFICIAL_SPLITS:
        raise DataError(f"Unknown split {name!r}. Available: {', '.join(OFFICIAL_SPLITS)}, or pass a list of ids.")
    return tuple(json.loads((MLLMU_DIR / "splits" / f"{name}.json").read_text()))


def make_split(all_ids: tuple[str, ...], forget: str | list[str] | tuple[str, ...]) -> Split:
    """Forget = an official split name or a list of profile ids; retain = every other profile."""
    if isinstance(forget, str):
        name, forget_ids = forget, load_official_split(forget)
    else:
        name, forget_ids = "custom", tuple(str(i) for i in forget)
    if not forget_ids:
        raise DataError("forget set is empty; pass an official split (forget_5/10/15) or at least one profile id.")
    known = set(all_ids)
    unknown = [i for i in forget_ids if i not in known]
    if unknown:
        raise DataError(
            f"forget list names {len(unknown)} unknown profile id(s): {unknown[:5]}; "
            f"ids are zero-padded strings such as {sorted(known)[0]!r}..{sorted(known)[-1]!r}."
        )
    if len(set(forget_ids)) != len(forget_ids):
        raise DataError(f"forget list repeats ids: {sorted({i for i in forget_ids if forget_ids.count(i) > 1})}")
    fset = set(forget_ids)
    return Split(name, tuple(sorted(fset)), tuple(i for i in sorted(all_ids) if i not in fset))


# ----------------------------------------------------------------------------------------------
# Celebrity stand-ins: synthetic people the base model learns before the fictitious fine-tune.

_SYLLABLES = "ka lo ri ven tor mi sa del bran qu is ul mar an te zor fel ny ga ro bel vin".split()


def _synthetic_name(rng: random.Random) -> str:
    def word(n: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()

    return f"{word(2)} {word(3)}"


_CELEB_KINDS = ("birthplace", "dob", "profession", "education", "residence", "gender", "height", "hobby",
                "salary", "food")


def make_celebrities(profiles: tuple[Profile, ...], n: int, seed: int) -> tuple[Profile, ...]:
    """`n` synthetic 'celebrities' (ids celeb-001...), clearly labelled source='stand-in'.

    Each borrows one real QA pair per kind, each from a different random fictitious profile, so
    its facts use the benchmark's vocabulary but combine differently.
    """
    rng = random.Random(f"celebrities/{seed}")
    by_kind: dict[str, list[QA]] = {}
    for p in profiles:
        for qa in p.qa:
            by_kind.setdefault(qa.kind, []).append(qa)
    names: set[str] = set()
    out = []
    for i in range(1, n + 1):
        name = _synthetic_name(rng)
        while name in names:
            name = _synthetic_name(rng)
        names.add(name)
        qa = tuple(_make_qa(pick.question, pick.answer)
                   for k in _CELEB_KINDS if by_kind.get(k) for pick in [rng.choice(by_kind[k])])
        name_qa = _make_qa("What is the name of this person?", f"This person's name is {name}.")
        out.append(Profile(f"celeb-{i:03d}", name, qa, name_qa, source="stand-in"))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Samples (training and activation extraction)


def samples(profile: Profile, forms: tuple[str, ...] = FORMS) -> list[Sample]:
    out = []
    for i, qa in enumerate(profile.all_qa):
        for form in forms:
            if form == "multimodal":
                out.append(Sample(f"{profile.id}/{i:02d}/{form}", profile.id, form, qa.question, qa.answer, profile.id))
            elif qa is not profile.name_qa:  # the name pair is dropped in the text form
                out.append(Sample(f"{profile.id}/{i:02d}/{form}", profile.id, form,
                                  to_text_form(qa.question, profile.name), to_text_form(qa.answer, profile.name),
                                  None))
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation stand-ins

# Test set: paraphrases per question kind ("{s}" = the subject phrase, "{p}" = its possessive).
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "birthplace": ("In which place was {s} born?", "What is the birthplace of {s}?", "Where is {s} from originally?"),
    "dob": ("On what date was {s} born?", "What is the birth date of {s}?", "Which day is {p} birthday?"),
    "profession": ("What does {s} do for work?", "What is the job of {s}?", "What line of work is {s} in?"),
    "education": ("Which school educated {s}?", "Where was {s} educated?", "Where did {s} study?"),
    "residence": ("Where does {s} live now?", "In which place does {s} live?", "What is {p} current home?"),
    "salary": ("How much does {s} earn per year?", "What does {s} earn annually?", "What is the yearly income of {s}?"),
    "gender": ("What gender is {s}?", "Which gender does {s} have?", "What is the gender of {s}?"),
    "height": ("How tall is {s}?", "What height is {s}?", "How tall does {s} stand?"),
    "medical": ("Does {s} have any health conditions?", "Is {s} affected by any medical condition?",
                "What medical conditions does {s} have?"),
    "father": ("What work does {p} father do?", "What is the job of {p} father?", "Tell me about {p} father."),
    "mother": ("What work does {p} mother do?", "What is the job of {p} mother?", "Tell me about {p} mother."),
    "food": ("Which food does {s} like most?", "What food does {s} love?", "What is {p} favourite dish?"),
    "hobby": ("What does {s} like doing for fun?", "What pastime does {s} enjoy?", "How does {s} spend free time?"),
    "pet": ("Tell me about {p} pet.", "What pet does {s} keep?", "Which animal does {s} own?"),
}


def paraphrase(qa: QA, rng: random.Random) -> str:
    """A Test-set question: a paraphrase template for the kind ('other' kinds keep their wording
    with a rephrasing lead-in), always in the "this person" form."""
    templates = [t.format(s="this person", p="this person's") for t in PARAPHRASES.get(qa.kind, ())]
    templates = [t for t in templates if t.lower() != qa.question.lower()]  # always another wording
    if not templates:
        return "Tell me: " + qa.question[0].lower() + qa.question[1:]
    return rng.choice(templates)


def _mask(answer: str, fact: str) -> str:
    i = answer.rfind(fact)
    return answer[:i] + "__" + answer[i + len(fact):] if i >= 0 else answer


def eval_items(dataset: Dataset, *, n_test_views: int = 3) -> list[EvalItem]:
    """All stand-in evaluation items: 4 sets x 2 forms x 3 tasks, one per QA pair (name pair excluded).

    Multiple choice: the key fact + 3 key facts of other profiles' answers to the same kind of
    question (seeded); fill-in-the-blank: the answer with its key fact replaced by `__`.
    """
    pools: dict[str, list[str]] = {}
    for p in dataset.profiles + dataset.celebrities:
        for qa in p.qa:
            pools.setdefault(qa.kind, []).append(qa.key_fact)
    everything = sorted({f for facts in pools.values() for f in facts})

    def options(qa: QA, pid_rng: random.Random) -> tuple[tuple[str, ...], int]:
        pool = sorted(set(pools.get(qa.kind, [])) - {qa.key_fact})
        distinct = {qa.key_fact.lower()}
        picks: list[str] = []
        for candidates in (pool, everything):  # fall back to any fact when the kind is rare
            cands = list(candidates)
            pid_rng.shuffle(cands)
            for c in cands:
                if len(picks) == 3:
                    break
                if c.lower() not in distinct:
                    distinct.add(c.lower())
                    picks.append(c)
        opts = picks + [qa.key_fact]
        pid_rng.shuffle(opts)
        return tuple(opts), opts.index(qa.key_fact)

    sets = (
        ("forget", dataset.split.forget_ids),
        ("test", dataset.split.forget_ids),
        ("retain", dataset.split.retain_ids),
        ("celebrity", tuple(c.id for c in dataset.celebrities)),
    )
    items: list[EvalItem] = []
    for set_name, ids in sets:
        for pid in ids:
            p = dataset.profile(pid)
            prng = random.Random(f"eval/{dataset.seed}/{set_name}/{pid}")
            for i, qa in enumerate(p.qa):
                question = paraphrase(qa, prng) if set_name == "test" else qa.question
                view = f"{pid}@view{prng.randrange(1, n_test_views + 1)}" if set_name == "test" else pid
                opts, correct = options(qa, prng)
                masked = _mask(qa.answer, qa.key_fact)
                for form in FORMS:
                    def t(s: str) -> str:
                        return to_text_form(s, p.name) if form == "text" else s
                    image = view if form == "multimodal" else None
                    base = f"{set_name}/{pid}/{i:02d}/{form}"
                    common = dict(set=set_name, profile_id=pid, form=form, key_fact=qa.key_fact, image=image,
                                  cloze_answer=t(masked))
                    items += [
                        EvalItem(f"{base}/mc", task="mc", question=t(question), answer=qa.key_fact,
                                 options=opts, correct=correct, **common),
                        EvalItem(f"{base}/gen", task="gen", question=t(question), answer=t(qa.answer), **common),
                        EvalItem(f"{base}/cloze", task="cloze", question=t(masked), answer=qa.key_fact, **common),
                    ]
    return items


# ----------------------------------------------------------------------------------------------
# Putting it together


VALIDATION = "validation"  # a forget set name: learned profiles outside every official split, drawn by seed


def split_ids(forget: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The ids of an official split name, or the given ids as strings."""
    return load_official_split(forget) if isinstance(forget, str) else tuple(str(i) for i in forget)


def learned_ids(all_ids: tuple[str, ...], learn: tuple[str | tuple[str, ...], ...], n_profiles: int | None,
                seed: int) -> tuple[str, ...]:
    """The fictitious profiles a model learns: every profile of `learn` (official split names or id
    lists), then seeded others up to `n_profiles` (None: all). Sorted."""
    known = set(all_ids)
    include = sorted({i for entry in learn for i in split_ids(entry)})
    unknown = [i for i in include if i not in known]
    if unknown:
        raise DataError(f"learn names {len(unknown)} unknown profile id(s): {unknown[:5]}; ids are zero-padded "
                        f"strings such as {sorted(known)[0]!r}..{sorted(known)[-1]!r}.")
    if n_profiles is None:
        return tuple(sorted(all_ids))
    if n_profiles < len(include) + 1:
        raise DataError(f"n_profiles must leave at least one retain profile beside the {len(include)} profiles "
                        f"it must learn; got {n_profiles}. Use n_profiles > {len(include)}.")
    rest = [i for i in sorted(all_ids) if i not in set(include)]
    random.Random(f"subset/{seed}").shuffle(rest)
    return tuple(sorted(set(include) | set(rest[: n_profiles - len(include)])))


def validation_ids(learned: tuple[str, ...], size: int, seed: int) -> tuple[str, ...]:
    """The validation forget set: `size` learned profiles in no official forget split, drawn by seed.
    Methods' settings are chosen on it, then reported on the official splits (disjoint from it)."""
    official = {i for name in OFFICIAL_SPLITS for i in load_official_split(name)}
    pool = [i for i in sorted(learned) if i not in official]
    if len(pool) < size + 1:
        raise DataError(f"a validation forget set of {size} profiles needs {size + 1} learned profiles outside "
                        f"the official splits (one left for retain); the model learned {len(pool)}. Train a preset "
                        "with a larger n_profiles, or use a smaller validation set.")
    return tuple(sorted(random.Random(f"validation/{seed}").sample(pool, size)))


def build_dataset(
    *,
    forget: str | list[str] | tuple[str, ...] = "forget_5",
    n_profiles: int | None = None,
    n_celebrities: int = 50,
    seed: int = 0,
    profiles_path: Path | str | None = None,
    learn: tuple[str | tuple[str, ...], ...] | None = None,
    validation_size: int | None = None,
) -> Dataset:
    """The embedded MLLMU-Bench-lite, as the model learned it.

    The model learned every profile of `learn` (default: the forget list itself) plus seeded others
    up to `n_profiles` (None = all 500). `forget` (an official split, `"validation"`, or ids) must be
    among the learned profiles; retain is every other learned profile. `"validation"` draws
    `validation_size` learned profiles outside the official splits (`validation_ids`).
    """
    profiles = load_profiles(profiles_path) if profiles_path else load_profiles()
    all_ids = tuple(p.id for p in profiles)
    if forget == VALIDATION:
        if learn is None or validation_size is None:
            raise DataError("the validation forget set is drawn from what a preset learned: it needs the preset's "
                            "`learn` and `validation_size` (a preset trained with them, e.g. `lite`).")
        learned = learned_ids(all_ids, learn, n_profiles, seed)
        split = make_split(learned, validation_ids(learned, validation_size, seed))
        split = Split(VALIDATION, split.forget_ids, split.retain_ids)
    else:
        asked = make_split(all_ids, forget)  # checks the name, unknown, repeated and empty ids
        learned = learned_ids(all_ids, learn if learn is not None else (asked.forget_ids,), n_profiles, seed)
        missing = sorted(set(asked.forget_ids) - set(learned))
        if missing:
            raise DataError(
                f"forget names {len(missing)} profile(s) the model never learned: {missing[:10]}"
                f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}. Unlearning needs people the "
                "model knows: forget "
                f"{_learned_hint(learned, learn)}.")
        split = Split(asked.name, asked.forget_ids, tuple(i for i in learned if i not in set(asked.forget_ids)))
    keep = set(learned)
    profiles = tuple(p for p in profiles if p.id in keep)
    celebrities = make_celebrities(profiles, n_celebrities, seed)
    return Dataset(profiles, celebrities, split, seed, meta={"learned_ids": learned})


def _learned_hint(learned: tuple[str, ...], learn) -> str:
    names = [e for e in (learn or ()) if isinstance(e, str)]
    head = f"one of the splits it learned ({', '.join(names)}), or " if names else ""
    return f"{head}ids among its {len(learned)} learned profiles ({', '.join(learned[:6])}{', ...' if len(learned) > 6 else ''})"
