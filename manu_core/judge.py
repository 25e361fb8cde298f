"""Factuality judges (1-10): does a generated answer say what the ground truth says?

The benchmark asks gpt-4o-mini with a rubric (evaluation.md, "Factuality score"). Here the judge is
pluggable and works offline; every score row and report carries the judge's `name`:

  offline              `OfflineJudge`: deterministic key-fact overlap mapped to 1-10 (the default
                       on the embedded model; not an LLM, and named so everywhere).
  openai:<url>#<model> `OpenAIJudge`: any OpenAI-compatible chat endpoint (a lab's vLLM server);
                       its API key and the hosts the key may go to are passed in (the
                       pipeline reads them from the worker's environment: tasks.devices.judge_for).
  hf:<path>            `HFJudge`: a local Hugging Face causal LM, scored by the likelihood of each
                       grade 1..10 after the rubric prompt (always a valid grade, deterministic).

`make_judge(spec, api_key=..., allowed=...)` turns one of those strings into a judge.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence
from urllib.parse import urlsplit

RUBRIC = """You are an impartial judge. Compare the model's answer with the ground truth answer to the \
question and rate how factually consistent the model's answer is with the ground truth, on a scale of 1 to 10:
10-9: the answer has the same meaning as the ground truth;
8-7: mostly correct, with minor omissions or inaccuracies;
6-5: partly correct, with some important facts wrong or missing;
4-3: major factual errors, only a small part is right;
2-1: wrong or irrelevant.

Question: {question}
Ground truth: {ground_truth}
Model's answer: {prediction}

Reply with the score only, a single integer from 1 to 10."""


class JudgeError(RuntimeError):
    """The judge could not score: the message names the endpoint or model, what failed and the fix."""


class Judge(Protocol):
    name: str

    def score(self, questions: Sequence[str], ground_truths: Sequence[str], predictions: Sequence[str],
              key_facts: Sequence[str] | None = None) -> list[int]: ...


def rubric_prompt(question: str, ground_truth: str, prediction: str) -> str:
    return RUBRIC.format(question=question, ground_truth=ground_truth, prediction=prediction or "(empty)")


_SCORE = re.compile(r"\b(10|[1-9])\b")


def parse_score(reply: str) -> int | None:
    """The first integer 1-10 in a judge's reply ("Score: 7", "7/10", "7"), or None."""
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# Offline

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the this that these those person individual is was are were be been has have had of in on at to for "
    "from by with as and or but it its their his her they he she them who whom which what where when how "
    "do does did name named called".split()
)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter  # rouge-score's own dependency, and its stemmer

    return porter.PorterStemmer()


def _content_stems(text: str) -> set[str]:
    stem = _stemmer().stem
    return {stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


@dataclass(frozen=True)
class OfflineJudge:
    """1 + 9 × (share of the key fact's content words, stemmed, that the answer contains), rounded.

    The key fact is the part of the ground truth that carries the fact ("Riga, Latvia"); without one
    (the real benchmark has none) the ground truth's content words are used. Deterministic; not an
    LLM judgment, which every report says by naming it.
    """

    name: str = "offline-keyfact-overlap"

    def score(self, questions, ground_truths, predictions, key_facts=None) -> list[int]:
        facts = key_facts if key_facts is not None else [""] * len(ground_truths)
        out = []
        for truth, pred, fact in zip(ground_truths, predictions, facts, strict=True):
            want = _content_stems(fact) or _content_stems(truth)
            if not want:
                out.append(10 if pred.strip().lower() == truth.strip().lower() else 1)
                continue
            have = _content_stems(pred)
            out.append(1 + int(9 * len(want & have) / len(want) + 0.5))  # half up, not to even
        return out


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


ALLOW_LIST_SETTING = "MANU_JUDGE_ENDPOINTS"  # the worker's setting that fills `allowed` (tasks.devices.judge_for)


def check_key_destination(base_url: str, allowed: tuple[str, ...] = ()) -> None:
    """Where the judge's API key may be sent. A run parameter names the URL, so whoever can start a run
    could otherwise point the key anywhere: the host must be loopback or on the worker's allow-list
    (`allowed`: host or host:port; the pipeline fills it from $MANU_JUDGE_ENDPOINTS). A host on the
    list is the operator's choice, over https or plain http (a lab's vLLM server often has no TLS);
    a host off the list gets no key, whatever the scheme."""
    u = urlsplit(base_url)
    host = (u.hostname or "").lower()
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return
    hosts = tuple(h.strip().lower() for h in allowed if h.strip())
    if host not in hosts and f"{host}:{port}" not in hosts:
        raise JudgeError(f"the judge host {host!r} is not on this worker's allow-list, so the API key is not sent "
                         f"there; the worker's operator adds it with {ALLOW_LIST_SETTING}={host} (comma-separated "
                         f"hosts or host:port; now: {', '.join(hosts) or 'empty'}).")


def check_reachable(base_url: str, timeout: float = 5.0) -> None:
    """Fail at once, before any model loads, when nothing answers at the judge's URL: any HTTP reply to
    GET {base_url}/models (even 401 or 404) means a server is there."""
    import httpx

    try:
        httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout)
    except httpx.HTTPError as e:
        raise JudgeError(f"the judge endpoint {base_url} does not answer ({type(e).__name__}: {e}); start the "
                         "judge server or fix the URL in openai:<base url>#<model>.") from None


