"""The training loop on the generated dataset, CPU: every loss mode learns, schedules, resume, divergence, DDP."""

from __future__ import annotations

import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data import EvalLoader, build_train_loader, load_train_test, make_synthetic, parse_data_spec
from dkd_tune.engine.acceleration import Acceleration
from dkd_tune.engine.loop import LiveTeacher, fit, training_objective
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models import create_model

CLASSES = 10
IDENTITY = RunIdentity(arch="resnet8", num_classes=CLASSES, dataset="synthetic", input_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    # Tests share the machine's two cores with other processes; one thread avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(
        root, classes=CLASSES, superclasses=5, train_per_class=60, test_per_class=30, image_size=16, seed=0
    )
    return load_train_test(parse_data_spec(f"synthetic:{root}"))


def short_recipe(**overrides):
    values = {"epochs": 3, "batch_size": 32, "lr_milestones": [2], "warmup_epochs": 1, "lr": 0.05, "seed": 0}
    values.update(overrides)
    return resolve_recipe("cifar100", overrides=values)


def loaders(datasets, recipe, *, rank=0, world_size=1):
    train, test = datasets
    train_loader = build_train_loader(
        train,
        "standard",
        recipe.batch_size // world_size,
        "cpu",
        seed=recipe.seed,
        rank=rank,
        world_size=world_size,
    )
    return train_loader, EvalLoader(test, 256, "cpu", rank=rank, world_size=world_size)


def train(datasets, recipe, loss_mode="ce", teacher=None, **kwargs):
    torch.manual_seed(recipe.seed)
    student = create_model("resnet8", num_classes=CLASSES)
    train_loader, test_loader = loaders(datasets, recipe)
    return fit(
        student,
        train_loader,
        test_loader,
        recipe,
        identity=IDENTITY,
        loss_mode=loss_mode,
        teacher=teacher,
        **kwargs,
    )


@pytest.fixture(scope="module")
def teacher(datasets, tmp_path_factory):
    torch.set_num_threads(1)
    result = train(
        datasets,
        short_recipe(epochs=6, lr_milestones=[5], warmup_epochs=0),
        "ce",
        checkpoint_dir=tmp_path_factory.mktemp("teacher"),
    )
    from dkd_tune.models import load_teacher

    return load_teacher("resnet8", result.best_checkpoint)


@pytest.mark.parametrize("loss_mode", ["ce", "kd", "dkd", "tckd", "nckd"])
def test_each_loss_mode_learns(datasets, teacher, loss_mode):
    result = train(datasets, short_recipe(epochs=4, lr_milestones=[3]), loss_mode, teacher=teacher)
    chance = 100.0 / CLASSES
    assert result.status == "completed"
    assert result.final_test_score > 2 * chance, result.history[-1]
    parts = set(result.history[-1])
    expected = {"ce": set(), "kd": {"train_kd"}, "dkd": {"train_tckd", "train_nckd"}}.get(
        loss_mode, {"train_tckd", "train_nckd"}
    )
    assert expected <= parts


def test_reported_schedule_follows_the_recipe(datasets):
    recipe = short_recipe(epochs=4, lr_milestones=[1, 3], warmup_epochs=2)
    reports = []
    train(
        datasets,
        recipe,
        "dkd",
        teacher=LiveTeacher(create_model("resnet8", num_classes=CLASSES)),
        reporter=reports.append,
    )
    assert [r.epoch for r in reports] == [1, 2, 3, 4]
    assert [r.metrics["lr"] for r in reports] == pytest.approx([0.05, 0.005, 0.005, 0.0005])
    assert [r.metrics["warmup_factor"] for r in reports] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert [r.status for r in reports] == ["running", "running", "running", "completed"]
    for key in (
        "time_data_ms",
        "time_teacher_ms",
        "time_student_ms",
        "images_per_s",
        "test_acc_top5",
        "epoch_time_s",
    ):
        assert reports[0].metrics[key] >= 0


def test_resume_continues_exactly(datasets, teacher, tmp_path):
    recipe = short_recipe(epochs=4, lr_milestones=[2])
    whole = train(datasets, recipe, "dkd", teacher=teacher, checkpoint_dir=tmp_path / "whole")
    first = train(
        datasets, recipe, "dkd", teacher=teacher, checkpoint_dir=tmp_path / "parts", stop_after_epochs=2
    )
    assert first.status == "stopped" and first.epochs_completed == 2
    rest = train(
        datasets,
        recipe,
        "dkd",
        teacher=teacher,
        checkpoint_dir=tmp_path / "parts",
        resume_from=first.last_checkpoint,
    )
    assert rest.epochs_completed == 4 and len(rest.history) == 4
    for uninterrupted, resumed in zip(whole.history, rest.history, strict=True):
        for key in ("train_loss", "train_acc", "test_acc", "test_loss", "train_tckd", "train_nckd", "lr"):
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


