"""Scoring modes (paper, released, selective) against an independent numpy reference.

The reference is written from the modes' specification, not from manu_core.importance: every store here
is generated as per-TOKEN activations a_t (per sample, per unit), the store gets the per-sample quantities
derived from them (z = mean over the sample's tokens, tokens, Σ|a|, Σa², #(a > 0), #(|a| > 0.1), max |a|),
and the reference computes every statistic from the token arrays themselves.

Exactness: token values are integers in [-24, 24] / 8 (multiples of 1/8, |a| <= 3), so every per-sample
token sum is exact in float32. The reference still rounds the per-sample Σ|a| and Σa² to float32, as the
store does, for the one test with a 2000 token (whose Σa² is not exact in float32). The stored z is
float32(Σ_t a_t / n) (the store's contract: a float32 mean); the reference uses that same float32 z promoted
to float64 wherever the spec works from z (paper mode, and Σ_t a_t = Σ_samples z·tokens in the token std,
which is all the store can give for Σa).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import manu_core.importance as importance
from manu_core.importance import ImportanceParams, compute_importance, importance_table, neuron_sums
from manu_core.store import write_partition

SPLITS = ("forget", "retain")
FORMS = ("multimodal", "text")
TOKEN_TAU = 0.1  # released code's |a| > 0.1 (store.TOKEN_TAU)
RTOL, ATOL = 1e-9, 1e-12

# Unequal sample counts per (split, form) (vision: multimodal only)
COUNTS = {("forget", "multimodal"): 7, ("forget", "text"): 5, ("retain", "multimodal"): 9, ("retain", "text"): 6}
LANG_W, VIS_W = 6, 4

# Option spellings of the implementation (one place to adjust if the API names them differently)
POOL = {"pool_layers": True}


def clamp(c):
    return {"clamp": c}


def statistic(s):
    return {"statistic": s}


# ----------------------------------------------------------------------------------------------
# Writing a store from per-token activations


def sample_stats(samples):
    """Per-sample quantities of one stream from its token arrays [(n_i, width)]: what the store holds."""
    tokens = np.array([len(s) for s in samples], np.int64)
    z = np.stack([s.sum(0) / len(s) for s in samples]).astype(np.float32)  # the store's float32 mean
    stats = {
        "abs": np.stack([np.abs(s).sum(0) for s in samples]),
        "sq": np.stack([(s * s).sum(0) for s in samples]),
        "pos": np.stack([(s > 0).sum(0) for s in samples]),
        "active": np.stack([(np.abs(s) > TOKEN_TAU).sum(0) for s in samples]),
    }
    return z, tokens, stats


def write_stream(root, key, samples, parts=2, with_tokens=True, with_max_abs=True, max_abs=None):
    """Write one stream (split, form, tower, layer) in `parts` part files."""
    split, form, tower, layer = key
    z, tokens, stats = sample_stats(samples)
    for p, idx in enumerate(np.array_split(np.arange(len(samples)), parts)):
        if not len(idx):
            continue
        names = [f"{split}-{form}-{i}" for i in idx]
        kw = {}
        if with_tokens:
            kw.update(tokens=tokens[idx], token_stats={k: v[idx] for k, v in stats.items()})
        if with_max_abs:
            kw["max_abs"] = float(max(np.abs(samples[i]).max() for i in idx)) if max_abs is None else max_abs
        write_partition(root, split=split, form=form, tower=tower, layer=layer, sample_ids=names,
                        profile_ids=names, activations=z[idx], part=p, **kw)


def write_store(root, data, **kw):
    for key, samples in data.items():
        write_stream(root, key, samples, **kw)
    return root


def random_tokens(rng, lens, width):
    """Token activations per sample: multiples of 1/8 in [-3, 3], unit-specific location, spread and zeros."""
    mu, sd, p0 = rng.uniform(-1.2, 1.2, width), rng.uniform(0.2, 1.6, width), rng.uniform(0.0, 0.5, width)
    out = []
    for n in lens:
        while True:
            a = np.clip(np.round(rng.normal(mu, sd, (n, width)) * 8), -24, 24) / 8
            a[rng.random((n, width)) < p0] = 0.0
            zz = np.float32(a.sum(0) / n).astype(np.float64)
            if not np.any(np.abs(np.abs(zz) - TOKEN_TAU) < 1e-6):  # keep |z| off the paper threshold τ
                break
        out.append(a)
    return out


def random_data(seed, lang_layers=(0, 1), vis_layers=(0, 1)):
    """{(split, form, tower, layer): [token array (n_i, width) per sample]}; token counts 1..9 per sample,
    shared by the layers of a tower (same samples, same positions)."""
    rng = np.random.default_rng(seed)
    data = {}
    for (split, form), n in COUNTS.items():
        towers = [("language", lang_layers, LANG_W)] + ([("vision", vis_layers, VIS_W)] if form == "multimodal" else [])
        for tower, layers, width in towers:
            lens = rng.integers(1, 10, n)
            for layer in layers:
                data[(split, form, tower, layer)] = random_tokens(rng, lens, width)
    return data


# ----------------------------------------------------------------------------------------------
# The reference


def neurons(data):
    """Every (tower, layer, unit), sorted ('language' < 'vision')."""
    widths = {(t, l): s[0].shape[1] for (_, _, t, l), s in data.items()}
    return sorted((t, l, u) for (t, l), w in widths.items() for u in range(w))


def kfloor(alpha, n):
    return math.floor(Fraction(repr(alpha)) * n)


def top_k(keys, scores, k, exclude=(), allow_ties=False):
    """Top k by (−score, key) among keys not in `exclude`; the boundary must be unambiguous."""
    cand = sorted((i for i, key in enumerate(keys) if key not in exclude), key=lambda i: (-scores[i], keys[i]))
    if 0 < k < len(cand):
        a, b = scores[cand[k - 1]], scores[cand[k]]
        ok = a - b > 1e-7 * max(1.0, abs(a)) or (allow_ties and a == b)
        assert ok, f"ill-posed test data: scores {a!r} and {b!r} at the selection boundary k={k} are too close"
    return {keys[i] for i in cand[:k]}


def threshold_select(keys, scores, k, allow_ties=False):
    """selected = score >= the k-th largest score (all ties at the threshold); k = 0 -> none."""
    if k == 0:
        return set()
    thr = sorted(scores, reverse=True)[k - 1]
    near = [s for s in scores if s != thr and abs(s - thr) <= 1e-7 * max(1.0, abs(thr))]
    assert not near, f"ill-posed test data: scores {near} nearly tie the threshold {thr!r}"
    if not allow_ties:
        assert sum(s == thr for s in scores) == 1, f"ill-posed test data: exact ties at the threshold {thr!r}"
    return {key for key, s in zip(keys, scores) if s >= thr}


def z_of(samples):
    return np.stack([s.sum(0) / len(s) for s in samples]).astype(np.float32).astype(np.float64)


def f32_sum(per_sample):
    """Σ over samples of per-sample sums stored as float32 (the store's contract; exact for |a| <= 3)."""
    return np.stack(per_sample).astype(np.float32).astype(np.float64).sum(0)


def token_sums(samples):
    """Sums over every counted token of a stream; Σa from the stored z (z·tokens, the store's contract)."""
    cat = np.concatenate(samples).astype(np.float64)
    lens = np.array([len(s) for s in samples], np.float64)
    return {
        "N": float(len(cat)),
        "abs": f32_sum([np.abs(s).sum(0) for s in samples]),
        "sq": f32_sum([(s * s).sum(0) for s in samples]),
        "pos": (cat > 0).sum(0).astype(np.float64),
        "active": (np.abs(cat) > TOKEN_TAU).sum(0).astype(np.float64),
        "sum": (z_of(samples) * lens[:, None]).sum(0),
    }


def add_sums(items):
    return {k: sum(d[k] for d in items) for k in items[0]}


def token_statistics(t):
    """S_abs, S_freq (|a| > 0.1), S_pos (a > 0), S_std (unbiased, torch .std()), S_rms over tokens."""
    n = t["N"]
    var = np.maximum((t["sq"] - t["sum"] ** 2 / n) / (n - 1), 0.0)
    return {"abs": t["abs"] / n, "freq": t["active"] / n, "pos": t["pos"] / n, "std": np.sqrt(var),
            "rms": np.sqrt(t["sq"] / n)}


def ref_paper(data, alpha, eps=1e-5, tau=0.1, w=None):
    w = w or {"abs": 1.0, "freq": 1.0, "var": 1.0, "rms": 1.0}
    keys = neurons(data)
    imp = {}
    for split in SPLITS:
        vals = []
        for tower, layer, unit in keys:
            st = {}
            for form in FORMS:
                samples = data.get((split, form, tower, layer))
                if samples is None:  # vision on text: 0
                    st[form] = (0.0, 0.0, 0.0, 0.0)
                    continue
                z = z_of(samples)[:, unit]
                st[form] = (np.mean(np.abs(z)), float(np.sum(np.abs(z) > tau)), np.var(z), np.mean(z * z))
            (am, nm, vm, qm), (at, nt, vt, qt) = st["multimodal"], st["text"]
            i = {"abs": abs(am - at) / (am + at + eps), "freq": abs(nm - nt) / (nm + nt + eps),
                 "var": math.sqrt(vm + vt), "rms": math.sqrt(abs(qm - qt) / (qm + qt + eps))}
            vals.append(sum(w[k] * i[k] for k in i))
        imp[split] = np.array(vals)
    score = imp["forget"] / (imp["retain"] + eps)
    return keys, score, top_k(keys, score, kfloor(alpha, len(keys)))


RELEASED_W = {"abs": 2.0, "freq": 0.0, "var": 2.0, "rms": 2.0}


def released_stats(data, split, tower, layers):
    """Token statistics of one split for a tower: language on the text form, vision on multimodal;
    several layers: their token sums added per unit index (pool_layers)."""
    form = "multimodal" if tower == "vision" else "text"
    return token_statistics(add_sums([token_sums(data[(split, form, tower, layer)]) for layer in layers]))


def released_score(f, r, eps, w):
    kmap = {"abs": "abs", "freq": "freq", "var": "std", "rms": "rms"}
    return sum(w[k] * (f[kmap[k]] / (r[kmap[k]] + eps) - 1.0) for k in w)


def ref_released(data, alpha, eps=1e-5, w=None):
    """Returns keys, scores, selected, {column: values} for the forget_/retain_ statistic columns."""
    w = w or RELEASED_W
    keys = neurons(data)
    towers = sorted({t for t, _, _ in keys})
    score, cols, selected = {}, {}, set()
    for tower in towers:
        tkeys = [k for k in keys if k[0] == tower]
        for layer in sorted({l for _, l, _ in tkeys}):
            f = released_stats(data, "forget", tower, [layer])
            r = released_stats(data, "retain", tower, [layer])
            s = released_score(f, r, eps, w)
            for u in range(len(s)):
                score[(tower, layer, u)] = s[u]
                for split, st in (("forget", f), ("retain", r)):
                    for col, k in (("abs", "abs"), ("freq", "freq"), ("var", "std"), ("rms", "rms")):
                        cols.setdefault(f"{split}_{col}", {})[(tower, layer, u)] = st[k][u]
        selected |= threshold_select(tkeys, [score[k] for k in tkeys], kfloor(alpha, len(tkeys)))
    columns = {c: np.array([v[k] for k in keys]) for c, v in cols.items()}
    return keys, np.array([score[k] for k in keys]), selected, columns


def ref_released_pooled(data, alpha, eps=1e-5, w=None, targets=None):
    """pool_layers: one score per unit index per tower (token sums of ALL layers added), assigned to the
    tower's last three layers (or `targets[tower]`, the layers named); threshold over those 3·width values.
    Returns {key: score} (those layers only) and the selected set."""
    w = w or RELEASED_W
    keys = neurons(data)
    score, selected = {}, set()
    for tower in sorted({t for t, _, _ in keys}):
        layers = sorted({l for t, l, _ in keys if t == tower})
        f = released_stats(data, "forget", tower, layers)
        r = released_stats(data, "retain", tower, layers)
        s = released_score(f, r, eps, w)
        k = kfloor(alpha, 3 * len(s))
        threshold_select(list(range(len(s))), list(s), -(-k // 3) if k else 0)  # guard: distinct unit scores
        last3 = layers[-3:] if targets is None else targets[tower]
        lkeys = [(tower, l, u) for l in last3 for u in range(len(s))]
        for key in lkeys:
            score[key] = s[key[2]]
        selected |= threshold_select(lkeys, [score[key] for key in lkeys], k, allow_ties=True)
    return score, selected


def selective_scores(data, stat="abs", eps=1e-3):
    """F/(R + eps) with the statistic over every token of both forms pooled (vision: multimodal only)."""
    keys = neurons(data)
    name = {"abs": "abs", "freq": "pos", "std": "std", "rms": "rms"}[stat]
    score = {}
    for tower in sorted({t for t, _, _ in keys}):
        for layer in sorted({l for t, l, _ in keys if t == tower}):
            st = {}
            for split in SPLITS:
                streams = [data[(split, f, tower, layer)] for f in FORMS if (split, f, tower, layer) in data]
                st[split] = token_statistics(add_sums([token_sums(s) for s in streams]))[name]
            for u, v in enumerate(st["forget"] / (st["retain"] + eps)):
                score[(tower, layer, u)] = v
    return keys, np.array([score[k] for k in keys])


def ref_selective(data, alpha, stat="abs", eps=1e-3):
    keys, score = selective_scores(data, stat, eps)
    return keys, score, top_k(keys, score, kfloor(alpha, len(keys)))


# ----------------------------------------------------------------------------------------------
# Helpers on the implementation's table


def table_keys(df):
    return list(zip(df["tower"].to_list(), df["layer"].to_list(), df["unit"].to_list()))


def by_key(df, col):
    return dict(zip(table_keys(df), df[col].to_list()))


def selected_set(df):
    return {k for k, s in zip(table_keys(df), df["selected"].to_list()) if s}


def check_against(df, keys, score, selected):
    df = df.sort(["tower", "layer", "unit"])
    assert table_keys(df) == keys
    np.testing.assert_allclose(df["score"].to_numpy(), score, rtol=RTOL, atol=ATOL)
    assert selected_set(df) == selected


# ----------------------------------------------------------------------------------------------
# Fixtures: random stores (module-scoped: written once)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two language layers (width 6), two vision layers (width 4), unequal sample counts, 2 parts per stream."""
    data = random_data(seed=11)
    return write_store(tmp_path_factory.mktemp("store"), data), data


@pytest.fixture(scope="module")
def deep_store(tmp_path_factory):
    """Four language layers, three vision layers (for pool_layers)."""
    data = random_data(seed=12, lang_layers=(0, 1, 2, 3), vis_layers=(0, 1, 2))
    return write_store(tmp_path_factory.mktemp("deep"), data), data


ALPHAS = (0.1, 0.25, 0.5)


# ----------------------------------------------------------------------------------------------
# 1. Each mode against the reference


@pytest.mark.parametrize("alpha", ALPHAS)
def test_paper_matches_reference(store, alpha):
    root, data = store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="paper"))
    check_against(df, *ref_paper(data, alpha))
    # rank: 1-based, descending score, ties by (tower, layer, unit), global
    keys, score, _ = ref_paper(data, alpha)
    order = sorted(range(len(keys)), key=lambda i: (-score[i], keys[i]))
    assert by_key(df, "rank") == {keys[i]: r + 1 for r, i in enumerate(order)}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_released_matches_reference(store, alpha):
    root, data = store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="released"))
    keys, score, selected, cols = ref_released(data, alpha)
    check_against(df, keys, score, selected)
    df = df.sort(["tower", "layer", "unit"])
    for col, want in cols.items():  # forget_k / retain_k hold the token statistics F_k / R_k
        np.testing.assert_allclose(df[col].to_numpy(), want, rtol=RTOL, atol=ATOL, err_msg=col)
    # per tower: at least ⌊α·N_tower⌋ selected (more only with ties at the threshold; none here)
    for tower, n in (("language", 2 * LANG_W), ("vision", 2 * VIS_W)):
        assert sum(1 for k in selected_set(df) if k[0] == tower) == kfloor(alpha, n)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_released_with_weights_matches_reference(store, alpha):
    """Explicit weights (freq on): every statistic enters the score."""
    root, data = store
    w = {"abs": 1.0, "freq": 1.5, "var": 0.5, "rms": 3.0}
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="released", weights=w))
    keys, score, selected, _ = ref_released(data, alpha, w=w)
    check_against(df, keys, score, selected)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_released_pool_layers_matches_reference(deep_store, alpha):
    root, data = deep_store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="released", options=POOL))
    score, selected = ref_released_pooled(data, alpha)
    got = by_key(df, "score")
    keys = sorted(score)
    np.testing.assert_allclose([got[k] for k in keys], [score[k] for k in keys], rtol=RTOL, atol=ATOL)
    assert selected_set(df) == selected
    # only the last three layers of each tower can be selected: language 1..3, vision 0..2
    assert all(l >= 1 for t, l, _ in selected_set(df) if t == "language")
    assert {(t, l) for t, l, _ in selected_set(df)} <= {("language", 1), ("language", 2), ("language", 3),
                                                        ("vision", 0), ("vision", 1), ("vision", 2)}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("stat", ["abs", "freq", "std", "rms"])
