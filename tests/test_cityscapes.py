"""Cityscapes on a tiny tree written in the official layout: trainId mapping, normalisation,
joint crop/flip, masks for the oracle without images, errors, a whole run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradnorm_al.data import cityscapes as cs
from gradnorm_al.data import load_dataset
from gradnorm_al.errors import DataError
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.runner import run_experiment
from gradnorm_al.oracles import DatasetOracle

# cityscapesScripts' labels.py, written out: label id -> trainId of the 19 training classes
# (every other id 0-33 is ignored: trainId 255 or -1)
OFFICIAL_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
OFFICIAL_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
H, W = 16, 40
CITIES = {"train": {"aachen": 3, "bochum": 2}, "val": {"frankfurt": 2}}


def write_tree(root: Path, seed: int = 0) -> dict[str, list[tuple[Path, np.ndarray, np.ndarray]]]:
    """A Cityscapes tree as the official zips unpack: per split, (image path, RGB uint8 [H, W, 3],
    label ids uint8 [H, W]) sorted by path. Every label id 0-33 occurs in every mask; the
    color/instanceIds/polygons files a real tree has lie beside the labelIds (decoys whose
    values are no label ids)."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[Path, np.ndarray, np.ndarray]]] = {}
    for split, cities in CITIES.items():
        written[split] = []
        for city, n in cities.items():
            images, masks = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            images.mkdir(parents=True)
            masks.mkdir(parents=True)
            for k in range(n):
                stem = f"{city}_{k:06d}_{19:06d}"
                rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                ids = rng.integers(0, 34, (H, W), dtype=np.uint8)
                ids[0, :34] = np.arange(34)
                Image.fromarray(rgb, "RGB").save(images / f"{stem}_leftImg8bit.png")
                Image.fromarray(ids, "L").save(masks / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(rgb[::-1], "RGB").save(masks / f"{stem}_gtFine_color.png")
                decoy = np.full((H, W), 200, dtype=np.uint8)
                Image.fromarray(decoy, "L").save(masks / f"{stem}_gtFine_instanceIds.png")
                (masks / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"objects": []}))
                written[split].append((images / f"{stem}_leftImg8bit.png", rgb, ids))
    for split in written:
        written[split].sort(key=lambda entry: str(entry[0]))
    return written


def train_ids_by_pixel(ids: np.ndarray) -> np.ndarray:
    """The reference mapping: one pixel at a time through the written-out official table."""
    out = np.empty(ids.shape, dtype=np.int64)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            out[r, c] = OFFICIAL_TRAIN_IDS.get(int(ids[r, c]), 255)
    return out


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "cityscapes"
    return root, write_tree(root)


def test_the_train_id_table_is_the_official_one():
    from torchvision.datasets import Cityscapes

    lut = cs.train_id_lut()
    for label_id in range(34):
        assert lut[label_id] == OFFICIAL_TRAIN_IDS.get(label_id, 255), label_id
    assert (lut[34:] == -1).all()  # no official id: refused when read
    # and torchvision's copy of the table, read here independently of the module
    for c in Cityscapes.classes:
        if c.id >= 0:
            assert lut[c.id] == (c.train_id if 0 <= c.train_id < 19 else 255), c.name
    assert cs.class_names() == OFFICIAL_NAMES


def test_items_are_normalised_images_and_official_train_ids_pixel_by_pixel(tree):
    root, written = tree
    bundle = load_dataset("cityscapes", root)
    assert (bundle.task, bundle.num_classes, bundle.ignore_index) == ("segmentation", 19, 255)
    assert (bundle.default_model, bundle.in_channels, bundle.image_size) == ("drn-d-22", 3, (H, W))
    assert bundle.class_names == OFFICIAL_NAMES and bundle.dense
    assert bundle.train_targets is None and bundle.test_targets is None
    assert (bundle.pool_size, len(bundle.test)) == (5, 2)
    assert bundle.augment.crop == (688, 688) and bundle.augment.flip
    assert bundle.augment.ignore_index == 255
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float64)[:, None, None]
    views = ((bundle.train_eval, "train"), (bundle.train, "train"), (bundle.test, "val"))
    for dataset, split in views:
        assert len(dataset) == len(written[split])
        for i, (_, rgb, ids) in enumerate(written[split]):  # the order is sorted by path
            x, y = dataset[i]
            assert x.dtype == torch.float32 and x.shape == (3, H, W)
            expected = (rgb.transpose(2, 0, 1) / 255.0 - mean) / std
            assert np.abs(x.numpy() - expected).max() < 1e-5 * np.abs(expected).max()
            assert y.dtype == torch.int64 and y.shape == (H, W)
            assert np.array_equal(y.numpy(), train_ids_by_pixel(ids))


