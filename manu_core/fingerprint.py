"""What a cache key hashes of the code: what it does, not how it is written down.

A preset's key and every pipeline stage's key include the code that produced the output, so that a
change to the code recomputes it. Hashing the source bytes also recomputes it for a reworded
docstring or comment (a preset retrains for minutes, and every cached stage after it reruns). So the
code is hashed as its syntax tree: comments are not in it, and docstrings (the first string of a
module, class or function body) are taken out; anything else changes the fingerprint, a string
constant the code uses included. The tree's printout belongs to the Python version (3.12 added
fields), so a key computed under one minor version is not reused under another.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
import textwrap
import threading

# CPython 3.11 counts the AST constructor's recursion depth per interpreter, not per thread: two threads
# parsing at once (two tasks computing their cache keys) fail with "SystemError: AST constructor recursion
# depth mismatch". One parse at a time.
_PARSE_LOCK = threading.Lock()
_BODIES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


@functools.lru_cache(maxsize=512)
def code_fingerprint(source: str) -> str:
    """sha256 of `source`'s syntax tree without docstrings (comments are never in it). `source` may be
    a whole module or an indented function or class (dedented first). Memoised by the source text: a
    flow computes each stage's key from the same modules many times (~40 ms a parse)."""
    with _PARSE_LOCK:
        tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        if isinstance(node, _BODIES) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    h = hashlib.sha256(f"python{sys.version_info.major}.{sys.version_info.minor}\0".encode())
    h.update(ast.dump(tree, annotate_fields=True, include_attributes=False).encode())
    return h.hexdigest()
