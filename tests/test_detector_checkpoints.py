"""Detector checkpoints: every registered detector round-trips through the project's own files, and published
COCO teachers (torchvision's weights, Detectron2's model-zoo pickles, written here in their formats) load and
distil."""

from __future__ import annotations

import http.server
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dkd_tune.commands.download_teachers import download_detection_teachers
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data.coco import collate_detections, load_coco
from dkd_tune.data.synthetic_coco import make_synthetic_coco
from dkd_tune.engine.checkpoints import save_best_model
from dkd_tune.engine.detection_loop import StudentForward, detection_step
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models import detector_conversion
from dkd_tune.models.detection import (
    DETECTOR_NAMES,
    create_detector,
    load_detector,
    matching_detector_weights,
)
from tests.test_download_teachers import Handler
from tests.test_search_spaces import placeholder_inputs

CATEGORIES = ("person", "bicycle", "car")
CATEGORY_IDS = (1, 2, 3)
SMALL = 96  # pixels: the tests shrink the detectors' resizing so real backbones run fast on a CPU


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def shrink(model):
    model.transform.min_size, model.transform.max_size = (SMALL,), SMALL
    return model


def an_image(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 80, 72, generator=generator)]


def save_like_training(path: Path, model, name: str) -> Path:
    """best.pt as the project's training writes it (EpochRecorder -> save_best_model)."""
    settings = model.detector_settings
    identity = RunIdentity(
        arch=name, num_classes=len(CATEGORIES) + 1, dataset="coco", categories=CATEGORIES,
        category_ids=CATEGORY_IDS, detector=settings.to_dict() if settings is not None else None,
    )  # fmt: skip
    save_best_model(path, model, identity, resolve_recipe("coco-1x"), {"test_ap": 1.0})
    return path


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_every_registered_detector_round_trips_through_its_own_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    # Built as training builds it (frozen batch norms for the real ones), with random weights.
    trained = create_detector(name, len(CATEGORIES) + 1)
    path = save_like_training(tmp_path / "best.pt", trained, name)
    weights = matching_detector_weights(name, path, CATEGORIES, CATEGORY_IDS)  # the config check's read
    assert weights.source == "dkd-tune"
    counters = {key for key in trained.state_dict() if key.endswith("num_batches_tracked")}  # not parameters
    assert set(weights.state_dict) == set(trained.state_dict()) - counters
    loaded = load_detector(name, path, categories=CATEGORIES, category_ids=CATEGORY_IDS)  # the trial's
    assert loaded.detector_settings == trained.detector_settings
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if name in ("frcnn_r18_fpn", "frcnn_mv2_fpn", "frcnn_tiny"):  # a forward each for the cheap ones
        trained.eval()
        with torch.no_grad():
            expected, got = shrink(trained)(an_image()), shrink(loaded)(an_image())
        assert torch.equal(expected[0]["boxes"], got[0]["boxes"])


def test_a_checkpoint_with_batch_norm_counters_loads_and_another_architecture_is_named(tmp_path):
    torch.manual_seed(0)
    model = create_detector("frcnn_r18_fpn", len(CATEGORIES) + 1)
    state = dict(model.state_dict())
    state["backbone.body.bn1.num_batches_tracked"] = torch.tensor(3)  # a BatchNorm2d build's extra buffer
    torch.save(state, tmp_path / "plain.pth")
    assert matching_detector_weights("frcnn_r18_fpn", tmp_path / "plain.pth", CATEGORIES, CATEGORY_IDS)
    with pytest.raises(
        UserInputError, match="holds a frcnn_r18_fpn, but the detector asked for is frcnn_r50_fpn"
    ):
        matching_detector_weights("frcnn_r50_fpn", tmp_path / "plain.pth", CATEGORIES, CATEGORY_IDS)


