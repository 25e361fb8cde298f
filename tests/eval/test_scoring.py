"""Scorers and prompts on hand-made answers (evaluation.md, "Tasks and metrics")."""

import pytest
from rouge_score import rouge_scorer

from manu_core.scoring import (CLOZE_INSTRUCTION, GEN_INSTRUCTION, MC_INSTRUCTION, cloze_correct, cloze_prompt,
                               extract_letter, gen_prompt, mc_prompt, rouge_l)


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"),
    ("b", "B"),                    # lower case
    (" C", "C"),                   # leading space
    ("\n  d) Paris", "D"),
    ("Answer: B", "B"),            # the instruction's frame echoed
    ("answer:c", "C"),
    ("Correct Answer: A", "A"),
    ("The answer is D.", "D"),
    ("(A)", "A"),
    ("Bob", "B"),                  # the benchmark's first-character rule, kept as is
    ("E", None),                   # not an option letter
    ("", None),                    # no letter
    ("   ", None),
    ("I think so", None),
    ("Answer:", None),
])
def test_extract_letter(answer, letter):
    assert extract_letter(answer) == letter


def test_extract_letter_respects_number_of_options():
    assert extract_letter("C", n_options=2) is None
    assert extract_letter("B", n_options=2) == "B"


def test_mc_prompt_is_the_benchmarks_block():
    p = mc_prompt("Where was this person born?", ["Riga", "Oslo", "Lima", "Cork"])
    assert p == ("Where was this person born?\nA: Riga\nB: Oslo\nC: Lima\nD: Cork\n" + MC_INSTRUCTION)
    with pytest.raises(ValueError, match="2-4 options"):
        mc_prompt("q", ["only one"])


def test_gen_and_cloze_prompts():
    assert gen_prompt("Who?") == "Who?\n" + GEN_INSTRUCTION
    assert cloze_prompt("This person was born in __.") == "This person was born in [Blank].\n" + CLOZE_INSTRUCTION
    with pytest.raises(ValueError, match="`__` blank"):
        cloze_prompt("no blank here")


@pytest.mark.parametrize("prediction, truth, ok", [
    ("Riga, Latvia", "Riga, Latvia", True),
    ("She was born in RIGA, LATVIA in 1990.", "riga, latvia", True),   # case-insensitive substring
    ("Riga", "Riga, Latvia", False),                                   # partial is wrong
    ("Latvia, Riga", "Riga, Latvia", False),
    ("anything", "", False),                                           # an empty truth never matches
    ("  riga, latvia  ", " Riga, Latvia ", True),
])
def test_cloze_substring_rule(prediction, truth, ok):
    assert cloze_correct(prediction, truth) is ok


@pytest.mark.parametrize("pred, ref", [
    ("This person was born in Riga, Latvia.", "This person was born in Riga, Latvia."),
    ("She was born in Riga.", "This person was born in Riga, Latvia."),
    ("The person works as an engineer.", "This individual is working as a software engineer."),
    ("", "This person is female."),
    ("running runs ran", "run running runner"),  # stemming matters
])
def test_rouge_l_equals_rouge_score(pred, ref):
    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(want, abs=0)


@pytest.mark.parametrize("pred, ref, want", [
    # LCS over tokens; P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R). Tokens are lower-cased words.
    ("she was born in riga", "this person was born in riga latvia", 2 * (4 / 5) * (4 / 7) / (4 / 5 + 4 / 7)),
    ("born riga", "riga born", 0.5),  # LCS 1 of 2 and 2 -> P = R = 0.5
    ("The Engineer", "an engineer", 0.5),  # "engineer" matches across case: LCS 1, P = R = 1/2
    ("a b c", "x y z", 0.0),
    ("", "this person is female", 0.0),
])
def test_rouge_l_hand_computed(pred, ref, want):
    assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12)


def test_rouge_l_uses_stemming():
    assert rouge_l("runs", "running") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
