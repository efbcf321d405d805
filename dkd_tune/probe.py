"""Linear-probe transfer (paper A.7): a linear classifier trained on a frozen student's pooled features.

The protocol: the features are the student's global-average-pool output (`forward_features`),
the student is frozen, and a linear layer is trained on them with SGD (momentum 0.9, weight
decay 0) for 40 epochs at lr 0.1 for batch 128, divided by 10 every 10 epochs; the probe
datasets (STL-10 train/test, Tiny-ImageNet train/val) are resized to the student's input size.

The frozen student sees each image un-augmented, so its features are the same in every epoch:
they are computed once per split (one backbone pass) and the 40 epochs run on the cached
(N, F) tensors, which gives the same probe as running the backbone every epoch at a fraction of
the cost. Everything here is deterministic for a seed: the head's initialisation and the
per-epoch shuffles come from one seeded generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.progress import Progress
from dkd_tune.data import EvalLoader, ImageDataset, load_stl10, load_tiny_imagenet
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD
from dkd_tune.data.kinds import DATASET_KINDS
from dkd_tune.engine.devices import training_device
from dkd_tune.models import ImageClassifier, load_teacher, model_info, read_model_checkpoint
from dkd_tune.models.registry import IMAGENET_MODELS

# Probe dataset -> (training split, evaluation split) as the readers name them.
PROBE_SPLITS = {"stl10": ("train", "test"), "tiny-imagenet": ("train", "val")}
FEATURE_BATCH_SIZE = 512
EVAL_CHUNK = 8192  # rows of features scored at once when measuring accuracy


@dataclass(frozen=True)
class ProbeProtocol:
    """How the linear head is trained; the defaults are the paper's (A.7)."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    lr_step: int = 10  # epochs between learning-rate decays
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based `epoch` (step decay)."""
        return self.lr * self.lr_decay ** (epoch // self.lr_step)


PAPER_PROTOCOL = ProbeProtocol()


@dataclass(frozen=True)
class ProbeEpoch:
    """One epoch of the head: mean mini-batch loss, then top-1 (%) on all train and test features."""

    epoch: int  # 1-based
    lr: float
    train_loss: float
    train_acc: float
    test_acc: float


@dataclass
class ProbeResult:
    """A finished probe: final train/test top-1 (%), the per-epoch history, and what was probed."""

    train_acc: float
    test_acc: float
    history: list[ProbeEpoch]
    num_train: int
    num_test: int
    feature_dim: int
    num_classes: int
    protocol: ProbeProtocol
    seed: int
    train_seconds: float
    extract_seconds: float = 0.0
    dataset: str = ""
    arch: str = ""
    checkpoint: str = ""
    input_size: int = 0
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (history as a list of dicts)."""
        return dataclasses.asdict(self)


@dataclass
class Student:
    """A frozen student read from a checkpoint, with what the probe needs to feed it."""

    model: ImageClassifier
    arch: str
    input_size: int
    trained_on: str  # the dataset recorded in the checkpoint, "" for foreign files
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: Path


def load_student(
    checkpoint_path: str | os.PathLike, model_name: str | None = None, device: str | torch.device = "cpu"
) -> Student:
    """The network in `checkpoint_path`, frozen and in eval mode.

    dkd-tune checkpoints record their architecture and input size; foreign files (mdistiller,
    bare state dicts) do not, so they need `model_name`, and their input size is the
    architecture's default. Inputs are normalised as the student was trained: with the statistics
    its checkpoint records, else ImageNet's for ImageNet students and CIFAR-100's otherwise.
    """
    checkpoint = read_model_checkpoint(checkpoint_path)
    arch = model_name or checkpoint.arch
    if arch is None:
        raise UserInputError(
            f"{checkpoint.path}: a {checkpoint.source_format} checkpoint does not record its architecture; "
            "pass the model name (--model), e.g. --model wrn_16_2"
        )
    model = load_teacher(arch, checkpoint.path, device=device)  # strict load, frozen, eval mode
    info = model_info(arch)
    input_size = checkpoint.input_size or info.input_size
    trained_on = DATASET_KINDS.get(checkpoint.dataset or "")
    if checkpoint.mean and checkpoint.std:  # dkd-tune checkpoints record what the network was trained with
        mean, std = checkpoint.mean, checkpoint.std
    elif trained_on is not None and trained_on.mean is not None:
        mean, std = trained_on.mean, trained_on.std
    elif info.family == IMAGENET_MODELS:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    return Student(model, arch, int(input_size), checkpoint.dataset or "", mean, std, checkpoint.path)


