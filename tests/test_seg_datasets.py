"""The registered segmentation datasets: ``brain-mri`` (Debian's mricron-data: a T1 MRI and its
AAL atlas, read as NIfTI-1) and ``maskfolder`` (the user's images/ + masks/ with classes.txt).

Readers are tested on files the tests write in the exact on-disk format (gzipped single-file
NIfTI-1 as mricron-data ships it; PNG images and index masks), the slicing, grouping and
normalisation rules against slow pixel-by-pixel references, and the installed data when present.
"""

from __future__ import annotations

import collections
import gzip
import math
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradnorm_al import DataError
from gradnorm_al.data import DATASETS, load_dataset
from gradnorm_al.data import brain_mri as bm
from gradnorm_al.data.mask_folders import CLASSES_FILE, read_class_names
from gradnorm_al.data.nifti import read_nifti
from gradnorm_al.data.shapes import synthetic_shapes
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.runner import run_experiment

MNI_SROW = (1.0, 0, 0, -90.0, 0, 1.0, 0, -125.0, 0, 0, 1.0, -71.0)  # mricron-data's ch2 / aal


def write_nifti(
    path: Path,
    data: np.ndarray,
    *,
    dtype: str = "u1",
    code: int = 2,
    order: str = "<",
    slope: float = 1.0,
    inter: float = 0.0,
    srow: tuple[float, ...] = MNI_SROW,
    magic: bytes = b"n+1\x00",
    dims: tuple[int, ...] | None = None,
    quatern: tuple[float, ...] = (0.0,) * 6,
) -> Path:
    """A gzipped single-file NIfTI-1 volume laid out as mricron-data's: 348-byte header,
    4-byte extender, voxels in Fortran order from byte 352, sform_code 4, qform_code 0."""
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    shape = dims if dims is not None else (3, *data.shape, 1, 1, 1, 1)
    struct.pack_into(order + "8h", header, 40, *shape)
    struct.pack_into(order + "2h", header, 70, code, np.dtype(dtype).itemsize * 8)
    struct.pack_into(order + "8f", header, 76, 1, 1, 1, 1, 0, 0, 0, 0)
    struct.pack_into(order + "f", header, 108, 352.0)
    struct.pack_into(order + "2f", header, 112, slope, inter)
    struct.pack_into(order + "2h", header, 252, 0, 4)
    struct.pack_into(order + "6f", header, 256, *quatern)
    struct.pack_into(order + "12f", header, 280, *srow)
    header[344:348] = magic
    voxels = np.asarray(data).astype(np.dtype(dtype).newbyteorder(order)).tobytes(order="F")
    path.write_bytes(gzip.compress(bytes(header) + b"\x00" * 4 + voxels))
    return path


# ---------------------------------------------------------------------------------------------
# NIfTI-1


def test_nifti_volumes_read_in_voxel_order_both_byte_orders_and_scaled(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 200, size=(5, 4, 3))
    got = read_nifti(write_nifti(tmp_path / "a.nii.gz", volume))
    assert got.data.dtype == np.uint8 and got.data.shape == (5, 4, 3)
    assert np.array_equal(got.data, volume)  # Fortran order: the first axis varies fastest
    assert got.data[1, 0, 0] == volume[1, 0, 0] and got.sform_code == 4
    big = read_nifti(
        write_nifti(tmp_path / "b.nii.gz", volume - 100, dtype="i2", code=4, order=">")
    )
    assert big.data.dtype == np.int16 and np.array_equal(big.data, volume - 100)
    scaled = read_nifti(write_nifti(tmp_path / "c.nii.gz", volume, slope=0.5, inter=-3.0))
    assert scaled.data.dtype == np.float64 and np.allclose(scaled.data, volume * 0.5 - 3.0)
    plain = tmp_path / "d.nii"
    plain.write_bytes(gzip.decompress((tmp_path / "a.nii.gz").read_bytes()))
    assert np.array_equal(read_nifti(plain).data, volume)  # not gzipped: the same reader