def test_selective_matches_reference(store, alpha, stat):
    root, data = store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="selective", options=statistic(stat)))
    check_against(df, *ref_selective(data, alpha, stat))
    assert int(df["selected"].sum()) == kfloor(alpha, len(df))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_selective_default_statistic_is_abs(store, alpha):
    root, data = store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="selective"))
    check_against(df, *ref_selective(data, alpha, "abs"))


def test_modes_read_the_same_sums(store):
    """compute_importance(root, p) == importance_table(neuron_sums(root, p.tau), p) in every mode."""
    root, _ = store
    sums = neuron_sums(root, 0.1)
    for p in (ImportanceParams(alpha=0.25, mode="paper"), ImportanceParams(alpha=0.25, mode="released"),
              ImportanceParams(alpha=0.25, mode="selective", options=statistic("std"))):
        a, b = compute_importance(root, p), importance_table(sums, p)
        np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=0, atol=0)
        assert a["selected"].equals(b["selected"])


# ----------------------------------------------------------------------------------------------
# 2. Hand cases


def const(n_samples, n_tokens, row):
    """n_samples samples of n_tokens tokens each, every token = row (one value per unit)."""
    return [np.tile(np.asarray(row, np.float64), (n_tokens, 1)) for _ in range(n_samples)]


ABS_ONLY = {"abs": 1.0, "freq": 0.0, "var": 0.0, "rms": 0.0}