def load_probe_splits(
    dataset_name: str,
    data_root: str | os.PathLike,
    image_size: int,
    *,
    mean: tuple[float, ...] = CIFAR100_MEAN,
    std: tuple[float, ...] = CIFAR100_STD,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of a probe dataset resized to `image_size`: STL-10 train/test, Tiny-ImageNet train/val."""
    if dataset_name not in PROBE_SPLITS:
        raise UserInputError(f"probe dataset {dataset_name!r} is not one of: {', '.join(PROBE_SPLITS)}")
    reader = load_stl10 if dataset_name == "stl10" else load_tiny_imagenet
    train_split, test_split = PROBE_SPLITS[dataset_name]
    return (
        reader(data_root, train_split, image_size, mean=mean, std=std),
        reader(data_root, test_split, image_size, mean=mean, std=std),
    )


def extract_features(
    model: ImageClassifier,
    dataset: ImageDataset,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = FEATURE_BATCH_SIZE,
    progress: bool = False,
    label: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen `model` over `dataset`: (float32 (N, num_features) CPU features, labels).

    Eval mode (batch-norm running statistics), no gradients, no augmentation, the dataset's
    normalisation; the model's training mode is restored afterwards.
    """
    device = torch.device(device)
    loader = EvalLoader(dataset, batch_size, device)
    features = torch.empty((len(dataset), model.num_features), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            Progress(
                f"features of {label or dataset.name}", len(loader), unit="batch", enabled=progress
            ) as bar,
        ):
            start = 0
            for batch in loader:
                pooled = model.forward_features(batch.images)
                features[start : start + len(pooled)] = pooled.float().cpu()
                start += len(pooled)
                bar.update()
    finally:
        model.train(was_training)
    return features, dataset.labels.clone()


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = PAPER_PROTOCOL.epochs,
    batch_size: int = PAPER_PROTOCOL.batch_size,
    lr: float = PAPER_PROTOCOL.lr,
    lr_step: int = PAPER_PROTOCOL.lr_step,
    lr_decay: float = PAPER_PROTOCOL.lr_decay,
    momentum: float = PAPER_PROTOCOL.momentum,
    weight_decay: float = PAPER_PROTOCOL.weight_decay,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ProbeResult:
    """Train a linear head on cached features with SGD and step decay; top-1 (%) after every epoch.

    Each epoch visits the training features in a fresh seeded order, in mini-batches of
    `batch_size` (the last one smaller). `lr` is the rate at that batch size: the paper's 0.1 is
    for 128. Accuracies are of the head at the end of the epoch on all train and test features.
    """
    protocol = ProbeProtocol(epochs, batch_size, lr, lr_step, lr_decay, momentum, weight_decay)
    _check_probe_inputs(train_features, train_labels, test_features, test_labels, num_classes, protocol)
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    feature_dim = train_features.shape[1]
    head = linear_head(feature_dim, num_classes, generator).to(device)
    x_train = train_features.to(device, torch.float32)
    y_train = train_labels.to(device, torch.int64)
    x_test = test_features.to(device, torch.float32)
    y_test = test_labels.to(device, torch.int64)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    count = x_train.shape[0]
    history: list[ProbeEpoch] = []
    started = time.perf_counter()
    with (
        single_cpu_thread(device),
        Progress("linear probe", epochs, unit="epoch", enabled=progress) as bar,
    ):
        for epoch in range(epochs):
            epoch_lr = protocol.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            order = torch.randperm(count, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, count, batch_size):
                rows = order[start : start + batch_size]
                loss = F.cross_entropy(head(x_train[rows]), y_train[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * rows.numel()
            history.append(
                ProbeEpoch(
                    epoch=epoch + 1,
                    lr=epoch_lr,
                    train_loss=float(loss_sum) / count,
                    train_acc=top1_accuracy(head, x_train, y_train),
                    test_acc=top1_accuracy(head, x_test, y_test),
                )
            )
            bar.update()
    return ProbeResult(
        train_acc=history[-1].train_acc,
        test_acc=history[-1].test_acc,
        history=history,
        num_train=count,
        num_test=x_test.shape[0],
        feature_dim=feature_dim,
        num_classes=num_classes,
        protocol=protocol,
        seed=seed,
        train_seconds=time.perf_counter() - started,
        device=str(device),
    )


def probe_model(
    model: ImageClassifier,
    train_set: ImageDataset,
    test_set: ImageDataset,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    protocol: ProbeProtocol = PAPER_PROTOCOL,
    progress: bool = False,
) -> ProbeResult:
    """Features of both splits (one backbone pass each), then the linear head trained on them."""
    if train_set.num_classes != test_set.num_classes:
        raise ValueError(
            f"train and test sets disagree on the class count: {train_set.num_classes} vs {test_set.num_classes}"
        )
    model = model.to(device)
    started = time.perf_counter()
    train_features, train_labels = extract_features(
        model, train_set, device=device, progress=progress, label=f"{train_set.name} train"
    )
    test_features, test_labels = extract_features(
        model, test_set, device=device, progress=progress, label=f"{test_set.name} test"
    )
    extract_seconds = time.perf_counter() - started
    result = train_linear_probe(
        train_features,
        train_labels,
        test_features,
        test_labels,
        train_set.num_classes,
        **dataclasses.asdict(protocol),
        seed=seed,
        device=device,
        progress=progress,
    )
    return dataclasses.replace(
        result, extract_seconds=extract_seconds, dataset=train_set.name, input_size=train_set.images.shape[-1]
    )


def probe_checkpoint(
    checkpoint_path: str | os.PathLike,
    dataset_name: str,
    data_root: str | os.PathLike,
    *,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    protocol: ProbeProtocol = PAPER_PROTOCOL,
    progress: bool = True,
) -> ProbeResult:
    """The paper's linear probe of the student in `checkpoint_path` on STL-10 or Tiny-ImageNet.

    `device=None` takes the GPU when there is one.
    """
    if dataset_name not in PROBE_SPLITS:
        raise UserInputError(f"probe dataset {dataset_name!r} is not one of: {', '.join(PROBE_SPLITS)}")
    device = torch.device(device) if device is not None else training_device()
    student = load_student(checkpoint_path, model_name)
    train_set, test_set = load_probe_splits(
        dataset_name, data_root, student.input_size, mean=student.mean, std=student.std
    )
    result = probe_model(
        student.model, train_set, test_set, device=device, seed=seed, protocol=protocol, progress=progress
    )
    return dataclasses.replace(result, arch=student.arch, checkpoint=str(student.path))


@contextlib.contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with one intra-op thread, then restore the previous count.

    A head step (a (128, F) x (F, C) product) is far too small for threads to pay, and each parallel
    region waits for every thread: on a loaded machine that wait dominates (40 epochs on 400 x 64
    features took 4 s with 2 threads and 0.07 s with 1 on the shared 2-core development machine).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def top1_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of `head` on `features`, scored in chunks."""
    with torch.no_grad():
        correct = torch.zeros((), dtype=torch.int64, device=features.device)
        for start in range(0, features.shape[0], EVAL_CHUNK):
            logits = head(features[start : start + EVAL_CHUNK])
            correct += (logits.argmax(dim=1) == labels[start : start + EVAL_CHUNK]).sum()
    return 100.0 * int(correct) / max(features.shape[0], 1)


def linear_head(feature_dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with its default initialisation, drawn from `generator` (not the global RNG)."""
    head = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(feature_dim)
        nn.init.uniform_(head.bias, -bound, bound, generator=generator)
    return head


def _check_probe_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    protocol: ProbeProtocol,
) -> None:
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError("features must be (N, F) matrices")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in width: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    for features, labels, split in (
        (train_features, train_labels, "train"),
        (test_features, test_labels, "test"),
    ):
        if labels.shape != (features.shape[0],):
            raise ValueError(f"{split}: {labels.numel()} labels for {features.shape[0]} feature rows")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{split}: labels must lie in 0..{num_classes - 1}")
    if train_features.shape[0] == 0:
        raise ValueError("no training features")
    if protocol.epochs < 1 or protocol.batch_size < 1 or protocol.lr_step < 1:
        raise ValueError(f"epochs, batch_size and lr_step must be positive: {protocol}")
