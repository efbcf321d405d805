"""Model checkpoints: the project format round trip, strict loading of mdistiller/CRD files, clear mismatch errors."""

import argparse

import pytest
import torch

from dkd_tune.core.checkpoint_file import CorruptCheckpointError, load_checkpoint, save_checkpoint
from dkd_tune.core.errors import UserInputError
from dkd_tune.models import (
    ArchitectureMismatchError,
    ClassCountMismatchError,
    create_model,
    load_teacher,
    read_model_checkpoint,
    save_model,
)

# Facts read from megvii-research/mdistiller (mdistiller/models/cifar/*.py, imagenet/mobilenetv1.py):
# a few parameter names with their shapes at 100 classes (1000 for MobileNetV1), and how many
# entries each network's state dict has there.
MDISTILLER_KEYS = {
    "resnet8x4": (
        62,
        {
            "conv1.weight": (32, 3, 3, 3),
            "layer1.0.downsample.0.weight": (64, 32, 1, 1),
            "layer1.0.downsample.1.running_var": (64,),
            "layer3.0.conv2.weight": (256, 256, 3, 3),
            "layer3.0.bn2.num_batches_tracked": (),
            "fc.weight": (100, 256),
        },
    ),
    "wrn_40_2": (
        227,
        {
            "conv1.weight": (16, 3, 3, 3),
            "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
            "block1.layer.5.bn2.running_mean": (32,),
            "block3.layer.5.conv2.weight": (128, 128, 3, 3),
            "bn1.weight": (128,),
            "fc.bias": (100,),
        },
    ),
    "ShuffleV1": (
        296,
        {
            "conv1.weight": (24, 3, 1, 1),
            "layer1.0.conv1.weight": (54, 24, 1, 1),
            "layer1.0.conv3.weight": (216, 18, 1, 1),
            "layer2.1.conv1.weight": (120, 160, 1, 1),
            "layer3.3.bn3.running_var": (960,),
            "linear.weight": (100, 960),
        },
    ),
    "ShuffleV2": (
        338,
        {
            "layer1.0.conv1.weight": (24, 1, 3, 3),
            "layer1.0.conv5.weight": (58, 58, 1, 1),
            "layer2.7.conv2.weight": (116, 1, 3, 3),
            "conv2.weight": (1024, 464, 1, 1),
            "linear.weight": (100, 1024),
        },
    ),
    "MobileNetV2": (
        320,
        {
            "conv1.0.weight": (16, 3, 3, 3),
            "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
            "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
            "conv2.0.weight": (1280, 160, 1, 1),
            "classifier.0.weight": (100, 1280),
        },
    ),
    "vgg13": (
        72,
        {
            "block0.0.weight": (64, 3, 3, 3),
            "block0.0.bias": (64,),
            "block0.3.weight": (64, 64, 3, 3),
            "block4.4.running_mean": (512,),
            "classifier.weight": (100, 512),
        },
    ),
    "ResNet50": (
        320,
        {
            "conv1.weight": (64, 3, 3, 3),
            "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
            "layer4.2.conv3.weight": (2048, 512, 1, 1),
            "linear.weight": (100, 2048),
        },
    ),
    "MobileNetV1": (
        164,
        {
            "model.0.0.weight": (32, 3, 3, 3),
            "model.1.0.weight": (32, 1, 3, 3),
            "model.13.3.weight": (1024, 1024, 1, 1),
            "model.13.4.running_var": (1024,),
            "fc.weight": (1000, 1024),
        },
    ),
}


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    # Tiny batches gain nothing from intra-op threads, and on shared cores their spinning costs several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _trained_looking(model):
    """Give batch-norm statistics non-default values, so a load that drops them would show in the logits."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def _same_logits(a, b, size=32):
    batch = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a(batch), b(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MDISTILLER_KEYS))
def test_parameter_names_follow_mdistiller(name):
    count, samples = MDISTILLER_KEYS[name]
    state = create_model(name).state_dict()
    assert len(state) == count
    assert {key: tuple(state[key].shape) for key in samples} == samples


def test_project_format_round_trip(tmp_path):
    model = _trained_looking(create_model("resnet8x4"))
    path = tmp_path / "teacher.pt"
    recipe = {"epochs": 240, "lr": 0.05, "milestones": [150, 180, 210]}
    digest = save_model(
        path,
        model,
        arch="resnet8x4",
        num_classes=100,
        dataset="cifar100",
        input_size=32,
        recipe=recipe,
        metrics={"top1": 72.5},
    )
    assert len(digest) == 64
    assert load_checkpoint(path)["kind"] == "model"  # a plain hashed project checkpoint underneath

    checkpoint = read_model_checkpoint(path)
    assert checkpoint.source_format == "dkd-tune"
    assert (checkpoint.arch, checkpoint.num_classes, checkpoint.dataset, checkpoint.input_size) == (
        "resnet8x4",
        100,
        "cifar100",
        32,
    )
    assert checkpoint.recipe == recipe and checkpoint.metrics == {"top1": 72.5}
    assert checkpoint.state_dict.keys() == model.state_dict().keys()

    teacher = load_teacher("resnet8x4", path, num_classes=100)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert _same_logits(model, teacher)


def test_save_model_refuses_inconsistent_metadata(tmp_path):
    model = create_model("wrn_16_1", num_classes=10)
    with pytest.raises(ValueError, match="not a resnet20"):
        save_model(
            tmp_path / "a.pt", model, arch="resnet20", num_classes=10, dataset="cifar10", input_size=32
        )
    with pytest.raises(ValueError, match="has 10 classes, not num_classes=100"):
        save_model(
            tmp_path / "a.pt", model, arch="wrn_16_1", num_classes=100, dataset="cifar100", input_size=32
        )
    with pytest.raises(UserInputError, match="unknown model 'wrn16'"):
        save_model(tmp_path / "a.pt", model, arch="wrn16", num_classes=10, dataset="cifar10", input_size=32)
    assert not (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_40_2", "ShuffleV1", "MobileNetV2", "vgg8"])
def test_mdistiller_checkpoint_loads_strictly(tmp_path, name):
    model = _trained_looking(create_model(name))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(
        {"epoch": 240, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_acc": 75.0},
        path,
    )
    checkpoint = read_model_checkpoint(path)
    assert checkpoint.source_format == "mdistiller" and checkpoint.arch is None
    teacher = load_teacher(name, path, num_classes=100)
    assert _same_logits(model, teacher)


def test_imagenet_mobilenet_v1_student_file_loads(tmp_path):
    """mdistiller's student_best: {"model": student.state_dict()}."""
    model = _trained_looking(create_model("MobileNetV1"))
    torch.save({"model": model.state_dict()}, tmp_path / "student_best")
    assert _same_logits(model, load_teacher("MobileNetV1", tmp_path / "student_best"), size=64)