def test_nifti_grids_compare_the_placement_the_header_uses(tmp_path):
    volume = np.zeros((4, 4, 4))
    a = read_nifti(write_nifti(tmp_path / "a.nii.gz", volume))
    # qform fields are meaningless while qform_code is 0 (mricron's aal has zeros, ch2 not)
    b = read_nifti(write_nifti(tmp_path / "b.nii.gz", volume, quatern=(1.0, 0, 0, 0, 0, 0)))
    moved = read_nifti(
        write_nifti(tmp_path / "c.nii.gz", volume, srow=(1.0, 0, 0, -89.0, *MNI_SROW[4:]))
    )
    other = read_nifti(write_nifti(tmp_path / "d.nii.gz", np.zeros((4, 4, 5))))
    assert a.same_grid(b) and not a.same_grid(moved) and not a.same_grid(other)


def test_bad_nifti_files_are_refused_naming_the_file(tmp_path):
    volume = np.ones((3, 3, 3))
    with pytest.raises(DataError, match=r"missing\.nii\.gz not found"):
        read_nifti(tmp_path / "missing.nii.gz")
    pair = write_nifti(tmp_path / "pair.nii.gz", volume, magic=b"ni1\x00")
    with pytest.raises(DataError, match=r"pair\.nii\.gz: .*\.hdr/\.img pair"):
        read_nifti(pair)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(gzip.decompress(write_nifti(tmp_path / "x.nii.gz", volume).read_bytes())[:370])
    with pytest.raises(DataError, match=r"cut\.nii: truncated"):
        read_nifti(cut)
    series = write_nifti(tmp_path / "t.nii.gz", volume, dims=(4, 3, 3, 3, 2, 1, 1, 1))
    with pytest.raises(DataError, match=r"t\.nii\.gz: a 4-D image"):
        read_nifti(series)
    rgb = write_nifti(tmp_path / "rgb.nii.gz", volume, code=128)
    with pytest.raises(DataError, match=r"rgb\.nii\.gz: NIfTI datatype 128 is not supported"):
        read_nifti(rgb)
    (tmp_path / "text.nii").write_text("not an image" * 40)
    with pytest.raises(DataError, match=r"text\.nii: header size .*not a NIfTI-1 file"):
        read_nifti(tmp_path / "text.nii")


# ---------------------------------------------------------------------------------------------
# brain-mri: rules against slow references


def test_region_groups_follow_the_thousands_digit_of_the_aal_code(tmp_path):
    path = tmp_path / "aal.nii.txt"
    # mricron-data's file: CRLF line ends and a blank last line
    path.write_bytes(b"1 Precentral_L 2001\r\n2 Insula_R 3002\r\n4 Vermis_10 9170\r\n\r\n")
    assert bm.read_region_groups(path).tolist() == [0, 1, 2, 0, 8]
    path.write_text("1 Precentral_L 2001\n2 Somewhere 1234\n")
    with pytest.raises(DataError, match=r"aal\.nii\.txt, line 2: code 1234 of region Somewhere"):
        bm.read_region_groups(path)
    path.write_text("1 Precentral L 2001\n")
    with pytest.raises(DataError, match=r"aal\.nii\.txt, line 1: expected 'index name code'"):
        bm.read_region_groups(path)
    path.write_text("1 A 2001\n1 B 2002\n")
    with pytest.raises(DataError, match=r"line 2: index 1 is < 1 or listed twice"):
        bm.read_region_groups(path)