def test_divergence_is_a_status_not_an_exception(datasets, tmp_path):
    reports = []
    result = train(datasets, short_recipe(lr=1e12), "ce", reporter=reports.append, checkpoint_dir=tmp_path)
    assert result.status == "diverged"
    assert reports[-1].status == "diverged" and reports[-1].metrics["diverged"] == 1.0
    assert result.epochs_completed == reports[-1].epoch == 1


def test_live_teacher_is_moved_where_the_student_runs(datasets):
    # A trial loads its teacher on the CPU and hands fit a LiveTeacher: fit must give it the
    # student's device and memory format (on a GPU, a CPU teacher would fail on CUDA batches).
    teacher = LiveTeacher(create_model("resnet8", num_classes=CLASSES))
    assert not teacher.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    train(
        datasets,
        short_recipe(epochs=1),
        "dkd",
        teacher=teacher,
        acceleration=Acceleration(channels_last=True),
        stop_after_epochs=1,
    )
    assert teacher.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_distillation_without_teacher_is_refused(datasets):
    with pytest.raises(UserInputError, match="needs a teacher"):
        train(datasets, short_recipe(), "dkd")


def test_warmup_scales_only_the_distillation_term():
    recipe = short_recipe(beta=8.0, alpha=1.0)
    logits = torch.randn(6, CLASSES)
    teacher_logits = torch.randn(6, CLASSES)
    labels = torch.arange(6) % CLASSES
    full, parts = training_objective("dkd", logits, teacher_logits, labels, recipe, 1.0)
    half, _ = training_objective("dkd", logits, teacher_logits, labels, recipe, 0.5)
    ce = parts["ce"]
    distillation = recipe.alpha * parts["tckd"] + recipe.beta * parts["nckd"]
    assert full.item() == pytest.approx((ce + distillation).item(), rel=1e-6)
    assert half.item() == pytest.approx((ce + 0.5 * distillation).item(), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world_size, port, datasets, recipe, teacher_state, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        teacher = create_model("resnet8", num_classes=CLASSES)
        teacher.load_state_dict(teacher_state)
        torch.manual_seed(recipe.seed)
        student = create_model("resnet8", num_classes=CLASSES)
        train_loader, test_loader = loaders(datasets, recipe, rank=rank, world_size=world_size)
        result = fit(
            student, train_loader, test_loader, recipe, identity=IDENTITY, loss_mode="dkd", teacher=teacher
        )
        queue.put((rank, result.history[0]["train_loss"], result.history[0]["test_acc"]))
    finally:
        dist.destroy_process_group()


class RanksInOneProcess(torch.nn.Module):
    """One process doing what DDP's ranks do: each rank's share of the global batch through the model alone.

    The loader gives rank r every `world_size`-th sample of the epoch's order, so rank r's part of a
    global batch is `batch[r::world_size]`. Batch norm then normalises each share with its own
    statistics, as on the ranks, and the batch-mean loss over equal shares is the mean of the ranks'
    losses, whose gradient is DDP's averaged gradient.
    """

    def __init__(self, model: torch.nn.Module, world_size: int):
        super().__init__()
        self.model, self.world_size = model, world_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shares = [self.model(images[rank :: self.world_size]) for rank in range(self.world_size)]
        logits = shares[0].new_empty((images.shape[0], shares[0].shape[1]))
        for rank, share in enumerate(shares):
            logits[rank :: self.world_size] = share
        return logits


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(datasets, teacher):
    # beta 8, T 4 and lr 0.05 from the first step: an unstable first epoch that magnifies any
    # difference, so a tight match means DDP trains what one process training the ranks' shares does.
    recipe = short_recipe(epochs=1, batch_size=64)
    torch.manual_seed(recipe.seed)
    student = RanksInOneProcess(create_model("resnet8", num_classes=CLASSES), world_size=2)
    train_loader, test_loader = loaders(datasets, recipe)
    reference = fit(
        student, train_loader, test_loader, recipe, identity=IDENTITY, loss_mode="dkd", teacher=teacher
    )
    whole_batches = train(datasets, recipe, "dkd", teacher=teacher)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), datasets, recipe, teacher.state_dict(), queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    results = sorted(queue.get() for _ in range(2))
    (_, loss_rank0, acc_rank0), (_, loss_rank1, acc_rank1) = results
    # Metrics are all-reduced, so both ranks report the same numbers.
    assert loss_rank0 == pytest.approx(loss_rank1) and acc_rank0 == pytest.approx(acc_rank1)
    assert math.isfinite(loss_rank0)
    # Measured: 38.988306 (DDP) vs 38.988305 (the ranks' shares in one process) vs 37.965 (whole batches).
    assert loss_rank0 == pytest.approx(reference.history[0]["train_loss"], rel=1e-6)
    # The control: whole-batch statistics are a different run (the shares' batch norm is the difference).
    assert loss_rank0 != pytest.approx(whole_batches.history[0]["train_loss"], rel=1e-3)


