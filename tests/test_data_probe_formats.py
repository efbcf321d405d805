"""STL-10 binary, Tiny-ImageNet folders and ImageFolder (ImageNet): round trips of files in the real formats, and errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dkd_tune.core.errors import UserInputError
from dkd_tune.data import Batch, imagenet_loaders, load_stl10, load_tiny_imagenet
from dkd_tune.data.dataset import resize_images


def write_stl10(root: Path, split="train", count=6, seed=0):
    """Write STL-10's binary format: per image 3 channels of 96x96 bytes, each column-major; labels 1..10."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)  # (N, C, row, col)
    labels = rng.integers(1, 11, count).astype(np.uint8)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # column-major within each channel
    labels.tofile(folder / f"{split}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return images, labels


def test_stl10_round_trip_at_full_and_reduced_size(tmp_path):
    images, labels = write_stl10(tmp_path, "test")
    full = load_stl10(tmp_path, "test", 96)
    assert torch.equal(full.images, torch.from_numpy(images))
    assert torch.equal(full.labels, torch.from_numpy(labels.astype(np.int64) - 1))
    assert full.class_names[0] == "airplane" and full.num_classes == 10 and full.name == "stl10"
    small = load_stl10(tmp_path / "stl10_binary", "test", 32)
    assert small.image_shape == (3, 32, 32)
    assert torch.equal(small.images, resize_images(torch.from_numpy(images), 32))


def test_resize_matches_pil_antialiased_bilinear_closely():
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    ours = resize_images(torch.from_numpy(image).permute(2, 0, 1)[None], 32)[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 2


def test_stl10_errors(tmp_path):
    with pytest.raises(UserInputError, match=r"stl10_binary: no such folder.*stl10_binary.tar.gz"):
        load_stl10(tmp_path, "train", 32)
    write_stl10(tmp_path, "train")
    folder = tmp_path / "stl10_binary"
    with pytest.raises(UserInputError, match=r"test_X.bin: missing file"):
        load_stl10(tmp_path, "test", 32)
    with pytest.raises(UserInputError, match="split 'unlabeled'"):
        load_stl10(tmp_path, "unlabeled", 32)
    (folder / "train_X.bin").write_bytes((folder / "train_X.bin").read_bytes()[:-5])
    with pytest.raises(UserInputError, match="not a whole number of 3x96x96 images"):
        load_stl10(tmp_path, "train", 32)
    write_stl10(tmp_path, "train")
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(UserInputError, match="3 labels for 6 images"):
        load_stl10(tmp_path, "train", 32)
    (folder / "train_y.bin").write_bytes(bytes([0, 1, 2, 3, 4, 5]))
    with pytest.raises(UserInputError, match=r"labels must be 1..10, found 0..5"):
        load_stl10(tmp_path, "train", 32)


WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as the real wnids.txt is


def write_tiny_imagenet(root: Path, per_class=2, val=4, side=64):
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tlemon\n")
    train = {}
    for wnid in WNIDS:
        (folder / "train" / wnid / "images").mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.png")
            train[(wnid, i)] = pixels
    lines, val_images = [], []
    for i in range(val):
        wnid = WNIDS[i % 3]
        pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)  # greyscale, as some real ones are
        Image.fromarray(pixels, mode="L").save(folder / "val" / "images" / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{wnid}\t0\t0\t10\t10")
        val_images.append((wnid, pixels))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return train, val_images


def test_tiny_imagenet_round_trip(tmp_path):
    train_pixels, val_images = write_tiny_imagenet(tmp_path)
    train = load_tiny_imagenet(tmp_path, "train", 64)
    assert train.num_classes == 3 and train.class_names == ["goldfish", "tabby", "lemon"]  # sorted wnids
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(train.images[0], torch.from_numpy(train_pixels[("n01", 0)]).permute(2, 0, 1))
    val = load_tiny_imagenet(tmp_path / "tiny-imagenet-200", "val", 32)
    assert val.image_shape == (3, 32, 32) and val.name == "tiny-imagenet"
    assert val.labels.tolist() == [sorted(WNIDS).index(wnid) for wnid, _ in val_images]
    full_val = load_tiny_imagenet(tmp_path, "val", 64)
    grey = torch.from_numpy(val_images[0][1])
    assert all(torch.equal(full_val.images[0, c], grey) for c in range(3))


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(UserInputError, match=r"tiny-imagenet-200: no such folder.*tiny-imagenet-200.zip"):
        load_tiny_imagenet(tmp_path, "train", 32)
    write_tiny_imagenet(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    with pytest.raises(UserInputError, match="split 'test'"):
        load_tiny_imagenet(tmp_path, "test", 32)
    annotations = folder / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text + "val_9.png\tn09\t0\t0\t1\t1\n")
    with pytest.raises(UserInputError, match=r"val_annotations.txt:5: class 'n09' is not in wnids.txt"):
        load_tiny_imagenet(tmp_path, "val", 32)
    annotations.write_text(text + "val_9.png\tn01\t0\t0\t1\t1\n")
    with pytest.raises(
        UserInputError, match=r"val_9.png: missing image listed in val_annotations.txt line 5"
    ):
        load_tiny_imagenet(tmp_path, "val", 32)
    annotations.write_text("garbage-line\n")
    with pytest.raises(UserInputError, match="expected 'FILENAME<TAB>WNID"):
        load_tiny_imagenet(tmp_path, "val", 32)
    annotations.unlink()
    with pytest.raises(UserInputError, match=r"val_annotations.txt: missing file"):
        load_tiny_imagenet(tmp_path, "val", 32)
    (folder / "train" / "n03" / "images" / "n03_0.png").write_bytes(b"not an image")
    with pytest.raises(UserInputError, match=r"n03_0.png: not a readable image"):
        load_tiny_imagenet(tmp_path, "train", 32)
    Image.new("RGB", (32, 32)).save(folder / "train" / "n03" / "images" / "n03_0.png")
    with pytest.raises(UserInputError, match=r"n03_0.png: image is 32x32, expected 64x64"):
        load_tiny_imagenet(tmp_path, "train", 32)
    for image in (folder / "train" / "n03" / "images").iterdir():
        image.unlink()
    with pytest.raises(UserInputError, match=r"holds no .JPEG images"):
        load_tiny_imagenet(tmp_path, "train", 32)
    (folder / "wnids.txt").unlink()
    with pytest.raises(UserInputError, match=r"wnids.txt: missing file"):
        load_tiny_imagenet(tmp_path, "train", 32)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(40, 60)), int(rng.integers(40, 60)))
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.jpg"
                )


