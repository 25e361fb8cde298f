"""Every README command for a real checkpoint, run as printed against a tiny checkpoint folder and the
MLLMU-Bench test fixture, on CPU.

    python bench/readme_real_path.py            # ~10 min on 2 cores (a real Prefect server and worker included)

The commands are read from README.md (each fenced block that names /models/llava-1.5-7b...), with
only the machine's paths swapped: /models/llava-1.5-7b-* -> the `tiny` preset's model copied without
its manu_preset.json (what a lab's checkpoint folder looks like), /data/MLLMU-Bench -> the test
fixture (tests/eval/mllmu_fixture.py: 4 fictitious profiles in the hub's layout), cuda -> cpu, and
the judge host vllm-host:8000 -> a stand-in OpenAI-compatible server on 127.0.0.1. Each must exit 0
and leave what the README says it leaves. The deployment command runs through a real server, work
pool and worker with its `--param config=...` as printed and one more parameter, a sweep cut to
forget_5 x {manu, npo}: the printed paper-grid is days of work on a CPU, and its validation split
needs 25 learned profiles the 4-profile fixture does not have. Prints one line per command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def readme_commands() -> list[tuple[str, str]]:
    """(kind, text) of every README code block naming a real checkpoint: shell commands one by one
    (continuations joined), a Python block whole."""
    text = (REPO / "README.md").read_text()
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if "/models/llava-1.5-7b" not in body:
            continue
        if lang == "python":
            out.append(("python", body))
            continue
        for cmd in body.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if "/models/llava-1.5-7b" in cmd:
                out.append(("shell", cmd))
    return out


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that grades every answer 8 (the README's vLLM judge stands here)."""

    def do_GET(self):  # noqa: N802
        self._send({"data": [{"id": "stand-in"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"choices": [{"message": {"content": "8"}}]})

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> None:
    from manu_core.presets import resolve_model
    from tasks.cache import models_dir
    from tests.eval import mllmu_fixture

    root = Path(tempfile.mkdtemp(prefix="manu-readme-"))
    tiny = resolve_model("tiny", models=models_dir(), progress=False)
    models = root / "models"
    for name in ("llava-1.5-7b-vanilla", "llava-1.5-7b-hf", "llava-1.5-7b-retain"):
        shutil.copytree(tiny, models / name)
        (models / name / "manu_preset.json").unlink()
    bench = mllmu_fixture.build(root / "MLLMU-Bench")
    judge = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    env = {**os.environ, "MANU_ARTIFACTS": str(root / "artifacts"), "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MANU_JUDGE_API_KEY": "sk-stand-in",
           "MANU_JUDGE_ENDPOINTS": "vllm-host", "PATH": f"{BIN}:{os.environ['PATH']}"}

    def here(text: str) -> str:
        return (text.replace("/models/", f"{models}/").replace("/data/MLLMU-Bench", str(bench))
                .replace("--device cuda", "--device cpu").replace('"device": "cuda"', '"device": "cpu"')
                .replace('device="cuda"', 'device="cpu"').replace("vllm-host:8000", f"127.0.0.1:{judge.server_port}"))

    failures, server, worker = [], None, None
    try:
        for kind, text in readme_commands():
            t0 = time.time()
            cmd = here(text)
            if kind == "python":
                script = root / "snippet.py"
                script.write_text(cmd)
                r = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True)
                ok = r.returncode == 0 and (root / "artifacts/runs/llava7b-forget5/model/selection.parquet").is_file()
                what = "the library snippet: a pruned model with selection.parquet"
            elif text.startswith("prefect deployment run"):
                if server is None:
                    server, worker, env = _prefect(root, env)
                sweep = '{"forget_splits": ["forget_5"], "methods": ["manu", "npo"]}'
                r = subprocess.run(shlex.split(cmd) + ["--param", f"sweep={sweep}"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=3600)
                ok = r.returncode == 0 and "Completed" in r.stdout
                what = "the deployment run (sweep cut to forget_5 x manu, npo): Completed"
            else:
                r = subprocess.run(shlex.split(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=3600)
                if text.startswith("manu evaluate"):
                    out = root / shlex.split(cmd)[shlex.split(cmd).index("--out") + 1]
                    ok = r.returncode == 0 and (out / "report.md").is_file() and "openai:" in (out / "report.md").read_text()
                    what = "manu evaluate: report.md, judged by the endpoint"
                else:
                    ok = r.returncode == 0 and "results:" in r.stdout
                    what = "manu run: the results table"
            print(f"{'ok  ' if ok else 'FAIL'} {time.time() - t0:6.0f} s  {what}\n      {text}", flush=True)
            if not ok:
                failures.append(text)
                print((r.stdout + r.stderr)[-3000:], flush=True)
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(2)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        judge.shutdown()
    print(f"{len(failures)} of {len(readme_commands())} README commands failed" if failures
          else f"every README command for a real checkpoint ran as printed ({root})")
    sys.exit(1 if failures else 0)


def _prefect(root: Path, env: dict):
    """The README's server steps on loopback: a Prefect server, the process work pool, every deployment
    of prefect.yaml and a worker (the README's own commands, host 127.0.0.1)."""
    from flows.runs import free_port, start_server

    port = free_port()
    env = {**env, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_UI_ENABLED": "false"}
    server = start_server(env, port, root / "server.log", timeout=180)
    for args in (["work-pool", "create", "manu-pool", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        subprocess.run([BIN / "prefect", *args], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "manu-pool", "--install-policy", "never"],
                              cwd=REPO, env=env, stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT)
    return server, worker, env


if __name__ == "__main__":
    main()