def test_trial_recipe_types_sampled_values():
    from dkd_tune.trial import trial_recipe

    base = short_recipe()
    recipe = trial_recipe(base, {"beta": 3, "warmup_epochs": 1.0, "temperature": "2"})
    assert recipe.beta == 3.0 and recipe.warmup_epochs == 1 and recipe.temperature == 2.0
    assert (
        dataclasses.replace(
            recipe, beta=base.beta, warmup_epochs=base.warmup_epochs, temperature=base.temperature
        )
        == base
    )


def test_prepare_run_seeds_the_student_and_records_normalisation(datasets, tmp_path):
    from dkd_tune.data import InMemoryData
    from dkd_tune.engine.run_setup import prepare_run
    from dkd_tune.models.weights_file import read_model_checkpoint

    train_set, test_set = datasets
    recipe = short_recipe(epochs=1)
    data = InMemoryData(train_set, test_set, augment="standard")
    first = prepare_run("resnet8", data, recipe, device=torch.device("cpu"))
    second = prepare_run("resnet8", data, recipe, device=torch.device("cpu"))
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    result = fit(
        first.model, first.train_loader, first.test_loader, recipe,
        identity=first.identity, loss_mode="ce", checkpoint_dir=tmp_path,
    )  # fmt: skip
    saved = read_model_checkpoint(result.best_checkpoint)
    assert saved.arch == "resnet8" and saved.input_size == 16 and saved.dataset == "synthetic"
    assert saved.mean == pytest.approx(train_set.mean) and saved.std == pytest.approx(train_set.std)


def test_a_validation_split_is_evaluated_every_epoch_beside_the_test_split(datasets):
    from dkd_tune.data import InMemoryData
    from dkd_tune.engine.loop import evaluate
    from dkd_tune.engine.run_setup import prepare_run

    train_set, test_set = datasets
    # The first test images stand in for a held-out split: the report must evaluate them as well.
    held_out = dataclasses.replace(test_set, images=test_set.images[:10], labels=test_set.labels[:10])
    recipe = short_recipe(epochs=2)
    run = prepare_run("resnet8", InMemoryData(train_set, test_set, "standard", val=held_out), recipe,
                      device=torch.device("cpu"))  # fmt: skip
    assert run.val_loader is not None
    result = fit(run.model, run.train_loader, run.test_loader, recipe, identity=run.identity, loss_mode="ce",
                 val_loader=run.val_loader)  # fmt: skip
    assert [set(r) >= {"val_acc", "val_loss", "test_acc"} for r in result.history] == [True, True]
    final = evaluate(run.model, run.val_loader, torch.device("cpu"))
    assert result.history[-1]["val_acc"] == pytest.approx(final["acc"])
    without = prepare_run(
        "resnet8", InMemoryData(train_set, test_set, "standard"), recipe, device=torch.device("cpu")
    )
    assert without.val_loader is None


