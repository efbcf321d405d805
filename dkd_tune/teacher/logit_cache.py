"""The exact teacher-logit cache: the teacher's output on every view a trial will draw, computed once.

With the standard CIFAR augmentation (crop with 4-pixel zero padding, horizontal flip) every
training image has exactly 81 x 2 = 162 distinct views, so the teacher's output on every batch a
trial will ever draw is known in advance. `TeacherLogitCache` computes it once per (teacher,
dataset, augmentation), stores it as one float16 (N, V, C) file keyed by a hash of all three,
and every trial memory-maps it and looks logits up by (sample index, view id) instead of running
the teacher: the teacher's forward pass, often more than half of a DKD step, leaves the trials.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkd_tune.core.checkpoint_file import payload_digest
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json, commit_file, file_sha256
from dkd_tune.core.progress import Log, Progress
from dkd_tune.data import ImageDataset, normalize, render_views
from dkd_tune.data.train_loader import CIFAR_PADDING
from dkd_tune.data.views import num_views

CACHE_FORMAT = "dkd-tune-teacher-logits/1"


CACHE_DATA_FILE = "logits.f16"  # raw float16, row-major (num_samples, num_views, num_classes)


CACHE_PARTIAL_FILE = "logits.f16.partial"  # the table while it is built; renamed to CACHE_DATA_FILE when done


CACHE_META_FILE = "cache.json"  # written last, atomically: its presence marks a complete cache


CACHE_PROGRESS_FILE = "build.json"  # how many images are done while a build is under way


CACHE_LOCK_FILE = "build.lock"


CACHE_DTYPE = torch.float16


# A chunk is the unit of resumption: this many teacher views (whole images), then an fsync'd checkpoint.
CHUNK_VIEWS = 32768


# Views per teacher batch while building: a GPU wants big batches; on a CPU, larger batches than a
# training batch run slower per image (resnet32x4, 1 thread: 65 img/s at 64, 44 img/s at 324).
GPU_BUILD_BATCH = 1024


CPU_BUILD_BATCH = 64


# Room left on the disk besides the cache itself, for the files a search writes next to it.
DISK_MARGIN_BYTES = 256 << 20


# On CUDA the table moves to the GPU only when it takes at most this share of the free memory.
GPU_TABLE_SHARE = 0.5


# Tables whose SHA-256 this process has checked, with the file version checked: a reused trial
# process hashes a table once, and again only if the file changed.
_VERIFIED_TABLES: dict[tuple[str, str], tuple[int, int, int, int]] = {}


class CorruptCacheError(UserInputError):
    """A teacher-logit cache that is incomplete, truncated or no longer matches its SHA-256."""


def teacher_weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): what the teacher computes."""
    return payload_digest(dict(model.state_dict()))


