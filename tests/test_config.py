"""The search-space schema: a valid file loads into typed objects; `--set` overrides; each mistake is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dkd_tune.config.loading import load_search_space
from dkd_tune.config.overrides import apply_set_override
from dkd_tune.core.errors import UserInputError
from dkd_tune.models import create_model, save_model


@pytest.fixture
def valid(tmp_path) -> dict:
    checkpoint = tmp_path / "teacher.pth"
    save_model(
        checkpoint,
        create_model("resnet20", 10),
        arch="resnet20",
        num_classes=10,
        dataset="synthetic",
        input_size=32,
    )
    return {
        "name": "unit",
        "data": {
            "name": "synthetic",
            "root": str(tmp_path / "data"),
            "generate": {"classes": 10, "superclasses": 5},
        },
        "student": "resnet8",
        "recipe": "cifar100",
        "overrides": {"epochs": 10, "warmup_epochs": 2},
        "teachers": [
            {"model": "resnet20", "checkpoint": str(checkpoint), "space": {"beta": {"loguniform": [1, 8]}}},
            {"name": "trained", "model": "wrn_16_2", "train": {"overrides": {"epochs": 5}}},
        ],
        "space": {"alpha": 1.0, "temperature": {"choice": [2, 4]}, "warmup_epochs": {"int": [0, 5]}},
        "scheduler": {"grace_period": 2, "max_t": 10},
    }


def write(tmp_path: Path, content) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def test_a_valid_file_loads_into_typed_objects(tmp_path, valid):
    space = load_search_space(write(tmp_path, valid))
    first, second = space.teachers
    assert first.label == "resnet20" and second.label == "trained"
    assert space.space_for(first)["beta"].kind == "loguniform"
    assert space.space_for(first)["temperature"].choice == [2, 4]
    assert space.space_for(first)["alpha"].fixed == 1.0  # a bare value means fixed
    assert "beta" not in space.space_for(second)
    recipe = space.base_recipe(first)
    assert recipe.epochs == 10 and recipe.warmup_epochs == 2 and recipe.beta == 8.0
    assert space.max_epochs() == 10


def test_set_overrides_reach_any_field(tmp_path, valid):
    path = write(tmp_path, valid)
    space = load_search_space(
        path,
        [
            "search.num_samples=3",
            "epochs=12",
            "teachers.0.space.beta={loguniform: [2, 4]}",
            "scheduler.max_t=12",
        ],
    )
    assert space.search.num_samples == 3
    assert space.base_recipe(space.teachers[0]).epochs == 12
    assert space.space_for(space.teachers[0])["beta"].loguniform == (2.0, 4.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.update(studnet="resnet8"), r"studnet: unknown key 'studnet'; did you mean 'student'\?"),
        (
            lambda v: (
                v["search"].update(algoritm="optuna") if "search" in v else v.update(search={"algoritm": "x"})
            ),
            "did you mean 'algorithm'",
        ),
        (lambda v: v.update(student="resnet3x4"), r"student: unknown model 'resnet3x4'"),
        (
            lambda v: v["teachers"][0]["space"].update(beta={"uniform": [-1, 2]}),
            "beta = -1.0 is not valid; expected a number >= 0",
        ),
        (
            lambda v: v["space"].update(temperature={"choice": [0, 4]}),
            "temperature = 0.0 is not valid; expected a number > 0",
        ),
        (
            lambda v: v["space"].update(warmup_epochs={"int": [0, 50]}),
            r"warmup_epochs = 50 is not valid; expected an integer in \[0, epochs=10\]",
        ),
        (lambda v: v.update(resources={"gpu": 0.5, "workers": 2}), "each DDP worker needs a whole GPU"),
        (lambda v: v.update(resources={"gpu": 1.5}), "must be a whole number"),
        (lambda v: v.update(scheduler={"grace_period": 20}), "grace_period: 20 is more than max_t"),
        (
            lambda v: v["teachers"][0].update(checkpoint="/nonexistent/t.pth"),
            "teachers\\[0\\].checkpoint: file '/nonexistent/t.pth' not found",
        ),
        (
            lambda v: v.update(data="cifar100:/nonexistent"),
            "/nonexistent/cifar-100-python/train: missing file",
        ),
        (lambda v: v["space"].update(betta=1.0), "cannot search 'betta'; did you mean 'beta'?"),
        (lambda v: v["space"].update(beta={"uniform": [1, 2], "choice": [1]}), "give exactly one of"),
        (lambda v: v["space"].update(epochs={"uniform": [1, 2]}), "epochs is an integer"),
        (lambda v: v.update(loss="dkdd"), "loss = 'dkdd'"),
    ],
)
def test_each_mistake_is_one_line_naming_file_and_key(tmp_path, valid, change, message):
    change(valid)
    path = write(tmp_path, valid)
    with pytest.raises(UserInputError, match=message) as caught:
        load_search_space(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and "\n" not in text


def test_syntax_errors_and_empty_and_binary_files(tmp_path):
    for content, message in [
        ("name: [unclosed\n", "YAML syntax error at line"),
        ("", "file is empty"),
        ("- just\n- a list\n", "top level is a list"),
    ]:
        with pytest.raises(UserInputError, match=message):
            load_search_space(write(tmp_path, content))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00")
    with pytest.raises(UserInputError, match="is not UTF-8"):
        load_search_space(binary)
    with pytest.raises(UserInputError, match="file not found"):
        load_search_space(tmp_path / "missing.yaml")


def test_set_override_errors():
    raw = {"teachers": [{"model": "x"}]}
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        apply_set_override(raw, "epochs")
    with pytest.raises(UserInputError, match="not an index"):
        apply_set_override(raw, "teachers.3.model=y")
    apply_set_override(raw, "teachers.0.model=resnet8")
    assert raw["teachers"][0]["model"] == "resnet8"


def test_yaml_is_loaded_safely(tmp_path, valid):
    # A python/object tag would construct an object under yaml.load; safe_load refuses it.
    text = yaml.safe_dump(valid) + "evil: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(UserInputError, match="YAML syntax error"):
        load_search_space(write(tmp_path, text))


def test_the_data_short_form_takes_the_same_overrides_as_the_mapping(tmp_path, valid):
    """`data: cifar100:PATH` with `--set data.download=true`: the form the missing-data message suggests."""
    valid["data"] = f"cifar100:{tmp_path / 'nothing_here'}"
    valid["teachers"] = [
        {"model": "resnet8", "train": {}}
    ]  # CIFAR-100 has 100 classes, the fixture's checkpoint 10
    path = write(tmp_path, valid)
    with pytest.raises(UserInputError, match=r"--set data\.download=true") as error:
        load_search_space(path)
    assert "\n" not in str(error.value)
    space = load_search_space(path, ["data.download=true", "data.augment=none"])
    assert space.data_spec.name == "cifar100" and space.data_spec.download is True
    assert space.data_spec.augment == "none" and space.data_spec.root == tmp_path / "nothing_here"
    # A string that is no short form gets no keys: one line.
    with pytest.raises(UserInputError, match="data is not a mapping"):
        apply_set_override({"data": "not-a-spec"}, "data.download=true")


def test_a_recipe_field_at_the_top_level_is_suggested_as_one(tmp_path, valid):
    path = write(tmp_path, valid)
    with pytest.raises(UserInputError, match=r"did you mean 'epochs'\? \(a recipe field") as error:
        load_search_space(path, ["epoch=120"])
    assert "--set epochs=VALUE" in str(error.value)
    with pytest.raises(UserInputError, match=r"did you mean 'search'\?$"):
        load_search_space(path, ["serch.num_samples=3"])


def test_the_schema_table_lists_every_key_and_every_recipe_field():
    from pydantic import BaseModel

    from dkd_tune.config.schema import SearchSpaceFile
    from dkd_tune.config.schema_table import schema_rows
    from dkd_tune.core.recipes import RECIPE_FIELD_MEANINGS, RECIPE_FIELDS

    rows = {row.key: row for row in schema_rows()}
    assert set(RECIPE_FIELD_MEANINGS) == set(RECIPE_FIELDS)
    for name in RECIPE_FIELDS:
        assert f"overrides.{name}" in rows and rows[f"overrides.{name}"].meaning
    assert rows["overrides.beta"].type == "float" and rows["overrides.epochs"].default == "240 (cifar100)"
    # Every field of every model the file holds is a row, with a meaning.
    for name in SearchSpaceFile.model_fields:
        assert name in rows and rows[name].meaning, name
    assert {
        "teachers[].model",
        "space.<name>.loguniform",
        "scheduler.grace_period",
        "data.validation",
    } <= set(rows)
    nested = [row for row in rows.values() if not row.meaning]
    assert nested == [], [row.key for row in nested]
    assert all(not isinstance(row.default, BaseModel) for row in rows.values())
    assert rows["loss"].type == "ce | kd | dkd | tckd | nckd"


def test_the_schema_command_prints_the_table_and_json_on_request():
    import json
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "schema"], capture_output=True, text=True, check=True
    ).stdout
    for key in ("overrides.temperature", "overrides.warmup_epochs", "teachers[].checkpoint", "metric"):
        assert key in table
    assert "Uniform float in [low, high]." in table  # printed as text, not eaten as rich markup
    assert len(table.splitlines()) < 260
    schema = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dkd_tune", "schema", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert "teachers" in schema["properties"]


def test_an_override_of_a_searched_field_fixes_it_everywhere_and_says_so(tmp_path):
    """`--set beta=2` on a file whose space searches beta (here `beta: auto`) runs beta 2 for every
    teacher, and the note says what it replaced; an unsearched field is a plain recipe override."""
    from dkd_tune.config.loading import load_search_space

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "search_spaces" / "demo.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "data")
    raw["teachers"][0]["space"] = {"beta": {"loguniform": [0.5, 4]}}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    notes: list[str] = []
    space = load_search_space(path, ["beta=2", "epochs=12"], notes)
    teacher = space.teachers[0]
    assert space.space_for(teacher)["beta"].kind == "fixed" and space.space_for(teacher)["beta"].fixed == 2
    assert space.base_recipe(teacher).beta == 2 and space.base_recipe(teacher).epochs == 12
    assert notes == [
        "--set beta=2: beta is fixed at 2 for every teacher (the file searched it: auto, {loguniform: [0.5, 4]})"
    ]


def test_an_unquoted_yaml_on_or_off_for_the_logit_cache_is_the_word_the_user_wrote(tmp_path):
    import yaml

    from dkd_tune.config.schema import TeacherLogitCacheConfig

    for written, meant in (("on", "on"), ("off", "off"), ("auto", "auto")):
        parsed = yaml.safe_load(f"teacher_logits: {written}")  # YAML 1.1: on/off are booleans
        assert TeacherLogitCacheConfig(**parsed).teacher_logits == meant
