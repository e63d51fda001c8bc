"""Segmentation through the experiment layer: joint augmentation, the oracle's masks, the
model/task checks, runs with mIoU results that resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from gradnorm_al.data import DatasetBundle
from gradnorm_al.data.augment import RandomCropFlip
from gradnorm_al.data.shapes import synthetic_shapes
from gradnorm_al.errors import ConfigError
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.results import read_results
from gradnorm_al.experiment.runner import protocol, run_experiment
from gradnorm_al.oracles import DatasetOracle

SEG_COLUMNS = ["test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy"]


@pytest.fixture(scope="module")
def shapes_bundle() -> DatasetBundle:
    x, y = synthetic_shapes(60, 16, seed=0)
    xt, yt = synthetic_shapes(20, 16, seed=1)
    pool = TensorDataset(x, y)
    return DatasetBundle(
        "shapes",
        pool,
        pool,
        TensorDataset(xt, yt),
        None,  # masks read from the items by the oracle
        None,
        num_classes=3,
        in_channels=3,
        image_size=(16, 16),
        default_model="fcn-small",
        task="segmentation",
        augment=RandomCropFlip(12),
    )


def _config(**overrides) -> ExperimentConfig:
    values = dict(
        dataset="shapes",
        strategies=["random", "entropy-gradnorm"],
        trials=1,
        cycles=3,
        epochs=2,
        lr=0.05,
        batch_size=8,
    )
    values.update(overrides)
    return ExperimentConfig(**values)


# --------------------------------------------------------------------------- joint augmentation
def test_crop_and_flip_move_image_and_mask_together() -> None:
    masks = torch.randint(0, 3, (6, 10, 14))
    # channel 0 of each image is its mask, channel 1 its column index: both must follow the mask
    cols = torch.arange(14).expand(6, 10, 14).float()
    images = torch.stack([masks.float(), cols, torch.zeros(6, 10, 14)], dim=1)
    x, y = RandomCropFlip((8, 9))(images, masks, torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 8, 9) and y.shape == (6, 8, 9)
    assert torch.equal(x[:, 0].long(), y)
    flipped = 0
    for i in range(6):
        row = x[i, 1, 0]
        step = int(row[1] - row[0])
        assert step in (1, -1) and torch.equal(row.diff(), torch.full((8,), float(step)))
        flipped += step == -1
        left = int(row.min())  # the window's first column in the original image
        mask = y[i].flip(-1) if step == -1 else y[i]
        windows = [masks[i, t : t + 8, left : left + 9] for t in range(3)]
        assert any(torch.equal(w, mask) for w in windows)
    assert 0 < flipped < 6  # flips are random (seeded): some of each here


def test_crop_pads_small_images_with_zero_and_the_ignore_index() -> None:
    images, masks = torch.ones(2, 1, 4, 5), torch.zeros(2, 4, 5, dtype=torch.int64)
    x, y = RandomCropFlip((6, 5), flip=False, ignore_index=255)(images, masks)
    assert y.shape == (2, 6, 5)
    assert (y == 255).sum() == 2 * 2 * 5 and (x == 0).sum() == 2 * 2 * 5
    assert torch.equal((y == 255), (x[:, 0] == 0))


def test_crop_flip_is_seeded_and_checks_its_input() -> None:
    x, y = synthetic_shapes(4, 16, seed=3)
    a = RandomCropFlip(12)(x, y, torch.Generator().manual_seed(5))
    b = RandomCropFlip(12)(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="same size"):
        RandomCropFlip(12)(x, y[:, :8])
    with pytest.raises(ConfigError, match="crop must be"):
        RandomCropFlip((0, 4))


# --------------------------------------------------------------------------- the oracle's masks
class _Masks(Dataset):
    """Items whose image must not be decoded to answer the oracle: target(i) is the label."""

    def __init__(self, n: int) -> None:
        self.n, self.items_read = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.items_read += 1
        return torch.zeros(1, 2, 2), self.target(i)

    def target(self, i: int) -> torch.Tensor:
        return torch.full((2, 2), i, dtype=torch.int64)


def test_dataset_oracle_reads_masks_through_target_behind_subsets() -> None:
    base = _Masks(10)
    pool = Subset(Subset(base, [9, 7, 5, 3, 1, 0]), [4, 0, 2])  # -> base 1, 9, 5
    labels = DatasetOracle(pool).labels(np.array([0, 1, 2]))
    assert [int(m[0, 0]) for m in labels] == [1, 9, 5]
    assert base.items_read == 0
    with pytest.raises(Exception, match="out of range"):
        DatasetOracle(pool).labels(np.array([3]))


# --------------------------------------------------------------------------- runs
def test_a_segmentation_run_writes_miou_results_and_resumes_to_the_same_rows(
    tmp_path, shapes_bundle
) -> None:
    config = _config()
    first = run_experiment(config, tmp_path / "run", bundle=shapes_bundle, progress=False)
    rows = read_results(tmp_path / "run" / "results.csv", config)
    assert len(rows) == 2 * 3
    assert [k for k in rows[0] if k.startswith(("test_", "train_")) and k != "train_seconds"] == (
        SEG_COLUMNS
    )
    for row in rows:
        assert all(0.0 <= row[c] <= 1.0 for c in SEG_COLUMNS)
    assert "Test mIoU (%)" in (tmp_path / "run" / "summary.md").read_text()
    assert "| random |" in first.table
    # the same seed gives the same numbers, and a resume of the finished run changes nothing
    again = run_experiment(config, tmp_path / "again", bundle=shapes_bundle, progress=False).rows
    resumed = run_experiment(
        config, tmp_path / "run", bundle=shapes_bundle, progress=False, resume=True
    ).rows
    for other in (again, resumed):
        for a, b in zip(first.rows, other):
            assert {k: a[k] for k in SEG_COLUMNS} == {k: b[k] for k in SEG_COLUMNS}
    # the labelled masks are checkpointed as uint8 (8x less than int64), loaded back exactly
    state = torch.load(
        tmp_path / "run" / "state" / "random.t0.pt", map_location="cpu", weights_only=True
    )
    labels = state["learner"]["labels"]
    assert labels.dtype == torch.uint8 and labels.dim() == 3
    indices = torch.as_tensor(state["learner"]["pool"]["labeled_at"]).ge(0).nonzero().flatten()
    truth = torch.stack([shapes_bundle.train_eval[int(i)][1] for i in indices])
    assert torch.equal(labels.long(), truth.long())


def test_models_and_strategies_that_do_not_fit_the_task_are_refused_before_the_folder(
    tmp_path, shapes_bundle, small_digits
) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="model smallcnn is a classification model.*fcn-small"):
        run_experiment(_config(model="smallcnn"), out, bundle=shapes_bundle)
    with pytest.raises(ConfigError, match="model fcn-small is a per-pixel"):
        run_experiment(_config(dataset="digits", model="fcn-small"), out, bundle=small_digits)
    with pytest.raises(ConfigError, match="expected-gradnorm"):
        run_experiment(_config(strategies=["expected-gradnorm"]), out, bundle=shapes_bundle)
    assert not out.exists()


def test_the_reduction_is_recorded_only_when_it_is_not_the_default() -> None:
    assert "reduction" not in protocol(_config())  # states written before it existed resume
    assert protocol(_config(reduction="max"))["reduction"] == "max"
    with pytest.raises(ConfigError, match="reduction"):
        _config(reduction="median").check()