def test_mobilenet_v2_taps_each_stages_end_and_freezes_nothing_but_its_norms():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = create_detector("frcnn_mv2_fpn", 5)
    channels = [block[0].in_channels for block in model.backbone.fpn.inner_blocks]
    assert channels == [24, 32, 96, 320]
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    norms = [m for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    resnet = create_detector("frcnn_r50_fpn", 5)
    assert resnet.rpn._post_nms_top_n["training"] == 1000 and resnet.transform.min_size[-1] == 800
    assert resnet.transform.min_size[0] == 640


# ------------------------------------------------------------------------------------------------
# torchvision's COCO-trained weights


def head_inputs(model, images):
    """(backbone features, RPN proposals, image sizes) of an eval forward."""
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    return features, proposals, batch.image_sizes


def head_logits(model, features, proposals, sizes):
    heads = model.roi_heads
    return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, sizes)))[0]


def torchvision_coco_detector():
    """torchvision's fasterrcnn_resnet50_fpn with random weights as its COCO_V1 release runs: 91 head rows,
    frozen batch norms of eps 0; the unused ('N/A') rows far below every other, as training leaves them."""
    from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    # What fasterrcnn_resnet50_fpn(weights=COCO_V1) builds (frozen batch norms), without the download.
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d)
    model = FasterRCNN(backbone, num_classes=91).eval()
    overwrite_eps(model, 0.0)
    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    with torch.no_grad():
        for index, name in enumerate(names):
            if name == "N/A":
                model.roi_heads.box_predictor.cls_score.bias[index] = -1e4
        for module in model.modules():  # running stats a trained network would have
            if hasattr(module, "running_var"):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.5, 0.5)
    return model, names


def test_torchvision_coco_weights_give_torchvision_s_own_detections(tmp_path):
    reference, names = torchvision_coco_detector()
    torch.save(reference.state_dict(), tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")
    ids = tuple(i for i, name in enumerate(names) if i and name != "N/A")
    categories = tuple(names[i] for i in ids)
    loaded = load_detector(
        "frcnn_r50_fpn",
        tmp_path / "fasterrcnn_resnet50_fpn_coco.pth",
        categories=categories,
        category_ids=ids,
    )
    assert loaded.detector_settings.roi_align == "torchvision"
    image = an_image()
    with torch.no_grad():
        expected_features, got_features = (
            head_inputs(shrink(reference), image),
            head_inputs(shrink(loaded), image),
        )
        for key, value in expected_features[0].items():  # equal up to float rounding of the folded eps
            assert (got_features[0][key] - value).abs().max() <= 1e-5 * value.abs().max(), key
        # The R-CNN head on the same proposals: the rows of the data's categories, background first.
        proposals, sizes = expected_features[1], expected_features[2]
        expected = head_logits(reference, expected_features[0], proposals, sizes)
        got = head_logits(loaded, expected_features[0], proposals, sizes)
    scale = expected.abs().max()
    assert (got - expected[:, [0, *ids]]).abs().max() <= 1e-5 * scale
    # A dataset of some COCO categories takes those rows; a category COCO's release lacks is one line.
    subset = load_detector(
        "frcnn_r50_fpn", tmp_path / "fasterrcnn_resnet50_fpn_coco.pth", categories=("car", "person"),
        category_ids=(3, 1),
    )  # fmt: skip
    cls = subset.roi_heads.box_predictor.cls_score.weight
    torch.testing.assert_close(cls[1], reference.roi_heads.box_predictor.cls_score.weight[3])
    with pytest.raises(
        UserInputError, match=r"category 'thing' has COCO category id 12, which this"
    ) as error:
        matching_detector_weights(
            "frcnn_r50_fpn", tmp_path / "fasterrcnn_resnet50_fpn_coco.pth", ("thing",), (12,)
        )
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Detectron2's model-zoo format


def as_detectron2(model) -> dict[str, np.ndarray]:
    """The test's own inverse of the conversion: a torchvision-layout ResNet-FPN detector (80 COCO classes,
    background first) in Detectron2's names and layout (BGR stem, background last, no background deltas)."""
    out = {}
    for key, value in model.state_dict().items():
        array = value.detach().numpy().copy()
        name = key
        name = re.sub(r"^backbone\.body\.conv1\.", "backbone.bottom_up.stem.conv1.", name)
        name = re.sub(r"^backbone\.body\.bn1\.", "backbone.bottom_up.stem.conv1.norm.", name)
        name = re.sub(
            r"^backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.",
            name,
        )
        name = re.sub(
            r"^backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.",
            name,
        )
        name = re.sub(
            r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.",
            name,
        )
        name = re.sub(
            r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.",
            lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.",
            name,
        )
        name = re.sub(
            r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.",
            lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.",
            name,
        )
        name = re.sub(
            r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.", name
        )
        name = name.replace("rpn.head.conv.0.0.", "proposal_generator.rpn_head.conv.")
        name = name.replace("rpn.head.cls_logits.", "proposal_generator.rpn_head.objectness_logits.")
        name = name.replace("rpn.head.bbox_pred.", "proposal_generator.rpn_head.anchor_deltas.")
        name = name.replace("roi_heads.box_head.fc6.", "roi_heads.box_head.fc1.").replace(
            "box_head.fc7.", "box_head.fc2."
        )
        if name == "backbone.bottom_up.stem.conv1.weight":
            array = array[:, ::-1].copy()  # RGB -> BGR
        if name.startswith("roi_heads.box_predictor.cls_score."):
            array = np.concatenate([array[1:], array[:1]])  # background last
        if name.startswith("roi_heads.box_predictor.bbox_pred."):
            array = array[4:]  # no deltas for the background
        out[name] = array
    for level in range(5):
        out[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = np.zeros((3, 4), np.float32)
    return out  # fmt: skip


@pytest.fixture(scope="module")
def detectron2_file(tmp_path_factory):
    """A Detectron2-format R50-FPN pickle (random weights) and the detector it must convert to."""
    torch.manual_seed(0)
    source = create_detector("frcnn_r50_fpn", 81, settings=detector_conversion.DETECTRON2_SETTINGS).eval()
    with torch.no_grad():
        for module in source.modules():
            if hasattr(module, "running_var"):
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("d2") / "model_final_280758.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": as_detectron2(source), "__author__": "Detectron2 Model Zoo"}, file, protocol=2)
    return path, source


