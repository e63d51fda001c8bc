"""Image-folder datasets (caltech101, imagenet, imagefolder) and the CIFAR checksum guarantee.

Every test writes tiny real image files (PIL JPEG/PNG) or archives in the exact on-disk layouts,
so nothing is downloaded. Where a reader verifies official md5 checksums, the tests replace only
the official values (by those of the files they wrote): the check itself still runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import gradnorm_al.data.folders as folders  # registers the three readers
from gradnorm_al.data import DATASETS, load_dataset
from gradnorm_al.data.folders import (
    CALTECH_SPLIT_SEED,
    CALTECH_TEST_FRACTION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_imagefolder,
    stratified_split,
)
from gradnorm_al.errors import DataError

# ---------------------------------------------------------------------------------------------
# writers


def write_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Path:
    """A small random image in ``mode``; the format follows the suffix (JPEG, PNG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_caltech(root: Path, counts: dict[str, int], grey: tuple[str, int] | None = None) -> Path:
    """torchvision's Caltech-101 layout; ``grey`` = (category, number) of one greyscale JPEG."""
    folder = root / "caltech101" / "101_ObjectCategories"
    seed = 0
    for category, n in counts.items():
        for i in range(1, n + 1):
            seed += 1
            mode = "L" if grey == (category, i) else "RGB"
            write_image(folder / category / f"image_{i:04d}.jpg", seed, mode=mode)
    return folder


CALTECH_COUNTS = {
    "BACKGROUND_Google": 3,  # not a class
    "Faces": 5,
    "accordion": 6,
    "Motorbikes": 10,
}
CALTECH_CLASSES = ["Faces", "Motorbikes", "accordion"]  # sorted: capitals first, as torchvision


def reference_eval(path: str, size: int = 224, resize: int = 256) -> torch.Tensor:
    """The evaluation view by torchvision's own transforms, from the file itself."""
    from PIL import Image
    from torchvision import transforms as T

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(rgb)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean


def paths_of(dataset) -> list[str]:
    return [dataset.path(i) for i in range(len(dataset))]


def check_augmentation(bundle) -> None:
    """The pool view is a random 224 crop (+ flip) with the evaluation view's label."""
    from torchvision import transforms as T

    kinds = [type(t) for t in bundle.train.transform.transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert bundle.train.transform.transforms[0].size == (224, 224)
    torch.manual_seed(0)
    first, label = bundle.train[0]
    second, _ = bundle.train[0]
    assert first.shape == (3, 224, 224) and first.dtype == torch.float32
    assert label == bundle.train_eval[0][1] == bundle.train_targets[0]
    assert not torch.equal(first, second)  # random crops of a random image
    assert paths_of(bundle.train) == paths_of(bundle.train_eval)


# ---------------------------------------------------------------------------------------------
# the split


def test_stratified_split_counts_and_cover() -> None:
    targets = np.array([2] * 10 + [0] * 5 + [1] * 31 + [3] * 2 + [4] * 1)
    rng = np.random.default_rng(0)
    targets = targets[rng.permutation(len(targets))]  # classes interleaved
    train, test = stratified_split(targets, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(targets)))
    assert np.intersect1d(train, test).size == 0
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    # round(0.2 n), at least 1 (n >= 2), at most n - 1; a single image stays in training
    expected = {0: 1, 1: 6, 2: 2, 3: 1, 4: 0}
    assert {c: int((targets[test] == c).sum()) for c in range(5)} == expected
    again = stratified_split(targets, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = stratified_split(targets, 0.2, seed=1)
    assert not np.array_equal(other[1], test)


def test_stratified_split_known_answer() -> None:
    # pinned: the published Caltech-101 split depends on exactly this procedure staying the same
    targets = np.array([0] * 5 + [1] * 10)
    train, test = stratified_split(targets, 0.2, seed=0)
    first = np.random.RandomState(0).permutation(5)[:1]  # class 0, then class 1 from one stream
    rs = np.random.RandomState(0)
    rs.permutation(5)
    second = rs.permutation(10)[:2] + 5
    assert test.tolist() == sorted([*first.tolist(), *second.tolist()]) == [2, 10, 11]
    assert train.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14]


def test_stratified_split_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.zeros(4, dtype=np.int64), 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# caltech101


def test_caltech101_loads(tmp_path: Path) -> None:
    folder = write_caltech(tmp_path, CALTECH_COUNTS, grey=("accordion", 2))
    (folder / "Faces" / ".DS_Store").write_bytes(b"\0")  # not an image: ignored
    write_image(folder / ".hidden" / "image_0001.jpg", 99)  # hidden folder: not a class
    bundle = load_dataset("caltech101", tmp_path)

    assert bundle.name == "caltech101"
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, (224, 224))
    assert bundle.default_model == "resnet18"
    # 5, 10 and 6 images: round(0.2 n) = 1, 2 and 1 test images; no background image anywhere
    assert np.bincount(bundle.test_targets).tolist() == [1, 2, 1]
    assert np.bincount(bundle.train_targets).tolist() == [4, 8, 5]
    assert bundle.pool_size == 17 and len(bundle.test) == 4
    train_paths, test_paths = paths_of(bundle.train_eval), paths_of(bundle.test)
    assert not set(train_paths) & set(test_paths)
    assert len(set(train_paths) | set(test_paths)) == 21
    for paths, targets in ((train_paths, bundle.train_targets), (test_paths, bundle.test_targets)):
        assert [CALTECH_CLASSES[t] for t in targets] == [Path(p).parent.name for p in paths]
        assert all("BACKGROUND_Google" not in p for p in paths)
    assert bundle.train_targets.dtype == np.int64 and bundle.test_targets.dtype == np.int64

    # evaluation views: exactly torchvision's Resize(256) + CenterCrop(224) + normalisation
    for dataset in (bundle.train_eval, bundle.test):
        image, label = dataset[1]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert label == dataset.targets[1]
        torch.testing.assert_close(image, reference_eval(dataset.path(1)), rtol=0, atol=1e-5)
    check_augmentation(bundle)

    # the greyscale JPEG comes out as RGB with three equal channels
    grey_path = str(folder / "accordion" / "image_0002.jpg")
    view = bundle.train_eval if grey_path in train_paths else bundle.test
    image, _ = view[paths_of(view).index(grey_path)]
    raw = unnormalise(image)
    torch.testing.assert_close(raw[0], raw[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(raw[0], raw[2], rtol=0, atol=1e-5)


def test_caltech101_split_identical_across_loads(tmp_path: Path) -> None:
    write_caltech(tmp_path, CALTECH_COUNTS)
    first, second = load_dataset("caltech101", tmp_path), load_dataset("caltech101", tmp_path)
    assert paths_of(first.train_eval) == paths_of(second.train_eval)
    assert paths_of(first.test) == paths_of(second.test)
    assert np.array_equal(first.train_targets, second.train_targets)
    # and it is stratified_split(labels, 0.2, seed 0) of the full, torchvision-ordered list
    _, paths, labels = folders.caltech101_samples(tmp_path / "caltech101" / "101_ObjectCategories")
    train_idx, test_idx = stratified_split(labels, CALTECH_TEST_FRACTION, CALTECH_SPLIT_SEED)
    assert [os.path.relpath(p, first.test.root) for p in paths_of(first.test)] == [
        paths[i] for i in test_idx
    ]
    assert len(train_idx) == first.pool_size


def test_caltech101_order_and_labels_match_torchvision(tmp_path: Path) -> None:
    import torchvision.datasets

    folder = write_caltech(tmp_path, CALTECH_COUNTS)
    categories, paths, labels = folders.caltech101_samples(folder)
    reference = torchvision.datasets.Caltech101(str(tmp_path))
    assert categories == reference.categories == CALTECH_CLASSES
    assert labels.tolist() == reference.y
    expected = [
        os.path.join(categories[y], f"image_{i:04d}.jpg")
        for y, i in zip(reference.y, reference.index)
    ]
    assert paths == expected


@pytest.mark.parametrize(
    "where", ["root", "caltech101", "101_ObjectCategories", "caltech-101", "bare"]
)
def test_caltech101_root_variants(tmp_path: Path, where: str) -> None:
    counts = {"a": 2, "b": 3}
    if where == "caltech-101":  # the zip's own folder name, unpacked by hand
        write_caltech(tmp_path, counts)
        (tmp_path / "caltech101").rename(tmp_path / "caltech-101")
        root = tmp_path
    elif where == "bare":  # root/101_ObjectCategories
        write_caltech(tmp_path, counts)
        (tmp_path / "caltech101" / "101_ObjectCategories").rename(tmp_path / "101_ObjectCategories")
        root = tmp_path
    else:
        write_caltech(tmp_path, counts)
        root = {
            "root": tmp_path,
            "caltech101": tmp_path / "caltech101",
            "101_ObjectCategories": tmp_path / "caltech101" / "101_ObjectCategories",
        }[where]
    bundle = load_dataset("caltech101", root)
    assert bundle.num_classes == 2 and bundle.pool_size + len(bundle.test) == 5


def test_caltech101_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("caltech101", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "101_ObjectCategories" in message
    assert "--download" in message and "\n" not in message
    with pytest.raises(DataError, match="--data-root DIR"):
        load_dataset("caltech101", None)


def test_caltech101_empty_category(tmp_path: Path) -> None:
    folder = write_caltech(tmp_path, {"a": 2, "b": 2})
    (folder / "c").mkdir()
    (folder / "c" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"no image files in class folder\(s\) c") as info:
        load_dataset("caltech101", tmp_path)
    assert "\n" not in str(info.value)


def test_caltech101_unreadable_image(tmp_path: Path) -> None:
    folder = write_caltech(tmp_path, {"a": 2, "b": 2})
    bad = folder / "a" / "image_0001.jpg"
    bad.write_bytes(b"not a jpeg")
    bundle = load_dataset("caltech101", tmp_path)  # lazy: only reading the item fails
    view = bundle.train_eval if str(bad) in paths_of(bundle.train_eval) else bundle.test
    with pytest.raises(DataError, match="cannot read image") as info:
        view[paths_of(view).index(str(bad))]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_caltech101_download(tmp_path: Path, monkeypatch) -> None:
    import urllib.error

    import torchvision.datasets

    def offline(self) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.Caltech101, "download", offline)
    with pytest.raises(DataError, match="download into .* failed") as info:
        load_dataset("caltech101", tmp_path, download=True)
    assert "\n" not in str(info.value)

    def fake_download(self) -> None:  # what torchvision's download leaves in root/caltech101
        write_caltech(Path(self.root).parent, {"BACKGROUND_Google": 1, "a": 2, "b": 3})

    monkeypatch.setattr(torchvision.datasets.Caltech101, "download", fake_download)
    assert load_dataset("caltech101", tmp_path, download=True).num_classes == 2

    def no_network(self) -> None:
        raise AssertionError("should not download: the files are there")

    monkeypatch.setattr(torchvision.datasets.Caltech101, "download", no_network)
    assert load_dataset("caltech101", tmp_path, download=True).num_classes == 2


# ---------------------------------------------------------------------------------------------
# imagenet


def write_imagenet_split(folder: Path, per_class: dict[str, int], seed: int) -> None:
    for wnid, n in per_class.items():
        for i in range(n):
            seed += 1
            write_image(folder / wnid / f"{wnid}_{i}.JPEG", seed)


WNIDS = {"n01440764": 3, "n01443537": 2, "n01484850": 2}


@pytest.mark.parametrize("inside", [True, False])
def test_imagenet_folder_layout(tmp_path: Path, monkeypatch, inside: bool) -> None:
    base = tmp_path / "imagenet" if inside else tmp_path
    write_imagenet_split(base / "train", WNIDS, seed=0)
    write_imagenet_split(base / "val", {w: 1 for w in WNIDS}, seed=100)
    (base / "meta.bin").write_bytes(b"not read")  # torchvision's pickle: never loaded

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    bundle = load_dataset("imagenet", tmp_path)
    assert bundle.name == "imagenet"
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, (224, 224))
    assert bundle.default_model == "vgg16"
    assert bundle.train_targets.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert bundle.test_targets.tolist() == [0, 1, 2]
    assert all(Path(p).parent.parent == base / "val" for p in paths_of(bundle.test))
    image, label = bundle.test[2]
    assert label == 2 and image.shape == (3, 224, 224)
    torch.testing.assert_close(image, reference_eval(bundle.test.path(2)), rtol=0, atol=1e-5)
    check_augmentation(bundle)


def test_imagenet_matches_torchvision_imagefolder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    base = tmp_path / "imagenet"
    write_imagenet_split(base / "train", WNIDS, seed=0)
    write_image(base / "train" / "n01443537" / "sub" / "extra.png", 7)  # nested: included
    write_imagenet_split(base / "val", {w: 1 for w in WNIDS}, seed=100)
    bundle = load_dataset("imagenet", tmp_path)
    reference = ImageFolder(str(base / "train"))
    assert [p for p, _ in reference.samples] == paths_of(bundle.train_eval)
    assert reference.targets == bundle.train_targets.tolist()


def test_imagenet_class_mismatch(tmp_path: Path) -> None:
    base = tmp_path / "imagenet"
    write_imagenet_split(base / "train", WNIDS, seed=0)
    write_imagenet_split(base / "val", {"n01440764": 1, "n01443537": 1, "n09999999": 1}, seed=9)
    with pytest.raises(DataError) as info:
        load_dataset("imagenet", tmp_path)
    message = str(info.value)
    assert "only in train: n01484850" in message and "only in val: n09999999" in message
    assert "\n" not in message


def test_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no ImageNet found") as info:
        load_dataset("imagenet", tmp_path)
    assert "imagenet/train/<wnid>" in str(info.value) and "\n" not in str(info.value)
    write_imagenet_split(tmp_path / "imagenet" / "train", WNIDS, seed=0)
    with pytest.raises(DataError, match="val not found.*ILSVRC2012_img_val.tar"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="--data-root DIR"):
        load_dataset("imagenet", None)


def test_imagenet_flat_val_folder(tmp_path: Path) -> None:
    base = tmp_path / "imagenet"
    write_imagenet_split(base / "train", WNIDS, seed=0)
    write_image(base / "val" / "ILSVRC2012_val_00000001.JPEG", 1)  # unpacked, never sorted
    with pytest.raises(DataError, match="must be sorted into val/<wnid>/"):
        load_dataset("imagenet", tmp_path)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_imagenet_archives(folder: Path) -> list[int]:
    """The three official archives in miniature; returns the val labels (sorted wnid index)."""
    import scipy.io

    folder.mkdir(parents=True)
    # devkit: meta.mat with the synsets (leaves and one parent) and the val ground truth (IDs)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height"]
    fields.append("num_train_images")
    synsets = [
        (1, "n02000000", "dog, domestic dog", "-", 0, 0, 2),
        (2, "n01000000", "cat", "-", 0, 0, 2),
        (3, "n00000001", "animal", "-", 2, 1, 0),  # not a leaf: not a class
    ]
    array = np.array(synsets, dtype=[(f, "O") for f in fields]).reshape(-1, 1)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": array})
    val_ids = [2, 1, 1]  # val image 1 is a cat, images 2 and 3 dogs
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        truth = "".join(f"{i}\n" for i in val_ids).encode()
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    # train: one tar per wnid inside the big tar
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as tar:
        for k, wnid in enumerate(["n01000000", "n02000000"]):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(2):
                    _add(class_tar, f"{wnid}_{i}.JPEG", _jpeg_bytes(10 * k + i))
            _add(tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(len(val_ids)):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg_bytes(100 + i))
    wnid_of_id = {1: "n02000000", 2: "n01000000"}
    return [sorted(wnid_of_id.values()).index(wnid_of_id[i]) for i in val_ids]


@pytest.fixture
def imagenet_archives(tmp_path: Path, monkeypatch) -> tuple[Path, list[int]]:
    """The miniature archives, with torchvision's official md5s replaced by theirs."""
    from torchvision.datasets import imagenet as tv_imagenet

    folder = tmp_path / "imagenet"
    val_labels = write_imagenet_archives(folder)
    official = {
        split: (name, _md5(folder / name)) for split, (name, _) in tv_imagenet.ARCHIVE_META.items()
    }
    monkeypatch.setattr(tv_imagenet, "ARCHIVE_META", official)
    return folder, val_labels


def test_imagenet_unpacks_official_archives(tmp_path: Path, imagenet_archives, monkeypatch):
    import torchvision.datasets.utils

    folder, val_labels = imagenet_archives
    (folder / "meta.bin").write_bytes(b"a user's meta.bin: never read")
    checked, loaded = [], []
    real_md5, real_load = torchvision.datasets.utils.calculate_md5, torch.load

    def md5_spy(path, *args, **kwargs):
        checked.append(Path(path).name)
        return real_md5(path, *args, **kwargs)

    def load_spy(path, *args, **kwargs):
        loaded.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torchvision.datasets.utils, "calculate_md5", md5_spy)
    monkeypatch.setattr(torch, "load", load_spy)
    bundle = load_dataset("imagenet", tmp_path)
    assert bundle.num_classes == 2
    assert bundle.train_targets.tolist() == [0, 0, 1, 1]
    assert bundle.test_targets.tolist() == val_labels == [0, 1, 1]
    assert Path(bundle.test.path(0)).name == "ILSVRC2012_val_00000001.JPEG"
    assert {"ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar"} <= set(checked)
    assert "ILSVRC2012_img_val.tar" in checked
    # only the meta.bin made from the verified devkit, in a scratch folder, was unpickled
    assert len(loaded) == 1 and loaded[0].parent != folder and not loaded[0].exists()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["train", "val"]
    assert bundle.test[1][0].shape == (3, 224, 224)


