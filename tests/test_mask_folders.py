"""The folder reader for segmentation: images/<stem>.png|jpg with masks/<stem>.png, on files the
tests write (palette and greyscale PNG masks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gradnorm_al import DataError, SegmentationTask
from gradnorm_al.data.mask_folders import MaskFolder, mask_folder_splits

MASK = np.array([[0, 1, 1, 2], [0, 0, 255, 2], [1, 1, 0, 0]], dtype=np.uint8)  # 3 x 4


def _write(directory, stem, mask, *, mode="P", image_ext=".png", image_size=None):
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "masks").mkdir(parents=True, exist_ok=True)
    h, w = mask.shape if image_size is None else image_size
    rgb = (np.arange(h * w * 3).reshape(h, w, 3) * 7 % 256).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(directory / "images" / f"{stem}{image_ext}")
    im = Image.fromarray(mask, "L")
    if mode == "P":  # palette image: colours that are not the indices, as VOC saves them
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in ((i * 37) % 256, 255 - i, 128)])
        im.putdata(mask.flatten().tolist())
    im.save(directory / "masks" / f"{stem}.png")
    return rgb


def test_palette_and_greyscale_masks_are_read_as_class_indices(tmp_path):
    rgb = _write(tmp_path, "a", MASK, mode="P")
    _write(tmp_path, "b", MASK[::-1].copy(), mode="L", image_ext=".jpg")
    assert Image.open(tmp_path / "masks" / "a.png").mode == "P"
    data = MaskFolder(tmp_path, num_classes=3)
    assert len(data) == 2 and data.stems == ["a", "b"]
    image, mask = data[0]
    assert image.shape == (3, 3, 4) and image.dtype == torch.float32
    assert torch.allclose(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert mask.dtype == torch.int64 and mask.tolist() == MASK.tolist()
    assert data[1][1].tolist() == MASK[::-1].tolist()
    masks = SegmentationTask(3).collate([data.mask(0), data.mask(1)])  # the task accepts them
    assert masks.shape == (2, 3, 4)


def test_train_and_test_split_folders(tmp_path):
    _write(tmp_path / "train", "x", MASK)
    _write(tmp_path / "train", "y", MASK)
    _write(tmp_path / "val", "z", MASK, mode="L")
    splits = mask_folder_splits(tmp_path, 3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "test": 1}
    assert list(mask_folder_splits(tmp_path / "val", 3)) == ["all"]


def test_bad_folders_are_refused_naming_the_file(tmp_path):
    _write(tmp_path, "a", MASK)
    with pytest.raises(DataError, match=r"a\.png: value 2 is neither a class in \[0, 2\)"):
        MaskFolder(tmp_path, num_classes=2)[0]
    (tmp_path / "images" / "b.jpg").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    with pytest.raises(DataError, match=r"image .*b\.jpg has no mask .*b\.png"):
        MaskFolder(tmp_path, 3)
    (tmp_path / "images" / "b.jpg").unlink()
    Image.fromarray(MASK, "L").save(tmp_path / "masks" / "c.png")
    with pytest.raises(DataError, match=r"mask .*c\.png has no image"):
        MaskFolder(tmp_path, 3)
    (tmp_path / "masks" / "c.png").unlink()
    _write(tmp_path, "d", MASK, image_size=(4, 4))
    with pytest.raises(
        DataError, match=r"mask .*d\.png is 4x3 pixels but its image .*d\.png is 4x4"
    ):
        MaskFolder(tmp_path, 3)
    _write(tmp_path / "rgb", "d", MASK)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8), "RGB").save(tmp_path / "rgb/masks/d.png")
    with pytest.raises(DataError, match=r"mask .*d\.png is a RGB image; masks must be index"):
        MaskFolder(tmp_path / "rgb", 3)[0]
    with pytest.raises(DataError, match="masks"):
        MaskFolder(tmp_path / "nowhere", 3)
