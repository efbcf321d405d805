"""The model zoo: registry, parameter counts, shapes, the forward_features/forward_head split, precision, CLI."""

import subprocess
import sys
import urllib.error

import pytest
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.models import (
    ImageClassifier,
    count_parameters,
    create_model,
    list_models,
    model_info,
    parameter_count,
)
from dkd_tune.models.detection import DETECTOR_NAMES, create_detector

# Millions of parameters at 100 classes, as the CRD/mdistiller code reports them.
CIFAR_PARAMS_M = {
    "resnet8": 0.084,
    "resnet14": 0.181,
    "resnet20": 0.278,
    "resnet32": 0.473,
    "resnet44": 0.667,
    "resnet56": 0.862,
    "resnet110": 1.737,
    "resnet8x4": 1.234,
    "resnet32x4": 7.434,
    "ResNet18": 11.220,
    "ResNet50": 23.705,
    "wrn_16_1": 0.181,
    "wrn_16_2": 0.703,
    "wrn_40_1": 0.570,
    "wrn_40_2": 2.255,
    "vgg8": 3.965,
    "vgg11": 9.277,
    "vgg13": 9.462,
    "vgg16": 14.774,
    "vgg19": 20.087,
    "MobileNetV2": 0.813,
    "ShuffleV1": 0.949,
    "ShuffleV2": 1.356,
    "mlp_32": 0.028,
    "mlp_256": 0.223,  # dkd-tune's own CPU benchmark students (16x16x3 pooled pixels -> 256 -> classes)
    "mlp_512x2": 0.708,
    "cnn_8": 0.021,  # the all-CNN auto-beta family's student (five 3x3 convolutions, 8-16-32 channels)
}
# Millions of parameters at 1000 classes (torchvision's published counts; MobileNetV1 as in mdistiller).
IMAGENET_PARAMS_M = {
    "resnet18": 11.690,
    "resnet34": 21.798,
    "resnet50": 25.557,
    "mobilenet_v2": 3.505,
    "MobileNetV1": 4.232,
}


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    # Tiny batches gain nothing from intra-op threads, and on shared cores their spinning costs several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_registry_holds_the_paper_networks_and_the_benchmark_mlps():
    assert list_models("cifar") == list(CIFAR_PARAMS_M)
    assert list_models("imagenet") == list(IMAGENET_PARAMS_M)
    assert list_models() == list(CIFAR_PARAMS_M) + list(IMAGENET_PARAMS_M)
    info = model_info("wrn_40_2")
    assert (info.family, info.input_size, info.default_num_classes) == ("cifar", 32, 100)
    info = model_info("MobileNetV1")
    assert (info.family, info.input_size, info.default_num_classes) == ("imagenet", 224, 1000)


@pytest.mark.parametrize("name", list(CIFAR_PARAMS_M) + list(IMAGENET_PARAMS_M))
def test_parameter_count_to_the_thousand(name):
    expected = {**CIFAR_PARAMS_M, **IMAGENET_PARAMS_M}[name]
    assert round(parameter_count(name) / 1e6, 3) == expected
    # The class count changes only the classifier: (in + 1) parameters per class.
    model = create_model(name, num_classes=7)
    assert isinstance(model, ImageClassifier)
    assert model.num_classes == 7
    default_classes = model_info(name).default_num_classes
    assert count_parameters(model) == parameter_count(name) - (default_classes - 7) * (model.num_features + 1)


def _shape_cases(name):
    if model_info(name).family == "cifar":
        return [(32, 100), (64, 200)]  # CIFAR-100, Tiny-ImageNet
    return [(64, 1000)] + ([(224, 1000)] if name == "resnet18" else [])


@pytest.mark.parametrize("name", list_models())
def test_logits_and_features_shapes(name):
    for size, num_classes in _shape_cases(name):
        model = create_model(name, num_classes=num_classes).eval()
        batch = torch.randn(8, 3, size, size)
        with torch.inference_mode():
            features = model.forward_features(batch)
            logits = model.forward_head(features)
            single_features = model.forward_features(batch[:1])
            single_logits = model(batch[:1])
        assert features.shape == (8, model.num_features)
        assert logits.shape == (8, num_classes)
        assert single_features.shape == (1, model.num_features)
        assert single_logits.shape == (1, num_classes)
        assert torch.isfinite(logits).all()
        # forward == forward_head(forward_features), and samples do not mix inside a batch.
        scale = logits.abs().max().clamp_min(1e-12)
        assert ((single_logits - logits[:1]).abs().max() / scale) < 1e-4
        feature_scale = features.abs().max().clamp_min(1e-12)
        assert ((single_features - features[:1]).abs().max() / feature_scale) < 1e-4