@pytest.mark.parametrize("archive", ["ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar"])
def test_imagenet_tampered_archive(tmp_path: Path, imagenet_archives, archive: str) -> None:
    folder, _ = imagenet_archives
    path = folder / archive
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupted") as info:
        load_dataset("imagenet", tmp_path)
    assert archive in str(info.value) and "\n" not in str(info.value)
    assert not any(p.is_dir() for p in folder.iterdir() if p.name != "train")  # nothing left half


def test_imagenet_val_archive_needs_devkit(tmp_path: Path, imagenet_archives) -> None:
    folder, _ = imagenet_archives
    (folder / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(DataError, match="needs .*ILSVRC2012_devkit_t12.tar.gz"):
        load_dataset("imagenet", tmp_path)


# ---------------------------------------------------------------------------------------------
# imagefolder


def write_imagefolder(root: Path, test_name: str = "test") -> None:
    for split, n in (("train", 3), (test_name, 2)):
        for k, cls in enumerate(["zebra", "apple", "mango"]):
            for i in range(n):
                suffix = ".png" if i == 0 else ".jpg"
                write_image(root / split / cls / f"{i}{suffix}", 10 * k + i + (0 if n == 3 else 50))


def test_imagefolder_loads(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    write_image(tmp_path / "train" / "apple" / "rgba.png", 5, mode="RGBA", size=(300, 260))
    write_image(tmp_path / "test" / "mango" / "grey.jpg", 6, mode="L")
    bundle = load_dataset("imagefolder", tmp_path)
    assert bundle.name == "imagefolder"
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, (224, 224))
    assert bundle.default_model == "resnet18"
    # classes: sorted folder names (apple, mango, zebra)
    assert bundle.train_targets.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert bundle.test_targets.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert [Path(p).parent.name for p in paths_of(bundle.test)] == ["apple"] * 2 + ["mango"] * 3 + [
        "zebra"
    ] * 2
    # the large RGBA PNG (train 3) and the greyscale JPEG (test 4) as well as ordinary images
    for dataset, i in ((bundle.train_eval, 3), (bundle.train_eval, 5), (bundle.test, 4)):
        image, label = dataset[i]
        assert image.shape == (3, 224, 224) and label == dataset.targets[i]
        torch.testing.assert_close(image, reference_eval(dataset.path(i)), rtol=0, atol=1e-5)
    assert Path(bundle.train_eval.path(3)).name == "rgba.png"
    assert Path(bundle.test.path(4)).name == "grey.jpg"
    check_augmentation(bundle)


def test_imagefolder_val_and_image_size(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, test_name="val")
    bundle = load_imagefolder(tmp_path, image_size=64)
    assert bundle.image_size == (64, 64) and len(bundle.test) == 6
    image, _ = bundle.test[0]
    assert image.shape == (3, 64, 64)
    # evaluation resizes to round(64 * 256 / 224) = 73, then the centre crop
    torch.testing.assert_close(
        image, reference_eval(bundle.test.path(0), size=64, resize=73), rtol=0, atol=1e-5
    )
    assert bundle.train[0][0].shape == (3, 64, 64)
    with pytest.raises(DataError, match="image_size"):
        load_imagefolder(tmp_path, image_size=0)


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    (tmp_path / "test" / "mango").rename(tmp_path / "test" / "Mango")
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path)
    message = str(info.value)
    assert "only in train: mango" in message and "only in test: Mango" in message
    assert "\n" not in message


