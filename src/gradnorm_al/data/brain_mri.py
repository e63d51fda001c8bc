"""``brain-mri``: axial slices of a real T1 brain MRI with atlas labels, offline from Debian.

Debian's ``mricron-data`` package (``apt-get install mricron-data``, 16 MB) installs, in
``/usr/share/mricron/templates``, the Colin27 single-subject T1 MRI (``ch2.nii.gz``: one brain
scanned 27 times and averaged, 181x217x181 voxels of 1 mm, skull included) and the AAL atlas
drawn on that same brain (``aal.nii.gz``, same grid: 116 grey-matter regions;
``aal.nii.txt``: ``index name code`` per region). ``--data-root DIR`` reads those three files
from ``DIR`` instead.

It is one annotated volume (nothing better with real annotations installs offline here: see
the README), cut into 2-D samples by fixed rules:

* **Classes** (9): background (everything the atlas leaves unlabelled: white matter,
  cerebrospinal fluid, skull, air) and the AAL regions grouped by the thousands digit of their
  AAL code (left and right together): 2 frontal, 3 insula, 4 limbic, 5 occipital, 6 parietal,
  7 subcortical grey nuclei, 8 temporal, 9 cerebellum and vermis. No pixel is ignored.
* **Slices**: every axial slice (the volume's third axis) from the lowest to the highest that
  holds an atlas label: 146 slices. In a slice, rows run along the second axis from anterior to
  posterior (reversed voxel order) and columns along the first, so a horizontal flip mirrors
  left and right.
* **Window and size** (:data:`IMAGE_SIZE` = 64): a square window of ``IMAGE_SIZE * f`` voxels,
  ``f`` = ceil(largest in-plane extent of the labelled voxels / 64) = 3 (192 mm), centred on the
  in-plane bounding box of the atlas's labels over the whole volume and padded outside the
  volume with its lowest intensity (air) and background labels; then reduced ``f`` x ``f`` blocks
  to one pixel: the block's mean intensity, and its most frequent class (ties go to the lowest
  class index). Slices are 64x64 pixels of 3 mm.
* **Intensities**: standardised per volume (minus the volume's mean voxel, divided by its
  standard deviation, over every voxel of the volume) before windowing.
* **Split**: consecutive slices are nearly identical, so the test slices are whole blocks away
  from the training slices. The slices are cut into blocks of :data:`BLOCK` (10) from the lowest;
  every :data:`TEST_EVERY`-th block (4th, starting with the second) is a test block, whose first
  and last :data:`GAP` (2) slices are used neither for training nor for testing. This gives 106
  training and 24 test slices, every test slice at least 3 mm from every training slice, every
  class in both sets. Both sets come from the same brain: the test measures how well the model
  labels unseen levels of that brain, not new subjects.

Training augmentation (``bundle.augment``): random 56x56 crops (a translation, as a head's
position in the scanner varies) and horizontal flips. A mirrored axial slice is a plausible
brain with valid labels, since the classes join the left and right regions; vertical flips
would put the face behind the brain and are not used.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import DataError
from .augment import RandomCropFlip
from .base import DATASETS, DatasetBundle, tensor_dataset
from .nifti import read_nifti

#: where ``apt-get install mricron-data`` puts the files
DEFAULT_ROOT = Path("/usr/share/mricron/templates")
INSTALL_HINT = "apt-get install mricron-data"
IMAGE_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
REGIONS_FILE = "aal.nii.txt"

CLASS_NAMES = (
    "background",
    "frontal",
    "insula",
    "limbic",
    "occipital",
    "parietal",
    "subcortical",
    "temporal",
    "cerebellum",
)
#: the thousands digit of an AAL code -> class index
CODE_GROUPS = {2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 9: 8}
IMAGE_SIZE = 64
CROP = 56  # training crops (56 of 64 pixels: up to 8 pixels, 24 mm, of translation)
BLOCK = 10
TEST_EVERY = 4
TEST_BLOCK = 1  # blocks TEST_BLOCK, TEST_BLOCK + TEST_EVERY, ... are test blocks
GAP = 2


def read_region_groups(path: str | Path) -> np.ndarray:
    """int64 [max index + 1]: the class of each atlas index (0 for index 0, background), from an
    AAL ``index name code`` text file. :class:`DataError` naming the file and line for a line
    that is not three fields, an index or code that is not an integer, a repeated index, or a
    code whose thousands digit is not a group of :data:`CODE_GROUPS`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err})") from err
    groups: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 3:
                raise ValueError
            index, code = int(fields[0]), int(fields[2])
        except ValueError:
            raise DataError(
                f"{path}, line {number}: expected 'index name code' (integers around the "
                f"name), got {line.strip()!r}"
            ) from None
        if index < 1 or index in groups:
            raise DataError(f"{path}, line {number}: index {index} is < 1 or listed twice")
        if code // 1000 not in CODE_GROUPS:
            raise DataError(
                f"{path}, line {number}: code {code} of region {fields[1]} has no group (the "
                f"thousands digit must be one of {sorted(CODE_GROUPS)})"
            )
        groups[index] = CODE_GROUPS[code // 1000]
    if not groups:
        raise DataError(f"{path}: no regions listed")
    table = np.zeros(max(groups) + 1, dtype=np.int64)
    for index, group in groups.items():
        table[index] = group
    return table


def slice_volume(
    image: np.ndarray, labels: np.ndarray, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32 [N, 1, size, size], masks int64 [N, size, size], z int64 [N]) from a
    volume ``image`` [X, Y, Z] and its class volume ``labels`` (0 = background), following the
    module's rules: standardise the volume, keep the axial slices from the lowest to the
    highest labelled one, window them around the labels' in-plane bounding box and reduce
    f x f blocks (mean intensity, most frequent class with ties to the lowest)."""
    if image.shape != labels.shape or image.ndim != 3:
        raise DataError(f"image {image.shape} and labels {labels.shape} must be one 3-D grid")
    found = np.nonzero(labels)
    if not found[0].size:
        raise DataError("the atlas labels no voxel")
    volume = image.astype(np.float64)
    std = volume.std()
    volume = (volume - volume.mean()) / (std if std > 0 else 1.0)
    lo = [int(f.min()) for f in found]
    hi = [int(f.max()) for f in found]
    factor = max(1, math.ceil(max(hi[0] - lo[0] + 1, hi[1] - lo[1] + 1) / size))
    side = size * factor
    z = np.arange(lo[2], hi[2] + 1)
    window = [(lo[a] + hi[a] + 1) // 2 - side // 2 for a in (0, 1)]  # first voxel, per axis
    padded = np.full((side, side, len(z)), volume.min())
    classes = np.zeros((side, side, len(z)), dtype=np.int64)
    # the part of the window inside the volume
    src = [slice(max(w, 0), min(w + side, n)) for w, n in zip(window, image.shape)]
    dst = [slice(s.start - w, s.stop - w) for s, w in zip(src, window)]
    padded[dst[0], dst[1]] = volume[src[0], src[1], lo[2] : hi[2] + 1]
    classes[dst[0], dst[1]] = labels[src[0], src[1], lo[2] : hi[2] + 1]
    # [X, Y, Z] -> [Z, rows = Y reversed, columns = X]
    padded = padded.transpose(2, 1, 0)[:, ::-1]
    classes = classes.transpose(2, 1, 0)[:, ::-1]
    n = len(z)
    blocks = padded.reshape(n, size, factor, size, factor)
    images = blocks.mean(axis=(2, 4)).astype(np.float32)[:, None]
    # class counts per block: one bincount of (block number, class) pairs
    num_classes, num_blocks = int(classes.max()) + 1, n * size * size
    per_block = classes.reshape(n, size, factor, size, factor).transpose(0, 1, 3, 2, 4)
    keys = per_block.reshape(num_blocks, factor * factor)
    keys = keys + num_classes * np.arange(num_blocks)[:, None]
    counts = np.bincount(keys.ravel(), minlength=num_blocks * num_classes)
    counts = counts.reshape(n, size, size, num_classes)
    masks = counts.argmax(axis=-1)  # argmax: the first (lowest) class among equal counts
    return images, masks, z.astype(np.int64)


def split_slices(z: np.ndarray) -> np.ndarray:
    """int64 [N]: 0 training, 1 test, -1 unused, for consecutive slice indices ``z`` (the
    block rule of the module docs, counted from ``z[0]``)."""
    position = np.asarray(z) - int(np.asarray(z)[0])
    block, within = position // BLOCK, position % BLOCK
    test_block = block % TEST_EVERY == TEST_BLOCK
    inner = (within >= GAP) & (within < BLOCK - GAP)
    return np.where(test_block, np.where(inner, 1, -1), 0).astype(np.int64)


def _path(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise DataError(
            f"brain-mri: {path} not found; install the data with `{INSTALL_HINT}` (puts "
            f"{IMAGE_FILE}, {ATLAS_FILE} and {REGIONS_FILE} in {DEFAULT_ROOT}) or give "
            "--data-root DIR holding those three files"
        )
    return path


@DATASETS.register("brain-mri")
def load_brain_mri(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """The ``brain-mri`` bundle (module docs). ``download`` cannot fetch anything: the data comes
    from Debian's package."""
    root = DEFAULT_ROOT if root is None else Path(root)
    image = read_nifti(_path(root, IMAGE_FILE))
    atlas = read_nifti(_path(root, ATLAS_FILE))
    table = read_region_groups(_path(root, REGIONS_FILE))
    if not image.same_grid(atlas):
        raise DataError(
            f"brain-mri: {atlas.path} {atlas.data.shape} is not on the grid of {image.path} "
            f"{image.data.shape} (shape, voxel size or position differ); give the atlas drawn "
            "on that image"
        )
    values = atlas.data
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= len(table):
        unknown = np.setdiff1d(np.unique(values), np.arange(len(table)))
        raise DataError(
            f"brain-mri: {atlas.path} holds values that {REGIONS_FILE} does not list as "
            f"region indices (e.g. {unknown[:5].tolist()}); give the matching region list"
        )
    images, masks, z = slice_volume(image.data, table[values.astype(np.int64)])
    split = split_slices(z)
    train, test = split == 0, split == 1
    for what, chosen in (("training", train), ("test", test)):
        missing = np.setdiff1d(np.arange(len(CLASS_NAMES)), np.unique(masks[chosen]))
        if missing.size:
            names = ", ".join(CLASS_NAMES[i] for i in missing)
            raise DataError(
                f"brain-mri: no {names} pixel in the {what} slices of {atlas.path}; these "
                "files do not have the layout of mricron-data's ch2 and AAL volumes"
            )
    train_set = tensor_dataset(images[train], masks[train])
    return DatasetBundle(
        name="brain-mri",
        train=train_set,
        train_eval=train_set,
        test=tensor_dataset(images[test], masks[test]),
        train_targets=masks[train],
        test_targets=masks[test],
        num_classes=len(CLASS_NAMES),
        in_channels=1,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        default_model="fcn-small",
        task="segmentation",
        augment=RandomCropFlip(CROP, flip=True),
        class_names=CLASS_NAMES,
    )
