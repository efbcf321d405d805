"""`dkd-tune download-teachers`: the paper's CIFAR-100 teachers (mdistiller's `cifar_teachers.tar`), and with
--detection its COCO teachers (Detectron2's model zoo, converted), fetched, checked and put where the shipped
search files look, or nothing at all."""

from __future__ import annotations

import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.progress import Progress
from dkd_tune.models import list_models, matching_state_dict

# The checkpoints release of the paper's code base (github.com/megvii-research/mdistiller).
CIFAR_TEACHERS_URL = (
    "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
)
ARCHIVE_FOLDER = "cifar_teachers"  # the tar's top folder: cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth
CHECKPOINT_NAME = "ckpt_epoch_240.pth"
DEFAULT_DESTINATION = "~/checkpoints"  # where search_spaces/cifar_*.yaml look
COMPLETE_MARKER = ".dkd-tune-complete"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


def download_teachers(
    destination: str | os.PathLike = DEFAULT_DESTINATION,
    *,
    url: str = CIFAR_TEACHERS_URL,
    log: Callable[[str], None] = print,
) -> Path:
    """`destination/cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth` for every teacher of the release.

    The archive is downloaded and unpacked inside a temporary folder next to the result, every
    checkpoint is read and matched to its architecture, and only then is the folder renamed into
    place: an interrupted, truncated or damaged download leaves nothing behind.
    """
    root = Path(destination).expanduser()
    target = root / ARCHIVE_FOLDER
    if (target / COMPLETE_MARKER).is_file():
        log(f"dkd-tune download-teachers: {target} already holds the checked teachers; nothing to do")
        return target
    if target.exists():
        raise UserInputError(
            f"{target}: exists but was not written by download-teachers; move it away (or use --to) and run again"
        )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-teachers-", dir=root) as scratch:
        archive = Path(scratch) / "cifar_teachers.tar"
        _fetch(url, archive, log)
        unpacked = Path(scratch) / "unpacked"
        teachers = _unpack(archive, unpacked, url)
        for model, path in teachers.items():
            _check_checkpoint(model, path, url)
        (unpacked / ARCHIVE_FOLDER / COMPLETE_MARKER).write_text("\n".join(sorted(teachers)) + "\n")
        os.replace(unpacked / ARCHIVE_FOLDER, target)
    log(f"dkd-tune download-teachers: {len(teachers)} teachers in {target}: {', '.join(sorted(teachers))}")
    return target


