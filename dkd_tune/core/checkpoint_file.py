"""The project's checkpoint file: metadata and weights with a content hash, written atomically, loaded safely.

A file is ``{"format": FORMAT, "sha256": <digest of payload>, "payload": {...}}`` saved with
``torch.save``. The payload holds only tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` and no pickled code can run. The digest covers every
tensor's bytes and every key and value, so a truncated or corrupted file is refused with one
line instead of being silently used.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_path

FORMAT = "dkd-tune-checkpoint/1"


class CorruptCheckpointError(UserInputError):
    """A checkpoint file that cannot be read back, or whose content no longer matches its hash."""


def payload_digest(payload: Any) -> str:
    """Deterministic SHA-256 of a nested structure of tensors, numbers, strings, lists and dicts."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            # Reinterpret as bytes: works for every dtype, bf16 included, without a copy through numpy.
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"D%d" % len(value))
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, bool) or value is None:
        digest.update(f"B{value}".encode())
    elif isinstance(value, int):
        digest.update(b"I" + str(value).encode())
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        encoded = value.encode("utf-8")
        digest.update(b"S%d:" % len(encoded) + encoded)
    else:
        raise TypeError(f"cannot store a value of type {type(value).__name__} in a checkpoint")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> str:
    """Write `payload` atomically with its digest; returns the digest."""
    digest = payload_digest(payload)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "sha256": digest, "payload": payload}, tmp)
    return digest


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into one line naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here: unpickling, zip, EOF, runtime
        reason = " ".join(str(error).split()) or type(error).__name__
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif "weights_only" in reason or "Unsupported global" in reason or "GLOBAL" in reason:
            reason = "it contains pickled Python objects that safe loading (weights_only=True) refuses"
        elif len(reason) > 160:
            reason = reason[:160] + "..."
        raise CorruptCheckpointError(
            f"{path}: cannot read checkpoint ({reason}); expected a PyTorch checkpoint of tensors "
            "(a truncated or corrupted file, or one that needs unsafe unpickling)"
        ) from None


def is_project_checkpoint(content: Any) -> bool:
    return isinstance(content, dict) and content.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a project checkpoint and verify its content hash; returns its payload."""
    content = read_checkpoint_file(path)
    if not is_project_checkpoint(content):
        raise CorruptCheckpointError(f"{path}: not a dkd-tune checkpoint (expected format {FORMAT!r})")
    return verified_payload(path, content)


def verified_payload(path: str | os.PathLike, content: dict[str, Any]) -> dict[str, Any]:
    payload = content.get("payload")
    if not isinstance(payload, dict) or payload_digest(payload) != content.get("sha256"):
        raise CorruptCheckpointError(
            f"{path}: checkpoint content does not match its SHA-256 (corrupted file); "
            "expected the hash recorded when it was written"
        )
    return payload
