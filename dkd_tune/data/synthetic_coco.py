"""A generated detection dataset in COCO's on-disk format, for the detection demo, the tests and CPU-only runs.

Six categories in three sibling pairs: a pair shares its shape (square, disk or triangle) and
differs only in the direction of the stripes painted inside it (across or along), so at small
sizes siblings are easily confused and a teacher's non-target scores carry which category looks
like which. Objects (one to four per image, 10-30 pixels, random colours, so colour is no cue) sit
on textured backgrounds: two random gratings, noise and low-contrast blobs that look like nothing.
Category ids have gaps (1, 2, 4, 5, 7, 8) as COCO's do, so the id-to-label mapping is exercised.
The folder is COCO's layout: `annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json

FORMAT = "dkd-tune-synthetic-coco/1"
PARAMS_FILE = "synthetic_coco.json"
SHAPES = ("square", "disk", "triangle")
STRIPES = ("across", "along")
CATEGORY_IDS = (1, 2, 4, 5, 7, 8)  # gaps on purpose: COCO's 80 categories have ids up to 90
OBJECT_SIZE = (10, 30)  # pixels, side of the object's box
MAX_OBJECTS = 4


def categories() -> list[dict]:
    """COCO `categories` entries: `<shape>-<stripes>`, the shape as supercategory."""
    names = [(shape, stripes) for shape in SHAPES for stripes in STRIPES]
    return [
        {"id": category_id, "name": f"{shape}-{stripes}", "supercategory": shape}
        for category_id, (shape, stripes) in zip(CATEGORY_IDS, names, strict=True)
    ]


def make_synthetic_coco(
    out_dir: str | Path,
    *,
    train_images: int = 400,
    val_images: int = 100,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the dataset into `out_dir` (kept as is when it already holds one with these parameters)."""
    params = {
        "format": FORMAT,
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "seed": seed,
    }
    for key in ("train_images", "val_images"):
        if params[key] < 1:
            raise UserInputError(f"generate.{key} = {params[key]}: expected an integer >= 1")
    if image_size < 2 * OBJECT_SIZE[1]:
        raise UserInputError(f"generate.image_size = {image_size}: expected at least {2 * OBJECT_SIZE[1]}")
    out_dir = Path(out_dir).expanduser()
    params_file = out_dir / PARAMS_FILE
    if params_file.is_file() and json.loads(params_file.read_text()) == params:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder beside the destination, then moved in: never half a dataset.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".generating-") as scratch:
        scratch_path = Path(scratch)
        rng = np.random.default_rng(seed)
        (scratch_path / "annotations").mkdir()
        for split, count, first_id in (("train2017", train_images, 1), ("val2017", val_images, 10**6)):
            instances = _write_split(scratch_path / split, count, first_id, image_size, rng)
            atomic_write_json(scratch_path / "annotations" / f"instances_{split}.json", instances)
        for name in ("annotations", "train2017", "val2017"):
            if (out_dir / name).exists():
                shutil.rmtree(out_dir / name)
            (scratch_path / name).rename(out_dir / name)
    atomic_write_json(params_file, params)
    return out_dir


def _write_split(folder: Path, count: int, first_id: int, size: int, rng: np.random.Generator) -> dict:
    from PIL import Image

    folder.mkdir()
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        pixels, objects = _render_image(size, rng)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1 + first_id * 10,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories()}


def _render_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """One RGB image (uint8) and its objects as (category id, (x, y, w, h)) in pixels."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rows, cols, size, rng)
    objects: list = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        side = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
        for _attempt in range(20):  # a free place: objects may touch, not cover each other
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(_overlap((x, y, side, side), box) < 0.3 for box in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(CATEGORY_IDS)))
        mask = _shape_mask(SHAPES[label // 2], rows - y, cols - x, side)
        stripes = _stripes(STRIPES[label % 2], rows - y, cols - x, side, rng)
        colour = rng.uniform(0.15, 0.95, size=3).astype(np.float32)
        shade = np.where(stripes, 1.0, 0.45).astype(np.float32)
        image = np.where(mask[..., None], colour * shade[..., None], image)
        boxes.append((x, y, side, side))
        ys, xs = np.nonzero(mask)
        tight = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        objects.append((CATEGORY_IDS[label], tight))
    image = image + rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), objects


def _background(rows: np.ndarray, cols: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Texture: two gratings of random frequency, direction and colour, plus low-contrast blobs."""
    image = np.broadcast_to(rng.uniform(0.2, 0.7, size=3).astype(np.float32), (size, size, 3)).copy()
    for _ in range(2):
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(0.1, 0.6)
        wave = np.sin(frequency * (np.cos(angle) * cols + np.sin(angle) * rows) + rng.uniform(0, 2 * np.pi))
        image += 0.12 * wave[..., None] * rng.uniform(-1, 1, size=3).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
        blob = ((rows - cy) ** 2 + (cols - cx) ** 2) < radius**2
        image = np.where(blob[..., None], image + rng.uniform(-0.15, 0.15, size=3).astype(np.float32), image)
    return image


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, side: int) -> np.ndarray:
    inside = (dy >= 0) & (dx >= 0) & (dy < side) & (dx < side)
    if shape == "square":
        return inside
    if shape == "disk":
        centre = (side - 1) / 2
        return inside & ((dy - centre) ** 2 + (dx - centre) ** 2 <= (side / 2) ** 2)
    # triangle: apex at the top centre, base along the bottom
    return inside & (np.abs(dx - (side - 1) / 2) <= (dy + 1) / 2)


def _stripes(
    direction: str, dy: np.ndarray, dx: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    period = max(3.0, side / rng.uniform(3.0, 4.5))
    along = dx if direction == "across" else dy
    return np.floor(along / (period / 2)).astype(np.int64) % 2 == 0


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / min(a[2] * a[3], b[2] * b[3])