@dataclass
class OpenAIJudge:
    """POST {base_url}/chat/completions, temperature 0, one request per answer.

    Connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff
    (`backoff` × 2^k seconds), then raise JudgeError. A reply without a 1-10 score (or not the
    chat-completions JSON) raises JudgeError at once: it is not transient.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    allowed: tuple[str, ...] = ()  # hosts other than loopback a key may go to

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise JudgeError(f"judge URL must start with http:// or https://; got {self.base_url!r}. "
                             "Example: openai:http://localhost:8000/v1#meta-llama/Llama-3.1-8B-Instruct")
        self.base_url = self.base_url.rstrip("/")
        if self.api_key:
            check_key_destination(self.base_url, self.allowed)

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    def _post(self, client, prompt: str) -> str:
        import httpx

        url = f"{self.base_url}/chat/completions"
        body = {"model": self.model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": prompt}]}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = client.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:  # connection refused, timeout, protocol error
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise JudgeError(f"judge {url} refused the request: HTTP {r.status_code}: {r.text[:300]}. "
                                 "Check the model name and $MANU_JUDGE_API_KEY.")
            try:
                return r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise JudgeError(f"judge {url} sent a reply that is not a chat completion "
                                 f"({type(e).__name__}: {e}): {r.text[:300]!r}") from None
        raise JudgeError(f"judge {url} failed {self.retries + 1} times; last error: {last}. "
                         "Is the server up and reachable? (timeout per request: "
                         f"{self.timeout:g} s; retries: {self.retries})")

    def score(self, questions, ground_truths, predictions, key_facts=None) -> list[int]:
        import httpx

        out = []
        with httpx.Client(timeout=self.timeout) as client:
            for q, t, p in zip(questions, ground_truths, predictions, strict=True):
                reply = self._post(client, rubric_prompt(q, t, p))
                s = parse_score(reply)
                if s is None:
                    raise JudgeError(f"judge {self.base_url} ({self.model}) replied without a score 1-10: "
                                     f"{reply[:200]!r}. Use a model that follows the rubric's format.")
                out.append(s)
        return out


# ----------------------------------------------------------------------------------------------
# Local Hugging Face causal LM


@dataclass
class HFJudge:
    """A local causal LM: the grade is the one of "1".."10" with the highest log-likelihood after
    the rubric prompt (in the model's chat format when its tokenizer has one)."""

    path: str
    device: str = "cpu"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not Path(self.path).is_dir():
            raise JudgeError(f"judge model folder not found: {self.path}. Pass hf:<local folder with "
                             "config.json and tokenizer files>; nothing is downloaded.")
        self._model = self._tok = None

    @property
    def name(self) -> str:
        return f"hf:{Path(self.path).name}"

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        return self._model, self._tok

    def _context(self, tok, prompt: str) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
        return prompt + "\nScore:"

    def score(self, questions, ground_truths, predictions, key_facts=None) -> list[int]:
        import torch

        model, tok = self._load()
        grades = [str(g) for g in range(1, 11)]
        out = []
        for q, t, p in zip(questions, ground_truths, predictions, strict=True):
            ctx = tok(self._context(tok, rubric_prompt(q, t, p)), add_special_tokens=False)["input_ids"]
            rows = [ctx + tok(" " + g if not ctx else g, add_special_tokens=False)["input_ids"] for g in grades]
            best, best_lp = 1, float("-inf")
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=self.device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=self.device)
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                for j, r in enumerate(chunk):
                    lp = sum(float(logp[j, k - 1, r[k]]) for k in range(len(ctx), len(r)))
                    if lp > best_lp:
                        best, best_lp = start + j + 1, lp
            out.append(best)
        return out


def make_judge(spec: str = "offline", *, device: str = "cpu", api_key: str | None = None,
               allowed: tuple[str, ...] = ()) -> Judge:
    """`offline`, `openai:<base url>#<model>` (with its `api_key` and the non-loopback hosts
    `allowed` to receive it) or `hf:<local path>`."""
    if spec == "offline":
        return OfflineJudge()
    if spec.startswith("openai:"):
        url, sep, model = spec[len("openai:"):].rpartition("#")
        if not sep or not url or not model:
            raise JudgeError(f"judge spec {spec!r} needs a model after '#': openai:<base url>#<model>, e.g. "
                             "openai:http://localhost:8000/v1#Qwen/Qwen2.5-7B-Instruct")
        return OpenAIJudge(url, model, api_key=api_key, allowed=tuple(allowed))
    if spec.startswith("hf:"):
        return HFJudge(spec[len("hf:"):], device=device)
    raise JudgeError(f"unknown judge {spec!r}; use offline, openai:<base url>#<model> or hf:<local path>")