def test_released_tie_at_threshold_selects_all_tied(tmp_path):
    # One language layer, 4 units, abs weight only: score = F_abs / (R_abs + ε) − 1, language on the TEXT form.
    #   retain/text: every token 1 -> R_abs = 1 for all units
    #   forget/text: unit 0 tokens (2, 2), unit 1 (2, −2), unit 2 (1, 1), unit 3 (0.5, 0.5)
    #     -> F_abs = 2, 2, 1, 0.5 -> scores 2/(1+ε)−1 ≈ 1 (units 0 and 1 tied exactly), ≈ −1e−5, ≈ −0.5
    #   the multimodal forms (3 everywhere forget, 0.125 retain) would give very different scores: ignored.
    data = {
        ("forget", "text", "language", 0): [np.array([[2, 2, 1, 0.5], [2, -2, 1, 0.5]])],
        ("retain", "text", "language", 0): const(1, 2, [1, 1, 1, 1]),
        ("forget", "multimodal", "language", 0): const(1, 2, [3, 0.125, 3, 3]),
        ("retain", "multimodal", "language", 0): const(1, 2, [0.125, 3, 0.125, 0.125]),
    }
    write_store(tmp_path, data, parts=1)
    eps = 1e-5
    top, third, fourth = 2 / (1 + eps) - 1, 1 / (1 + eps) - 1, 0.5 / (1 + eps) - 1
    for alpha, want in [(0.25, {0, 1}),  # k = 1: threshold = the tied top score -> both tied units
                        (0.5, {0, 1}),  # k = 2: threshold = still the tied score
                        (0.75, {0, 1, 2}),  # k = 3: threshold = unit 2's score
                        (0.2, set())]:  # k = ⌊0.2·4⌋ = 0: none
        df = compute_importance(tmp_path, ImportanceParams(alpha=alpha, mode="released", weights=ABS_ONLY))
        assert df["score"].to_list() == pytest.approx([top, top, third, fourth], rel=1e-12, abs=1e-15)
        assert df["forget_abs"].to_list() == pytest.approx([2, 2, 1, 0.5], rel=1e-12)
        assert df["retain_abs"].to_list() == pytest.approx([1, 1, 1, 1], rel=1e-12)
        assert {u for _, _, u in selected_set(df)} == want, alpha


