"""Which device a run trains on: the GPU Ray gave the process, or the one a user named, checked."""

from __future__ import annotations

import torch

from dkd_tune.core.errors import UserInputError


def training_device(prefer_cuda: bool = True) -> torch.device:
    """cuda:0 when a GPU was given to this process (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if prefer_cuda and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def chosen_device(name: str | None, source: str = "--device") -> torch.device:
    """The device a user named (cpu, cuda, cuda:N), checked against this machine; None: `training_device()`."""
    if name is None:
        return training_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"{source} {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"{source} {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserInputError(f"{source} {name}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= count:
            raise UserInputError(
                f"{source} {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return device
