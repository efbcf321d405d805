"""Speed settings of a run (bf16 autocast, channels-last, torch.compile, TF32): on for CUDA, off for the CPU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Acceleration:
    """Speed settings. `for_device` turns everything on for CUDA and off for the CPU."""

    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA: halves activation traffic, no loss scaling
    channels_last: bool = False  # NHWC convolutions run on tensor cores without transposes
    compile: bool = False  # torch.compile fuses the small CIFAR layers; pays off over long runs
    # torch.compile's mode: None (default), "reduce-overhead" (CUDA graphs: one launch per step
    # instead of hundreds, for launch-bound small networks) or "max-autotune".
    compile_mode: str | None = None
    # Grouped 1x1 convolutions run as dense ones (models/grouped_pointwise.py): GEMMs instead of
    # grouped kernels; the same parameters and checkpoints.
    dense_grouped_pointwise: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def for_device(cls, device: torch.device, *, compile: bool | None = None) -> Acceleration:
        if device.type != "cuda":
            return cls(compile=bool(compile))
        return cls(
            autocast_dtype=torch.bfloat16,
            channels_last=True,
            compile=True if compile is None else compile,
            tf32=True,
            cudnn_benchmark=True,
        )

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled model runs as CUDA graphs: each step must then be marked as new."""
        return self.compile and self.compile_mode == "reduce-overhead"

    def apply_global_settings(self) -> None:
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """Dtype the loaders should produce: the autocast dtype avoids one cast per batch."""
        return self.autocast_dtype or torch.float32


def prepared_model(model: torch.nn.Module, acceleration: Acceleration) -> torch.nn.Module:
    """`model` with the structural speed settings applied in place (its weights and checkpoint keys unchanged)."""
    if acceleration.dense_grouped_pointwise:
        from dkd_tune.models.grouped_pointwise import densify_grouped_pointwise

        densify_grouped_pointwise(model)
    return model


def compiled(model: torch.nn.Module, acceleration: Acceleration) -> torch.nn.Module:
    """`model` compiled as `acceleration` asks (or as it is)."""
    if not acceleration.compile:
        return model
    return torch.compile(model, mode=acceleration.compile_mode)


def memory_format(acceleration: Acceleration) -> torch.memory_format:
    return torch.channels_last if acceleration.channels_last else torch.preserve_format
