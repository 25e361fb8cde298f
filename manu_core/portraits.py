"""Procedural portraits: the stand-in for MLLMU-Bench's (non-public) profile images.

Every portrait is a pure function of (profile id, view): a stylised head and shoulders whose
colours and shapes are drawn from a generator seeded by the profile id, so that a tiny vision
tower can tell 500+ people apart. `view > 0` renders the same person "from another angle" for the
Test set: a seeded rotation, shift, scale and colour change of view 0.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from PIL import Image, ImageDraw, ImageEnhance

SIZE = 64


def _rng(*key: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))  # type: ignore[return-value]


def _base_portrait(profile_id: str, size: int) -> Image.Image:
    rng = _rng("portrait", profile_id)
    s = size / 64
    img = Image.new("RGB", (size, size), _colour(rng))
    d = ImageDraw.Draw(img)
    # background pattern: a few stripes or blocks (cheap identity signal that survives shifts)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randint(0, size - 8), rng.randint(0, size - 8)
        d.rectangle([x0, y0, x0 + rng.randint(6, 24) * s, y0 + rng.randint(6, 24) * s], fill=_colour(rng))
    shirt = _colour(rng)
    d.ellipse([10 * s, 46 * s, 54 * s, 80 * s], fill=shirt)  # shoulders
    skin = _colour(rng, 60, 240)
    face = [20 * s + rng.randint(-2, 2), 14 * s, 44 * s + rng.randint(-2, 2), 46 * s + rng.randint(-3, 3)]
    hair = _colour(rng)
    style = rng.randrange(3)
    if style == 0:  # long hair behind the face
        d.rectangle([face[0] - 4 * s, 10 * s, face[2] + 4 * s, 50 * s], fill=hair)
    d.ellipse(face, fill=skin)
    if style in (0, 1):  # fringe
        d.pieslice([face[0] - 2 * s, 8 * s, face[2] + 2 * s, 34 * s], 180, 360, fill=hair)
    else:  # hat
        d.rectangle([face[0] - 4 * s, 8 * s, face[2] + 4 * s, 18 * s], fill=hair)
    eye = _colour(rng, 0, 160)
    ey = 28 * s + rng.randint(-2, 2)
    for ex in (27 * s, 37 * s):
        d.ellipse([ex - 2 * s, ey - 2 * s, ex + 2 * s, ey + 2 * s], fill=eye)
    if rng.random() < 0.4:  # glasses
        d.line([23 * s, ey, 41 * s, ey], fill=_colour(rng, 0, 90), width=max(1, int(s)))
    d.arc([26 * s, 34 * s, 38 * s, 42 * s], 20, 160, fill=_colour(rng, 80, 200), width=max(1, int(2 * s)))
    return img


@lru_cache(maxsize=4096)
def portrait(profile_id: str, view: int = 0, size: int = SIZE) -> Image.Image:
    """The stand-in portrait of `profile_id`; `view` k > 0 is the k-th transformed Test-set view.

    Cached: callers must not modify the returned image in place."""
    img = _base_portrait(profile_id, size)
    if view == 0:
        return img
    rng = _rng("view", profile_id, view)
    angle = rng.uniform(-15, 15)
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.randint(-4, 4), rng.randint(-4, 4)
    img = img.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=img.getpixel((0, 0)))
    w = round(size * scale)
    img = img.resize((w, w), Image.BILINEAR)
    if w > size:  # zoom in: centre crop
        o = (w - size) // 2
        img = img.crop((o, o, o + size, o + size))
    else:  # zoom out: paste on the background colour
        canvas = Image.new("RGB", (size, size), img.getpixel((0, 0)))
        canvas.paste(img, ((size - w) // 2, (size - w) // 2))
        img = canvas
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))


def image_for(key: str, size: int = SIZE) -> Image.Image:
    """Resolve an image key from the data module: '<profile>' or '<profile>@view<k>'. Any other key
    (e.g. a local benchmark's 'mllmu:<config>:<id>') is an error, never a drawn stand-in."""
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]+(@view[0-9]+)?", key):
        raise ValueError(f"image key {key!r} is not an embedded portrait ('<profile id>' or '<profile id>@view<k>'); "
                         "a benchmark's image keys resolve through its Benchmark.image (pass images=...).")
    pid, _, view = key.partition("@view")
    return portrait(pid, int(view) if view else 0, size)
