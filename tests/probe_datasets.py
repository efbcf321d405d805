"""Writers of the probe datasets' real on-disk formats (STL-10 binary, Tiny-ImageNet folders), for tests.

`write_stl10_split` and `write_tiny_imagenet` take the pixels to write; `separable_images` makes
images whose class shows in their colour and stripes, so a probe on random conv features of them
can learn the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_stl10_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """`root/stl10_binary/{split}_X.bin, {split}_y.bin, class_names.txt` from uint8 (N, 3, 96, 96) and 0-based labels.

    The release stores each channel column-major and numbers classes from 1.
    """
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(images.transpose(0, 1, 3, 2), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
    (np.asarray(labels) + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return folder


def write_tiny_imagenet(
    root: Path,
    wnids: list[str],
    train: list[tuple[int, np.ndarray]],
    val: list[tuple[int, np.ndarray]],
) -> Path:
    """`root/tiny-imagenet-200/` with wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt.

    `train` and `val` are (class index into `wnids`, uint8 (H, W, 3) pixels) pairs.
    """
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        (folder / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    for i, (label, pixels) in enumerate(train):
        wnid = wnids[label]
        Image.fromarray(pixels).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", quality=95)
    lines = []
    for i, (label, pixels) in enumerate(val):
        Image.fromarray(pixels).save(folder / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t{pixels.shape[1] - 1}\t{pixels.shape[0] - 1}")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def separable_images(labels: np.ndarray, num_classes: int, side: int, seed: int) -> np.ndarray:
    """uint8 (N, side, side, 3): a class colour, horizontal stripes of a class period, and noise."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, (num_classes, 3))
    rows = np.arange(side)[:, None]
    images = np.empty((len(labels), side, side, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        period = 2 + 2 * (int(label) % 5)
        stripes = np.where((rows // period) % 2 == 0, 40.0, -40.0) * np.ones((1, side))
        pixels = palette[label][None, None, :] + stripes[:, :, None] + rng.normal(0, 12, (side, side, 3))
        images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images
