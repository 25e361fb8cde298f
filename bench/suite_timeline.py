"""When each `make test` worker ran which test file, and how long it sat idle at the end.

    MANU_TEST_TIMELINE=/tmp/timeline.jsonl make test
    python bench/suite_timeline.py /tmp/timeline.jsonl

The suite runs three xdist workers on two cores and is CPU-bound (Makefile), so its wall time is
about its CPU time over two; what a better file order can still win is the tail: the minutes when
some workers are done and the others still run a long file. Prints, per worker, its files in the order
it ran them (start and end in seconds since the first test began), then each worker's idle tail.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def spans(path: str) -> dict[str, list[tuple[str, float, float]]]:
    """{worker: [(file, first start, last end), ...]} in the order the worker ran them."""
    events = [json.loads(line) for line in open(path) if line.strip()]
    t0 = min(e["t"] for e in events)
    out: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for e in sorted(events, key=lambda e: e["t"]):
        file = e["test"].split("::")[0]
        span = out[e["worker"]].setdefault(file, [e["t"] - t0, e["t"] - t0])
        span[1] = e["t"] - t0
    return {w: [(f, a, b) for f, (a, b) in files.items()] for w, files in sorted(out.items())}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    by_worker = spans(sys.argv[1])
    end = max(b for files in by_worker.values() for _, _, b in files)
    for worker, files in by_worker.items():
        print(f"{worker}:")
        for f, a, b in files:
            if b - a >= 5:
                print(f"  {a:6.0f} → {b:6.0f} s  {b - a:5.0f} s  {f}")
        print(f"  ({sum(b - a < 5 for _, a, b in files)} files under 5 s not listed)")
    print(f"\nlast test ended at {end:.0f} s; idle tail per worker: "
          + ", ".join(f"{w} {end - max(b for _, _, b in files):.0f} s" for w, files in by_worker.items()))


if __name__ == "__main__":
    main()
