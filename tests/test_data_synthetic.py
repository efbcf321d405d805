"""The generated dataset: CIFAR format, determinism, idempotence, class structure, the CLI command."""

import json

import pytest
import torch

from dkd_tune.cli import main
from dkd_tune.core.errors import UserInputError
from dkd_tune.data import load_train_test, make_synthetic, parse_data_spec
from dkd_tune.data.cifar import read_cifar100

SMALL = dict(classes=6, superclasses=2, train_per_class=12, test_per_class=4, image_size=16, seed=3)


def files(root):
    folder = root / "cifar-100-python"
    return {name: (folder / name).read_bytes() for name in ("train", "test", "meta")}


def test_written_in_cifar_format_with_balanced_classes_and_superclasses(tmp_path):
    make_synthetic(tmp_path, **SMALL)
    train, test = read_cifar100(tmp_path, name="synthetic", how_to_get="")
    assert train.image_shape == (3, 16, 16) and len(train) == 72 and len(test) == 24
    assert torch.equal(torch.bincount(train.labels), torch.full((6,), 12))
    assert torch.equal(train.coarse_labels, train.labels * 2 // 6)  # contiguous groups of siblings
    assert train.num_classes == 6 and len(train.coarse_class_names) == 2
    record = json.loads((tmp_path / "synthetic.json").read_text())
    assert record["params"] == SMALL


def test_deterministic_and_seed_dependent(tmp_path):
    make_synthetic(tmp_path / "a", **SMALL)
    make_synthetic(tmp_path / "b", **SMALL)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    make_synthetic(tmp_path / "c", **{**SMALL, "seed": 4})
    assert files(tmp_path / "a")["train"] != files(tmp_path / "c")["train"]


def test_idempotent_unless_parameters_change_or_files_are_damaged(tmp_path):
    make_synthetic(tmp_path, **SMALL)
    train_file = tmp_path / "cifar-100-python" / "train"
    stamp = train_file.stat().st_mtime_ns
    make_synthetic(tmp_path, **SMALL)
    assert train_file.stat().st_mtime_ns == stamp
    make_synthetic(tmp_path, **{**SMALL, "train_per_class": 5})
    assert len(read_cifar100(tmp_path, name="synthetic", how_to_get="")[0]) == 30
    train_file.write_bytes(b"damaged")
    make_synthetic(tmp_path, **{**SMALL, "train_per_class": 5})
    assert len(read_cifar100(tmp_path, name="synthetic", how_to_get="")[0]) == 30


def test_siblings_look_alike_more_than_other_superclasses(tmp_path):
    """Superclasses share structure: class-mean images are closer within a superclass than across."""
    make_synthetic(
        tmp_path, classes=8, superclasses=2, train_per_class=60, test_per_class=1, image_size=16, seed=0
    )
    train, _ = read_cifar100(tmp_path, name="synthetic", how_to_get="")
    means = torch.stack([train.images[train.labels == c].double().mean(0).flatten() for c in range(8)])
    distance = torch.cdist(means, means)
    group = torch.arange(8) * 2 // 8
    same = group[:, None] == group[None, :]
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert distance[same & off_diagonal].mean() < 0.5 * distance[~same].mean()


def test_parameters_are_validated(tmp_path):
    with pytest.raises(UserInputError, match=r"superclasses 7 must be an integer in \[1, 6\]"):
        make_synthetic(tmp_path, classes=6, superclasses=7)
    with pytest.raises(UserInputError, match="image-size 4"):
        make_synthetic(tmp_path, image_size=4)


def test_data_spec_with_generate_creates_the_dataset(tmp_path):
    spec = parse_data_spec(
        {"name": "synthetic", "root": str(tmp_path), "generate": SMALL, "label_noise": 0.25}
    )
    train, test = load_train_test(spec)
    assert train.name == "synthetic" and len(train) == 72 and len(test) == 24
    assert train.clean_labels is not None and 0 < train.label_noise_rate < 1
    assert len(train.mean) == 3 and all(0 < s < 1 for s in train.std)


def test_make_synthetic_command(tmp_path, capsys):
    main(
        [
            "make-synthetic",
            "--out",
            str(tmp_path),
            "--classes",
            "4",
            "--superclasses",
            "2",
            "--train-per-class",
            "5",
            "--test-per-class",
            "2",
            "--image-size",
            "16",
            "--seed",
            "1",
        ]
    )
    assert "4 classes in 2 superclasses, 20 train / 8 test images of 16x16" in capsys.readouterr().out
    train, test = load_train_test(parse_data_spec(f"synthetic:{tmp_path}"))
    assert len(train) == 20 and len(test) == 8


def test_a_validation_split_is_held_out_of_training_per_class_and_always_the_same(tmp_path):
    import numpy as np

    from dkd_tune.data import load_splits

    spec = parse_data_spec({"name": "synthetic", "root": str(tmp_path), "generate": SMALL, "validation": 3})
    full, _ = load_train_test(
        parse_data_spec({"name": "synthetic", "root": str(tmp_path), "generate": SMALL})
    )
    train, validation, _test = load_splits(spec)
    assert len(validation) == 3 * full.num_classes and len(train) + len(validation) == len(full)
    assert np.bincount(validation.labels.numpy()).tolist() == [3] * full.num_classes
    # Disjoint and together the original training split: no image both trains and selects.
    held = {bytes(image.numpy()) for image in validation.images}
    kept = {bytes(image.numpy()) for image in train.images}
    assert not held & kept and held | kept == {bytes(image.numpy()) for image in full.images}
    again = load_splits(spec)[1]
    assert torch.equal(again.images, validation.images)  # a fixed split: every run and teacher selects alike
    assert len(load_train_test(spec)[0]) == len(train)  # train without the held-out images everywhere
    with pytest.raises(UserInputError, match="validation 999 images per class leaves no training image"):
        load_splits(
            parse_data_spec(
                {"name": "synthetic", "root": str(tmp_path), "generate": SMALL, "validation": 999}
            )
        )
    for bad in (-1, 1.5, True):
        with pytest.raises(UserInputError, match=r"validation .* must be a non-negative integer"):
            parse_data_spec({"name": "synthetic", "root": str(tmp_path), "validation": bad})