@pytest.mark.parametrize(
    "name",
    ["resnet8x4", "wrn_40_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "MobileNetV1", "mobilenet_v2"],
)
def test_channels_last_and_bf16_autocast(name):
    size = 32 if model_info(name).family == "cifar" else 64
    model = create_model(name).eval()
    batch = torch.randn(4, 3, size, size)
    with torch.no_grad():
        reference = model(batch)
        model = model.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
        channels_last = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = model(batch)
            features = model.forward_features(batch)
    assert ((channels_last - reference).abs().max() / reference.abs().max()) < 1e-4
    assert low_precision.dtype == torch.bfloat16 and features.shape == (4, model.num_features)
    similarity = torch.nn.functional.cosine_similarity(low_precision.float(), reference, dim=1)
    assert similarity.min() > 0.99


def test_training_step_reaches_every_parameter():
    model = create_model("ShuffleV1", num_classes=10).to(memory_format=torch.channels_last).train()
    batch = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_vgg_pools_before_its_last_block_only_at_64():
    """The reference's Tiny-ImageNet rule: a 64x64 image reaches block4 at 4x4, like a 32x32 one."""
    model = create_model("vgg8").eval()
    seen = []
    model.block4.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 64, 64))
    assert seen == [(4, 4), (4, 4)]


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("resnet3x4", ["resnet32x4", "resnet8x4"]),
        ("mobilenetv2", ["MobileNetV2", "mobilenet_v2"]),
        ("WRN_40_2", ["wrn_40_2"]),
    ],
)
def test_unknown_name_suggests_the_closest(name, suggested):
    with pytest.raises(UserInputError, match=f"unknown model '{name}'") as error:
        create_model(name)
    message = str(error.value)
    assert "\n" not in message and "did you mean" in message
    assert all(candidate in message for candidate in suggested)


def test_bad_arguments_are_one_line_user_errors():
    with pytest.raises(UserInputError, match="has no option 'pretrained'"):
        create_model("resnet8", pretrained="weights.pth")
    with pytest.raises(UserInputError, match="positive integer"):
        create_model("resnet8", num_classes=0)
    with pytest.raises(UserInputError, match="unknown model family 'tiny'"):
        list_models("tiny")


def test_imagenet_models_load_local_pretrained_weights(tmp_path):
    source = create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    # Without batch-norm counters, like torchvision's files saved before PyTorch 0.4.1.
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    same = create_model("resnet18", pretrained=path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), same.state_dict().values(), strict=True)
    )
    # Another class count: the backbone is loaded, the classifier is new.
    tiny = create_model("resnet18", num_classes=200, pretrained=str(path))
    assert torch.equal(tiny.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert tiny.fc.weight.shape == (200, 512)
    torch.save(create_model("resnet34").state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(UserInputError, match="do not fit resnet18"):
        create_model("resnet18", pretrained=tmp_path / "resnet34.pth")


def test_torchvision_weights_use_the_paper_version_and_fail_in_one_line(monkeypatch):
    requested = []

    def unreachable(url, **kwargs):
        requested.append((url, kwargs.get("weights_only")))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(
        UserInputError, match="could not get torchvision's IMAGENET1K_V1 weights for resnet50"
    ) as error:
        create_model("resnet50", pretrained="torchvision")
    assert "\n" not in str(error.value) and "pretrained=PATH" in str(error.value)
    assert requested == [("https://download.pytorch.org/models/resnet50-0676ba61.pth", True)]

    published = create_model("mobilenet_v2").state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: published)
    loaded = create_model("mobilenet_v2", pretrained="torchvision")
    assert torch.equal(loaded.classifier[1].weight, published["classifier.1.weight"])
    with pytest.raises(UserInputError, match="no weights 'NOPE' for resnet18"):
        create_model("resnet18", pretrained="torchvision:NOPE")
    with pytest.raises(UserInputError, match="torchvision publishes no weights for MobileNetV1"):
        create_model("MobileNetV1", pretrained="torchvision")


def test_cli_lists_every_model_with_its_parameter_count():
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "models"], capture_output=True, text=True, check=True
    )
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert list(rows) == list(CIFAR_PARAMS_M) + list(IMAGENET_PARAMS_M) + list(DETECTOR_NAMES)
    assert all(rows[name][1] == "detection" for name in DETECTOR_NAMES)
    for name, expected in {**CIFAR_PARAMS_M, **IMAGENET_PARAMS_M}.items():
        assert rows[name][2] == f"{expected:.3f}"
    imagenet_only = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "models", "--family", "imagenet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [line.split()[0] for line in imagenet_only.splitlines()[1:]] == list(IMAGENET_PARAMS_M)


def test_detectors_are_torchvisions_faster_rcnn_with_the_papers_backbones():
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn

    for name in DETECTOR_NAMES:
        assert isinstance(create_detector(name, 7), FasterRCNN)
    # frcnn_r50_fpn is torchvision's own ResNet-50 Faster R-CNN-FPN, parameter for parameter.
    ours = create_detector("frcnn_r50_fpn", 91).state_dict()
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    assert {k: v.shape for k, v in ours.items() if "num_batches" not in k} == {
        k: v.shape for k, v in theirs.items() if "num_batches" not in k
    }
