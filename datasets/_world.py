"""The embedded synthetic fine-grained world: four object families drawn procedurally.

Each family (dogs, cars, birds, aircraft) has three attributes with four values each:

* ``colour``: the body colour (a global cue, shared by many classes);
* ``marker``: the colour of a small part at one end of the object (ears, badge, crest, tail fin):
  a local cue covering a few patches, like the "red-winged" or "yellow-headed" of real bird names;
* ``pattern``: the texture on the body (plain, striped, spotted, checkered): a local cue.

A class is one (colour, marker, pattern) combination; its name is an attribute phrase such as
"golden striped crimson-eared dog". A benchmark dataset has ``2 * n_known`` classes: the first half are
the known (ID) classes; OOD class ``n_known + j`` is ID class ``j`` with its marker (even j) or its
pattern (odd j) changed, a near duplicate ("hard unknown"). Position, scale, rotation, background
clutter, colour jitter and pixel noise vary more than the class cue.

The tiny CLIP is pretrained on captions of the *other* combinations of each family (every attribute
word is seen; no benchmark class combination is), see ``pretraining_combos``.
Everything is deterministic given the seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 48  # output image size (the tiny CLIP's input size)
MARKER_SCALE = 0.3  # part radius relative to the object's half-size (pretraining and benchmark)
CANVAS = 96  # drawn at 2x then downsampled

PATTERNS = ("plain", "striped", "spotted", "checkered")
MARKER_SHAPES = ("triangle", "circle", "square", "bar")  # part outlines (and background clutter)
# the four part colours (the ``marker`` attribute); their words are used by no body colour
MARKER_COLOURS = (("crimson", (200, 20, 60)), ("lime", (150, 230, 30)), ("cyan", (30, 215, 230)),
                  ("magenta", (225, 40, 215)))


@dataclass(frozen=True)
class Family:
    key: str
    noun: str
    colours: Tuple[Tuple[str, Tuple[int, int, int]], ...]
    part: str  # the marked part's adjective ("eared"); marker words are "<part colour>-<part>"
    part_shape: str  # the part's outline, one of MARKER_SHAPES
    template: str

    @property
    def marker_words(self) -> Tuple[str, ...]:
        return tuple(f"{name}-{self.part}" for name, _ in MARKER_COLOURS)


FAMILIES: Dict[str, Family] = {
    "dogs": Family("dogs", "dog",
                   (("black", (45, 42, 40)), ("brown", (125, 78, 42)), ("white", (232, 230, 220)),
                    ("golden", (214, 168, 72))),
                   "eared", "triangle",
                   "a photo of a {}, a type of dog."),
    "cars": Family("cars", "car",
                   (("red", (196, 40, 38)), ("blue", (40, 70, 190)), ("silver", (185, 188, 195)),
                    ("green", (40, 140, 60))),
                   "badged", "circle",
                   "a photo of a {}."),
    "birds": Family("birds", "bird",
                    (("grey", (128, 128, 132)), ("yellow", (230, 205, 50)), ("blue", (60, 110, 205)),
                     ("brown", (130, 85, 45))),
                    "crested", "triangle",
                    "a photo of a {}, a type of bird."),
    "aircraft": Family("aircraft", "aircraft",
                       (("white", (236, 236, 236)), ("grey", (125, 128, 135)), ("orange", (235, 120, 35)),
                        ("navy", (30, 40, 100))),
                       "finned", "square",
                       "a photo of a {}, a type of aircraft."),
}

Combo = Tuple[int, int, int]  # (colour index, marker index, pattern index)
ALL_COMBOS: Tuple[Combo, ...] = tuple((c, m, p) for c in range(4) for m in range(4) for p in range(4))


def combo_index(combo: Combo) -> int:
    """Position of ``combo`` in ALL_COMBOS."""
    c, m, p = combo
    return c * 16 + m * 4 + p


def class_name(fam: Family, combo: Combo) -> str:
    c, m, p = combo
    return f"{fam.colours[c][0]} {PATTERNS[p]} {fam.marker_words[m]} {fam.noun}"


@lru_cache(maxsize=None)
def benchmark_classes(family: str, n_known: int = 12, seed: int = 0) -> Tuple[Combo, ...]:
    """The dataset's classes in canonical order: n_known ID combos, then their OOD twins."""
    rng = np.random.default_rng([seed, list(FAMILIES).index(family)])
    order = rng.permutation(len(ALL_COMBOS))
    ids: List[Combo] = []
    used = set()
    for i in order:
        combo = ALL_COMBOS[i]
        if len(ids) == n_known:
            break
        ids.append(combo)
        used.add(combo)
    oods: List[Combo] = []
    for j, (c, m, p) in enumerate(ids):
        alts = [(c, mm, p) for mm in range(4) if mm != m] if j % 2 == 0 else \
               [(c, m, pp) for pp in range(4) if pp != p]
        alts = [a for a in alts if a not in used]
        if not alts:  # fall back to changing the other local attribute
            alts = [(c, mm, pp) for mm in range(4) for pp in range(4)
                    if (c, mm, pp) not in used and (mm == m or pp == p)]
        twin = alts[int(rng.integers(len(alts)))]
        oods.append(twin)
        used.add(twin)
    return tuple(ids + oods)


