"""The Prefect UI a colleague opens, in a real browser: the screenshots in docs/ui/, and what the pages show.

    python docs/make_ui_shots.py [--out docs/ui]        # or: make ui-shots (about 2 min on 2 cores)

Starts `prefect server start` with its UI on loopback (its own PREFECT_HOME: the database holds only this
run), the `manu-pool` process work pool, prefect.yaml's smoke deployment and a worker, runs `manu/smoke`
(the embedded `tiny` preset, trained on first use), then opens headless Chromium at 1400x900
on the pages a colleague reads: the flow run (its graph and artifacts), its task runs, each artifact (the
results table, the report with its figures, the selected neurons, the output paths), a task run and the
smoke deployment's run form (Parameters -> custom run); the results table and the report also at 1000 px,
in the dark theme, and in the V1 UI, where the links the `prefect` command prints lead. Every fact comes
from the rendered page (the DOM after the UI's JavaScript ran), never from the API: tests/pipeline/
tests/pipeline/test_deployment.py asserts on the same tour (`tour`).

The browser is driven over the DevTools protocol through the `websockets` client Prefect already
installs: no WebDriver binary to match to the browser's version, no new dependency, and the protocol
gives what a `--dump-dom` snapshot cannot: the page's JavaScript errors, image sizes after decoding and
element geometry. Chromium: $CHROMIUM, else Debian's `chromium` package (`apt-get install chromium`);
headless, offline (every host but loopback unresolvable), with --no-sandbox (it may run as root).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, NARROW = 1400, 900, 1000
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> Optional[str]:
    """The browser to drive: $CHROMIUM, else the first of BROWSERS on PATH; None when there is none."""
    exe = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    return exe if exe and os.access(exe, os.X_OK) else None


# ----------------------------------------------------------------------------------------------
# The browser: one headless Chromium page over the DevTools protocol


@dataclass
class Browser:
    """A headless Chromium tab. `open` loads a page and waits until a JavaScript condition holds; `js`
    evaluates an expression in the page (its value as JSON); `shot` saves the viewport as PNG. Errors the
    page reports (uncaught exceptions, console.error, failed loads) are kept per page in `errors`."""

    exe: str
    width: int = WIDTH
    height: int = HEIGHT
    page: str = ""
    errors: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="manu-chromium-")
        self.proc = subprocess.Popen(
            [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-crash-reporter", "--mute-audio",
             "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader",  # software WebGL: the flow run graph is a WebGL canvas
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # offline: loopback only
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here once listening
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"{self.exe} did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import httpx

        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.viewport(self.width, self.height)

    # -- the protocol
    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            error = {"kind": "exception", "text": text, "url": d.get("url", "")}
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            error = {"kind": "console", "text": text, "url": ""}
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            e = p["entry"]
            error = {"kind": e.get("source", "log"), "text": e.get("text", ""), "url": e.get("url", "")}
        else:
            return
        self.errors.setdefault(self.page, []).append(error)

    # -- pages
    def viewport(self, width: int, height: int = HEIGHT) -> None:
        self.width, self.height = width, height
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def theme(self, dark: bool) -> None:
        """prefers-color-scheme, which the V2 UI follows unless a theme was picked in its settings."""
        self.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme",
                                                           "value": "dark" if dark else "light"}])

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:200]}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait(self, condition: str, timeout: float = 60, what: str = "") -> None:
        deadline = time.time() + timeout
        while not self.js(f"!!({condition})"):
            if time.time() > deadline:
                text = self.js("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise TimeoutError(f"{what or self.page}: waited {timeout:.0f} s for {condition}; "
                                   f"the page shows:\n{text}")
            time.sleep(0.2)

    def open(self, name: str, url: str, ready: str, settle: float = 0.3, timeout: float = 60) -> None:
        """Load `url` as page `name` (errors are filed under it), wait until `ready` holds, the fonts and
        every image have loaded, then `settle` seconds more (animations, the graph's first frame)."""
        self.js("window.__manu_left = true")  # marks the page being left; events still queued belong to it
        self.page = name
        self.errors.setdefault(name, [])
        self.call("Page.navigate", url=url)
        self.wait(f"!window.__manu_left && location.href.startsWith({json.dumps(url.split('?')[0])}) "
                  f"&& document.readyState == 'complete' && ({ready})", timeout, name)
        self.wait("[...document.images].every(i => i.complete)", timeout, f"{name} (images)")
        self.js("document.fonts.ready.then(() => true)")
        time.sleep(settle)
        self.js("0")

    def click(self, element: str) -> None:
        """A real mouse click (press and release) at the middle of the element `element` evaluates to: the
        UI's tabs answer pointer events, not a scripted click()."""
        box = self.js(f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}}); "
                      "const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def shot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the browser: its whole process group (Debian's `chromium` is a script that does not exec, so
        the process started here is not the browser itself)."""
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
                time.sleep(0.2)  # the group's other processes follow the first
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.profile, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# What a page shows, measured in it (JavaScript run in the page; each returns JSON-able values)

# Every table: its header cells, and those a reader cannot see whole without scrolling sideways (outside
# the viewport, cut by a scrolling or clipping container, or their own text clipped).
TABLES_JS = """(() => {
  const vw = document.documentElement.clientWidth;
  const clips = e => { for (let p = e.parentElement; p && p !== document.body; p = p.parentElement) {
      const s = getComputedStyle(p);
      if (s.overflowX !== 'visible' && p.scrollWidth > p.clientWidth + 1) return true; } return false; };
  return [...document.querySelectorAll('table')].map(t => {
    const ths = [...t.querySelectorAll('thead th, tr:first-child th')];
    const hidden = ths.filter(th => { const r = th.getBoundingClientRect();
      return r.left < 0 || r.right > vw + 0.5 || th.scrollWidth > th.clientWidth + 1; }).map(th => th.innerText.trim());
    const row = t.querySelector('tbody tr') || t.querySelector('tr:nth-child(2)');
    return {headers: ths.map(th => th.innerText.trim()), hidden: hidden, scrolls_sideways: clips(t),
            first_row_bottom: row ? row.getBoundingClientRect().bottom + window.scrollY : null};
  });
})()"""

PAGE_JS = """({width: document.documentElement.clientWidth, height: window.innerHeight,
  page_scrolls_sideways: document.scrollingElement.scrollWidth > document.documentElement.clientWidth + 1,
  scroll_height: document.scrollingElement.scrollHeight, text: document.body.innerText})"""

FIGURES_JS = """[...document.images].filter(i => i.src.startsWith('data:image/png') || /\\.png/.test(i.src)).map(i => ({
  alt: i.alt, loaded: i.complete && i.naturalWidth > 0, natural_width: i.naturalWidth, shown_width: i.clientWidth,
  scale: i.naturalWidth ? i.clientWidth / i.naturalWidth : 0}))"""

# Links and images a reader could click or load: a file:// URL is dead on any other machine and blocked by
# browsers on an http page; a relative one (figures/x.png) resolves against the UI's own URL.
LINKS_JS = """(() => {
  const out = [];
  for (const a of document.querySelectorAll('a[href]')) {
    const h = a.getAttribute('href');
    if (/^file:/i.test(h) || /^file:/i.test(a.href)) out.push({tag: 'a', url: h, text: a.innerText.trim()});
  }
  for (const i of document.images) {
    if (/^file:/i.test(i.getAttribute('src') || '') || !(i.complete && i.naturalWidth > 0))
      out.push({tag: 'img', url: (i.getAttribute('src') || '').slice(0, 120), text: i.alt});
  }
  if (/file:\\/\\//i.test(document.body.innerText)) out.push({tag: 'text', url: 'file://', text: ''});
  return out;
})()"""

# The WCAG contrast ratio of the text in the rendered artifact (tables, captions, paragraphs) against
# the background it sits on: the lowest, with the element it belongs to (4.5 is WCAG AA for body text).
CONTRAST_JS = """(() => {
  const ctx = document.createElement('canvas').getContext('2d', {willReadFrequently: true});
  const rgb = css => { ctx.clearRect(0, 0, 1, 1); ctx.fillStyle = '#000'; ctx.fillStyle = css; ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data; return [d[0], d[1], d[2], d[3] / 255]; };  // any CSS color (oklch too)
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const bg = e => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
      if (c[3] > 0.5) return c; } return [255, 255, 255, 1]; };
  let worst = {ratio: 99, text: ''};
  // the artifact's rendered markdown: .prose in the V2 UI, .markdown-renderer in V1
  for (const e of document.querySelectorAll(':is(.prose, .markdown-renderer) :is(th, td, p, em, h1, h2, h3, li)')) {
    if (!e.innerText || !e.innerText.trim() || !e.getClientRects().length) continue;
    const a = lum(rgb(getComputedStyle(e).color)), b = lum(bg(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < worst.ratio)
      worst = {ratio: Math.round(ratio * 100) / 100, text: e.tagName + ': ' + e.innerText.slice(0, 60)};
  }
  return worst;
})()"""

FORM_JS = """(() => {
  const labels = [...document.querySelectorAll('label')].map(l => l.innerText.trim());
  // a field's box: the widest ancestor of its label that holds no other field's label
  const field = name => { const l = [...document.querySelectorAll('label')].find(l => l.innerText.trim() === name);
    if (!l) return null; let box = l;
    while (box.parentElement && box.parentElement.querySelectorAll('label').length === 1) box = box.parentElement;
    return box; };
  const alpha = field('Alpha (Optional)'), scoring = field('Scoring (Optional)'), sets = field('Sets (Optional)');
  const num = alpha && alpha.querySelector('input[type=number]');
  return {labels: labels, text: document.body.innerText,
          alpha: num ? {min: num.min, max: num.max, value: num.value} : null,
          scoring: scoring ? scoring.innerText : null,
          // a multi-select: its chosen values are the chips after its "Select" box
          sets: sets ? sets.innerText.slice(sets.innerText.lastIndexOf('Select') + 6).split('\\n').map(s => s.trim())
                                     .filter(Boolean) : null};
})()"""


# ----------------------------------------------------------------------------------------------
# The server, the work pool, the smoke deployment and a worker


@dataclass
class Stack:
    base: str  # the UI's address, e.g. http://127.0.0.1:4242
    env: dict
    cli: Callable[..., str]

    @property
    def api(self) -> str:
        return f"{self.base}/api"

    def post(self, path: str, body: Optional[dict] = None) -> list | dict:
        import httpx

        r = httpx.post(f"{self.api}/{path}", json=body or {}, timeout=30)
        r.raise_for_status()
        return r.json()


@contextmanager
def prefect_stack(workdir: Path, env: Optional[dict] = None, deploy: tuple[str, ...] = ("--name", "manu/smoke")
                  ) -> Iterator[Stack]:
    """A Prefect server with its UI on a free loopback port, `manu-pool` with prefect.yaml's smoke
    deployment on it (`deploy`: the arguments of `prefect deploy`; ("--all",) for every deployment) and
    one worker; everything stopped on exit (SIGINT: a worker ignores SIGTERM for 20 s
    or more). Logs: workdir/server.log, workdir/worker.log."""
    from flows.runs import PREFECT as prefect, free_port, start_server, stop

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**(env if env is not None else os.environ), "PREFECT_HOME": str(workdir / "prefect-home"),
           "PREFECT_API_URL": f"{base}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_UI_ENABLED": "true",
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}  # a lab server: no upgrade banners
    logs = {"worker": open(workdir / "worker.log", "w")}
    server = start_server(env, port, workdir / "server.log")
    worker = None
    try:

        def cli(*args, timeout: float = 300) -> str:
            out = subprocess.run([prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n"
                                   + (workdir / "worker.log").read_text()[-3000:])
            return out.stdout + out.stderr

        cli("work-pool", "create", "manu-pool", "--type", "process")
        cli("--no-prompt", "deploy", *deploy)  # smoke: the one the tour runs and opens the form of
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "manu-pool", "--limit", "1",
                                   "--install-policy", "never"], env=env, cwd=REPO, stdout=logs["worker"],
                                  stderr=subprocess.STDOUT)
        yield Stack(base, env, cli)
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        for f in logs.values():
            f.close()


def run_smoke(stack: Stack, *args: str) -> str:
    """`prefect deployment run manu/smoke --watch` (with `args`, e.g. "--param", "config={...}"); the flow
    run's id."""
    out = stack.cli("deployment", "run", "manu/smoke", *args, "--watch", timeout=900)
    if "Completed" not in out:
        raise RuntimeError(f"manu/smoke did not complete:\n{out[-3000:]}")
    return re.search(r"flow-run/([0-9a-f-]{36})", out).group(1)