def test_a_detectron2_pickle_converts_to_the_same_detector(detectron2_file):
    path, source = detectron2_file
    ids = detector_conversion.COCO_THING_IDS
    categories = tuple(f"c{i}" for i in ids)
    loaded = load_detector("frcnn_r50_fpn", path, categories=categories, category_ids=ids)
    assert loaded.detector_settings == detector_conversion.DETECTRON2_SETTINGS
    assert loaded.detector_settings.stride_in_1x1 and loaded.backbone.body.layer2[0].conv1.stride == (2, 2)
    for key, value in source.state_dict().items():
        if key.startswith(
            "roi_heads.box_predictor.bbox_pred"
        ):  # Detectron2 has no box deltas for the background: rows 0-3 are zeros
            value, got = value[4:], loaded.state_dict()[key][4:]
            assert not loaded.state_dict()[key][:4].any()
        else:
            got = loaded.state_dict()[key]
        assert torch.equal(got, value), key
    with pytest.raises(UserInputError, match="converts to frcnn_r101_fpn or frcnn_r50_fpn"):
        matching_detector_weights("frcnn_r18_fpn", path, categories, ids)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": Payload(), "__author__": "x"}, file, protocol=2)
    with pytest.raises(UserInputError, match=r"global (__builtin__|builtins)\.print is not allowed") as error:
        matching_detector_weights("frcnn_r50_fpn", path, CATEGORIES, CATEGORY_IDS)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("teacher_format", ["detectron2", "torchvision"])
