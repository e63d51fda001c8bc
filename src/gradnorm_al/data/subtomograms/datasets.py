"""The datasets ``subtomograms`` (files) and ``subtomograms-sim`` (simulated in memory).

Items are ``(volume float32 [1, D, H, W], label)``; every volume is normalised on its own to zero
mean and unit standard deviation over its voxels (subtomograms from different tomograms differ in
scale and offset). All volumes are held in memory (4 bytes per voxel: 128 KiB per 32^3 volume).

``subtomograms --data-root ROOT`` reads, in this order of preference:

1. ``ROOT`` an ``.npz`` file: arrays ``volumes`` [N, D, H, W] (or [N, 1, D, H, W]), ``labels``
   [N] (integers 0..K-1) and optionally ``class_names`` [K] (strings); split as in 4;
2. ``ROOT/train.npz`` and ``ROOT/test.npz`` (same keys): the pool and the test set;
3. ``ROOT/train/<class>/*.mrc`` and ``ROOT/test/<class>/*.mrc`` (``.rec`` and ``.map`` too;
   the same class folders in both): the pool and the test set;
4. ``ROOT/<class>/*.mrc`` (what ``gradnorm-al simulate-subtomograms`` writes): a seeded
   stratified split, :data:`TEST_FRACTION` of each class to the test set
   (:func:`~gradnorm_al.data.folders.stratified_split`, seed :data:`SPLIT_SEED`).

Classes are the sorted folder names. All volumes must have one size, and one voxel size where
their headers set it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..base import DATASETS, DatasetBundle, tensor_dataset
from ..folders import class_folders, stratified_split
from .files import list_volume_files, read_npz, read_volumes
from .simulate import SimulationParams, simulate_subtomograms

TEST_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_MODEL = "cnn3d"

#: the simulated sets behind ``subtomograms-sim`` (the CPU demo's data: 1,000 volumes of 16^3
#: voxels of 12 A, the same 192 A box as the 32^3 default at half the sampling, so that a demo of
#: 9 runs trains in minutes on 2 cores; SNR 0.1, twice the simulator's default, so that a small
#: CNN learns from 80-320 volumes) and ``subtomograms-sim-large`` (a GPU-scale set: every built-in
#: class, 12,000 volumes of 32^3 at the default SNR 0.05)
SIM_PARAMS = SimulationParams(
    classes=5, per_class=200, size=16, voxel_size=12.0, resolution=24.0, snr=0.1, seed=0
)
SIM_LARGE_PARAMS = SimulationParams(classes=8, per_class=1500, size=32, snr=0.05, seed=0)


def _bundle(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: tuple[str, ...],
) -> DatasetBundle:
    (x_train, y_train), (x_test, y_test) = train, test
    train_set = tensor_dataset(x_train, y_train)
    return DatasetBundle(
        name=name,
        train=train_set,
        train_eval=train_set,
        test=tensor_dataset(x_test, y_test),
        train_targets=y_train,
        test_targets=y_test,
        num_classes=len(class_names),
        in_channels=1,
        image_size=tuple(x_train.shape[2:]),
        default_model=DEFAULT_MODEL,
        class_names=class_names,
    )


def split_arrays(
    volumes: np.ndarray, labels: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The seeded stratified split of one set: ((train volumes, labels), (test volumes, labels))."""
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return (volumes[train_idx], labels[train_idx]), (volumes[test_idx], labels[test_idx])


def _npz_classes(path: Path, labels: np.ndarray, names: tuple[str, ...] | None) -> tuple[str, ...]:
    k = int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        return tuple(str(i) for i in range(k))
    if k > len(names) or (len(labels) and labels.min() < 0):
        bad = labels[(labels < 0) | (labels >= len(names))][0]
        raise DataError(
            f"{path}: label {int(bad)} is not a class in [0, {len(names)}) of 'class_names'; "
            "fix the labels or the class names"
        )
    return names


