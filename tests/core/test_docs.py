"""The repository speaks for itself: every relative link in the README and docs/ resolves inside
it, and nothing points at files a clone does not have."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)} links {target}, which does not exist"
        assert path.is_relative_to(ROOT), f"{doc.relative_to(ROOT)} links {target}, outside the repository"


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared/|closing note|\bissue [0-9]", re.IGNORECASE)
    files = [p for d in ("manu_core", "tasks", "flows", "bench", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".sh")] + [ROOT / "README.md", ROOT / "prefect.yaml", ROOT / "Makefile"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, f"references a clone cannot follow: {hits}"