def pool_data(layers):
    # Language tower, width 2, abs weight only; every stream: 1 sample of 2 tokens, every token = the value:
    #   forget/text: unit 0: 3 in the FIRST layer, 1 in the others; unit 1: 2 in every layer
    #   retain/text: 1 everywhere (R_abs = 1)
    # Pooled over the 4 layers: F_abs(unit 0) = (3+1+1+1)/4 = 1.5, F_abs(unit 1) = 2
    #   -> scores s0 = 1.5/(1+ε) − 1 ≈ 0.5, s1 = 2/(1+ε) − 1 ≈ 1, each on the last three layers.
    # (Unpooled, the first layer's unit 0 would score highest: 3/(1+ε) − 1 ≈ 2.)
    data = {}
    for i, layer in enumerate(layers):
        data[("forget", "text", "language", layer)] = const(1, 2, [3 if i == 0 else 1, 2])
        data[("retain", "text", "language", layer)] = const(1, 2, [1, 1])
        data[("forget", "multimodal", "language", layer)] = const(1, 2, [0.5, 0.5])
        data[("retain", "multimodal", "language", layer)] = const(1, 2, [0.5, 0.5])
    return data


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (0, 2, 5, 9)])  # last three by layer index among those present
def test_pool_layers_lands_only_on_the_last_three_layers(tmp_path, layers):
    write_store(tmp_path, pool_data(layers), parts=1)
    eps = 1e-5
    s0, s1 = 1.5 / (1 + eps) - 1, 2 / (1 + eps) - 1
    last3 = layers[1:]
    for alpha, want in [(0.25, {(l, 1) for l in last3}),  # k = ⌊0.25·6⌋ = 1: threshold s1 -> unit 1 ×3 layers
                        (0.5, {(l, 1) for l in last3}),  # k = 3: threshold s1 (3 tied values)
                        (0.75, {(l, u) for l in last3 for u in (0, 1)})]:  # k = 4: threshold s0 -> all 6
        df = compute_importance(tmp_path, ImportanceParams(alpha=alpha, mode="released", weights=ABS_ONLY,
                                                           options=POOL))
        assert len(df) == 8  # one row per neuron, also the first layer's
        got = by_key(df, "score")
        for l in last3:
            assert got[("language", l, 0)] == pytest.approx(s0, rel=1e-12)
            assert got[("language", l, 1)] == pytest.approx(s1, rel=1e-12)
        assert {(l, u) for _, l, u in selected_set(df)} == want, alpha  # never the first layer
    # Without pooling the first layer's unit 0 (F_abs = 3) is the top neuron.
    df = compute_importance(tmp_path, ImportanceParams(alpha=0.125, mode="released", weights=ABS_ONLY))
    assert {(l, u) for _, l, u in selected_set(df)} == {(layers[0], 0)}


