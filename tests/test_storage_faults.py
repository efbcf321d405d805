"""Files survive crashes and damage is caught: atomic writes, hashed checkpoints and teacher-logit caches.

A writer killed with SIGKILL mid-write leaves the previous file whole. A training checkpoint that
is truncated or has a flipped byte is refused with one line naming it when a retried trial
resumes from it, never used. The teacher-logit cache is built under a temporary name and renamed
only when complete; a damaged cache makes a trial run the live teacher, with one line saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkd_tune.core.checkpoint_file import CorruptCheckpointError, load_checkpoint, save_checkpoint
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data import EvalLoader, ImageDataset, build_train_loader
from dkd_tune.engine.checkpoints import LAST_CHECKPOINT
from dkd_tune.engine.loop import LiveTeacher, fit
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models import create_model, save_model
from dkd_tune.tasks import teacher_logit_source
from dkd_tune.teacher.logit_cache import (
    CACHE_DATA_FILE,
    CACHE_META_FILE,
    CACHE_PARTIAL_FILE,
    TeacherLogitCache,
)
from dkd_tune.teacher.preparation import TeacherArtifacts
from tests.damaged_files import flip_tensor_byte
from tests.test_logit_cache import ForwardCounter, build, random_dataset, teacher_for

ROOT = Path(__file__).resolve().parents[1]


# One torch thread: small models, and results that do not depend on the machine's core count.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------------
# Atomic writes


KILLED_WRITER = """
import os, signal, sys
from dkd_tune.core.files import atomic_write

def write(file):
    file.write(b"new content that never lands " * 100_000)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the machine dies mid-write

atomic_write(sys.argv[1], write)
"""

KILLED_CHECKPOINT_WRITER = """
import os, signal, sys
import torch
from dkd_tune.core.checkpoint_file import save_checkpoint

real_save = torch.save