def slow_slices(image: np.ndarray, labels: np.ndarray, size: int):
    """The documented rules pixel by pixel: standardise, keep the labelled z range, map each
    output pixel to its f x f voxels of the window (rows: second axis reversed), mean of the
    intensities and most frequent class (lowest on ties)."""
    volume = (image - image.mean()) / image.std()
    where = np.argwhere(labels > 0)
    lo, hi = where.min(axis=0), where.max(axis=0)
    f = math.ceil(max(hi[0] - lo[0] + 1, hi[1] - lo[1] + 1) / size)
    side = size * f
    start_x = (lo[0] + hi[0] + 1) // 2 - side // 2
    start_y = (lo[1] + hi[1] + 1) // 2 - side // 2
    images, masks = [], []
    for z in range(lo[2], hi[2] + 1):
        img = np.zeros((size, size))
        mask = np.zeros((size, size), dtype=np.int64)
        for r in range(size):
            for c in range(size):
                values, classes = [], []
                for i in range(r * f, (r + 1) * f):
                    for j in range(c * f, (c + 1) * f):
                        x, y = start_x + j, start_y + (side - 1 - i)
                        inside = 0 <= x < image.shape[0] and 0 <= y < image.shape[1]
                        values.append(volume[x, y, z] if inside else volume.min())
                        classes.append(int(labels[x, y, z]) if inside else 0)
                img[r, c] = np.mean(values)
                counts = collections.Counter(classes)
                mask[r, c] = min(k for k in counts if counts[k] == max(counts.values()))
        images.append(img)
        masks.append(mask)
    return np.array(images), np.array(masks), np.arange(lo[2], hi[2] + 1)


def test_slicing_matches_the_pixel_by_pixel_reference():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, size=(13, 11, 9)).astype(np.float64)
    labels = np.zeros((13, 11, 9), dtype=np.int64)
    labels[1:12, 2:11, 2:7] = rng.integers(0, 4, size=(11, 9, 5))  # x 11 wide, y up to the edge
    labels[2, 3, 2] = labels[11, 10, 6] = 3  # the bounding box reaches x 1..11, y 2..10, z 2..6
    images, masks, z = bm.slice_volume(image, labels, size=4)  # f = ceil(11 / 4) = 3
    ref_images, ref_masks, ref_z = slow_slices(image, labels, size=4)
    assert images.shape == (5, 1, 4, 4) and images.dtype == np.float32
    assert z.tolist() == ref_z.tolist() == [2, 3, 4, 5, 6]
    scale = np.abs(ref_images).max()
    assert np.abs(images[:, 0] - ref_images).max() <= 1e-6 * scale
    assert np.array_equal(masks, ref_masks)
    # the 12-voxel window runs past the volume (y 0..11 of 0..10): the padding is exercised
    assert (2 + 10 + 1) // 2 - 12 // 2 + 12 > image.shape[1]


def test_block_majority_ties_go_to_the_lowest_class():
    labels = np.zeros((4, 4, 1), dtype=np.int64)
    labels[:2, :2, 0] = [[3, 3], [2, 2]]  # a 2-2 tie between classes 2 and 3
    labels[2:, 2:, 0] = [[1, 2], [2, 2]]  # class 2 in three of four voxels
    labels[2:, :2, 0] = [[0, 0], [0, 5]]
    _, masks, _ = bm.slice_volume(np.arange(16.0).reshape(4, 4, 1), labels, size=2)
    # rows are the second axis reversed: row 0 holds y 2..3, row 1 y 0..1; columns x
    assert masks[0].tolist() == [[0, 2], [2, 0]]


def test_split_keeps_test_slices_away_from_training_slices():
    z = np.arange(10, 156)  # the 146 labelled slices of mricron-data's AAL
    split = bm.split_slices(z)
    assert [(split == s).sum() for s in (0, 1, -1)] == [106, 24, 16]
    for i, s in enumerate(split):  # the rule, slice by slice
        block, within = divmod(i, bm.BLOCK)
        if block % bm.TEST_EVERY != bm.TEST_BLOCK:
            assert s == 0
        else:
            assert s == (1 if bm.GAP <= within < bm.BLOCK - bm.GAP else -1)
    train, test = z[split == 0], z[split == 1]
    assert np.abs(test[:, None] - train[None, :]).min() == bm.GAP + 1


