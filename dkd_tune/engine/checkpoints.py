"""The training loop's checkpoints: `last.pt` (everything to resume, RNG included) and `best.pt` (the model), written atomically."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkd_tune.core.checkpoint_file import load_checkpoint, save_checkpoint
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import Recipe
from dkd_tune.engine.run_setup import RunIdentity

LAST_CHECKPOINT = "last.pt"


BEST_CHECKPOINT = "best.pt"


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    identity: RunIdentity,
    recipe: Recipe,
    loss_mode: str,
    epochs_completed: int,
    best_test_acc: float,
    history: list[dict[str, float]],
) -> None:
    device = next(model.parameters()).device
    save_checkpoint(
        path,
        {
            "kind": "training",
            **dataclasses.asdict(identity),
            "recipe": recipe.to_dict(),
            "loss_mode": loss_mode,
            "epoch": epochs_completed,
            "best_test_acc": best_test_acc,
            "history": history,
            "model": _cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(device),
        },
    )


def save_best_model(
    path: Path, model: nn.Module, identity: RunIdentity, recipe: Recipe, metrics: dict
) -> None:
    save_checkpoint(
        path,
        {
            "kind": "model",
            **dataclasses.asdict(identity),
            "recipe": recipe.to_dict(),
            "metrics": {key: float(value) for key, value in metrics.items()},
            "state_dict": _cpu_state_dict(model),
        },
    )


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def restore_training_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, float, list[dict[str, float]]]:
    payload = load_checkpoint(path)
    if payload.get("kind") != "training":
        raise UserInputError(
            f"{path}: not a training checkpoint (expected one written by dkd-tune's training loop)"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if device.type == "cuda" and "cuda" in payload["rng"]:
        torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
    return int(payload["epoch"]), float(payload["best_test_acc"]), list(payload["history"])


def existing_file(directory: Path | None, name: str) -> Path | None:
    if directory is None:
        return None
    path = directory / name
    return path if path.exists() else None