def test_imagefolder_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train") in message and str(tmp_path / "val") in message
    assert "train/<class>" in message and "\n" not in message
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders in .*train"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(DataError, match="--data-root DIR"):
        load_dataset("imagefolder", None)


def test_imagefolder_empty_class(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    for i in range(2):
        (tmp_path / "test" / "zebra" / f"{i}{'.png' if i == 0 else '.jpg'}").unlink()
    with pytest.raises(DataError, match=r"no image files in class folder\(s\) zebra"):
        load_dataset("imagefolder", tmp_path)


def test_readers_registered() -> None:
    assert {"caltech101", "imagenet", "imagefolder"} <= set(DATASETS.names())


# ---------------------------------------------------------------------------------------------
# CIFAR: no pickle is unpickled before its md5 matched the official one


def _cifar_batch(rng: np.random.Generator, n: int, label_key: str) -> dict:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {"batch_label": "b", label_key: labels, "data": data, "filenames": ["x.png"] * n}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [v // 5 for v in labels]
    return batch


def write_cifar(root: Path, name: str) -> Path:
    """Valid CIFAR-10 or CIFAR-100 python files (tiny), as pickled by the official archives."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{b}": _cifar_batch(rng, 2, "labels") for b in range(1, 6)}
        files["test_batch"] = _cifar_batch(rng, 2, "labels")
        files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        files = {split: _cifar_batch(rng, 3, "fine_labels") for split in ("train", "test")}
        files["meta"] = {
            "fine_label_names": [f"c{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)],
        }
    folder.mkdir(parents=True)
    for file_name, content in files.items():
        (folder / file_name).write_bytes(pickle.dumps(content))  # numpy data as raw bytes
    return folder


CIFAR_CASES = [
    ("cifar10", "CIFAR10", "data_batch_3"),
    ("cifar10", "CIFAR10", "test_batch"),
    ("cifar10", "CIFAR10", "batches.meta"),
    ("cifar100", "CIFAR100", "train"),
    ("cifar100", "CIFAR100", "test"),
    ("cifar100", "CIFAR100", "meta"),
]


@pytest.mark.parametrize(("name", "cls", "tampered"), CIFAR_CASES)
def test_cifar_tampered_file_is_never_unpickled(
    tmp_path: Path, monkeypatch, name: str, cls: str, tampered: str
) -> None:
    import torchvision.datasets
    import torchvision.datasets.utils

    folder = write_cifar(tmp_path, name)
    # the official checksums become those of the files written here; the md5 check still runs
    dataset_class = getattr(torchvision.datasets, cls)
    md5 = {p.name: _md5(p) for p in folder.iterdir()}
    monkeypatch.setattr(
        dataset_class, "train_list", [[f, md5[f]] for f, _ in dataset_class.train_list]
    )
    monkeypatch.setattr(
        dataset_class, "test_list", [[f, md5[f]] for f, _ in dataset_class.test_list]
    )
    meta = dict(dataset_class.meta, md5=md5[dataset_class.meta["filename"]])
    monkeypatch.setattr(dataset_class, "meta", meta)

    events: list[tuple[str, str]] = []
    real_md5, real_load = torchvision.datasets.utils.calculate_md5, pickle.load

    def md5_spy(path, *args, **kwargs):
        events.append(("md5", Path(path).name))
        return real_md5(path, *args, **kwargs)

    def load_spy(file, *args, **kwargs):
        events.append(("unpickle", Path(file.name).name))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torchvision.datasets.utils, "calculate_md5", md5_spy)
    monkeypatch.setattr(pickle, "load", load_spy)

    # the untouched files load, and each file is checksummed before it is unpickled
    bundle = load_dataset(name, tmp_path)
    assert bundle.pool_size == (10 if name == "cifar10" else 3)
    unpickled = {f for kind, f in events if kind == "unpickle"}
    assert unpickled == set(md5)
    for i, (kind, f) in enumerate(events):
        if kind == "unpickle":
            assert ("md5", f) in events[:i], f"{f} unpickled before its checksum was verified"

    # one flipped byte inside the image data: still a valid pickle, but refused, never unpickled
    path = folder / tampered
    data = bytearray(path.read_bytes())
    content = pickle.loads(bytes(data))  # our own file, just written
    if "data" in content:
        at = bytes(data).find(content["data"].tobytes()[:64]) + 10
    else:
        at = bytes(data).find(b"c1") + 1  # a class name in the meta file
    assert at > 10
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    pickle.loads(bytes(data))  # the tampering is invisible to the unpickler

    events.clear()
    with pytest.raises(DataError, match="not found or corrupted"):
        load_dataset(name, tmp_path)
    assert ("md5", tampered) in events
    assert ("unpickle", tampered) not in events