def pretraining_combos(family: str, n_known: int = 12, seed: int = 0) -> List[Combo]:
    excluded = set(benchmark_classes(family, n_known, seed))
    return [c for c in ALL_COMBOS if c not in excluded]


# -- drawing ---------------------------------------------------------------------------------------
def _pattern_colour(rgb) -> Tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (30, 30, 30) if lum > 120 else (225, 225, 215)


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    else:  # bar
        draw.rectangle([cx - r * 1.3, cy - r * 0.4, cx + r * 1.3, cy + r * 0.4], fill=fill)


def _body(fam: str, draw: ImageDraw.ImageDraw, S: float, o: float, fill) -> Tuple[float, float]:
    """Draw the family silhouette (body parts) centred at (o, o) with half-size S.
    Returns the marker position (relative to the centre, in units of S)."""
    def P(x, y):
        return (o + x * S, o + y * S)

    def ell(x, y, rx, ry, f=fill):
        draw.ellipse([*P(x - rx, y - ry), *P(x + rx, y + ry)], fill=f)

    dark = (35, 35, 35)
    if fam == "dogs":
        ell(0.0, 0.1, 0.7, 0.35)
        ell(0.72, -0.25, 0.26, 0.24)
        for x in (-0.45, -0.2, 0.25, 0.45):
            draw.rectangle([*P(x - 0.07, 0.3), *P(x + 0.07, 0.75)], fill=fill)
        draw.line([P(-0.68, 0.0), P(-0.95, -0.35)], fill=fill, width=max(1, int(S * 0.1)))
        return 0.72, -0.58
    if fam == "cars":
        draw.rectangle([*P(-0.9, -0.05), *P(0.9, 0.4)], fill=fill)
        draw.polygon([P(-0.5, -0.05), P(-0.3, -0.4), P(0.35, -0.4), P(0.55, -0.05)], fill=fill)
        ell(-0.55, 0.45, 0.2, 0.2, dark)
        ell(0.55, 0.45, 0.2, 0.2, dark)
        return 0.72, 0.12
    if fam == "birds":
        ell(0.0, 0.05, 0.55, 0.33)
        ell(0.52, -0.3, 0.23, 0.22)
        draw.polygon([P(-0.5, 0.0), P(-0.95, -0.2), P(-0.95, 0.3)], fill=fill)
        draw.polygon([P(0.72, -0.32), P(0.92, -0.26), P(0.72, -0.2)], fill=dark)
        return 0.5, -0.6
    # aircraft
    ell(0.0, 0.0, 0.95, 0.16)
    draw.polygon([P(0.15, 0.0), P(-0.25, -0.85), P(-0.4, -0.85), P(-0.15, 0.0)], fill=fill)
    draw.polygon([P(0.15, 0.0), P(-0.25, 0.85), P(-0.4, 0.85), P(-0.15, 0.0)], fill=fill)
    return -0.8, -0.32