def _same_shape(a: np.ndarray, b: np.ndarray, where_a: object, where_b: object) -> None:
    if a.shape[2:] != b.shape[2:]:
        raise DataError(
            f"{where_b}: volumes of size {b.shape[2:]} but {where_a} has {a.shape[2:]}; all "
            "volumes must have one size: crop or resample them"
        )


@DATASETS.register("subtomograms")
def load_subtomograms(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """Subtomograms from MRC files in class folders or from ``.npz`` arrays (module docstring)."""
    name = "subtomograms"
    if root is None:
        raise DataError(
            f"{name} needs --data-root (a folder of class folders of .mrc files, train/ and "
            "test/ such folders, train.npz and test.npz, or an .npz file)"
        )
    if root.is_file() or root.suffix == ".npz":
        if not root.is_file():
            raise DataError(f"{name}: {root} not found; give an existing .npz file or folder")
        volumes, labels, names = read_npz(root)
        classes = _npz_classes(root, labels, names)
        return _bundle(name, *split_arrays(volumes, labels), classes)
    if not root.is_dir():
        raise DataError(f"{name}: {root} not found; --data-root must be a folder or an .npz file")
    if (root / "train.npz").is_file() and (root / "test.npz").is_file():
        parts = [read_npz(root / f"{s}.npz") for s in ("train", "test")]
        (x_tr, y_tr, n_tr), (x_te, y_te, n_te) = parts
        if n_tr != n_te:
            raise DataError(
                f"{root}: train.npz and test.npz have different class_names; give both the same"
            )
        _same_shape(x_tr, x_te, root / "train.npz", root / "test.npz")
        both = np.concatenate([y_tr, y_te])
        classes = _npz_classes(root / "train.npz", both, n_tr)
        return _bundle(name, (x_tr, y_tr), (x_te, y_te), classes)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_classes, train_files, y_tr = list_volume_files(root / "train")
        test_classes = class_folders(root / "test")
        if test_classes != train_classes:
            raise DataError(
                f"{root}: the class folders of train/ ({', '.join(train_classes[:10])}) and "
                f"test/ ({', '.join(test_classes[:10])}) differ; both need the same class folders"
            )
        _, test_files, y_te = list_volume_files(root / "test")
        x_tr, _ = read_volumes(train_files + test_files)  # one size check over both
        x_te = x_tr[len(train_files) :]
        return _bundle(name, (x_tr[: len(train_files)], y_tr), (x_te, y_te), tuple(train_classes))
    classes, files, labels = list_volume_files(root)
    volumes, _ = read_volumes(files)
    return _bundle(name, *split_arrays(volumes, labels), tuple(classes))


@functools.lru_cache(maxsize=2)
def _simulated(params: SimulationParams) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from .files import normalise

    sim = simulate_subtomograms(params)
    volumes = np.stack([normalise(v, "simulated")[None] for v in sim.volumes])
    volumes.setflags(write=False)
    return volumes, sim.labels, sim.class_names


def simulated_bundle(params: SimulationParams, name: str) -> DatasetBundle:
    """The set ``params`` simulates (kept in memory, simulated once per process), split as a
    folder of class folders is (:func:`split_arrays`)."""
    volumes, labels, classes = _simulated(params)
    (x_tr, y_tr), (x_te, y_te) = split_arrays(volumes, labels)
    return _bundle(name, (x_tr, y_tr), (x_te, y_te), classes)  # indexing copies: writable


@DATASETS.register("subtomograms-sim")
def load_subtomograms_sim(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """:data:`SIM_PARAMS` simulated in memory (nothing read or written; ``root`` is ignored)."""
    return simulated_bundle(SIM_PARAMS, "subtomograms-sim")


@DATASETS.register("subtomograms-sim-large")
def load_subtomograms_sim_large(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """:data:`SIM_LARGE_PARAMS` simulated in memory (``root`` is ignored)."""
    return simulated_bundle(SIM_LARGE_PARAMS, "subtomograms-sim-large")
