"""A generated CIFAR-format dataset with real class structure, for the demo, the tests and CPU-only validation.

Classes are grouped into superclasses. A superclass fixes the look every sibling shares: a
background gradient, a shape (superellipse: size, aspect, rotation, colour), a stripe frequency
and a marker colour. A fine class is a pair (stripe orientation, marker position around the
shape) from its superclass's small grid of values, so each cue alone is shared with siblings and
only the conjunction names the class: telling siblings apart needs spatial reasoning, which a
bigger network does better. Samples vary in position, scale, rotation, colour, noise and a
distractor blob, and about a third are partly mixed with a sibling's cues (weight 0.15-0.5): those
images are genuinely ambiguous, which is the class-similarity information ("dark knowledge") a
trained teacher's non-target probabilities carry. Everything is drawn from one seed, rendered in
vectorised numpy, and written in the CIFAR-100 python format so the CIFAR reader loads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json
from dkd_tune.data.cifar import CIFAR_FILES, CIFAR_FOLDER, CifarSplit, write_cifar100
from dkd_tune.data.seeding import derived_seed

FORMAT = "dkd-tune-synthetic/2"  # 2: str keys in the pickles (1 wrote bytes keys; rewritten on first use)
PARAMS_FILE = "synthetic.json"
RENDER_CHUNK = 2048  # samples rendered at once; fixed so the output does not depend on memory
MIX_PROBABILITY = 0.35
MIX_WEIGHT = (0.15, 0.5)
NOISE_STD = 0.05
SHIFT = 0.15  # largest translation of the shape, in image half-widths
ROTATION = 0.25  # largest rotation of the shape, in radians, unless `rotation` (degrees) is given
# In units of the shape radius: where the marker sits, its radius, the stripe frequency.
MARKER_DISTANCE = 0.55
MARKER_RADIUS = 0.42
STRIPE_CYCLES = (1.0, 1.4)
DISTRACTOR_RADIUS = 0.14  # in image units (the image spans [-1, 1])


def make_synthetic(
    out_dir: str | Path,
    *,
    classes: int = 100,
    superclasses: int = 20,
    train_per_class: int = 500,
    test_per_class: int = 100,
    image_size: int = 32,
    seed: int = 0,
    rotation: int | None = None,
) -> Path:
    """Write `<out_dir>/cifar-100-python/{train,test,meta}` and `<out_dir>/synthetic.json`; return out_dir.

    Deterministic for the parameters; if the folder already holds a complete dataset made with the
    same parameters nothing is rewritten. `rotation` is the largest rotation of a sample's shape in
    degrees (default: 0.25 radians, about 14): the class cues are read in the shape's frame, so a
    wider rotation makes a network learn that frame, which a small one does worse than a deep one.
    """
    params = {
        "classes": classes,
        "superclasses": superclasses,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    if rotation is not None:  # absent from older datasets' parameters, which must still match
        params["rotation"] = rotation
    _check_params(params)
    out_dir = Path(out_dir).expanduser()
    if synthetic_params(out_dir) == params:
        return out_dir
    max_rotation = ROTATION if rotation is None else math.radians(rotation)
    prototypes = _Prototypes(classes, superclasses, seed)
    train = _render_split(prototypes, train_per_class, image_size, seed, "train", max_rotation)
    test = _render_split(prototypes, test_per_class, image_size, seed, "test", max_rotation)
    fine_names = [f"class_{c:03d}" for c in range(classes)]
    coarse_names = [f"superclass_{s:02d}" for s in range(superclasses)]
    (out_dir / PARAMS_FILE).unlink(missing_ok=True)
    folder = write_cifar100(out_dir, train, test, fine_names, coarse_names)
    sizes = {name: (folder / name).stat().st_size for name in CIFAR_FILES}
    # Written last: its presence marks a complete dataset.
    atomic_write_json(out_dir / PARAMS_FILE, {"format": FORMAT, "params": params, "file_sizes": sizes})
    return out_dir


def synthetic_params(out_dir: str | Path) -> dict | None:
    """The parameters of the complete synthetic dataset in `out_dir`, or None if there is none."""
    out_dir = Path(out_dir).expanduser()
    try:
        record = json.loads((out_dir / PARAMS_FILE).read_text())
        sizes = record["file_sizes"]
        complete = record["format"] == FORMAT and all(
            (out_dir / CIFAR_FOLDER / name).stat().st_size == sizes[name] for name in CIFAR_FILES
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record["params"] if complete else None


def _check_params(params: dict) -> None:
    bounds = {
        "classes": (2, 10_000),
        "superclasses": (1, params["classes"]),
        "train_per_class": (1, 100_000),
        "test_per_class": (1, 100_000),
        "image_size": (8, 256),
        "seed": (0, 2**63 - 1),
        "rotation": (0, 180),
    }
    for key, (low, high) in bounds.items():
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserInputError(
                f"make-synthetic: {key.replace('_', '-')} {value!r} must be an integer in [{low}, {high}]"
            )


class _Prototypes:
    """Per-superclass looks and per-class (stripe orientation, marker angle) cues, drawn from the seed."""

    def __init__(self, classes: int, superclasses: int, seed: int):
        rng = np.random.default_rng(derived_seed(seed, "synthetic-prototypes"))
        self.classes = classes
        self.superclass = np.arange(classes) * superclasses // classes
        s = superclasses
        self.bg_colors = rng.uniform(0.1, 0.9, (s, 2, 3))
        self.bg_angle = rng.uniform(0, 2 * math.pi, s)
        self.shape_power = rng.choice([1, 2, 4], s)  # diamond, ellipse, rounded square
        self.shape_radius = rng.uniform(0.6, 0.75, s)
        self.shape_aspect = rng.uniform(0.7, 1.0, s)
        self.shape_angle = rng.uniform(0, math.pi, s)
        self.shape_color = rng.uniform(0.05, 0.95, (s, 3))
        # Stripes and marker contrast with the shape: its colour mirrored, moved by a random amount.
        self.stripe_color = np.clip(1 - self.shape_color + rng.uniform(-0.2, 0.2, (s, 3)), 0, 1)
        self.stripe_cycles = rng.uniform(*STRIPE_CYCLES, s)
        # The marker's colour: of 32 random candidates, the one farthest from both shape and stripe colours.
        candidates = rng.uniform(0, 1, (s, 32, 3))
        distance = np.minimum(
            np.linalg.norm(candidates - self.shape_color[:, None], axis=2),
            np.linalg.norm(candidates - self.stripe_color[:, None], axis=2),
        )
        self.marker_color = candidates[np.arange(s), distance.argmax(1)]
        self.stripe_angle = np.zeros(classes)
        self.marker_angle = np.zeros(classes)
        self.siblings: list[np.ndarray] = []
        for group in range(s):
            members = np.flatnonzero(self.superclass == group)
            # A grid of values per cue, with more cells than siblings: each value is shared, each pair unique.
            grid = math.ceil(math.sqrt(len(members))) + (1 if len(members) > 1 else 0)
            pairs = rng.permutation(grid * grid)[: len(members)]
            stripe_base, marker_base = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
            self.stripe_angle[members] = stripe_base + (pairs // grid) * math.pi / grid
            self.marker_angle[members] = marker_base + (pairs % grid) * 2 * math.pi / grid
        for c in range(classes):
            siblings = np.flatnonzero(self.superclass == self.superclass[c])
            self.siblings.append(siblings[siblings != c])


def _render_split(
    prototypes: _Prototypes, per_class: int, size: int, seed: int, split: str, max_rotation: float
) -> CifarSplit:
    rng = np.random.default_rng(derived_seed(seed, "synthetic-samples", split))
    count = prototypes.classes * per_class
    labels = rng.permutation(np.repeat(np.arange(prototypes.classes), per_class))
    partner = labels.copy()
    mix = np.zeros(count)
    mixed = rng.random(count) < MIX_PROBABILITY
    for index in np.flatnonzero(mixed):
        siblings = prototypes.siblings[labels[index]]
        if len(siblings):
            partner[index] = siblings[rng.integers(len(siblings))]
            mix[index] = rng.uniform(*MIX_WEIGHT)
    pose = {
        "shift": rng.uniform(-SHIFT, SHIFT, (count, 2)),
        "scale": rng.uniform(0.85, 1.1, count),
        "rotation": rng.uniform(-max_rotation, max_rotation, count),
        "phase": rng.uniform(0, 2 * math.pi, count),
        "gain": rng.uniform(0.75, 1.25, (count, 3)),
        "offset": rng.uniform(-0.1, 0.1, count),
        "distractor_position": rng.uniform(-0.85, 0.85, (count, 2)),
        "distractor_color": rng.uniform(0, 1, (count, 3)),
    }
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    for chunk, start in enumerate(range(0, count, RENDER_CHUNK)):
        part = slice(start, start + RENDER_CHUNK)
        noise_rng = np.random.default_rng(derived_seed(seed, "synthetic-noise", split, chunk))
        images[part] = _render(
            prototypes,
            labels[part],
            partner[part],
            mix[part],
            {k: v[part] for k, v in pose.items()},
            size,
            noise_rng,
        )
    filenames = [f"class_{label:03d}_{split}_{i:06d}.png" for i, label in enumerate(labels)]
    return CifarSplit(images, labels, prototypes.superclass[labels], filenames)


def _render(
    p: _Prototypes,
    labels: np.ndarray,
    partner: np.ndarray,
    mix: np.ndarray,
    pose: dict[str, np.ndarray],
    size: int,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """uint8 (n, 3, size, size) images; float32 throughout, one (n, H, W) array per pixel-wise quantity."""
    n = len(labels)
    group = p.superclass[labels]
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = axis[None, :, None], axis[None, None, :]

    def per_sample(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(n, 1, 1)

    def rgb(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(n, 3, 1, 1)

    # Background: a two-colour gradient along the superclass's direction.
    along_bg = 0.5 + 0.5 * (
        x * per_sample(np.cos(p.bg_angle[group])) + y * per_sample(np.sin(p.bg_angle[group]))
    )
    low, high = rgb(p.bg_colors[group, 0]), rgb(p.bg_colors[group, 1])
    image = low + (high - low) * along_bg[:, None]

    # The shape's frame: shifted, rotated (superclass angle + jitter) and scaled per sample.
    angle = p.shape_angle[group] + pose["rotation"]
    scale = per_sample(pose["scale"] * p.shape_radius[group])
    dx, dy = x - per_sample(pose["shift"][:, 0]), y - per_sample(pose["shift"][:, 1])
    cos_a, sin_a = per_sample(np.cos(angle)), per_sample(np.sin(angle))
    u = (dx * cos_a + dy * sin_a) / scale
    v = (dy * cos_a - dx * sin_a) / (scale * per_sample(p.shape_aspect[group]))
    power = p.shape_power[group]
    level = np.empty_like(u)
    for value in np.unique(power):
        rows = power == value
        level[rows] = np.abs(u[rows]) ** value + np.abs(v[rows]) ** value
    shape = np.clip((1 - level) * 4 + 0.5, 0, 1)  # soft edge around the superellipse |u|^p + |v|^p = 1

    # Class cues, blended with a sibling's for mixed samples: stripe orientation and marker position.
    weight = per_sample(mix)
    cycles = per_sample(p.stripe_cycles[group] * 2 * math.pi)
    phase = per_sample(pose["phase"])
    stripes = np.zeros_like(u)
    marker = np.zeros_like(u)
    for cls, w in ((labels, 1 - weight), (partner, weight)):
        stripe_angle = p.stripe_angle[cls]
        stripes += w * np.sin(
            cycles * (u * per_sample(np.cos(stripe_angle)) + v * per_sample(np.sin(stripe_angle))) + phase
        )
        marker_u = per_sample(MARKER_DISTANCE * np.cos(p.marker_angle[cls]))
        marker_v = per_sample(MARKER_DISTANCE * np.sin(p.marker_angle[cls]))
        marker += w * _bump(((u - marker_u) ** 2 + (v - marker_v) ** 2) / MARKER_RADIUS**2)
    shape_rgb = rgb(p.shape_color[group]) + (rgb(p.stripe_color[group]) - rgb(p.shape_color[group])) * (
        0.5 + 0.4 * stripes[:, None]
    )
    image += (shape_rgb - image) * shape[:, None]
    image += (rgb(p.marker_color[group]) - image) * (0.9 * marker[:, None])

    # A distractor blob of a random colour anywhere, then colour jitter and pixel noise.
    distance = (x - per_sample(pose["distractor_position"][:, 0])) ** 2 + (
        y - per_sample(pose["distractor_position"][:, 1])
    ) ** 2
    image += (rgb(pose["distractor_color"]) - image) * (0.7 * _bump(distance / DISTRACTOR_RADIUS**2))[:, None]
    image = image * rgb(pose["gain"]) + per_sample(pose["offset"])[:, None]
    image += noise_rng.standard_normal(image.shape, dtype=np.float32) * NOISE_STD
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _bump(squared_distance: np.ndarray) -> np.ndarray:
    """A smooth blob profile: (1 - d^2)^2 inside the unit radius, 0 outside (cheaper than a Gaussian)."""
    inside = np.clip(1 - squared_distance, 0, 1)
    return inside * inside