def save_then_die(content, path):
    real_save(content, path)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)  # half the bytes are on disk when the power goes
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
save_checkpoint(sys.argv[1], {"weights": torch.full((1000,), 2.0), "epoch": 2})
"""


def run_killed(script: str, target: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=300,
        check=False,
    )
    return result.returncode


def test_a_writer_killed_mid_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "state.json"
    target.write_text('{"previous": true}')
    assert run_killed(KILLED_WRITER, target) == -signal.SIGKILL
    assert target.read_text() == '{"previous": true}'
    leftovers = [path.name for path in tmp_path.iterdir() if path != target]
    assert all(name.startswith(".state.json.") and name.endswith(".tmp") for name in leftovers)


def test_a_checkpoint_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / LAST_CHECKPOINT
    save_checkpoint(target, {"weights": torch.ones(1000), "epoch": 1})
    assert run_killed(KILLED_CHECKPOINT_WRITER, target) == -signal.SIGKILL
    payload = load_checkpoint(target)
    assert payload["epoch"] == 1 and torch.equal(payload["weights"], torch.ones(1000))


def test_an_exception_during_a_write_leaves_no_file_behind(tmp_path):
    target = tmp_path / "best.pt"

    class Unstorable:
        pass

    with pytest.raises(TypeError):
        save_checkpoint(target, {"weights": torch.ones(3), "odd": Unstorable()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Damaged training checkpoints, as a retried trial meets them


def tiny_run(tmp_path: Path, epochs: int, resume_from: Path | None = None, out: str = "run"):
    dataset = random_dataset(32)
    recipe = resolve_recipe(
        "cifar100", overrides={"epochs": epochs, "batch_size": 16, "lr_milestones": [], "warmup_epochs": 0}
    )
    torch.manual_seed(0)
    return fit(
        create_model("resnet8", num_classes=dataset.num_classes),
        build_train_loader(dataset, "none", recipe.batch_size, "cpu", seed=0),
        EvalLoader(dataset, 64, "cpu"),
        recipe,
        identity=RunIdentity(
            arch="resnet8", num_classes=dataset.num_classes, dataset="random", input_size=16
        ),
        loss_mode="ce",
        checkpoint_dir=tmp_path / out,
        resume_from=resume_from,
    )


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty"])
def test_a_damaged_training_checkpoint_is_refused_in_one_line_when_resuming(tmp_path, damage):
    first = tiny_run(tmp_path, epochs=1)
    damaged = tmp_path / "damaged.pt"
    shutil.copy(first.last_checkpoint, damaged)
    if damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[:-100])
    elif damage == "empty":
        damaged.write_bytes(b"")
    else:
        flip_tensor_byte(first.last_checkpoint, damaged)  # the zip still opens: only the hash can tell
    with pytest.raises(CorruptCheckpointError) as refused:
        tiny_run(tmp_path, epochs=2, resume_from=damaged, out="resumed")
    message = str(refused.value)
    assert "\n" not in message and str(damaged) in message
    expected = {
        "truncated": "cannot read checkpoint",
        "empty": "the file is empty",
        "flipped byte": "SHA-256",
    }
    assert expected[damage] in message
    assert not (tmp_path / "resumed" / LAST_CHECKPOINT).exists()  # nothing trained from it


def test_an_intact_checkpoint_resumes_where_it_stopped(tmp_path):
    first = tiny_run(tmp_path, epochs=1)
    resumed = tiny_run(tmp_path, epochs=2, resume_from=first.last_checkpoint, out="resumed")
    assert [row["epoch"] for row in resumed.history] == [1, 2]


# ------------------------------------------------------------------------------------------------
# The teacher-logit cache


def test_an_interrupted_cache_build_leaves_only_its_temporary_file(tmp_path):
    dataset = random_dataset()
    teacher = teacher_for(dataset)
    counter = ForwardCounter(teacher, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        build(teacher, dataset, tmp_path)
    counter.remove()
    (folder,) = tmp_path.iterdir()
    assert (folder / CACHE_PARTIAL_FILE).exists()
    assert not (folder / CACHE_DATA_FILE).exists() and not (folder / CACHE_META_FILE).exists()

    cache = build(teacher, dataset, tmp_path)
    assert (folder / CACHE_DATA_FILE).exists() and not (folder / CACHE_PARTIAL_FILE).exists()
    assert cache.meta["sha256"]


def cache_artifacts(tmp_path: Path) -> tuple[TeacherArtifacts, ImageDataset, Path]:
    dataset = random_dataset()
    teacher = teacher_for(dataset)
    checkpoint = tmp_path / "teacher.pt"
    save_model(
        checkpoint, teacher, arch="resnet8", num_classes=dataset.num_classes, dataset="random", input_size=16
    )
    cache = build(teacher, dataset, tmp_path / "caches")
    artifacts = TeacherArtifacts(
        label="teacher",
        model="resnet8",
        checkpoint=str(checkpoint),
        num_classes=dataset.num_classes,
        gap=None,
        cache_path=cache.path,
    )
    return artifacts, dataset, Path(cache.path) / CACHE_DATA_FILE


def test_a_trial_uses_an_intact_cache(tmp_path, capsys):
    artifacts, dataset, _ = cache_artifacts(tmp_path)
    loader = build_train_loader(dataset, "standard", 8, "cpu", seed=0)
    assert isinstance(teacher_logit_source(artifacts, loader, torch.device("cpu")), TeacherLogitCache)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_trial_refuses_a_damaged_cache_and_runs_the_live_teacher(tmp_path, capsys, damage):
    artifacts, dataset, table = cache_artifacts(tmp_path)
    if damage == "truncated":
        with open(table, "r+b") as file:
            file.truncate(table.stat().st_size - 2)
    else:
        flip_byte(table, 1000)
    loader = build_train_loader(dataset, "standard", 8, "cpu", seed=0)
    source = teacher_logit_source(artifacts, loader, torch.device("cpu"))
    assert isinstance(source, LiveTeacher)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(table) in lines[0] and "runs the live teacher instead" in lines[0]
    assert ("SHA-256" if damage == "flipped byte" else "truncated") in lines[0]