def test_data_parallel_prefix_and_bare_state_dict(tmp_path):
    model = _trained_looking(create_model("ShuffleV2"))
    wrapped = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"model": wrapped, "epoch": 240, "best_acc": 71.8}, tmp_path / "dp.pth")
    assert _same_logits(model, load_teacher("ShuffleV2", tmp_path / "dp.pth"))
    torch.save(wrapped, tmp_path / "bare.pth")
    assert read_model_checkpoint(tmp_path / "bare.pth").source_format == "state_dict"
    assert _same_logits(model, load_teacher("ShuffleV2", tmp_path / "bare.pth"))


def test_files_from_pytorch_before_0_4_1_lack_batch_counters(tmp_path):
    model = _trained_looking(create_model("resnet20"))
    state = {
        key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")
    }
    torch.save({"model": state, "epoch": 240}, tmp_path / "old.pth")
    assert _same_logits(model, load_teacher("resnet20", tmp_path / "old.pth"))


def test_training_checkpoint_is_read_through_its_model_entry(tmp_path):
    model = _trained_looking(create_model("wrn_16_2", num_classes=10))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    payload = {"kind": "training", "model": state, "arch": "wrn_16_2", "num_classes": 10, "epoch": 3}
    save_checkpoint(tmp_path / "trial.pt", payload)
    checkpoint = read_model_checkpoint(tmp_path / "trial.pt")
    assert (checkpoint.arch, checkpoint.num_classes, checkpoint.source_format) == ("wrn_16_2", 10, "dkd-tune")
    assert _same_logits(model, load_teacher("wrn_16_2", tmp_path / "trial.pt"))


def _one_line_error(error_type, name, path, **kwargs):
    with pytest.raises(error_type) as error:
        load_teacher(name, path, **kwargs)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and len(message) < 400, message
    return message