def test_image_folder_round_trip_through_imagenet_loaders(tmp_path):
    write_image_folder(tmp_path)
    train, val = imagenet_loaders(tmp_path, 4, workers=0, seed=0, image_size=32)
    assert len(train) == 2 and len(val) == 2
    batches = list(train)
    assert all(isinstance(b, Batch) and b.view_ids is None for b in batches)
    assert batches[0].images.shape == (4, 3, 32, 32) and batches[0].images.dtype == torch.float32
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(6))
    labels = {int(i): int(y) for b in batches for i, y in zip(b.indices, b.labels, strict=True)}
    assert labels == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    val_batches = list(val)
    assert torch.cat([b.indices for b in val_batches]).tolist() == list(range(6))
    # Validation is deterministic: resize + center crop, within PIL rounding of torchvision's PIL pipeline.
    from torchvision import transforms

    from dkd_tune.data.dataset import IMAGENET_MEAN, IMAGENET_STD

    reference = transforms.Compose(
        [
            transforms.Resize(37),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    with Image.open(tmp_path / "val" / "cat" / "0.jpg") as image:
        expected = reference(image.convert("RGB"))
    assert (val_batches[0].images[0] - expected).abs().max() < 3 / 255 / min(IMAGENET_STD)
    # Training augmentation is deterministic for a seed and differs between epochs.
    again, _ = imagenet_loaders(tmp_path, 4, workers=0, seed=0, image_size=32)
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, list(again), strict=True))
    assert not torch.equal(next(iter(train)).images, batches[0].images)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserInputError, match=r"train: no such folder.*ImageFolder layout"):
        imagenet_loaders(tmp_path, 4, workers=0, seed=0)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(UserInputError, match=r"train: .*[Ff]ound no valid file"):
        imagenet_loaders(tmp_path, 4, workers=0, seed=0)
    other = tmp_path / "other"
    write_image_folder(other)
    (other / "val" / "dog" / "0.jpg").write_bytes(b"broken")
    _, val = imagenet_loaders(other, 4, workers=0, seed=0, image_size=32)
    with pytest.raises(UserInputError, match=r"dog/0.jpg: not a readable image"):
        list(val)
    write_image_folder(tmp_path / "third", classes=("a",))
    (tmp_path / "third" / "val" / "b").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "third" / "val" / "b" / "0.png")
    with pytest.raises(UserInputError, match="class folders differ from train/"):
        imagenet_loaders(tmp_path / "third", 4, workers=0, seed=0)
