"""Cache keys follow what the code does (manu_core/fingerprint.py): a docstring or comment edit keeps
a fingerprint, a change to the computation changes it."""

from pathlib import Path

from manu_core.fingerprint import code_fingerprint

TRAIN = (Path(__file__).resolve().parents[2] / "manu_core" / "train.py").read_text()


def test_docstrings_comments_and_blank_lines_do_not_count():
    edited = TRAIN.replace('"""', '"""Reworded for a reader. ', 1)  # the module docstring
    edited = edited.replace("\ndef ", "\n# a new comment\n\ndef ", 1)
    assert edited != TRAIN and code_fingerprint(edited) == code_fingerprint(TRAIN)
    fn = 'def f(x):\n    """Add one."""\n    return x + 1  # one\n'
    assert code_fingerprint(fn) == code_fingerprint("def f(x):\n    return x + 1\n")
    assert code_fingerprint("    def g():\n        '''only a docstring'''\n") == code_fingerprint("def g():\n    pass\n")


def test_a_change_to_the_computation_changes_it():
    fn = "def loss(a, b):\n    return (a - b).pow(2).mean()\n"
    for changed in ("def loss(a, b):\n    return (a - b).abs().mean()\n",  # another loss
                    "def loss(a, b):\n    return (a - b).pow(2).sum()\n",
                    "def loss(b, a):\n    return (a - b).pow(2).mean()\n"):
        assert code_fingerprint(changed) != code_fingerprint(fn)
    # a string the code uses (not a docstring) is code
    assert code_fingerprint('def f():\n    x = 1\n    return "a"\n') != code_fingerprint('def f():\n    x = 1\n    return "b"\n')
    assert code_fingerprint('X = "template one"\n') != code_fingerprint('X = "template two"\n')


def test_pipeline_code_digest_ignores_a_docstring_edit(tmp_path, monkeypatch):
    from tasks import cache

    for pkg in ("manu_core", "tasks"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text('"""Doc."""\n\ndef f():\n    return 1\n')
    monkeypatch.setattr(cache, "REPO", tmp_path)
    cache.code_digest.cache_clear()
    try:
        before = cache.code_digest()
        (tmp_path / "tasks" / "m.py").write_text('"""Doc, reworded."""\n\n# note\ndef f():\n    return 1\n')
        cache.code_digest.cache_clear()
        assert cache.code_digest() == before
        (tmp_path / "tasks" / "m.py").write_text('"""Doc."""\n\ndef f():\n    return 2\n')
        cache.code_digest.cache_clear()
        assert cache.code_digest() != before
    finally:
        cache.code_digest.cache_clear()


def test_a_preset_keeps_its_key_for_a_docstring_and_changes_it_for_the_loss(monkeypatch):
    """A reworded docstring in train.py keeps every trained preset; a change to the loss retrains."""
    from manu_core import presets

    real = presets._key_sources

    def edited(fn):
        def sources(preset):
            return [(name, fn(src) if name == "train.py" else src) for name, src in real(preset)]
        return sources

    for text in ('"""Mean next-token cross-entropy over the answer tokens.', "cross_entropy(logits.float(), labels[keep])"):
        assert text in TRAIN  # the edits below change something
    lite = presets.get_preset("lite")
    key = lite.key()
    monkeypatch.setattr(presets, "_key_sources", edited(lambda src: src.replace(
        '"""Mean next-token cross-entropy over the answer tokens.', '"""The mean cross-entropy of the answer tokens.')))
    assert lite.key() == key
    monkeypatch.setattr(presets, "_key_sources", edited(lambda src: src.replace(
        "cross_entropy(logits.float(), labels[keep])", "cross_entropy(logits.float(), labels[keep], label_smoothing=0.1)")))
    assert lite.key() != key