@pytest.fixture(scope="module")
def tall_store(tmp_path_factory):
    """Four language layers, seven vision layers: Idefics2's vision layers (n−6..n−4) are not its last three."""
    data = random_data(seed=14, lang_layers=(0, 1, 2, 3), vis_layers=tuple(range(7)))
    return write_store(tmp_path_factory.mktemp("tall"), data), data


def scored_layers(df):
    return {(t, l) for t, l, s in zip(df["tower"], df["layer"], df["score"]) if s is not None}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_released_pool_layers_lands_on_the_authors_layers_per_architecture(tall_store, alpha):
    """docs/method.md, "Per architecture": the released code names vision 21-23 and language 29-31. On
    Idefics2 (27 vision layers) 21-23 end three before the last: here, 7 vision layers, layers 1-3."""
    root, data = tall_store
    df = compute_importance(root, ImportanceParams(alpha=alpha, mode="released", options=POOL), model_type="idefics2")
    score, selected = ref_released_pooled(data, alpha, targets={"vision": [1, 2, 3], "language": [1, 2, 3]})
    got = by_key(df, "score")
    np.testing.assert_allclose([got[k] for k in sorted(score)], [score[k] for k in sorted(score)], rtol=RTOL, atol=ATOL)
    assert scored_layers(df) == {("vision", 1), ("vision", 2), ("vision", 3),
                                 ("language", 1), ("language", 2), ("language", 3)}
    assert selected_set(df) == selected and len(df) == 4 * LANG_W + 7 * VIS_W  # one row per neuron
    # the option: the last three layers of each tower, as without the architecture
    uniform = ImportanceParams(alpha=alpha, mode="released", options={**POOL, "sites": "uniform"})
    df = compute_importance(root, uniform, model_type="idefics2")
    score, selected = ref_released_pooled(data, alpha)
    got = by_key(df, "score")
    np.testing.assert_allclose([got[k] for k in sorted(score)], [score[k] for k in sorted(score)], rtol=RTOL, atol=ATOL)
    assert scored_layers(df) == {("vision", 4), ("vision", 5), ("vision", 6),
                                 ("language", 1), ("language", 2), ("language", 3)}
    assert selected_set(df) == selected


