"""The ``augment`` option: shifts and flips of classification images, the dataset's own, none."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from gradnorm_al.cli import main
from gradnorm_al.data import load_dataset
from gradnorm_al.data.augment import PadCropFlip, training_augmentation
from gradnorm_al.errors import ConfigError
from gradnorm_al.experiment.config import ExperimentConfig


def test_shifts_are_windows_of_the_border_padded_image_and_flips_mirror_them():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    y = torch.tensor([4, 7])
    aug = PadCropFlip(2, flip=True)
    seen = set()
    for seed in range(40):
        out, labels = aug(x, y, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and torch.equal(labels, y)
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
        for i in range(2):
            windows = {
                (t, s, f)
                for t in range(5)
                for s in range(5)
                for f in (False, True)
                if torch.equal(
                    out[i],
                    padded[i, :, t : t + 5, s : s + 6].flip(-1)
                    if f
                    else padded[i, :, t : t + 5, s : s + 6],
                )
            }
            assert windows, "not a window of the padded image"
            seen |= windows
    assert len(seen) > 20  # many offsets, both flips
    assert {f for *_, f in seen} == {False, True}
    same = aug(x, y, torch.Generator().manual_seed(3))[0]
    assert torch.equal(same, aug(x, y, torch.Generator().manual_seed(3))[0])  # seeded
    assert torch.equal(PadCropFlip(0, flip=False)(x, y)[0], x)
    with pytest.raises(ConfigError, match="padding must be a non-negative integer"):
        PadCropFlip(-1)
    with pytest.raises(ValueError, match="one label per image"):
        aug(x, y[:1])


def test_the_option_picks_the_training_view_and_the_batch_augmentation(digits):
    assert training_augmentation(digits, "dataset") == (digits.train, digits.augment)
    assert training_augmentation(digits, "none") == (digits.train_eval, None)
    view, aug = training_augmentation(digits, "crop")
    assert view is digits.train_eval and aug.padding == 1 and not aug.flip  # 8x8 digits
    assert training_augmentation(digits, "crop-flip")[1].flip
    with pytest.raises(ConfigError, match="augment must be one of"):
        training_augmentation(digits, "mixup")
    with pytest.raises(ConfigError, match="augment must be one of 'dataset', 'none', 'crop'"):
        ExperimentConfig.from_dict({"augment": "mixup"})


def test_crops_of_what_is_not_an_image_are_refused_before_the_folder_is_touched(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["run", "--dataset", "brain-mri", "--model", "fcn-small", "--augment", "crop",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert "augment crop shifts 2-D classification images" in capsys.readouterr().err
    volumes = dataclasses.replace(load_dataset("digits"), image_size=(8, 8, 8))  # only the shape
    with pytest.raises(ConfigError, match="is 3-D: use augment dataset or none"):
        training_augmentation(volumes, "crop-flip")


def test_a_run_with_shifts_trains_on_other_batches_and_records_the_option(tmp_path):
    args = ["run", "--dataset", "digits", "--pool-size", "200", "--cycles", "2", "--epochs", "2",
            "--trials", "1", "--strategy", "random", "--quiet"]  # fmt: skip
    rows = {}
    for choice in ("dataset", "crop"):
        out = tmp_path / choice
        assert main([*args, "--augment", choice, "--out", str(out)]) == 0
        with open(out / "results.csv", newline="") as f:
            rows[choice] = [r["test_accuracy"] for r in csv.DictReader(f)]
        recorded = (out / "config.yaml").read_text()
        assert ("augment: crop" in recorded) == (choice == "crop")  # defaults stay unrecorded
    assert rows["crop"] != rows["dataset"]
