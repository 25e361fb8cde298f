"""Imports run one way: flows -> tasks -> manu_core; manu_core never imports prefect (style.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"manu_core": {"prefect", "prefect_dask", "tasks", "flows"}, "tasks": {"flows"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files or package != "manu_core"
    for f in files:
        bad = _imports(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}; {package} must not"


def test_the_core_reads_no_environment_and_restores_torch_threads():
    """manu_core takes its folders and secrets as arguments (tasks/flows read the environment), and
    whatever changes torch's thread count puts it back (train.torch_threads)."""
    for f in sorted((ROOT / "manu_core").rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                raise AssertionError(f"{f.relative_to(ROOT)}:{node.lineno} reads the environment (os.{node.attr})")
            if isinstance(node, ast.Attribute) and node.attr == "set_num_threads":
                assert f.name == "train.py", f"{f.relative_to(ROOT)}:{node.lineno} sets torch threads outside torch_threads"