# ----------------------------------------------------------------------------------------------
# The tour


def _filed_errors(errors: list[dict], base: str) -> list[dict]:
    """A page's errors, less what the Prefect UI itself fails to load, which no artifact causes: its
    attempts to reach hosts outside this server (blocked here, as on an offline lab machine), its own
    icons (/favicon-dark.ico, /completed.svg: 404 in Prefect 3.9.1) and its API calls (the V2 artifact
    page asks for the task run of an artifact a flow made, task_run_id null: 422). What an artifact
    references (its images) is checked on its own: every image decoded (`LINKS_JS`)."""
    own = re.compile(re.escape(base) + r"/(api/.*|[^/]+\.(ico|svg))$")
    return [e for e in errors
            if not (e["kind"] == "network" and (not e["url"].startswith(base) or own.match(e["url"])))]


def tour(browser: Browser, stack: Stack, flow_run: str, out: Optional[Path] = None,
         log: Callable[[str], None] = lambda s: None) -> dict:
    """Open the flow run's pages, its artifacts, a task run and the smoke run form; save the screenshots
    under `out` (None: none) and return what each page showed, {page: facts}, plus `api` (what the server
    holds, to compare with) and `errors` ({page: the errors it logged, less the UI's own: `_filed_errors`})."""
    base, v2 = stack.base, f"{stack.base}/v2"
    artifacts = stack.post("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run]}}})
    by_key = {a["key"]: a for a in artifacts if a.get("key")}
    results = next(a for k, a in by_key.items() if k.endswith("-results"))
    report = next(a for k, a in by_key.items() if k.startswith("report-") and not k.endswith("-html"))
    task_runs = stack.post("task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}})
    [smoke] = stack.post("deployments/filter", {"deployments": {"name": {"any_": ["smoke"]}}})
    n_figures = report["data"].count("](data:image/png;base64,")
    facts: dict = {"api": {"artifact_keys": sorted(by_key), "task_run_names": sorted(t["name"] for t in task_runs),
                           "n_figures": n_figures, "results_key": results["key"], "report_key": report["key"]}}

    def shot(name: str) -> None:
        if out is not None:
            browser.shot(out / f"{name}.png")

    def measure(name: str, *extra: str) -> dict:
        page = facts.setdefault(name, {})
        page.update(browser.js(PAGE_JS), links=browser.js(LINKS_JS))
        for what in extra:
            page[what] = browser.js({"tables": TABLES_JS, "figures": FIGURES_JS, "contrast": CONTRAST_JS}[what])
        return page

    def visit(name: str, url: str, ready: str, *extra: str, settle: float = 0.3) -> dict:
        t0 = time.time()
        browser.open(name, url, ready, settle=settle)
        page = measure(name, *extra)
        log(f"  {name}: {time.time() - t0:.1f} s")
        return page

    def resized(name: str, width: int, *extra: str, dark: bool = False) -> dict:
        """The page already open, at another width or theme (the UI lays itself out again; no reload)."""
        browser.page = name
        browser.viewport(width)
        browser.theme(dark)
        time.sleep(0.6)
        page = measure(name, *extra)
        browser.viewport(WIDTH)
        return page

    browser.theme(dark=False)
    browser.viewport(WIDTH)
    # the flow run: header, the graph of its task runs, the Artifacts tab; then its Task Runs tab (20 a page)
    visit("flow-run", f"{v2}/runs/flow-run/{flow_run}?tab=Artifacts",
          f"document.querySelectorAll('a[href*=\"/artifacts/artifact/\"]').length >= {len(by_key)} "
          "&& document.querySelector('canvas')", settle=1.5)
    facts["flow-run"]["artifact_cards"] = browser.js(
        "[...document.querySelectorAll('a[href*=\"/artifacts/artifact/\"]')].map(a => a.innerText)")
    shot("flow-run")
    browser.page = "task-runs"
    browser.click("[...document.querySelectorAll('[role=tab]')].find(e => e.innerText.trim() == 'Task Runs')")
    browser.wait("document.querySelectorAll('a[href*=\"/runs/task-run/\"]').length >= 2", what="task-runs")
    measure("task-runs")
    facts["task-runs"]["names"] = browser.js(
        "[...document.querySelectorAll('a[href*=\"/runs/task-run/\"]')].map(a => ({name: a.innerText.trim(), "
        "cut: a.scrollWidth > a.clientWidth + 1 "
        "|| a.getBoundingClientRect().right > document.documentElement.clientWidth}))")
    shot("task-runs")
    # the results table, at 1400 and at 1000 px
    visit("results", f"{v2}/artifacts/artifact/{results['id']}", "document.querySelector('table')", "tables")
    shot("results")
    resized("results-1000", NARROW, "tables")
    # the report: tables, then figures; at 1400 px, the figures, at 1000 px, and in the dark theme
    visit("report", f"{v2}/artifacts/artifact/{report['id']}",
          f"document.querySelector('table') && document.images.length >= {n_figures}", "tables", "figures", "contrast")
    shot("report")
    browser.js("document.images[0] && document.images[0].scrollIntoView({block: 'start'})")
    time.sleep(0.3)
    shot("report-figures")
    browser.js("window.scrollTo(0, 0)")
    resized("report-1000", NARROW, "tables", "figures")
    resized("report-dark", WIDTH, "tables", "contrast", dark=True)
    browser.theme(dark=False)
    # every other artifact of the run (the selected neurons, the output paths)
    for key, a in sorted(by_key.items()):
        if a["id"] not in (results["id"], report["id"]):
            visit(f"artifact:{key}", f"{v2}/artifacts/artifact/{a['id']}",
                  f"document.body.innerText.includes({json.dumps(key)}) && document.querySelector('.prose, table')",
                  "tables", settle=0.5)
    # a task run: the unlearned model's evaluation on the forget set, image + text
    run = next((t for t in task_runs if t["name"].startswith("evaluate-") and t["name"].endswith("forget-multimodal")
                and "vanilla" not in t["name"]), task_runs[0])
    facts["api"]["task_run"] = run["name"]
    visit("task-run", f"{v2}/runs/task-run/{run['id']}", f"document.body.innerText.includes({json.dumps(run['name'])})")
    facts["task-run"]["heading"] = browser.js("(document.querySelector('nav') || document.body).innerText")
    shot("task-run")
    # the smoke deployment's run form (Parameters -> custom run), from its top
    visit("run-form", f"{v2}/deployments/deployment/{smoke['id']}/run",
          "[...document.querySelectorAll('label')].some(l => l.innerText.startsWith('Alpha'))", settle=0.5)
    facts["run-form"].update(browser.js(FORM_JS))
    shot("run-form")
    # the V1 UI, where the links `prefect deployment run` prints lead
    visit("v1-results", f"{base}/artifacts/artifact/{results['id']}", "document.querySelector('table')", "tables")
    visit("v1-report", f"{base}/artifacts/artifact/{report['id']}",
          f"document.querySelector('table') && document.images.length >= {n_figures}", "tables", "figures", "contrast")
    browser.js("0")
    facts["errors"] = {page: _filed_errors(errors, base) for page, errors in browser.errors.items()}
    return facts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ui", help="where the PNGs go (default docs/ui)")
    ap.add_argument("--facts", type=Path, help="also write what the pages showed, as JSON")
    args = ap.parse_args(argv)
    exe = chromium_path()
    if exe is None:
        print("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)", file=sys.stderr)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="manu-ui-shots-") as tmp:
        with prefect_stack(Path(tmp)) as stack:
            print(f"Prefect server with its UI at {stack.base}; running manu/smoke ...", flush=True)
            flow_run = run_smoke(stack)
            print(f"  flow run {flow_run} completed after {time.time() - t0:.0f} s; opening its pages", flush=True)
            with Browser(exe) as browser:
                facts = tour(browser, stack, flow_run, out=args.out, log=print)
    if args.facts:
        args.facts.write_text(json.dumps({k: v for k, v in facts.items()}, indent=1, default=str))
    pngs = sorted(p.name for p in args.out.glob("*.png"))
    errors = {page: e for page, e in facts["errors"].items() if e}
    print(f"{len(pngs)} screenshots in {args.out}: {', '.join(pngs)} ({time.time() - t0:.0f} s)")
    if errors:
        print("JavaScript errors:", json.dumps(errors, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
