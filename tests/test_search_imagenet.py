"""An ImageNet-style search end to end on a tiny ImageFolder: worker-decoded data, a given teacher, no cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from dkd_tune.models import create_model
from dkd_tune.models.checkpoints import save_model
from tests.test_search_e2e import cli

pytestmark = pytest.mark.slow
CLASSES = ("n01440764", "n01443537")


def write_image_folder(root, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for index in range(count):
                base = np.full((40, 48, 3), 60 + 120 * label, dtype=np.uint8)
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{index}.JPEG", quality=90)


def test_imagenet_search_with_folder_data(tmp_path):
    write_image_folder(tmp_path / "imagenet", per_class=4)
    torch.manual_seed(0)
    save_model(tmp_path / "teacher.pt", create_model("resnet18", num_classes=2), arch="resnet18", num_classes=2,
               dataset="imagenet", input_size=224)  # fmt: skip
    space = {
        "name": "imagenet_tiny",
        "data": f"imagenet:{tmp_path / 'imagenet'}",
        "student": "MobileNetV1",
        "recipe": "imagenet",
        "overrides": {"epochs": 2, "batch_size": 4, "lr_milestones": [1], "warmup_epochs": 1},
        "teachers": [{"model": "resnet18", "checkpoint": str(tmp_path / "teacher.pt")}],
        "space": {"beta": {"choice": [0.5, 2.0]}},
        "search": {"algorithm": "optuna", "num_samples": 2, "max_concurrent_trials": 1},
        "scheduler": {"type": "none"},
        "resources": {"cpu": 1},
        "storage": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    result = cli("run", str(path), cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "imagenet_tiny" / "state.json").read_text())
    teacher = state["teachers"]["resnet18"]
    assert teacher["cache_path"] is None and "unbounded" in teacher["cache_note"]
    assert teacher["gap"]["num_samples"] == 8
    frame = pd.read_parquet(tmp_path / "runs" / "imagenet_tiny" / "results.parquet")
    assert (
        len(frame) == 2 and (frame["status"] == "completed").all() and (frame["dataset"] == "imagenet").all()
    )
