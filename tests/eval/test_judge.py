"""Factuality judges: offline determinism, the OpenAI-compatible client over real HTTP on
127.0.0.1 (success, retries, timeout, malformed replies), and a local Hugging Face causal LM."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from manu_core.judge import (RUBRIC, HFJudge, JudgeError, OfflineJudge, OpenAIJudge, make_judge, parse_score,
                             rubric_prompt)


def test_offline_judge_is_deterministic_and_graded():
    j = OfflineJudge()
    truths = ["This person was born in Riga, Latvia."] * 4
    preds = ["She was born in Riga, Latvia.", "Born in Riga.", "Born in Oslo, Norway.", ""]
    facts = ["Riga, Latvia"] * 4
    scores = j.score(["Where?"] * 4, truths, preds, facts)
    assert scores == [10, 6, 1, 1]
    assert j.score(["Where?"] * 4, truths, preds, facts) == scores
    # Without a key fact (the real benchmark), the ground truth's content words count.
    assert j.score(["Where?"], truths[:1], ["This person was born in Riga, Latvia."]) == [10]
    assert j.name == "offline-keyfact-overlap"


@pytest.mark.parametrize("reply, score", [("7", 7), ("Score: 10", 10), ("8/10", 8), ("none", None), ("0", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_rubric_prompt_follows_the_benchmarks_scale():
    p = rubric_prompt("Where?", "Riga.", "Oslo.")
    for band in ("10-9", "8-7", "6-5", "4-3", "2-1"):
        assert band in RUBRIC and band in p
    assert "Ground truth: Riga." in p and "Model's answer: Oslo." in p


# ---------------------------------------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}
    bodies: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        mode = self.path.split("/")[1]
        n = self.calls[mode] = self.calls.get(mode, 0) + 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append({"mode": mode, "auth": self.headers.get("Authorization"), **body})
        ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Score: 8"}}]})
        if mode == "ok":
            self._reply(200, ok)
        elif mode == "flaky":  # two 503s, then fine
            self._reply(503, "busy") if n <= 2 else self._reply(200, ok)
        elif mode == "down":
            self._reply(500, "internal error")
        elif mode == "slow":
            time.sleep(0.5)
            self._reply(200, ok)
        elif mode == "malformed":
            self._reply(200, "{not json")
        elif mode == "noscore":
            self._reply(200, json.dumps({"choices": [{"message": {"content": "It is quite good."}}]}))
        elif mode == "unauthorized":
            self._reply(401, '{"error": "bad key"}')


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _judge(server, mode, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIJudge(f"{server}/{mode}/v1", "judge-model", api_key="sk-test", **kw)


def test_openai_judge_scores_over_http(server):
    j = _judge(server, "ok")
    assert j.score(["Where?", "Who?"], ["Riga.", "Ann."], ["Riga.", "Bob."]) == [8, 8]
    sent = [b for b in _Handler.bodies if b["mode"] == "ok"][-1]
    assert sent["model"] == "judge-model" and sent["temperature"] == 0
    assert sent["auth"] == "Bearer sk-test"
    assert "Model's answer: Bob." in sent["messages"][0]["content"]
    assert j.name == "openai:judge-model"


def test_openai_judge_retries_transient_errors(server):
    assert _judge(server, "flaky", retries=3).score(["q"], ["t"], ["p"]) == [8]
    assert _Handler.calls["flaky"] == 3


def test_openai_judge_gives_up_clearly(server):
    with pytest.raises(JudgeError, match=r"failed 3 times; last error: HTTP 500"):
        _judge(server, "down", retries=2).score(["q"], ["t"], ["p"])


def test_openai_judge_timeout(server):
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match=r"failed 2 times; last error: ReadTimeout"):
        _judge(server, "slow", timeout=0.1, retries=1).score(["q"], ["t"], ["p"])
    assert time.perf_counter() - t0 < 2


def test_openai_judge_malformed_reply_fails_at_once(server):
    with pytest.raises(JudgeError, match="not a chat completion"):
        _judge(server, "malformed").score(["q"], ["t"], ["p"])
    assert _Handler.calls["malformed"] == 1
    with pytest.raises(JudgeError, match="without a score 1-10"):
        _judge(server, "noscore").score(["q"], ["t"], ["p"])
    with pytest.raises(JudgeError, match="HTTP 401"):
        _judge(server, "unauthorized").score(["q"], ["t"], ["p"])


def test_openai_judge_connection_refused():
    with pytest.raises(JudgeError, match="ConnectError"):
        OpenAIJudge("http://127.0.0.1:9/v1", "m", retries=1, backoff=0.01).score(["q"], ["t"], ["p"])


def test_the_pipeline_judge_takes_key_and_allow_list_from_the_worker_environment(server, monkeypatch):
    """manu_core.judge reads no environment; tasks.devices.judge_for hands it the worker's settings."""
    from tasks.devices import judge_for

    monkeypatch.delenv("MANU_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert make_judge(f"openai:{server}/ok/v1#m").api_key is None
    assert judge_for(f"openai:{server}/ok/v1#m").api_key == "sk-openai"
    monkeypatch.setenv("MANU_JUDGE_API_KEY", "sk-env")  # the tool's own variable comes first
    assert judge_for(f"openai:{server}/ok/v1#m").score(["q"], ["t"], ["p"]) == [8]
    assert [b for b in _Handler.bodies if b["mode"] == "ok"][-1]["auth"] == "Bearer sk-env"
    with pytest.raises(JudgeError, match="not on this worker's allow-list"):
        judge_for("openai:https://judge.example.org/v1#m")
    monkeypatch.setenv("MANU_JUDGE_ENDPOINTS", "other.org, judge.example.org")
    assert judge_for("openai:https://judge.example.org/v1#m").api_key == "sk-env"  # now allowed: built, no error


@pytest.mark.parametrize("spec, match", [
    ("openai:http://localhost:8000/v1", "needs a model"),
    ("openai:localhost:8000#m", "must start with http"),
    ("gpt4", "unknown judge"),
    ("hf:/no/such/folder", "not found"),
])
def test_make_judge_errors(spec, match):
    with pytest.raises(JudgeError, match=match):
        make_judge(spec)


def test_hf_judge_on_a_local_causal_lm(tmp_path, tiny_model):
    """A tiny random Llama saved locally: always a valid grade, the same one twice."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, processor = tiny_model
    tok = processor.tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    j = make_judge(f"hf:{tmp_path}")
    assert isinstance(j, HFJudge)
    a = j.score(["Where?", "Who?"], ["Riga.", "Ann."], ["Riga.", "Bob."])
    assert all(1 <= s <= 10 for s in a) and len(a) == 2
    assert j.score(["Where?", "Who?"], ["Riga.", "Ann."], ["Riga.", "Bob."]) == a


def test_judge_key_goes_only_to_loopback_or_the_allow_list():
    from manu_core.judge import JudgeError, check_key_destination

    for ok in ("http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:9/v1", "https://127.0.0.2/v1"):
        check_key_destination(ok)
    with pytest.raises(JudgeError, match="'judge.example.org' is not on this worker's allow-list"):
        OpenAIJudge("http://judge.example.org/v1", "m", api_key="sk-secret")
    # the README's lab example: a vLLM server without TLS, named by the operator (host, or host:port)
    for entry in ("vllm-host", "vllm-host:8000"):
        assert OpenAIJudge("http://vllm-host:8000/v1", "m", api_key="sk-secret", allowed=(entry,)).api_key
    with pytest.raises(JudgeError, match="not on this worker's allow-list.*MANU_JUDGE_ENDPOINTS=judge.example.org"):
        OpenAIJudge("https://judge.example.org/v1", "m", api_key="sk-secret")
    allowed = ("other.org", " judge.example.org:443")
    judge = OpenAIJudge("https://judge.example.org/v1", "m", api_key="sk-secret", allowed=allowed)
    assert "sk-secret" not in repr(judge) and "sk-secret" not in str(judge)
    with pytest.raises(JudgeError, match="allow-list"):  # the port is part of the entry given
        OpenAIJudge("https://judge.example.org:8443/v1", "m", api_key="sk-secret", allowed=allowed)
    # without a key nothing secret is sent, so any endpoint may be named
    assert OpenAIJudge("http://judge.example.org/v1", "m").api_key is None


def test_an_unreachable_judge_fails_at_once_and_a_live_one_passes(server):
    from manu_core.judge import check_reachable

    check_reachable(f"{server}/ok/v1")  # any HTTP reply: a server is there
    with pytest.raises(JudgeError, match="does not answer.*start the judge server or fix the URL"):
        check_reachable("http://127.0.0.1:9/v1", timeout=2)