def test_the_order_is_sorted_whatever_order_the_folders_are_listed_in(tree, monkeypatch):
    root, written = tree
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), reverse=True))
    pool = load_dataset("cityscapes", root).train_eval
    assert pool.image_paths == [str(p) for p, _, _ in written["train"]]
    assert [Path(m).name for m in pool.mask_paths] == [
        p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png") for p, _, _ in written["train"]
    ]


def test_the_official_zips_in_root_are_unpacked_by_torchvision(tree):
    root, written = tree
    for archive, folder in zip(cs.ARCHIVES, ("leftImg8bit", "gtFine")):
        shutil.make_archive(str(root / archive[: -len(".zip")]), "zip", root, folder)
        shutil.rmtree(root / folder)
    pool = load_dataset("cityscapes", root).train_eval
    assert pool.image_paths == [str(p) for p, _, _ in written["train"]]
    assert np.array_equal(pool[4][1].numpy(), train_ids_by_pixel(written["train"][4][2]))


def _crop(x: torch.Tensor, top: int, left: int, h: int, w: int, flip: bool) -> torch.Tensor:
    window = x[..., top : top + h, left : left + w]
    return window.flip(-1) if flip else window


def _window(big: torch.Tensor, small: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of the one window of ``big`` [..., H, W] that ``small`` is."""
    h, w = small.shape[-2:]
    found = [
        (t, s, flip)
        for t in range(big.shape[-2] - h + 1)
        for s in range(big.shape[-1] - w + 1)
        for flip in (False, True)
        if torch.equal(_crop(big, t, s, h, w, flip), small)
    ]
    assert len(found) == 1, found
    return found[0]


def test_training_crops_and_flips_move_image_and_mask_together(tree):
    root, _ = tree
    bundle = cs.load_cityscapes(root, crop=(8, 16))
    items = [bundle.train[i] for i in range(bundle.pool_size)] * 4
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    gen = torch.Generator().manual_seed(3)
    xa, ya = bundle.augment(x, y, gen)
    assert xa.shape == (20, 3, 8, 16) and ya.shape == (20, 8, 16) and ya.dtype == torch.int64
    flips = set()
    for i in range(len(x)):
        top, left, flipped = _window(x[i], xa[i])  # where the image crop came from
        assert torch.equal(ya[i], _crop(y[i], top, left, 8, 16, flipped))
        flips.add(flipped)
    assert flips == {False, True}
    # the paper's 688 crop of a smaller image: padded (image 0, mask ignored), then flipped
    paper = load_dataset("cityscapes", root).augment
    xa, ya = paper(x[:6], y[:6], torch.Generator().manual_seed(0))
    assert xa.shape == (6, 3, 688, 688) and ya.shape == (6, 688, 688)
    for i in range(6):
        flipped = bool((ya[i, :H, :W] == 255).all())  # the content went to the right edge
        if flipped:
            assert torch.equal(ya[i, :H, -W:], y[i].flip(-1))
            assert torch.equal(xa[i, :, :H, -W:], x[i].flip(-1))
        else:
            assert torch.equal(ya[i, :H, :W], y[i]) and torch.equal(xa[i, :, :H, :W], x[i])
        assert int((ya[i] != 255).sum()) == int((y[i] != 255).sum())  # the rest is padding
        assert float(xa[i].abs().sum()) == pytest.approx(float(x[i].abs().sum()), rel=1e-6)


def test_the_oracle_reads_masks_through_target_without_decoding_images(tree, monkeypatch):
    root, written = tree
    bundle = load_dataset("cityscapes", root)

    def no_images(path):
        raise AssertionError(f"image {path} decoded")

    monkeypatch.setattr(cs, "load_rgb", no_images)
    expected = [train_ids_by_pixel(ids) for _, _, ids in written["train"]]
    labels = DatasetOracle(bundle.train_eval).labels(np.array([3, 0]))
    assert [m.numpy().tolist() for m in labels] == [expected[3].tolist(), expected[0].tolist()]
    subset = bundle.with_pool_subset(3, np.random.default_rng(0))  # Subsets in between
    picked = subset.train_eval.indices
    labels = DatasetOracle(subset.train_eval).labels(np.array([2, 1]))
    assert [m.numpy().tolist() for m in labels] == [expected[picked[k]].tolist() for k in (2, 1)]


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda r: _remove(r / "leftImg8bit" / "val"), "leftImg8bit/val not found"),
        (lambda r: _remove(r / "gtFine" / "train"), "gtFine/train not found"),
        (lambda r: _remove(r / "leftImg8bit"), "leftImg8bit/train not found"),
        (
            lambda r: _remove(r / "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png"),
            "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png not found",
        ),
        (lambda r: (r / "leftImg8bit/train/README").write_text("x"), "leftImg8bit/train/README"),
    ],
    ids=["val-images", "train-masks", "all-images", "one-mask", "stray-file"],
)
def test_missing_files_are_errors_naming_the_path_and_the_fix(tree, damage, named):
    root, _ = tree
    damage(root)
    with pytest.raises(DataError) as err:
        load_dataset("cityscapes", root)
    message = str(err.value)
    assert str(root / named.split(" ")[0]) in message and named in message
    assert "\n" not in message
    if named.endswith("not found") and "labelIds" not in named:
        assert "gtFine_trainvaltest.zip" in message and "cityscapes-dataset.com" in message


def test_bad_ids_odd_sizes_no_root_and_download_are_clear_errors(tree, tmp_path):
    root, _ = tree
    bad = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    ids = np.zeros((H, W), dtype=np.uint8)
    ids[3, 5], ids[4, 4] = 40, 255
    Image.fromarray(ids, "L").save(bad)
    odd = root / "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png"
    Image.fromarray(np.zeros((H, W + 2, 3), dtype=np.uint8), "RGB").save(odd)
    bundle = load_dataset("cityscapes", root)  # both are found when an item is read
    assert bundle.train_eval[0][1].shape == (H, W)
    for read in (lambda: bundle.train_eval.target(1), lambda: bundle.train_eval[1]):
        with pytest.raises(DataError, match="no Cityscapes label id") as err:
            read()
        assert str(bad) in str(err.value) and "value 40" in str(err.value)
        assert "255" in str(err.value)  # 255 is no official id either (2 such pixels)
    with pytest.raises(DataError, match="is 42x16 pixels") as err:
        bundle.test[1]
    assert str(odd) in str(err.value)
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cityscapes", None)
    with pytest.raises(DataError, match="is not a folder") as err:
        load_dataset("cityscapes", tmp_path / "nowhere")
    assert "leftImg8bit_trainvaltest.zip" in str(err.value)
    with pytest.raises(DataError, match="cannot be downloaded") as err:
        load_dataset("cityscapes", root, download=True)
    message = str(err.value)
    assert all(s in message for s in (*cs.ARCHIVES, "cityscapes-dataset.com", str(root)))


def test_a_run_on_the_tiny_tree_writes_miou_rows(tree, tmp_path):
    root, _ = tree
    config = ExperimentConfig(
        dataset="cityscapes",
        data_root=str(root),
        model="fcn-small",
        strategies=["entropy-gradnorm"],
        trials=1,
        cycles=2,
        initial_fraction=0.4,
        budget_fraction=0.2,
        epochs=1,
        lr=0.05,
        batch_size=2,
    )
    bundle = cs.load_cityscapes(root, crop=(8, 16))
    result = run_experiment(config, tmp_path / "run", bundle=bundle, progress=False)
    rows = result.rows
    assert [(r["strategy"], r["cycle"], r["num_labeled"]) for r in rows] == [
        ("entropy-gradnorm", 0, 2),
        ("entropy-gradnorm", 1, 3),
    ]
    for r in rows:
        assert 0.0 <= r["test_miou"] <= 1.0 and 0.0 <= r["test_pixel_accuracy"] <= 1.0
        assert 0.0 <= r["train_miou"] <= 1.0
    header = (tmp_path / "run" / "results.csv").read_text().splitlines()[0].split(",")
    assert "test_miou" in header and "test_accuracy" not in header