def test_a_published_format_teacher_distils_a_student_on_generated_coco_data(
    teacher_format, detectron2_file, tmp_path
):
    if teacher_format == "detectron2":
        path, _ = detectron2_file
    else:  # torchvision's COCO release layout: 91 head rows, mapped to the data's categories by COCO id
        path = tmp_path / "fasterrcnn_resnet50_fpn_coco.pth"
        torch.save(torchvision_coco_detector()[0].state_dict(), path)
    coco = load_coco(
        make_synthetic_coco(tmp_path / "coco", train_images=8, val_images=4, seed=1),
        name="synthetic-coco", validation=0, augment="standard",
    )  # fmt: skip
    teacher = shrink(
        load_detector("frcnn_r50_fpn", path, categories=coco.category_names, category_ids=coco.category_ids)
    )
    assert teacher.roi_heads.box_predictor.cls_score.out_features == coco.num_classes
    torch.manual_seed(0)
    student = StudentForward(create_detector("frcnn_tiny", coco.num_classes).train())
    images, targets = collate_detections([coco.dataset("train", train=True)[i] for i in range(2)])
    loss, parts = detection_step(student, teacher, images, targets, "dkd", resolve_recipe("coco-1x"), 1.0)
    assert torch.isfinite(loss) and parts["nckd"] >= 0 and parts["tckd"] >= 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ------------------------------------------------------------------------------------------------
# download-teachers --detection, and the COCO search files checked with the teachers it writes


def check(file: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """`dkd-tune check FILE --set ...` in a subprocess (exit code and both streams)."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "dkd_tune",
        "check",
        str(file),
        *[a for o in overrides for a in ("--set", o)],
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=root)


def test_download_teachers_detection_converts_the_zoo_file_and_every_coco_file_checks(
    detectron2_file, tmp_path
):
    path, source = detectron2_file
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.truncate = {"/model_final_280758.pkl": path.read_bytes()}, False
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{httpd.server_address[1]}/model_final_280758.pkl"
        folder = download_detection_teachers(tmp_path / "ckpt", urls={"frcnn_r50_fpn": address}, log=print)
        httpd.truncate = True  # a download cut short writes nothing
        with pytest.raises(UserInputError, match="nothing was written"):
            download_detection_teachers(tmp_path / "other", urls={"frcnn_r50_fpn": address}, log=print)
        assert not (tmp_path / "other" / "coco_teachers" / "frcnn_r50_fpn.pt").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()
    written = folder / "frcnn_r50_fpn.pt"
    # A subset of COCO's categories, mapped by id.
    loaded = load_detector("frcnn_r50_fpn", written, categories=("car", "person"), category_ids=(3, 1))
    assert loaded.detector_settings == detector_conversion.DETECTRON2_SETTINGS
    assert torch.equal(
        loaded.roi_heads.box_predictor.cls_score.weight[1], source.roi_heads.box_predictor.cls_score.weight[3]
    )
    # Every shipped COCO file passes `dkd-tune check` with a project-written teacher of its architecture
    # (r50 from the conversion; r101 as the project's training saves a detector).
    torch.manual_seed(0)
    r101 = create_detector("frcnn_r101_fpn", 81)
    ids = detector_conversion.COCO_THING_IDS
    identity = RunIdentity("frcnn_r101_fpn", 81, "coco", categories=tuple(f"c{i}" for i in ids),
                           category_ids=ids, detector=r101.detector_settings.to_dict())  # fmt: skip
    save_best_model(folder / "frcnn_r101_fpn.pt", r101, identity, resolve_recipe("coco-1x"), {})
    root = Path(__file__).resolve().parents[1]
    for name in ("coco_frcnn_r101_r18", "coco_frcnn_r101_r50", "coco_frcnn_r50_mv2"):
        file = root / "search_spaces" / f"{name}.yaml"
        teacher = yaml.safe_load(file.read_text())["teachers"][0]
        assert teacher["checkpoint"] == f"~/checkpoints/coco_teachers/{teacher['model']}.pt"
        overrides = [o for o in placeholder_inputs(file, tmp_path / name) if not o.startswith("teachers.")]
        result = check(file, [*overrides, f"teachers.0.checkpoint={folder / (teacher['model'] + '.pt')}"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            result.stdout.startswith(f"ok: {file}: search '{name}' would run")
            and "checkpoint ok" in result.stdout
        )
    file = root / "search_spaces" / "coco_frcnn_r50_mv2.yaml"
    overrides = [o for o in placeholder_inputs(file, tmp_path / "x") if not o.startswith("teachers.")]
    bad = check(file, [*overrides, f"teachers.0.checkpoint={folder / 'frcnn_r101_fpn.pt'}"])
    assert bad.returncode == 2 and "holds a frcnn_r101_fpn" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