@pytest.mark.parametrize("options", [{}, POOL, {"pool_layers": True, "clamp": 1e3}], ids=["tokens", "pool", "pool+clamp"])
def test_llava_and_uniform_score_the_same_bytes_as_before(tall_store, options):
    """LLaVA's released choices are the mode's own rule (every Linear, the last three layers): the table
    is the same, byte for byte, with or without model_type, and so is sites="uniform" on Idefics2."""
    root, _ = tall_store
    base = compute_importance(root, ImportanceParams(alpha=0.25, mode="released", options=options))
    for model_type, sites in (("llava", "authors"), ("llava", "uniform"), ("idefics2", "uniform"), ("qwen2_vl", "authors")):
        params = ImportanceParams(alpha=0.25, mode="released", options={**options, "sites": sites})
        assert compute_importance(root, params, model_type=model_type).equals(base, null_equal=True), (model_type, sites)
    if not options:  # hidden units without pooling: the architecture changes nothing either
        params = ImportanceParams(alpha=0.25, mode="released")
        assert compute_importance(root, params, model_type="idefics2").equals(base, null_equal=True)
    for mode in ("paper", "selective"):  # the other modes ignore it
        a = compute_importance(root, ImportanceParams(alpha=0.25, mode=mode))
        assert compute_importance(root, ImportanceParams(alpha=0.25, mode=mode), model_type="idefics2").equals(a)


