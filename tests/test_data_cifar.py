"""CIFAR-100 pickle reader: round trip of written files, data specs, and one-line errors for each bad case."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.data import DataSpec, load_train_test, parse_data_spec
from dkd_tune.data.cifar import CifarSplit, read_cifar100, write_cifar100

HOW = "how-to-get-hint"


def tiny_split(count, seed, side=32, fine=6, coarse=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, fine, count)
    return CifarSplit(
        images=rng.integers(0, 256, (count, 3, side, side), dtype=np.uint8),
        fine_labels=labels,
        coarse_labels=labels % coarse,
        filenames=[f"img_{seed}_{i}.png" for i in range(count)],
    )


def write_tiny_cifar(root: Path, side=32) -> tuple[CifarSplit, CifarSplit]:
    train, test = tiny_split(20, 1, side), tiny_split(8, 2, side)
    write_cifar100(root, train, test, [f"fine{i}" for i in range(6)], ["coarseA", "coarseB"])
    return train, test


def test_round_trip_in_the_official_layout(tmp_path):
    train, test = write_tiny_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    # Read as most CIFAR code (torchvision included) reads the real release: str keys under latin1.
    with open(folder / "train", "rb") as file:
        raw = pickle.load(file, encoding="latin1")
    assert set(raw) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (20, 3072)
    # The row layout is CIFAR's: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert np.array_equal(raw["data"][0, 1024:2048].reshape(32, 32), train.images[0, 1])
    with open(folder / "meta", "rb") as file:
        assert pickle.load(file, encoding="latin1")["fine_label_names"] == [f"fine{i}" for i in range(6)]
    for root in (tmp_path, folder):  # the folder above cifar-100-python, or the folder itself
        train_set, test_set = read_cifar100(root, name="cifar100", how_to_get=HOW)
        assert torch.equal(train_set.images, torch.from_numpy(train.images))
        assert torch.equal(train_set.labels, torch.from_numpy(train.fine_labels))
        assert torch.equal(test_set.coarse_labels, torch.from_numpy(test.coarse_labels))
        assert train_set.class_names == [f"fine{i}" for i in range(6)] and train_set.num_classes == 6
        assert train_set.coarse_class_names == ["coarseA", "coarseB"]
        assert train_set.images.dtype == torch.uint8 and train_set.images.is_contiguous()
        assert test_set.mean == train_set.mean  # the test set is normalised with the training statistics


def test_reads_python2_style_pickles_with_bytes_keys_and_lists(tmp_path):
    """The real release was pickled by Python 2: protocol 2, bytes keys, labels as lists."""
    write_tiny_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    for name in ("train", "test", "meta"):
        with open(folder / name, "rb") as file:
            content = pickle.load(file, encoding="bytes")
        with open(folder / name, "wb") as file:
            pickle.dump(content, file, protocol=2)
    train_set, _ = read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    assert len(train_set) == 20


def test_non_32_pixel_images_are_read(tmp_path):
    write_tiny_cifar(tmp_path, side=16)
    train_set, _ = read_cifar100(tmp_path, name="synthetic", how_to_get=HOW)
    assert train_set.image_shape == (3, 16, 16)


def rewrite(path: Path, mutate):
    with open(path, "rb") as file:
        content = pickle.load(file, encoding="latin1")
    content = mutate(content)
    with open(path, "wb") as file:
        pickle.dump(content, file)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _set(key, value):
    def mutate(content):
        content[key] = value
        return content

    return mutate


def _drop(key):
    def mutate(content):
        del content[key]
        return content

    return mutate


BAD_CASES = {
    "missing key": ("train", _drop("fine_labels"), "missing key 'fine_labels'"),
    "not a dict": ("train", lambda c: [1, 2, 3], "expected a dict"),
    "data not an array": ("train", _set("data", [[0] * 3072] * 20), "expected a uint8 array"),
    "data wrong dtype": ("train", _set("data", np.zeros((20, 3072), np.float32)), "float32"),
    "data wrong shape": ("train", _set("data", np.zeros((20, 3000), np.uint8)), "(N, 3*S*S)"),
    "label count": ("test", _set("fine_labels", [0] * 7), "must be 8 integers"),
    "label out of range": ("train", _set("fine_labels", [0] * 19 + [6]), "outside [0, 6)"),
    "negative coarse label": ("train", _set("coarse_labels", [-1] + [0] * 19), "holds label -1"),
    "filenames count": ("train", _set("filenames", ["a"]), "one per image"),
    "meta names": ("meta", _set("fine_label_names", []), "non-empty list of names"),
    "pickled code": ("train", _set("data", Evil()), "refusing to construct builtins.print"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_file_gives_one_line_naming_the_path(tmp_path, case, capsys):
    write_tiny_cifar(tmp_path)
    file, mutate, fragment = BAD_CASES[case]
    path = tmp_path / "cifar-100-python" / file
    rewrite(path, mutate)
    with pytest.raises(UserInputError) as error:
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message and HOW in message
    assert "this must never run" not in capsys.readouterr().out


def test_missing_folder_file_and_unreadable_files(tmp_path):
    with pytest.raises(UserInputError, match=r"no such folder.*cifar-100-python/\{train,test,meta\}.*" + HOW):
        read_cifar100(tmp_path / "nowhere", name="cifar100", how_to_get=HOW)
    write_tiny_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    (folder / "test").unlink()
    with pytest.raises(UserInputError, match=f"{folder / 'test'}: missing file"):
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    (folder / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(UserInputError, match=f"{folder / 'test'}: not a CIFAR-100 pickle"):
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    data = (folder / "train").read_bytes()
    (folder / "test").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=f"{folder / 'test'}: .*truncated"):
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)


def test_train_and_test_image_sizes_must_agree(tmp_path):
    write_tiny_cifar(tmp_path)
    other = tmp_path / "other"
    write_tiny_cifar(other, side=16)
    (tmp_path / "cifar-100-python" / "test").write_bytes((other / "cifar-100-python" / "test").read_bytes())
    with pytest.raises(UserInputError, match="images are 16x16 but the training images are 32x32"):
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)


# --- data specs ----------------------------------------------------------------------------------


def test_string_and_mapping_specs_are_equivalent():
    from_string = parse_data_spec("cifar100:~/data")
    from_mapping = parse_data_spec({"name": "cifar100", "root": "~/data"})
    assert from_string == from_mapping == DataSpec("cifar100", Path.home() / "data")
    assert from_string.family == "cifar" and from_string.augment == "standard"
    full = parse_data_spec(
        {
            "name": "synthetic",
            "root": "./d",
            "augment": "autoaugment",
            "label_noise": 0.2,
            "noise_seed": 3,
            "generate": {"classes": 10, "image_size": 16},
        }
    )
    assert (
        full.family == "synthetic"
        and full.label_noise == 0.2
        and full.generate == {"classes": 10, "image_size": 16}
    )
    assert parse_data_spec("imagenet:/data/imagenet").family == "imagenet"
    assert len({full, parse_data_spec(dict(full.__dict__, root=str(full.root)))}) == 1  # hashable, by value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("cifar100", "expected NAME:PATH"),
        ("cifar10:~/data", "name 'cifar10' is not a known dataset"),
        ({"name": "cifar100"}, "needs the key 'root'"),
        ({"name": "cifar100", "root": "x", "downlaod": True}, "unknown key 'downlaod'"),
        ({"name": "cifar100", "root": "x", "download": "yes"}, "download 'yes' must be true or false"),
        ({"name": "synthetic", "root": "x", "download": True}, "cifar100 only"),
        ({"name": "cifar100", "root": "x", "augment": "randaugment"}, "augment 'randaugment'"),
        ({"name": "imagenet", "root": "x", "augment": "autoaugment"}, "not available for imagenet"),
        ({"name": "cifar100", "root": "x", "label_noise": 1.0}, "label_noise 1.0 must be a number in [0, 1)"),
        ({"name": "cifar100", "root": "x", "label_noise": "0.2"}, "label_noise '0.2'"),
        ({"name": "cifar100", "root": "x", "noise_seed": -1}, "noise_seed -1"),
        ({"name": "cifar100", "root": "x", "generate": {}}, "synthetic and synthetic-coco data only"),
        ({"name": "synthetic", "root": "x", "generate": {"colours": 3}}, "unknown key generate.colours"),
        ({"name": "synthetic", "root": "x", "generate": {"classes": "ten"}}, "generate.classes 'ten'"),
        ({"name": "coco", "root": "x", "augment": "autoaugment"}, "not available for detection data"),
        ({"name": "coco", "root": "x", "label_noise": 0.2}, "cifar100 and synthetic data, not coco"),
        ({"name": "synthetic-coco", "root": "x", "generate": {"classes": 5}}, "allowed keys: train_images"),
        (42, "got int"),
    ],
)
def test_bad_specs_name_the_source_and_the_value(value, fragment):
    with pytest.raises(UserInputError) as error:
        parse_data_spec(value, source="search.yaml: data")
    assert str(error.value).startswith("search.yaml: data: ") and fragment in str(error.value)


def test_load_train_test_reads_cifar_with_the_standard_statistics(tmp_path):
    write_tiny_cifar(tmp_path)
    train, test = load_train_test(parse_data_spec(f"cifar100:{tmp_path}"))
    assert train.name == "cifar100" and train.mean == (0.5071, 0.4867, 0.4408) and len(test) == 8
    assert train.label_noise_rate == 0.0 and train.clean_labels is None


def test_label_noise_is_applied_to_the_training_set_only(tmp_path):
    write_tiny_cifar(tmp_path)
    clean_train, clean_test = load_train_test(parse_data_spec(f"cifar100:{tmp_path}"))
    spec = parse_data_spec({"name": "cifar100", "root": str(tmp_path), "label_noise": 0.5, "noise_seed": 1})
    train, test = load_train_test(spec)
    assert torch.equal(test.labels, clean_test.labels)
    assert torch.equal(train.clean_labels, clean_train.labels)
    assert train.label_noise_rate == float((train.labels != clean_train.labels).double().mean()) > 0


def test_missing_cifar_explains_how_to_get_it(tmp_path):
    with pytest.raises(UserInputError, match=r"download: true.*cifar-100-python.tar.gz"):
        load_train_test(parse_data_spec(f"cifar100:{tmp_path}"))
    with pytest.raises(UserInputError, match="dkd-tune make-synthetic --out"):
        load_train_test(parse_data_spec(f"synthetic:{tmp_path}"))


def test_cli_error_is_one_line_exit_code_2(tmp_path):
    """A reader error reaching the CLI is one line, no traceback (via make-synthetic's bad parameters)."""
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "make-synthetic", "--out", str(tmp_path), "--classes", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "classes 1" in result.stderr


def test_download_true_uses_torchvision_and_reports_failures(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    calls = []

    class FakeCIFAR100:
        """Stands in for torchvision's downloader: writes the release's files, as the real one extracts them."""

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_tiny_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    spec = parse_data_spec({"name": "cifar100", "root": str(tmp_path / "data"), "download": True})
    train, _ = load_train_test(spec)
    assert calls == [(str(tmp_path / "data"), True, True)] and len(train) == 20
    load_train_test(spec)
    assert len(calls) == 1  # already there: no second download

    class Offline:
        def __init__(self, root, train, download):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(UserInputError) as error:
        load_train_test(
            parse_data_spec({"name": "cifar100", "root": str(tmp_path / "other"), "download": True})
        )
    assert "could not download CIFAR-100" in str(error.value) and "cifar-100-python.tar.gz" in str(
        error.value
    )
    assert "\n" not in str(error.value)


# Bytes that pickle reads as a length past the platform's limit (random garbage does this about 1%
# of the time): BINUNICODE8, BINBYTES8 and BYTEARRAY8 opcodes with an 8-byte length of 2^64 - 1.
@pytest.mark.parametrize("opcode", [b"\x8d", b"\x8e", b"\x96"])
def test_a_length_past_the_platform_s_limit_is_one_line(tmp_path, opcode):
    write_tiny_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(b"\x80\x04" + opcode + (2**64 - 1).to_bytes(8, "little"))
    with pytest.raises(UserInputError) as error:
        read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    assert (
        "\n" not in str(error.value) and str(path) in str(error.value) and "OverflowError" in str(error.value)
    )


def test_torchvisions_reader_opens_the_files_as_it_opens_the_release(tmp_path, monkeypatch):
    """torchvision's CIFAR100 reads our files with its own code; only its MD5 check of the official
    release's bytes is skipped (generated files cannot match those)."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets import cifar as torchvision_cifar

    monkeypatch.setattr(torchvision_cifar, "check_integrity", lambda *args, **kwargs: True)
    train, _ = write_tiny_cifar(tmp_path)
    dataset = CIFAR100(str(tmp_path), train=True, download=False)
    assert len(dataset) == 20 and dataset.classes == [f"fine{i}" for i in range(6)]
    assert dataset.targets == [int(v) for v in train.fine_labels]
    assert np.array_equal(dataset.data[0], train.images[0].transpose(1, 2, 0))


def test_files_with_bytes_keys_still_read(tmp_path):
    """The real release read with encoding="bytes" has bytes keys and names: the reader takes both."""
    train, _ = write_tiny_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    for name in ("train", "test", "meta"):
        rewrite(
            folder / name,
            lambda content: {
                key.encode(): [v.encode() for v in value] if key.endswith("names") else value
                for key, value in content.items()
            },
        )
    train_set, _ = read_cifar100(tmp_path, name="cifar100", how_to_get=HOW)
    assert torch.equal(train_set.images, torch.from_numpy(train.images))
    assert train_set.class_names == [f"fine{i}" for i in range(6)]
