"""Teachers for a search: loaded or trained once, their logit gap z_t - max z_i, and the exact teacher-logit cache.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkd_tune.checkpoint import payload_digest
from dkd_tune.data import EvalLoader, ImageDataset, ImageFolderData, InMemoryData, normalize, render_views
from dkd_tune.data.train_loader import CIFAR_PADDING
from dkd_tune.data.views import num_views
from dkd_tune.errors import UserInputError
from dkd_tune.models import load_teacher
from dkd_tune.progress import Progress
from dkd_tune.recipes import Recipe
from dkd_tune.storage import atomic_write_json, commit_file, file_sha256
from dkd_tune.train import BEST_CHECKPOINT, LAST_CHECKPOINT, fit, prepare_run

Log = Callable[[str], None]

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
TEACHER_RECORD = "teacher.json"
# Tables whose SHA-256 this process has checked, with the file version checked: a reused trial
# process hashes a table once, and again only if the file changed.
_VERIFIED_TABLES: dict[tuple[str, str], tuple[int, int, int, int]] = {}


class CorruptCacheError(UserInputError):
    """A teacher-logit cache that is incomplete, truncated or no longer matches its SHA-256."""


# ------------------------------------------------------------------------------------------------
# Logit gap


@dataclass(frozen=True)
class LogitGapStats:
    """The teacher's gap z_t - max_{i != t} z_i over the training set, and its top-1 accuracies (%)."""

    mean: float
    median: float
    std: float  # population standard deviation over the training samples
    negative_fraction: float  # share of training samples where the gap is < 0 (the teacher is wrong)
    train_acc: float
    test_acc: float  # NaN when no test set was measured
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN becomes null)."""
        return {
            "mean": self.mean,
            "median": self.median,
            "std": self.std,
            "negative_fraction": self.negative_fraction,
            "train_acc": self.train_acc,
            "test_acc": self.test_acc if math.isfinite(self.test_acc) else None,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LogitGapStats:
        test_acc = values.get("test_acc")
        return cls(
            mean=float(values["mean"]),
            median=float(values["median"]),
            std=float(values["std"]),
            negative_fraction=float(values["negative_fraction"]),
            train_acc=float(values["train_acc"]),
            test_acc=math.nan if test_acc is None else float(test_acc),
            num_samples=int(values["num_samples"]),
        )


@torch.no_grad()
def measure_logit_gap(
    teacher: nn.Module,
    train: ImageDataset | Any,
    test: ImageDataset | Any | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = True,
) -> LogitGapStats:
    """Mean, median and std of z_t - max_{i != t} z_i over `train`, as the paper reports it.

    One pass of the teacher in eval mode over unaugmented images (and over `test` for its test
    top-1), batched on `device`. `train` and `test` are in-memory datasets, or loaders of
    unaugmented batches for data read from folders (ImageNet). The teacher's mode is restored.
    """
    device = torch.device(device)
    was_training = teacher.training
    teacher = teacher.to(device).eval()
    total = _image_count(train) + (_image_count(test) if test is not None else 0)
    try:
        with Progress("teacher logit gap", total, unit="img", enabled=progress) as bar:
            gaps, train_correct = _gap_pass(teacher, train, device, batch_size, bar)
            test_acc = math.nan
            if test is not None:
                _, test_correct = _gap_pass(teacher, test, device, batch_size, bar)
                test_acc = 100.0 * test_correct / max(_image_count(test), 1)
    finally:
        teacher.train(was_training)
    return LogitGapStats(
        mean=gaps.mean().item(),
        median=_median(gaps),
        std=gaps.std(correction=0).item(),
        negative_fraction=(gaps < 0).double().mean().item(),
        train_acc=100.0 * train_correct / len(gaps),
        test_acc=test_acc,
        num_samples=len(gaps),
    )


def _image_count(source: Any) -> int:
    return len(source) if isinstance(source, ImageDataset) else len(source.dataset)


def _gap_pass(
    teacher: nn.Module, source: ImageDataset | Any, device: torch.device, batch_size: int, bar: Progress
) -> tuple[torch.Tensor, int]:
    """(per-sample gaps as float64 on the CPU, number of top-1 hits) of one unaugmented pass."""
    in_memory = isinstance(source, ImageDataset)
    name = source.name if in_memory else str(getattr(source.dataset, "root", "the dataset"))
    num_classes = source.num_classes if in_memory else len(source.dataset.classes)
    if _image_count(source) == 0:
        raise UserInputError(f"dataset {name!r} is empty; the logit gap needs training images")
    gaps, correct = [], 0
    for batch in EvalLoader(source, batch_size, device) if in_memory else source:
        logits = teacher(batch.images).float()
        if logits.shape[1] != num_classes:
            raise UserInputError(
                f"the teacher has {logits.shape[1]} outputs but dataset {name!r} has "
                f"{num_classes} classes; expected a teacher trained on this dataset"
            )
        labels = batch.labels[:, None]
        target = logits.gather(1, labels).squeeze(1)
        rival = logits.scatter(1, labels, -math.inf).amax(1)
        gaps.append((target - rival).double().cpu())
        correct += int((logits.argmax(1) == batch.labels).sum())
        bar.update(len(batch.labels))
    return torch.cat(gaps), correct


def _median(values: torch.Tensor) -> float:
    """The middle value, or the mean of the two middle values for an even count (as numpy's median)."""
    ordered = values.sort().values
    count = len(ordered)
    return float((ordered[(count - 1) // 2] + ordered[count // 2]) / 2)


# ------------------------------------------------------------------------------------------------
# Fingerprints


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


# ------------------------------------------------------------------------------------------------
# The exact teacher-logit cache


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


# ------------------------------------------------------------------------------------------------
# A search's teacher: loaded or trained once, measured, cached


@dataclass(frozen=True)
class TeacherArtifacts:
    """What a search keeps per teacher (in its state.json) and ships to every trial."""

    label: str
    model: str
    checkpoint: str
    num_classes: int
    gap: LogitGapStats | None
    cache_path: str | None
    cache_note: str = ""
    predicted_beta: float | None = None
    non_target: str = "as_is"  # "permuted": the negative control's teacher (see PermutedNonTarget)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "num_classes": self.num_classes,
            "gap": self.gap.to_dict() if self.gap is not None else None,
            "cache_path": self.cache_path,
            "cache_note": self.cache_note,
            "predicted_beta": self.predicted_beta,
            "non_target": self.non_target,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TeacherArtifacts:
        gap = values.get("gap")
        beta = values.get("predicted_beta")
        return cls(
            label=str(values["label"]),
            model=str(values["model"]),
            checkpoint=str(values["checkpoint"]),
            num_classes=int(values["num_classes"]),
            gap=LogitGapStats.from_dict(gap) if gap is not None else None,
            cache_path=values.get("cache_path"),
            cache_note=str(values.get("cache_note", "")),
            predicted_beta=float(beta) if beta is not None else None,
            non_target=str(values.get("non_target", "as_is")),
        )


class PermutedNonTarget:
    """A teacher whose non-target logits are shuffled: the negative control of the beta validation.

    Each training image gets its own random order of the non-target classes, the same in every
    epoch and every augmented view, so the student sees consistent but meaningless non-target
    knowledge. The target logit and the largest non-target logit keep their values, so the
    teacher's accuracy and its logit gap z_t - max z_i are those of the real teacher: only what
    NCKD transfers changes.
    """

    def __init__(self, source: Any, seed: int = 0):
        self.source = source
        self.seed = seed

    def logits_for(self, batch: Any) -> torch.Tensor:
        return permute_non_target(self.source.logits_for(batch), batch.labels, batch.indices, self.seed)


def permute_non_target(
    logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """`logits` with each row's non-target entries moved to positions drawn from (index, seed) alone."""
    rows, classes = logits.shape
    device = logits.device
    labels = labels.to(device).long()
    last = torch.full((rows, 1), 1 << 40, dtype=torch.int64, device=device)
    class_ids = torch.arange(classes, device=device, dtype=torch.int64)
    # Where the values go: the classes in an order hashed from (image, class); the target sorted last.
    keys = _hash32(indices.to(device).long()[:, None] * classes + class_ids[None, :], seed)
    destinations = keys.scatter(1, labels[:, None], last).argsort(dim=1)
    # Where they come from: the non-target classes in their own order, the target last.
    ordered = class_ids.expand(rows, classes).scatter(1, labels[:, None], last).argsort(dim=1)
    return torch.empty_like(logits).scatter_(1, destinations, logits.gather(1, ordered))


def _hash32(values: torch.Tensor, seed: int) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser applied twice, in int64 arithmetic that never overflows."""
    mask = 0xFFFFFFFF
    h = (values ^ (seed * 0x9E3779B9)) & mask
    for _ in range(2):
        h = h ^ (h >> 16)
        h = _mul32(h, 0x85EBCA6B)
        h = h ^ (h >> 13)
        h = _mul32(h, 0xC2B2AE35)
        h = h ^ (h >> 16)
    return h


def _mul32(h: torch.Tensor, factor: int) -> torch.Tensor:
    """(h * factor) mod 2**32 for 32-bit h, split in 16-bit halves so no product passes 2**63."""
    low, high = factor & 0xFFFF, factor >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & 0xFFFFFFFF


def augmentation_views(augment: str) -> tuple[int, bool] | None:
    """(padding, flip) of a training augmentation with finitely many views, or None (unbounded)."""
    if augment == "standard":
        return CIFAR_PADDING, True
    if augment == "none":
        return 0, False
    return None


def teacher_training_dir(
    teachers_dir: str | os.PathLike, model: str, recipe: Recipe, train_set: ImageDataset, augment: str
) -> Path:
    """Where a teacher trained with this recipe on this data and augmentation lives: reused across searches."""
    identity = {
        "model": model,
        "recipe": recipe.to_dict(),
        "dataset": dataset_fingerprint(train_set),
        "augment": augment,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Path(teachers_dir).expanduser().resolve() / f"{model}-{digest[:12]}"


def prepare_teacher(
    *,
    label: str,
    model: str,
    checkpoint: str | None,
    train_recipe: Recipe | None,
    train_set: ImageDataset,
    test_set: ImageDataset,
    augment: str,
    teachers_dir: Path,
    cache_dir: Path | None,
    cache_note: str,
    device: torch.device,
    log: Log = print,
) -> TeacherArtifacts:
    """Load (or train once) a search's teacher, measure its logit gap and build its logit cache.

    With `train_recipe` the teacher is trained with cross-entropy into
    `teacher_training_dir(...)/best.pt`, reused by any later search with the same recipe, data
    and augmentation, and resumed from `last.pt` when an earlier training was interrupted.
    `cache_dir` None means no cache (`cache_note` says why). `predicted_beta` is left to the caller.
    """
    device = torch.device(device)
    if checkpoint is not None:
        weights = Path(checkpoint).expanduser().resolve()
    elif train_recipe is not None:
        folder = teacher_training_dir(teachers_dir, model, train_recipe, train_set, augment)
        weights = train_teacher_once(model, train_recipe, train_set, test_set, augment, folder, device, log)
    else:
        raise UserInputError(f"teacher {label!r}: give a checkpoint or a train: recipe")
    teacher = load_teacher(model, weights, num_classes=train_set.num_classes, device=device)
    log(f"dkd-tune: teacher '{label}': measuring the logit gap on {len(train_set)} training images")
    gap = measure_logit_gap(teacher, train_set, test_set, device=device)
    cache_path = None
    if cache_dir is not None:
        views = augmentation_views(augment)
        if views is None:
            cache_note = f"off (augment {augment!r} has unbounded views)"
        else:
            padding, flip = views
            cache = TeacherLogitCache.build(
                teacher, train_set, cache_dir, padding=padding, flip=flip, device=device, log=log
            )
            cache_path = cache.path
    log(f"dkd-tune: teacher '{label}': logit cache {cache_note}" + (f": {cache_path}" if cache_path else ""))
    return TeacherArtifacts(
        label=label,
        model=model,
        checkpoint=str(weights),
        num_classes=train_set.num_classes,
        gap=gap,
        cache_path=cache_path,
        cache_note=cache_note,
    )


def prepare_folder_teacher(
    *, label: str, model: str, checkpoint: str, data: ImageFolderData, device: torch.device, log: Log = print
) -> TeacherArtifacts:
    """An ImageNet-style teacher: loaded from its checkpoint, gap measured over train/ (resized, center crop).

    Folder data is decoded by workers and augmented with random-resized crops, whose views are
    unbounded: no logit cache, and a teacher is given, not trained here.
    """
    from dkd_tune.data.imagenet import imagenet_eval_loader

    device = torch.device(device)
    weights = Path(checkpoint).expanduser().resolve()
    teacher = load_teacher(model, weights, num_classes=data.num_classes, device=device)

    def unaugmented(split: str):
        return imagenet_eval_loader(
            data.root, split, 256, workers=data.workers, image_size=data.input_size, device=device
        )

    log(f"dkd-tune: teacher '{label}': measuring the logit gap on {data.root / 'train'}")
    gap = measure_logit_gap(teacher, unaugmented("train"), unaugmented("val"), device=device)
    note = "off (random-resized crops of folder data have unbounded views)"
    log(f"dkd-tune: teacher '{label}': logit cache {note}")
    return TeacherArtifacts(
        label=label, model=model, checkpoint=str(weights), num_classes=data.num_classes, gap=gap,
        cache_path=None, cache_note=note,
    )  # fmt: skip


def train_teacher_once(
    model: str,
    recipe: Recipe,
    train_set: ImageDataset,
    test_set: ImageDataset,
    augment: str,
    folder: Path,
    device: torch.device,
    log: Log = print,
) -> Path:
    """`folder/best.pt` of a finished cross-entropy training: reused if there, resumed from last.pt, or trained."""
    best, last, record = folder / BEST_CHECKPOINT, folder / LAST_CHECKPOINT, folder / TEACHER_RECORD
    if record.is_file() and best.is_file():
        log(
            f"dkd-tune: teacher {model}: reusing the teacher trained earlier with this recipe and data: {best}"
        )
        return best
    folder.mkdir(parents=True, exist_ok=True)
    resume_from = last if last.is_file() else None
    if resume_from is not None:
        log(f"dkd-tune: teacher {model}: resuming its interrupted training from {last}")
    else:
        log(
            f"dkd-tune: teacher {model}: training it ({recipe.name}, {recipe.epochs} epochs, {len(train_set)} images, "
            f"augment {augment}) on {device} into {folder}"
        )
    run = prepare_run(model, InMemoryData(train_set, test_set, augment), recipe, device=device)

    def report(epoch_report) -> None:
        metrics = epoch_report.metrics
        log(
            f"dkd-tune: teacher {model} epoch {epoch_report.epoch}/{recipe.epochs}: loss {metrics['train_loss']:.4f}, "
            f"train {metrics['train_acc']:.2f}%, test {metrics['test_acc']:.2f}%"
        )

    result = fit(
        run.model,
        run.train_loader,
        run.test_loader,
        recipe,
        identity=run.identity,
        loss_mode="ce",
        device=device,
        acceleration=run.acceleration,
        reporter=report,
        checkpoint_dir=folder,
        resume_from=resume_from,
    )
    if result.status != "completed" or result.best_checkpoint is None:
        raise UserInputError(
            f"{folder}: training teacher {model} {result.status} after {result.epochs_completed} epochs; "
            "lower its lr (teachers[].train.overrides) and run again"
        )
    atomic_write_json(
        record,
        {
            "model": model,
            "recipe": recipe.to_dict(),
            "augment": augment,
            "dataset": train_set.name,
            "epochs": result.epochs_completed,
            "best_test_acc": result.best_test_acc,
            "final_test_acc": result.final_test_acc,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    log(
        f"dkd-tune: teacher {model}: trained, best test top-1 {result.best_test_acc:.2f}% ({result.best_checkpoint})"
    )
    return result.best_checkpoint
