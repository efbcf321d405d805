"""Moving a trial's checkpoint files in and out of Ray Tune's checkpoints (shared by the one-process and the DDP trainable)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from dkd_tune.engine.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT


def restore_checkpoint_files(checkpoint: Any, workdir: Path) -> Path | None:
    """Copy a Ray checkpoint's last.pt/best.pt into `workdir`; returns last.pt, or None without one."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
            if (Path(directory) / name).exists():
                shutil.copy2(Path(directory) / name, workdir / name)
    last = workdir / LAST_CHECKPOINT
    return last if last.exists() else None


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem: fall back to a copy
        shutil.copy2(source, target)