def _mricron_folder(root: Path, shape=(24, 30, 50)) -> tuple[np.ndarray, np.ndarray]:
    """ch2.nii.gz, aal.nii.gz and aal.nii.txt as mricron-data lays them out, for a small
    synthetic head: AAL indices 1..8 in eight columns through slices 5..44, one per group."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=shape).astype(np.uint8)
    atlas = np.zeros(shape, dtype=np.uint8)
    for k in range(8):
        x, y = 2 + (k % 4) * 5, 4 + (k // 4) * 10
        atlas[x : x + 4, y : y + 8, 5:45] = 2 * k + 1  # odd indices: the left regions
    root.mkdir(parents=True, exist_ok=True)
    write_nifti(root / bm.IMAGE_FILE, image)
    write_nifti(root / bm.ATLAS_FILE, atlas)
    lines = [f"{2 * k + 1} Region{k}_L {(k + 2) * 1000 + 1}" for k in range(8)]
    lines += [f"{2 * k + 2} Region{k}_R {(k + 2) * 1000 + 2}" for k in range(8)]
    (root / bm.REGIONS_FILE).write_bytes(("\r\n".join(lines) + "\r\n").encode())
    groups = np.zeros(shape, dtype=np.int64)
    groups[atlas > 0] = (atlas[atlas > 0] + 1) // 2  # index 2k+1 -> class k+1
    return image, groups


def test_brain_mri_reads_mricron_files_into_split_slices(tmp_path):
    image, groups = _mricron_folder(tmp_path)
    bundle = load_dataset("brain-mri", tmp_path)
    images, masks, z = bm.slice_volume(image.astype(np.float64), groups)
    assert z.tolist() == list(range(5, 45))  # the labelled slices
    split = bm.split_slices(z)
    assert (len(bundle.train), len(bundle.test)) == ((split == 0).sum(), (split == 1).sum())
    x, y = bundle.train.tensors
    assert x.shape == (30, 1, 64, 64) and y.shape == (30, 64, 64)
    assert torch.equal(x, torch.from_numpy(images[split == 0]))
    assert np.array_equal(bundle.test_targets, masks[split == 1])
    assert bundle.task == "segmentation" and bundle.num_classes == 9
    assert bundle.class_names == bm.CLASS_NAMES and bundle.default_model == "fcn-small"
    assert bundle.augment.crop == (bm.CROP, bm.CROP) and bundle.augment.flip


def test_brain_mri_errors_name_the_file_and_the_install_command(tmp_path):
    with pytest.raises(DataError, match=r"ch2\.nii\.gz not found; .*apt-get install mricron-data"):
        load_dataset("brain-mri", tmp_path)
    _mricron_folder(tmp_path)
    write_nifti(tmp_path / bm.ATLAS_FILE, np.zeros((24, 30, 51)))
    with pytest.raises(DataError, match=r"aal\.nii\.gz \(24, 30, 51\) is not on the grid of"):
        load_dataset("brain-mri", tmp_path)
    atlas = np.zeros((24, 30, 50))
    atlas[1, 1, 1] = 17
    write_nifti(tmp_path / bm.ATLAS_FILE, atlas)
    with pytest.raises(DataError, match=r"aal\.nii\.gz holds values .*\(e\.g\. \[17\]\)"):
        load_dataset("brain-mri", tmp_path)
    atlas[1, 1, 1] = 0
    atlas[4:8, 4:8, 10:12] = 1  # one group only, in the first block: no test slice holds it
    write_nifti(tmp_path / bm.ATLAS_FILE, atlas)
    with pytest.raises(DataError, match=r"no insula, limbic, .* pixel in the training slices"):
        load_dataset("brain-mri", tmp_path)


INSTALLED = bm.DEFAULT_ROOT / bm.IMAGE_FILE


@pytest.mark.skipif(
    not INSTALLED.is_file(), reason=f"{INSTALLED} absent (apt-get install mricron-data)"
)
def test_brain_mri_on_the_installed_mricron_data():
    assert read_nifti(INSTALLED).data.shape == (181, 217, 181)
    bundle = load_dataset("brain-mri")
    assert bundle.train.tensors[0].shape == (106, 1, 64, 64)
    assert bundle.test.tensors[0].shape == (24, 1, 64, 64)
    assert bundle.num_classes == len(bm.CLASS_NAMES) == 9
    for masks in (bundle.train_targets, bundle.test_targets):
        counts = np.bincount(masks.ravel(), minlength=9)
        assert len(counts) == 9 and (counts > 0).all()  # every class in both sets
        assert 0.6 < counts[0] / masks.size < 0.85  # background: white matter, skull, air
    x = bundle.train.tensors[0]
    assert torch.isfinite(x).all() and 0.0 < float(x.std()) < 2.0  # standardised intensities


# ---------------------------------------------------------------------------------------------
# maskfolder


def _mask_folder(directory: Path, n: int, *, size: int = 16, seed: int = 0, classes=True) -> None:
    images, masks = synthetic_shapes(n, size, seed=seed)
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir(parents=True)
    for i in range(n):
        rgb = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(directory / "images" / f"img{i:03d}.png")
        Image.fromarray(masks[i].numpy().astype(np.uint8), "L").save(
            directory / "masks" / f"img{i:03d}.png"
        )


def _classes(root: Path, text: str = "background\nrectangle\ncircle\n") -> None:
    (root / CLASSES_FILE).write_text(text)


def test_registry_has_both_datasets_and_maskfolder_needs_its_folder():
    assert {"brain-mri", "maskfolder"} <= set(DATASETS.names())
    with pytest.raises(DataError, match=r"maskfolder needs --data-root DIR.*classes\.txt"):
        load_dataset("maskfolder")


def test_classes_file_missing_or_malformed_is_an_error_naming_it(tmp_path):
    _mask_folder(tmp_path, 4)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / CLASSES_FILE} not found; create")):
        load_dataset("maskfolder", tmp_path)
    _classes(tmp_path, "background\n\ncircle\n")
    with pytest.raises(DataError, match=r"classes\.txt, line 2: blank"):
        load_dataset("maskfolder", tmp_path)
    _classes(tmp_path, "background\ncircle\ncircle\n")
    with pytest.raises(DataError, match=r"line 3: class 'circle' is listed twice"):
        load_dataset("maskfolder", tmp_path)
    _classes(tmp_path, "background\n")
    with pytest.raises(DataError, match=r"classes\.txt: 1 class\(es\); .* at least two"):
        load_dataset("maskfolder", tmp_path)
    _classes(tmp_path, " background \r\nrectangle\ncircle\n\n\n")
    assert read_class_names(tmp_path / CLASSES_FILE) == ("background", "rectangle", "circle")


def test_one_folder_is_split_once_with_a_fixed_seed(tmp_path):
    _mask_folder(tmp_path, 10)
    _classes(tmp_path)
    bundle = load_dataset("maskfolder", tmp_path)
    again = load_dataset("maskfolder", tmp_path)
    train, test = bundle.train.indices, bundle.test.indices
    assert len(test) == 2 and len(train) == 8  # 20% of 10
    assert sorted(train + test) == list(range(10))
    assert (train, test) == (again.train.indices, again.test.indices)
    assert bundle.num_classes == 3 and bundle.class_names == ("background", "rectangle", "circle")
    assert (
        bundle.image_size == (16, 16) and bundle.in_channels == 3 and bundle.task == "segmentation"
    )
    image, mask = bundle.test[0]
    assert image.shape == (3, 16, 16)
    assert torch.equal(mask, synthetic_shapes(10, 16, seed=0)[1][test[0]])  # image test[0]


def test_train_and_test_folders_are_used_as_given(tmp_path):
    _mask_folder(tmp_path / "train", 5)
    _mask_folder(tmp_path / "test", 3, seed=1)
    _classes(tmp_path)
    bundle = load_dataset("maskfolder", tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (5, 3)


def test_images_of_different_sizes_are_refused_naming_two(tmp_path):
    _mask_folder(tmp_path / "train", 3)
    _mask_folder(tmp_path / "test", 2, size=20, seed=1)
    _classes(tmp_path)
    with pytest.raises(DataError, match=r"test/images/img000\.png is 20x20 pixels but .*16x16"):
        load_dataset("maskfolder", tmp_path)


def test_a_mask_value_outside_the_classes_names_the_mask(tmp_path):
    _mask_folder(tmp_path, 6)
    _classes(tmp_path, "background\nshape\n")  # the masks also hold 2 (circles)
    bundle = load_dataset("maskfolder", tmp_path)
    with pytest.raises(DataError, match=r"masks/img\d{3}\.png: value 2 is neither a class"):
        for i in range(len(bundle.train_eval)):
            bundle.train_eval[i]
    config = ExperimentConfig(
        dataset="maskfolder",
        data_root=str(tmp_path),
        trials=1,
        cycles=2,
        epochs=1,
        strategies=["random"],
        initial_fraction=0.5,
    )
    with pytest.raises(DataError, match=r"mask .*masks/img\d{3}\.png: value 2"):
        run_experiment(config, tmp_path / "run", progress=False)


def test_maskfolder_runs_end_to_end_with_fcn_small(tmp_path):
    _mask_folder(tmp_path / "data", 12, size=12)
    _classes(tmp_path / "data")
    config = ExperimentConfig(
        dataset="maskfolder",
        data_root=str(tmp_path / "data"),
        strategies=["random", "entropy-gradnorm"],
        trials=1,
        cycles=2,
        epochs=1,
        lr=0.05,
        batch_size=4,
        initial_fraction=0.3,
        budget_fraction=0.2,
    )
    result = run_experiment(config, tmp_path / "run", progress=False)
    assert [(r["strategy"], r["cycle"]) for r in result.rows] == [
        ("random", 0), ("random", 1), ("entropy-gradnorm", 0), ("entropy-gradnorm", 1),
    ]  # fmt: skip
    assert [r["num_labeled"] for r in result.rows] == [3, 5, 3, 5]  # 30% of 10, + 20%
    for row in result.rows:
        assert 0.0 <= float(row["test_miou"]) <= 1.0
    assert "test_miou" in (tmp_path / "run" / "results.csv").read_text().splitlines()[0]


def test_the_segmentation_demo_runs_through_the_cli_on_brain_mri_files(tmp_path, monkeypatch):
    # The demo's own config (dataset, model, strategies, recipe), shortened, on mricron-layout
    # files: every strategy writes mIoU rows, and the summary reads them.
    from gradnorm_al.cli import main
    from gradnorm_al.experiment import config as config_module

    _mricron_folder(tmp_path / "mricron")
    demo = config_module.demo_config("segmentation")
    assert (demo.dataset, demo.model) == ("brain-mri", "fcn-small")
    assert demo.strategies == ["random", "entropy-gradnorm", "entropy"]

    def short(task: str) -> ExperimentConfig:
        return replace(
            config_module.demo_config(task),
            trials=1,
            cycles=2,
            epochs=1,
            data_root=str(tmp_path / "mricron"),
        )

    monkeypatch.setattr("gradnorm_al.cli.demo.demo_config", short)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--task", "segmentation", "--quiet"]) == 0
    out = tmp_path / "gradnorm-al-demo-segmentation"
    header, *rows = (out / "results.csv").read_text().splitlines()
    assert "test_miou" in header and "test_accuracy" not in header
    assert [r.split(",")[:3] for r in rows] == [
        [s, "0", str(c)] for s in ("random", "entropy-gradnorm", "entropy") for c in (0, 1)
    ]
    assert "mIoU" in (out / "summary.md").read_text()