def dataset_fingerprint(dataset: ImageDataset, *, include_labels: bool = True) -> str:
    """SHA-256 of a dataset's image (and label) bytes, shapes and normalisation.

    Training a teacher depends on the labels (label noise changes them); its logits for an image
    do not, so the logit cache is keyed without them and shared across label-noise settings.
    """
    digest = hashlib.sha256()
    tensors = [dataset.images, dataset.labels] if include_labels else [dataset.images]
    header = {
        "tensors": [[str(tensor.dtype), list(tensor.shape)] for tensor in tensors],
        "mean": [float(value) for value in dataset.mean],
        "std": [float(value) for value in dataset.std],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for tensor in tensors:
        digest.update(memoryview(tensor.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def cache_key(
    teacher_digest: str, dataset_digest: str, *, padding: int, flip: bool, image_shape: tuple[int, ...]
) -> str:
    """The hash that names a cache: teacher weights, dataset, augmentation, image size and stored dtype."""
    identity = {
        "format": CACHE_FORMAT,
        "teacher": teacher_digest,
        "dataset": dataset_digest,
        "padding": int(padding),
        "flip": bool(flip),
        "image_shape": [int(size) for size in image_shape],
        "dtype": str(CACHE_DTYPE),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class TeacherLogitCache:
    """The teacher's logits for every (training image, augmented view), float16, memory-mapped.

    `path` is the cache's folder: `logits.f16` (the table), `cache.json` (shape, key, SHA-256).
    """

    def __init__(self, path: Path, meta: dict[str, Any], table: torch.Tensor):
        self.path = str(path)
        self.meta = meta
        self.num_samples = int(meta["num_samples"])
        self.num_views = int(meta["num_views"])
        self.num_classes = int(meta["num_classes"])
        self.padding = int(meta["padding"])
        self.flip = bool(meta["flip"])
        self.key = str(meta["key"])
        self.nbytes = int(meta["nbytes"])
        self._table = table

    def __repr__(self) -> str:
        return (
            f"TeacherLogitCache({self.path!r}, {self.num_samples} images x {self.num_views} views x "
            f"{self.num_classes} classes, {_format_bytes(self.nbytes)}, on {self._table.device})"
        )

    # -------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        dataset: ImageDataset,
        directory: str | os.PathLike,
        *,
        padding: int = CIFAR_PADDING,
        flip: bool = True,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        chunk_images: int | None = None,
        progress: bool = True,
        log: Log = print,
    ) -> TeacherLogitCache:
        """The cache of `teacher` on `dataset`'s views under `directory`: reused if complete, else built.

        Building reports the size first and refuses (one line) when the disk lacks room, runs the
        teacher on `batch_size` views at a time, writes chunks of `chunk_images` images into a
        preallocated file and records each finished chunk, so an interrupted build continues where
        it stopped. Only a finished build gets `cache.json`.
        """
        device = torch.device(device)
        count, channels, height, width = dataset.images.shape
        if count == 0:
            raise UserInputError(f"dataset {dataset.name!r} is empty; there are no teacher logits to cache")
        views = num_views(padding, flip)
        key = cache_key(
            teacher_weights_digest(teacher),
            dataset_fingerprint(dataset, include_labels=False),
            padding=padding,
            flip=flip,
            image_shape=(channels, height, width),
        )
        folder = Path(directory).expanduser().resolve() / key[:24]
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / CACHE_LOCK_FILE, log):
            reused = cls._reusable(folder, key, log)
            if reused is not None:
                log(
                    f"dkd-tune: teacher-logit cache: reusing the complete cache {folder} ({reused.describe()})"
                )
                return reused
            teacher = teacher.to(device).eval()
            with torch.no_grad():
                sample = teacher(normalize(dataset.images[:1].to(device), dataset.mean, dataset.std))
            meta = {
                "format": CACHE_FORMAT,
                "key": key,
                "num_samples": count,
                "num_views": views,
                "num_classes": int(sample.shape[1]),
                "dtype": "float16",
                "padding": padding,
                "flip": flip,
                "image_shape": [channels, height, width],
                "dataset": dataset.name,
            }
            meta["nbytes"] = count * views * meta["num_classes"] * 2
            chunk = chunk_images or max(1, CHUNK_VIEWS // views)
            batch = batch_size or (GPU_BUILD_BATCH if device.type == "cuda" else CPU_BUILD_BATCH)
            _build_into(folder, meta, teacher, dataset, device, batch, chunk, progress, log)
            return cls.open(folder)

    @classmethod
    def _reusable(cls, folder: Path, key: str, log: Log) -> TeacherLogitCache | None:
        """The complete cache in `folder` if it is intact; a damaged one is removed (and rebuilt)."""
        if not (folder / CACHE_META_FILE).is_file():
            return None
        try:
            cache = cls.open(folder, verify=True)
            if cache.key != key:
                raise CorruptCacheError(f"{folder}: holds a cache with another key")
        except CorruptCacheError as error:
            log(f"dkd-tune: teacher-logit cache: {error}; building it again")
            (folder / CACHE_META_FILE).unlink(missing_ok=True)
            (folder / CACHE_DATA_FILE).unlink(missing_ok=True)
            return None
        return cache

    # -------------------------------------------------------------------------------- reading

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False) -> TeacherLogitCache:
        """Memory-map a complete cache (its folder or one of its files), read-only.

        The data file's size is always checked against the recorded shape; `verify` also checks
        its SHA-256 (a full read). Anything wrong raises `CorruptCacheError` naming the file.
        """
        folder = Path(path).expanduser()
        if folder.is_file():
            folder = folder.parent
        meta_path, data_path = folder / CACHE_META_FILE, folder / CACHE_DATA_FILE
        if not meta_path.is_file():
            if (folder / CACHE_PROGRESS_FILE).is_file():
                done = _read_json(folder / CACHE_PROGRESS_FILE).get("images_done", "?")
                raise CorruptCacheError(
                    f"{folder}: teacher-logit cache is incomplete (its build stopped after {done} images); "
                    "run the search again to finish it"
                )
            raise CorruptCacheError(f"{meta_path}: teacher-logit cache not found (expected a complete cache)")
        meta = _read_json(meta_path)
        required = ("format", "key", "num_samples", "num_views", "num_classes", "nbytes", "sha256")
        if meta.get("format") != CACHE_FORMAT or any(name not in meta for name in required):
            raise CorruptCacheError(
                f"{meta_path}: not a teacher-logit cache description (expected format {CACHE_FORMAT!r} "
                f"with keys {', '.join(required)})"
            )
        shape = (int(meta["num_samples"]), int(meta["num_views"]), int(meta["num_classes"]))
        expected = shape[0] * shape[1] * shape[2] * 2
        found = data_path.stat().st_size if data_path.is_file() else None
        if found != expected or int(meta["nbytes"]) != expected:
            raise CorruptCacheError(
                f"{data_path}: teacher-logit cache is "
                + ("missing" if found is None else f"{found} bytes")
                + f" but its shape {shape} needs {expected} bytes (truncated or damaged); delete the folder to rebuild it"
            )
        if verify:
            _verify_table(data_path, str(meta["sha256"]))
        # MAP_PRIVATE: pages come from the shared page cache; nothing can write back to the file.
        table = torch.from_file(str(data_path), shared=False, size=math.prod(shape), dtype=CACHE_DTYPE)
        return cls(folder, meta, table.view(shape))

    def to(self, device: torch.device | str) -> TeacherLogitCache:
        """The cache for batches on `device`: on a GPU the whole table when it fits, else pinned host memory."""
        device = torch.device(device)
        if device.type == "cpu" or self._table.device == device:
            return self
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes <= GPU_TABLE_SHARE * free:
                return TeacherLogitCache(Path(self.path), self.meta, self._table.to(device))
            return TeacherLogitCache(Path(self.path), self.meta, self._table.cpu().pin_memory())
        return TeacherLogitCache(Path(self.path), self.meta, self._table.to(device))

    def logits_for(self, batch: Any) -> torch.Tensor:
        """(B, C) float16 teacher logits of a batch's (sample index, view id) pairs, on the batch's device."""
        if batch.view_ids is None:
            raise ValueError(
                "the teacher-logit cache needs view ids; this loader's views are unbounded (use the live teacher)"
            )
        table = self._table
        if table.device == batch.indices.device:
            return table[batch.indices, batch.view_ids]
        # The table stayed in host memory: gather there, move only the batch's rows.
        rows = table[batch.indices.cpu(), batch.view_ids.cpu()]
        return rows.to(batch.images.device, non_blocking=True)

    def describe(self) -> str:
        return (
            f"{self.num_samples} images x {self.num_views} views x {self.num_classes} classes, "
            f"float16, {_format_bytes(self.nbytes)}"
        )


def _verify_table(data_path: Path, expected_sha256: str) -> None:
    stat = data_path.stat()
    version = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key = (str(data_path.resolve()), expected_sha256)
    if _VERIFIED_TABLES.get(key) == version:
        return
    if file_sha256(data_path) != expected_sha256:
        raise CorruptCacheError(
            f"{data_path}: teacher-logit cache does not match its recorded SHA-256 (corrupted); "
            "delete the folder to rebuild it"
        )
    _VERIFIED_TABLES[key] = version


def _build_into(
    folder: Path,
    meta: dict[str, Any],
    teacher: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    batch_size: int,
    chunk_images: int,
    progress: bool,
    log: Log,
) -> None:
    """Fill the table chunk by chunk (resuming a matching unfinished build), then rename it and mark it complete.

    The table is written into `logits.f16.partial` and renamed to `logits.f16` only once every chunk
    is on disk and hashed; `cache.json`, written atomically after that, marks the cache complete.
    """
    data_path, progress_path = folder / CACHE_PARTIAL_FILE, folder / CACHE_PROGRESS_FILE
    count, views, classes, nbytes = (
        meta["num_samples"],
        meta["num_views"],
        meta["num_classes"],
        meta["nbytes"],
    )
    done = _resumable_images(progress_path, data_path, meta)
    if done == 0:
        progress_path.unlink(missing_ok=True)
    # Blocks the data file already holds are reused (a resumed build keeps them, a fresh one rewrites them).
    needed = nbytes - _allocated_bytes(data_path)
    free = shutil.disk_usage(folder).free
    log(
        f"dkd-tune: teacher-logit cache: {count} images x {views} views x {classes} classes, float16 = "
        f"{_format_bytes(nbytes)} in {folder}" + (f"; resuming after {done}/{count} images" if done else "")
    )
    if free < needed + DISK_MARGIN_BYTES:
        raise UserInputError(
            f"{folder}: the teacher-logit cache needs {_format_bytes(needed)} more but the disk has "
            f"{_format_bytes(free)} free (keeping {_format_bytes(DISK_MARGIN_BYTES)} spare); free space, "
            "point cache.dir at another disk, or set cache.teacher_logits: off"
        )
    if not done:
        _preallocate(data_path, nbytes)
    started = time.perf_counter()
    row_bytes = views * classes * 2
    with (
        torch.no_grad(),
        open(data_path, "r+b") as file,
        Progress("teacher-logit cache", count - done, unit="img", enabled=progress) as bar,
    ):
        for start in range(done, count, chunk_images):
            end = min(start + chunk_images, count)
            block = _chunk_logits(teacher, dataset, start, end, views, meta, device, batch_size)
            file.seek(start * row_bytes)
            file.write(memoryview(block.numpy()).cast("B"))
            file.flush()
            os.fsync(file.fileno())
            # Recorded only once the chunk is on disk: a restart never trusts unwritten rows.
            atomic_write_json(progress_path, {"key": meta["key"], "nbytes": nbytes, "images_done": end})
            bar.update(end - start)
    seconds = time.perf_counter() - started
    meta = {
        **meta,
        "sha256": file_sha256(data_path),
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    commit_file(data_path, folder / CACHE_DATA_FILE)
    atomic_write_json(folder / CACHE_META_FILE, meta)
    progress_path.unlink(missing_ok=True)
    log(
        f"dkd-tune: teacher-logit cache complete: {folder} ({(count - done) * views / max(seconds, 1e-9):.0f} "
        f"teacher views/s, {seconds:.1f}s)"
    )


def _chunk_logits(
    teacher: nn.Module,
    dataset: ImageDataset,
    start: int,
    end: int,
    views: int,
    meta: dict[str, Any],
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """(end-start, V, C) float16 on the CPU: every view of images start..end-1, as the loader renders them."""
    images = dataset.images[start:end].to(device)
    count = end - start
    # Every (image, view) pair of the chunk in row order; teacher batches are slices of it.
    image_index = torch.arange(count, device=device).repeat_interleave(views)
    view_ids = torch.arange(views, device=device).repeat(count)
    rows = torch.empty((count * views, meta["num_classes"]), dtype=CACHE_DTYPE)
    for first in range(0, count * views, batch_size):
        part = slice(first, first + batch_size)
        pixels = render_views(images[image_index[part]], view_ids[part], meta["padding"], meta["flip"])
        logits = teacher(normalize(pixels, dataset.mean, dataset.std)).float()
        rounded = logits.to(CACHE_DTYPE)
        if not torch.isfinite(rounded).all():
            raise UserInputError(
                f"teacher logits reach {logits.abs().max().item():.3g}, beyond float16's range (65504); "
                "the teacher-logit cache cannot hold them: set cache.teacher_logits: off"
            )
        rows[part] = rounded.cpu()
    return rows.view(count, views, -1)


def _resumable_images(progress_path: Path, data_path: Path, meta: dict[str, Any]) -> int:
    """How many images an earlier, interrupted build of the same cache finished (0: start afresh)."""
    if not progress_path.is_file() or not data_path.is_file():
        return 0
    try:
        record = json.loads(progress_path.read_text())
        done = int(record["images_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    same = record.get("key") == meta["key"] and record.get("nbytes") == meta["nbytes"]
    if not same or data_path.stat().st_size != meta["nbytes"] or not 0 < done <= meta["num_samples"]:
        return 0
    return done


def _preallocate(path: Path, nbytes: int) -> None:
    """Create `path` at its final size, reserving the blocks where the platform allows."""
    with open(path, "wb") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, nbytes)
        except (AttributeError, OSError) as error:
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise UserInputError(
                    f"{path}: no space left on the disk for the {_format_bytes(nbytes)} teacher-logit cache"
                ) from None
            file.truncate(nbytes)


def _allocated_bytes(path: Path) -> int:
    try:
        stat = path.stat()
    except OSError:
        return 0
    return min(stat.st_size, getattr(stat, "st_blocks", 0) * 512)


@contextlib.contextmanager
def _exclusive(lock_path: Path, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (two searches sharing a cache folder build it once)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, builds are still resumable and atomic at the end
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"dkd-tune: teacher-logit cache: waiting for another process building {lock_path.parent}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"{path}: cannot read ({error})") from None
    if not isinstance(content, dict):
        raise CorruptCacheError(f"{path}: expected a JSON object")
    return content


def _format_bytes(count: float) -> str:
    """Decimal units, as disk sizes are quoted: 1.62 GB."""
    if count < 1000:
        return f"{count:.0f} B"
    exponent = min(int(math.log10(count)) // 3, 3)
    return f"{count / 1000**exponent:.2f} {('KB', 'MB', 'GB')[exponent - 1]}"


def augmentation_views(augment: str) -> tuple[int, bool] | None:
    """(padding, flip) of a training augmentation with finitely many views, or None (unbounded)."""
    if augment == "standard":
        return CIFAR_PADDING, True
    if augment == "none":
        return 0, False
    return None