def test_released_sites_and_model_type_errors_name_the_fix(tall_store, caplog):
    root, _ = tall_store
    with pytest.raises(ValueError, match="released option sites must be one of authors, uniform .*got 'last3'"):
        ImportanceParams(mode="released", options={"sites": "last3"})
    with pytest.raises(ValueError, match="Unknown architecture 'idefic2'. Did you mean 'idefics2'"):
        compute_importance(root, ImportanceParams(mode="released", options=POOL), model_type="idefic2")
    assert ImportanceParams(mode="released").option("sites") == "authors"  # the default
    with caplog.at_level("WARNING", logger="manu_core.importance"):
        compute_importance(root, ImportanceParams(alpha=0.25, mode="released", options=POOL))
    assert "Pass model_type" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="manu_core.importance"):
        compute_importance(root, ImportanceParams(alpha=0.25, mode="released"))  # nothing depends on it here
        compute_importance(root, ImportanceParams(alpha=0.25, mode="released", options=POOL), model_type="llava")
    assert "Pass model_type" not in caplog.text


def test_clamp_is_exact_when_max_abs_is_below_it(store):
    root, data = store  # every part records max_abs <= 3 < 1e3
    for alpha in ALPHAS:
        plain = compute_importance(root, ImportanceParams(alpha=alpha, mode="released"))
        clamped = compute_importance(root, ImportanceParams(alpha=alpha, mode="released", options=clamp(1e3)))
        np.testing.assert_allclose(clamped["score"].to_numpy(), plain["score"].to_numpy(), rtol=0, atol=0)
        assert clamped["selected"].equals(plain["selected"])
        check_against(clamped, *ref_released(data, alpha)[:3])


# Streams the released mode reads: language on the text form, vision on the multimodal form.
@pytest.mark.parametrize("key", [("retain", "text", "language", 1), ("forget", "multimodal", "vision", 0)])
def test_clamp_raises_when_a_part_exceeds_it(tmp_path, key):
    data = random_data(seed=13)
    data[key][-1][0, 2] = 2000.0  # one token of the last sample (second part) beyond the clamp
    write_store(tmp_path, data)
    with pytest.raises(ValueError, match="(?i)clamp"):
        compute_importance(tmp_path, ImportanceParams(alpha=0.25, mode="released", options=clamp(1e3)))
    # a clamp above the largest value, or no clamp, is fine (and exact)
    keys, score, selected, _ = ref_released(data, 0.25)
    check_against(compute_importance(tmp_path, ImportanceParams(alpha=0.25, mode="released")), keys, score, selected)
    check_against(compute_importance(tmp_path, ImportanceParams(alpha=0.25, mode="released", options=clamp(5e3))),
                  keys, score, selected)


def test_clamp_ignores_streams_the_released_mode_does_not_read(tmp_path):
    # Not in the brief's wording ("some part's max_abs exceeds clamp"): the implementation checks only the
    # streams released reads (language/text, vision/multimodal), where a clamp could change a statistic.
    # A large value in language/multimodal changes no released score, so the clamp is still exact.
    data = random_data(seed=13)
    data[("retain", "multimodal", "language", 1)][-1][0, 2] = 2000.0
    write_store(tmp_path, data)
    df = compute_importance(tmp_path, ImportanceParams(alpha=0.25, mode="released", options=clamp(1e3)))
    check_against(df, *ref_released(data, 0.25)[:3])


