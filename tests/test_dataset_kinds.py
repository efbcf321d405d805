"""The dataset kinds table: each dataset's storage, task, family and options in one row that callers ask."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dkd_tune.config.loading import load_search_space
from dkd_tune.core.errors import UserInputError
from dkd_tune.data.kinds import DATASET_KINDS, DATASET_NAMES
from dkd_tune.data.spec import parse_data_spec

PACKAGE = Path(__file__).resolve().parents[1] / "dkd_tune"


def test_every_dataset_a_spec_can_name_has_one_row_and_the_spec_asks_it():
    assert tuple(DATASET_KINDS) == DATASET_NAMES
    for name, kind in DATASET_KINDS.items():
        spec = parse_data_spec({"name": name, "root": "x"})
        assert spec.kind is kind
        assert (spec.family, spec.is_detection) == (kind.family, kind.task == "detection")
        assert kind.augmentations
        assert kind.is_detection or "{root}" in kind.how_to_get  # a classifier's hint names the folder
    assert {kind.storage for kind in DATASET_KINDS.values()} == {
        "cifar-pickle",
        "image-folder",
        "coco-folder",
    }


def test_no_module_but_the_table_branches_on_a_dataset_name():
    names = "|".join(re.escape(name) for name in DATASET_NAMES)
    branch = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "kinds.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"name": "imagenet", "label_noise": 0.1},
            "label_noise is available for cifar100 and synthetic data",
        ),
        ({"name": "coco", "download": True}, "download: true is available for cifar100 only"),
        (
            {"name": "cifar100", "generate": {"seed": 1}},
            "generate is available for synthetic and synthetic-coco",
        ),
        ({"name": "imagenet", "validation": 5}, "validation is available for cifar100, synthetic, coco, "),
        (
            {"name": "synthetic-coco", "generate": {"classes": 3}},
            "unknown key generate.classes; allowed keys: ",
        ),
    ],
)
def test_what_a_dataset_takes_is_read_from_its_row(fields, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        parse_data_spec({"root": "x", **fields}, source="data")


def write_space(tmp_path: Path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"name": "kinds", "data": data, "student": "resnet8", "loss": "ce"}))
    return path


@pytest.mark.parametrize("data", ["nosuchset:./data", {"name": "nosuchset", "root": "./data"}])
def test_both_forms_of_data_are_checked_by_the_one_data_spec_check(tmp_path, data):
    with pytest.raises(UserInputError) as error:
        load_search_space(write_space(tmp_path, data))
    assert str(error.value) == (
        f"{tmp_path / 'space.yaml'}: data: name 'nosuchset' is not a known dataset; expected one of "
        f"{', '.join(DATASET_NAMES)}"
    )


def test_the_search_file_and_the_data_spec_agree_on_every_value(tmp_path):
    # The schema used to accept what the data spec refused (a negative noise seed), and the other way round.
    with pytest.raises(UserInputError, match="noise_seed -1 must be a non-negative integer"):
        load_search_space(write_space(tmp_path, {"name": "synthetic", "root": "./data", "noise_seed": -1}))