def test_best_pt_is_chosen_on_the_validation_split_never_on_the_test_split(datasets, tmp_path):
    from dkd_tune.core.checkpoint_file import load_checkpoint
    from dkd_tune.data import InMemoryData
    from dkd_tune.engine.loop import EpochRecorder
    from dkd_tune.engine.run_setup import prepare_run

    train_set, test_set = datasets
    recipe = short_recipe(epochs=4)
    run = prepare_run(
        "resnet8", InMemoryData(train_set, test_set, "standard"), recipe, device=torch.device("cpu")
    )
    optimizer = torch.optim.SGD(run.model.parameters(), lr=0.1)
    # The test split peaks at epoch 1, the validation split at epoch 3.
    epochs = [{"test_acc": 60.0, "val_acc": 40.0}, {"test_acc": 50.0, "val_acc": 45.0},
              {"test_acc": 55.0, "val_acc": 50.0}, {"test_acc": 58.0, "val_acc": 48.0}]  # fmt: skip

    def chosen_epoch(folder, chosen_by, metrics, resume_after=None):
        def recorder():
            return EpochRecorder(run.model, optimizer, run.identity, recipe, "ce", folder, None, 4, "test_acc",
                                 chosen_by=chosen_by)  # fmt: skip

        record = recorder()
        for epoch, values in enumerate(metrics):
            if epoch == resume_after:  # a resumed run keeps choosing against the epochs before it
                record = recorder()
                record.resume(folder / "last.pt", torch.device("cpu"))
            record.epoch_done(epoch, {"epoch": epoch + 1, **values}, diverged=False)
        assert record.result().best_test_score == 60.0  # reported: the best test score
        return load_checkpoint(folder / "best.pt")["metrics"]["epoch"]

    assert chosen_epoch(tmp_path / "val", "val_acc", epochs) == 3
    assert chosen_epoch(tmp_path / "resumed", "val_acc", epochs, resume_after=3) == 3
    # Without a validation split nothing is chosen: best.pt is the latest epoch.
    no_val = [{"test_acc": values["test_acc"]} for values in epochs]
    assert chosen_epoch(tmp_path / "none", None, no_val) == 4


def _tckd_nckd_from_definitions(logits_student, logits_teacher, labels, temperature):
    """Batch-mean TCKD and NCKD written out from appendix A.1 (binary and renormalised non-target KLs)."""
    p_s = torch.softmax(logits_student.double() / temperature, dim=1)
    p_t = torch.softmax(logits_teacher.double() / temperature, dim=1)
    tckd, nckd = [], []
    for row in range(labels.numel()):
        target = labels[row]
        b_t = torch.stack([p_t[row, target], 1 - p_t[row, target]])
        b_s = torch.stack([p_s[row, target], 1 - p_s[row, target]])
        tckd.append((b_t * (b_t / b_s).log()).sum())
        others = [c for c in range(p_s.shape[1]) if c != target]
        hat_t = p_t[row, others] / p_t[row, others].sum()
        hat_s = p_s[row, others] / p_s[row, others].sum()
        nckd.append((hat_t * (hat_t / hat_s).log()).sum())
    scale = temperature**2
    return scale * torch.stack(tckd).mean().item(), scale * torch.stack(nckd).mean().item()


@pytest.mark.parametrize("loss_mode", ["dkd", "tckd", "nckd"])
def test_alpha_weights_tckd_and_beta_weights_nckd_in_training(loss_mode):
    # Distinct alpha and beta and a teacher far from the student: TCKD and NCKD differ by a lot, so
    # swapping the weights, or the two terms, changes the objective.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, CLASSES, generator=generator, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(8, CLASSES, generator=generator, dtype=torch.float64)
    labels = torch.arange(8) % CLASSES
    recipe = short_recipe(alpha=0.7, beta=5.0, temperature=2.0, ce_weight=1.0)
    total, parts = training_objective(loss_mode, logits, teacher_logits, labels, recipe, 1.0)
    tckd, nckd = _tckd_nckd_from_definitions(logits, teacher_logits, labels, recipe.temperature)
    assert abs(tckd - nckd) > 0.1
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-9)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    weighted = {"dkd": 0.7 * tckd + 5.0 * nckd, "tckd": 0.7 * tckd, "nckd": 5.0 * nckd}[loss_mode]
    assert total.item() == pytest.approx(ce + weighted, rel=1e-6)  # the objective takes CE in float32


def test_kd_weight_weights_classic_kd_in_training():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, CLASSES, generator=generator, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(8, CLASSES, generator=generator, dtype=torch.float64)
    labels = torch.arange(8) % CLASSES
    recipe = short_recipe(kd_weight=3.0, temperature=2.0)
    total, parts = training_objective("kd", logits, teacher_logits, labels, recipe, 0.5)
    p_s = torch.softmax(logits / 2.0, dim=1)
    p_t = torch.softmax(teacher_logits / 2.0, dim=1)
    kd = 4.0 * (p_t * (p_t / p_s).log()).sum(dim=1).mean().item()  # T^2 KL(p^T || p^S), batch mean
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-9)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert total.item() == pytest.approx(ce + 0.5 * 3.0 * kd, rel=1e-6)