def selective_hand_data():
    # Language layer 0, 5 units, statistic abs, ε = 1e-3. Forget: multimodal tokens (v, v), text (−v, −v)
    # with v = 4, 3, 3, 2, 1 -> pooled F_abs = v; retain: every token 1 -> R_abs = 1.
    # Scores v / 1.001 = 3.996, 2.997, 2.997, 1.998, 0.999 (units 1 and 2 tied exactly: unit 1 first).
    v = [4, 3, 3, 2, 1]
    return {
        ("forget", "multimodal", "language", 0): const(1, 2, v),
        ("forget", "text", "language", 0): const(1, 2, [-x for x in v]),
        ("retain", "multimodal", "language", 0): const(1, 2, [1] * 5),
        ("retain", "text", "language", 0): const(1, 2, [1] * 5),
    }


def test_selective_iterative_hand_case(tmp_path):
    write_store(tmp_path, selective_hand_data(), parts=1)
    sums = neuron_sums(tmp_path, 0.1)
    p = ImportanceParams(alpha=0.2, mode="selective")  # k = ⌊0.2·5⌋ = 1 new neuron per step
    units = lambda df: {u for _, _, u in selected_set(df)}
    step1 = importance_table(sums, p)
    assert step1["score"].to_list() == pytest.approx([4 / 1.001, 3 / 1.001, 3 / 1.001, 2 / 1.001, 1 / 1.001], rel=1e-12)
    assert units(step1) == {0}
    step2 = importance_table(sums, p, already=step1)
    assert units(step2) == {0, 1}  # unit 1 before its tie, unit 2 (ties by unit)
    step3 = importance_table(sums, p, already=step2)
    assert units(step3) == {0, 1, 2}
    # A previous selection that is not the top: kept, excluded from ranking, and the top one added.
    prev = step1.with_columns(selected=step1["unit"] == 4)
    assert units(importance_table(sums, p, already=prev)) == {4, 0}
    prev = step1.with_columns(selected=step1["unit"].is_in([0, 3]))
    assert units(importance_table(sums, p, already=prev)) == {0, 3, 1}


@pytest.mark.parametrize("stat", ["abs", "rms"])
def test_selective_iterative_matches_reference(store, stat):
    root, data = store
    sums = neuron_sums(root, 0.1)
    keys, score = selective_scores(data, stat)
    for alpha in ALPHAS:
        p = ImportanceParams(alpha=alpha, mode="selective", options=statistic(stat))
        k = kfloor(alpha, len(keys))
        prev, have = None, set()
        for _ in range(3 if alpha < 0.5 else 2):
            df = importance_table(sums, p, already=prev)
            new = top_k(keys, score, k, exclude=have)
            assert len(new) == k
            assert selected_set(df) == have | new
            np.testing.assert_allclose(df.sort(["tower", "layer", "unit"])["score"].to_numpy(), score,
                                       rtol=RTOL, atol=ATOL)
            prev, have = df, have | new


# ----------------------------------------------------------------------------------------------
# 3. A store without token statistics


@pytest.fixture(scope="module")
def no_token_store(tmp_path_factory):
    data = random_data(seed=14)
    return write_store(tmp_path_factory.mktemp("notok"), data, with_tokens=False, with_max_abs=False), data


@pytest.mark.parametrize("mode", ["released", "selective"])
def test_token_modes_need_token_statistics(no_token_store, mode):
    root, _ = no_token_store
    with pytest.raises(ValueError, match="(?i)extract"):  # ActivationStoreError is a ValueError
        compute_importance(root, ImportanceParams(alpha=0.25, mode=mode))


def test_paper_works_without_token_statistics(no_token_store):
    root, data = no_token_store
    for alpha in ALPHAS:
        check_against(compute_importance(root, ImportanceParams(alpha=alpha, mode="paper")), *ref_paper(data, alpha))


def test_paper_same_with_or_without_token_statistics(store, tmp_path):
    root, data = store
    write_store(tmp_path, data, with_tokens=False, with_max_abs=False)
    a = compute_importance(root, ImportanceParams(alpha=0.25, mode="paper"))
    b = compute_importance(tmp_path, ImportanceParams(alpha=0.25, mode="paper"))
    for c in importance.OUTPUT_COLUMNS[3:]:
        assert a[c].equals(b[c]), c