def _fetch(url: str, path: Path, log: Callable[[str], None]) -> None:
    """Download `url` to `path`, refusing an answer shorter than the length the server announced."""
    log(f"dkd-tune download-teachers: downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(path, "wb") as file:
            expected = int(response.headers.get("Content-Length") or 0)
            received = 0
            with Progress("download", total=expected or 1, unit="B", enabled=expected > 0) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise UserInputError(f"{url}: the server answered {error.code} {error.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserInputError(f"{url}: download failed ({reason}); nothing was written") from None
    if expected and received != expected:
        raise UserInputError(
            f"{url}: download ended after {received} of {expected} bytes; nothing was written, run again"
        )


def _unpack(archive: Path, folder: Path, url: str) -> dict[str, Path]:
    """Unpack the release's checkpoints (only regular files under cifar_teachers/); {model: checkpoint}."""
    try:
        with tarfile.open(archive) as tar:
            members = [member for member in tar.getmembers() if member.isfile()]
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if (
                    member.issym()
                    or member.islnk()
                    or not parts
                    or parts[0] != ARCHIVE_FOLDER
                    or ".." in parts
                ):
                    raise UserInputError(
                        f"{url}: unexpected entry {member.name!r} in the archive; expected only "
                        f"{ARCHIVE_FOLDER}/<model>_vanilla/{CHECKPOINT_NAME} files"
                    )
            # The members were checked above; where Python has tar filters, the "data" filter checks again.
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(folder, members=members, **options)
    except tarfile.TarError as error:
        raise UserInputError(f"{url}: not a readable tar archive ({error}); nothing was written") from None
    teachers = {}
    for path in sorted((folder / ARCHIVE_FOLDER).glob(f"*_vanilla/{CHECKPOINT_NAME}")):
        teachers[path.parent.name.removesuffix("_vanilla")] = path
    if not teachers:
        raise UserInputError(
            f"{url}: no {ARCHIVE_FOLDER}/<model>_vanilla/{CHECKPOINT_NAME} in the archive; nothing was written"
        )
    return teachers


def _check_checkpoint(model: str, path: Path, url: str) -> None:
    """The checkpoint reads safely and holds the architecture its folder names, with CIFAR-100's 100 classes."""
    if model not in list_models():
        return  # a teacher dkd-tune has no model for is kept as released, unchecked
    try:
        matching_state_dict(model, path, num_classes=100)
    except UserInputError as error:
        raise UserInputError(
            f"{url}: {ARCHIVE_FOLDER}/{path.parent.name}/{CHECKPOINT_NAME} is not a usable {model} teacher "
            f"({error}); nothing was written"
        ) from None


DETECTION_FOLDER = (
    "coco_teachers"  # where search_spaces/coco_*.yaml look: <destination>/coco_teachers/<model>.pt
)


def download_detection_teachers(
    destination: str | os.PathLike = DEFAULT_DESTINATION,
    *,
    urls: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The paper's COCO teachers (Detectron2's model zoo, 3x schedule) as this project's checkpoints:
    `destination/coco_teachers/frcnn_r101_fpn.pt` and `frcnn_r50_fpn.pt`, for COCO's 80 categories.

    Each pickle is downloaded into a temporary folder, read with the arrays-only unpickler, converted
    (`dkd_tune.models.detector_conversion`), loaded into its detector and written as a dkd-tune
    checkpoint; a file is moved into place only once it is complete, and nothing is written on failure.
    """
    from dkd_tune.models.detection import create_detector
    from dkd_tune.models.detector_conversion import (
        COCO_THING_IDS,
        DETECTRON2_TEACHERS,
        for_categories,
        read_detectron2,
    )

    urls = urls or DETECTRON2_TEACHERS
    target = Path(destination).expanduser() / DETECTION_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    names = _coco_category_names()
    for model, url in urls.items():
        final = target / f"{model}.pt"
        if final.is_file():
            log(f"dkd-tune download-teachers: {final} is there already; kept")
            continue
        with tempfile.TemporaryDirectory(prefix=".download-teachers-", dir=target) as scratch:
            pickle_path = Path(scratch) / Path(url).name
            _fetch(url, pickle_path, log)
            try:
                converted = read_detectron2(pickle_path, model)
            except UserInputError as error:
                raise UserInputError(f"{url}: {error}; nothing was written") from None
            weights = for_categories(converted, model, url, names, COCO_THING_IDS)
            detector = create_detector(model, len(names) + 1, settings=weights.settings)
            detector.load_state_dict(weights.state_dict, strict=True)
            _save_detector(Path(scratch) / final.name, detector, model, names, url)
            os.replace(Path(scratch) / final.name, final)
        log(f"dkd-tune download-teachers: {model} (Detectron2 model zoo) converted into {final}")
    return target


def _coco_category_names() -> tuple[str, ...]:
    """COCO's 80 category names in id order (torchvision's COCO metadata, which ships with it)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    from dkd_tune.models.detector_conversion import COCO_THING_IDS

    listed = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return tuple(listed[i] for i in COCO_THING_IDS)


def _save_detector(path: Path, detector, model: str, names: tuple[str, ...], url: str) -> None:
    from dkd_tune.core.recipes import resolve_recipe
    from dkd_tune.engine.checkpoints import save_best_model
    from dkd_tune.engine.run_setup import RunIdentity
    from dkd_tune.models.detector_conversion import COCO_THING_IDS

    identity = RunIdentity(
        arch=model, num_classes=len(names) + 1, dataset=f"coco (converted from {url})", categories=names,
        category_ids=COCO_THING_IDS, detector=detector.detector_settings.to_dict(),
    )  # fmt: skip
    save_best_model(path, detector, identity, resolve_recipe("coco-1x"), {})