def render(family: str, combo: Combo, rng: np.random.Generator, difficulty: float = 1.0,
           cast: Tuple[float, float, float] = (1.0, 1.0, 1.0), marker_scale: float = MARKER_SCALE,
           with_masks: bool = False):
    """One RGB uint8 image [SIZE, SIZE, 3] of ``combo`` with random nuisances. ``cast``: a per-channel
    gain (the benchmark datasets' "camera", a domain shift from the pretraining images).

    ``with_masks``: also return the object's and its marked part's coverage of each pixel (float
    [SIZE, SIZE] in [0, 1], the box-downsampled alpha of the drawn layers): ``(image, object, part)``.
    The image is the same either way (the masks draw no random numbers)."""
    fam = FAMILIES[family]
    c, m, p = combo
    base = np.array(fam.colours[c][1], float)
    body_rgb = tuple(int(v) for v in np.clip(base + rng.normal(0, 14 * difficulty, 3), 0, 255))
    # background: a random colour, gradient and clutter shapes
    bg = rng.integers(60, 200, 3)
    img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = MARKER_SHAPES[int(rng.integers(4))] if rng.random() < 0.5 else "circle"
        _shape(d, kind, *rng.uniform(0, CANVAS, 2), rng.uniform(3, 12), col)
    # the object, drawn on its own layer, then rotated and placed
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ld = ImageDraw.Draw(layer)
    o = CANVAS / 2
    S = CANVAS * rng.uniform(0.30, 0.44)
    mx, my = _body(family, ld, S, o, body_rgb + (255,))
    # pattern on the body pixels only
    if PATTERNS[p] != "plain":
        pat = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
        pd = ImageDraw.Draw(pat)
        pc = _pattern_colour(body_rgb) + (255,)
        step = S * 0.28
        if PATTERNS[p] == "striped":
            for k in range(-8, 9):
                x = o + k * step
                pd.line([(x, 0), (x + S * 0.3, CANVAS)], fill=pc, width=max(2, int(S * 0.09)))
        elif PATTERNS[p] == "spotted":
            for _ in range(14):
                x, y = o + rng.uniform(-1, 1) * S, o + rng.uniform(-0.6, 0.6) * S
                r = S * 0.08
                pd.ellipse([x - r, y - r, x + r, y + r], fill=pc)
        else:  # checkered
            for i in range(-6, 7):
                for j in range(-6, 7):
                    if (i + j) % 2 == 0:
                        x, y = o + i * step, o + j * step
                        pd.rectangle([x, y, x + step, y + step], fill=pc)
        mask = layer.split()[3]
        layer.paste(pat, (0, 0), Image.composite(pat, Image.new("RGBA", pat.size), mask).split()[3])
    _shape(ld, fam.part_shape, o + mx * S, o + my * S, S * marker_scale, MARKER_COLOURS[m][1] + (255,))
    part = None
    if with_masks:
        part = Image.new("L", (CANVAS, CANVAS), 0)
        _shape(ImageDraw.Draw(part), fam.part_shape, o + mx * S, o + my * S, S * marker_scale, 255)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
        part = part.transpose(Image.FLIP_LEFT_RIGHT) if part is not None else None
    angle = float(rng.uniform(-35, 35))
    layer = layer.rotate(angle, resample=Image.BICUBIC)
    shift = tuple(int(v) for v in rng.uniform(-0.16, 0.16, 2) * CANVAS)
    img.paste(layer, shift, layer)
    out = np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)
    out = out * np.asarray(cast, np.float32) * rng.uniform(0.8, 1.15) + rng.normal(0, 7 * difficulty, out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if not with_masks:
        return out

    def placed(alpha: Image.Image) -> np.ndarray:
        canvas = Image.new("L", (CANVAS, CANVAS), 0)
        canvas.paste(alpha, shift)
        return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255.0

    return out, placed(layer.split()[3]), placed(part.rotate(angle, resample=Image.BICUBIC))


# the random stream of each benchmark split (train and test keep the streams they always had)
SPLIT_STREAMS = {"train": 0, "test": 1, "val": 2}


@lru_cache(maxsize=16)
def dataset_arrays(family: str, split: str, per_class: int, n_known: int = 12,
                   seed: int = 0, difficulty: float = 1.0,
                   cast: Tuple[float, float, float] = (1.0, 1.0, 1.0),
                   marker_scale: float = MARKER_SCALE) -> Tuple[np.ndarray, np.ndarray]:
    """Images [N, SIZE, SIZE, 3] and labels [N] of a benchmark split, class-major order. Each split
    ("train", "test", "val") draws from its own random stream of the same generator, so the splits are
    disjoint draws of one distribution; "val" has the test split's rendering (same difficulty and
    cast) and never changes the train or test images."""
    classes = benchmark_classes(family, n_known, seed)
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), SPLIT_STREAMS[split]])
    labels = np.repeat(np.arange(len(classes)), per_class)
    imgs = np.stack([render(family, classes[y], rng, difficulty, cast, marker_scale) for y in labels])
    return imgs, labels


def dataset_masks(family: str, split: str, per_class: int, n_known: int = 12,
                  seed: int = 0, difficulty: float = 1.0,
                  cast: Tuple[float, float, float] = (1.0, 1.0, 1.0),
                  marker_scale: float = MARKER_SCALE) -> Tuple[np.ndarray, np.ndarray]:
    """The object and marked-part coverage masks [N, SIZE, SIZE] (float in [0, 1]) of the images of
    :func:`dataset_arrays` with the same arguments, image for image (the same random stream rendered
    again with ``with_masks``). For probes (scripts/probe_patch_alignment.py); no dataset reads them."""
    classes = benchmark_classes(family, n_known, seed)
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), SPLIT_STREAMS[split]])
    labels = np.repeat(np.arange(len(classes)), per_class)
    drawn = [render(family, classes[y], rng, difficulty, cast, marker_scale, with_masks=True)[1:]
             for y in labels]
    return np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn])


def captions(family: str, combo: Combo, rng: np.random.Generator) -> str:
    """A varied caption for pretraining; sometimes an attribute is left out."""
    fam = FAMILIES[family]
    c, m, p = combo
    words = [fam.colours[c][0], PATTERNS[p], fam.marker_words[m]]
    if rng.random() < 0.3:
        words[int(rng.integers(3))] = ""
    name = " ".join(w for w in words if w) + f" {fam.noun}"
    forms = ["a photo of a {}.", "a {}.", fam.template, "a photo of the {}.", "{}",
             "a blurry photo of a {}.", "a picture of a {}."]
    return forms[int(rng.integers(len(forms)))].format(name)