def test_wrong_architecture_recorded_in_the_file(tmp_path):
    path = tmp_path / "t.pth"
    save_model(
        path, create_model("wrn_40_2"), arch="wrn_40_2", num_classes=100, dataset="cifar100", input_size=32
    )
    message = _one_line_error(ArchitectureMismatchError, "resnet56", path)
    assert "holds a wrn_40_2 (recorded in the file) but the model asked for is resnet56" in message


@pytest.mark.parametrize(
    ("saved", "asked"), [("wrn_40_2", "resnet56"), ("resnet8", "resnet8x4"), ("vgg13", "vgg11")]
)
def test_wrong_architecture_found_from_names_and_shapes(tmp_path, saved, asked):
    path = tmp_path / "t.pth"
    torch.save({"model": create_model(saved).state_dict(), "epoch": 240}, path)
    message = _one_line_error(ArchitectureMismatchError, asked, path)
    assert (
        f"holds a {saved} (found by its parameter names and shapes) but the model asked for is {asked}"
        in message
    )


def test_unrecognised_parameters_are_summarised(tmp_path):
    # 336 entries renamed; the 56 batch counters are optional, so 280 count as missing.
    state = {
        key.replace("layer", "stage"): value for key, value in create_model("resnet56").state_dict().items()
    }
    torch.save({"model": state}, tmp_path / "renamed.pth")
    message = _one_line_error(ArchitectureMismatchError, "resnet56", tmp_path / "renamed.pth")
    assert "do not match resnet56: 280 missing, 336 unexpected, 0 of another shape" in message
    assert "missing 'layer1.0.conv1.weight'" in message

    distiller = {f"module.student.{k}": v for k, v in create_model("resnet8").state_dict().items()}
    distiller.update({f"module.teacher.{k}": v for k, v in create_model("resnet32").state_dict().items()})
    torch.save({"model": distiller, "epoch": 240}, tmp_path / "latest")
    assert "use its student_* file" in _one_line_error(
        ArchitectureMismatchError, "resnet8", tmp_path / "latest"
    )


def test_wrong_class_count(tmp_path):
    torch.save({"model": create_model("resnet32x4", num_classes=10).state_dict()}, tmp_path / "c10.pth")
    message = _one_line_error(ClassCountMismatchError, "resnet32x4", tmp_path / "c10.pth", num_classes=100)
    assert "has 10 classes but 100 were expected" in message
    # Without an expectation, the file's class count is used.
    assert load_teacher("resnet32x4", tmp_path / "c10.pth").num_classes == 10

    path = tmp_path / "ours.pt"
    model = create_model("ShuffleV1", num_classes=200)
    save_model(path, model, arch="ShuffleV1", num_classes=200, dataset="tiny-imagenet", input_size=64)
    assert "has 200 classes but 100 were expected" in _one_line_error(
        ClassCountMismatchError, "ShuffleV1", path, num_classes=100
    )


def test_corrupted_truncated_and_unsafe_files(tmp_path):
    path = tmp_path / "t.pt"
    save_model(
        path, create_model("resnet8"), arch="resnet8", num_classes=100, dataset="cifar100", input_size=32
    )
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "cannot read checkpoint" in _one_line_error(
        CorruptCheckpointError, "resnet8", tmp_path / "truncated.pt"
    )

    content = torch.load(path, weights_only=True)
    content["payload"]["state_dict"]["fc.bias"] += 1.0  # bit rot: the stored hash no longer matches
    torch.save(content, tmp_path / "tampered.pt")
    assert "SHA-256" in _one_line_error(CorruptCheckpointError, "resnet8", tmp_path / "tampered.pt")

    # CRD-era files sometimes pickle the argparse options; safe loading refuses to run that code.
    unsafe = {"model": create_model("resnet8").state_dict(), "opt": argparse.Namespace(lr=0.05)}
    torch.save(unsafe, tmp_path / "unsafe.pth")
    assert "weights_only" in _one_line_error(CorruptCheckpointError, "resnet8", tmp_path / "unsafe.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "not a model checkpoint" in _one_line_error(UserInputError, "resnet8", tmp_path / "list.pth")
    assert "not found" in _one_line_error(UserInputError, "resnet8", tmp_path / "missing.pth")
