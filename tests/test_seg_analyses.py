"""Reports and analyses on a segmentation run: the replay rebuilds the run's task and data, Table
1's true-label gradient norms use the true masks (ignore index left out), A.2 follows the run's
reduction, Table 3 is in mIoU, and the influence analysis refuses, each against a brute-force
recomputation where it computes something."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_to_scale,
    brute_grad_norms,
    check_gradnorm_decrease,
    check_topk_overlap,
    pool_items,
)
from torch.utils.data import TensorDataset

from gradnorm_al.analyses.generalization_gap import generalization_gap
from gradnorm_al.analyses.gradnorm_decrease import gradnorm_decrease
from gradnorm_al.analyses.influence import influence
from gradnorm_al.analyses.replay import RunReader
from gradnorm_al.analyses.topk_overlap import topk_overlap, true_label_grad_norms
from gradnorm_al.cli import main
from gradnorm_al.data import DATASETS, DatasetBundle
from gradnorm_al.data.augment import RandomCropFlip
from gradnorm_al.data.shapes import synthetic_shapes
from gradnorm_al.errors import ConfigError
from gradnorm_al.experiment import ExperimentConfig, run_experiment
from gradnorm_al.tasks import SegmentationTask
from gradnorm_al.train import evaluate

DATASET = "test-shapes"  # registered for this module only
IGNORE = 255
UNLABELLED_IMAGE = 7  # pool image without a labelled pixel: its true-mask loss is 0


def _bundle() -> DatasetBundle:
    """60 pool and 20 test images of 12 x 12 pixels; every pool mask's top row is unlabelled."""
    x, y = synthetic_shapes(60, 12, seed=0)
    xt, yt = synthetic_shapes(20, 12, seed=1)
    y[:, 0, :] = IGNORE
    y[UNLABELLED_IMAGE] = IGNORE
    pool = TensorDataset(x, y)  # targets None: the masks are read from the items
    return DatasetBundle(
        DATASET,
        pool,
        pool,
        TensorDataset(xt, yt),
        None,
        None,
        3,
        3,
        (12, 12),
        "fcn-small",
        task="segmentation",
        ignore_index=IGNORE,
        augment=RandomCropFlip(10, ignore_index=IGNORE),
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A real segmentation run kept with its models: 2 strategies x 2 trials x 3 cycles, 30
    candidates per selection, per-pixel scores reduced by their max (not the default mean, so
    an analysis that ignored the run's reduction would be caught)."""
    DATASETS.register(DATASET)(lambda root, download: _bundle())
    config = ExperimentConfig(
        dataset=DATASET,
        strategies=["random", "entropy-gradnorm"],
        trials=2,
        cycles=3,
        epochs=3,
        lr=0.05,
        batch_size=16,
        subset_size=30,
        reduction="max",
        keep_models=True,
    )
    out = tmp_path_factory.mktemp("segrun")
    try:
        run_experiment(config, out, progress=False)
        yield out
    finally:
        DATASETS.unregister(DATASET)


@pytest.fixture(scope="module")
def reader(run_dir):
    return RunReader(run_dir)


def _true_mask_ce(y: torch.Tensor):
    """The image's pixel cross-entropy with its true mask, mean over its labelled pixels, as
    PyTorch's own ignore_index computes it; None for an image without one."""

    def loss(logits: torch.Tensor, i: int) -> torch.Tensor | None:
        if not (y[i] != IGNORE).any():
            return None
        return F.cross_entropy(logits, y[i : i + 1], ignore_index=IGNORE)

    return loss


def test_replay_rebuilds_the_task_and_reproduces_the_runs_miou(reader):
    task = reader.task
    assert isinstance(task, SegmentationTask)
    assert (task.ignore_index, task.reduction, task.num_classes) == (IGNORE, "max", 3)
    for row in reader.rows:
        s, t, c = row["strategy"], row["trial"], row["cycle"]
        view = reader.cycles(s, t)[c]
        model = reader.model(s, t, c)
        device = reader.device
        test = evaluate(model, reader.bundle.test, task.metric_accumulator(), device=device)
        train = evaluate(
            model,
            reader.bundle.train_eval,
            task.metric_accumulator(),
            view.labeled,
            device=device,
            targets=reader.true_labels(view.labeled),
        )
        for split, metrics in (("test", test), ("train", train)):
            for name in ("miou", "pixel_accuracy"):
                assert math.isclose(metrics[name], row[f"{split}_{name}"], abs_tol=1e-12)
    masks = reader.true_labels(np.array([3, UNLABELLED_IMAGE]))
    assert masks.shape == (2, 12, 12) and masks.dtype == torch.uint8  # the task's mask dtype
    assert (masks[0, 0] == IGNORE).all() and (masks[1] == IGNORE).all()


@pytest.mark.parametrize("norm", ["tensor-sum", "l2"])
def test_true_mask_gradnorms_equal_one_backward_per_image(reader, norm):
    """float64, every pool image (one without a labelled pixel: 0), batches of 16."""
    model = reader.model("entropy-gradnorm", 0, 1).double()
    indices = np.arange(60)
    norms = true_label_grad_norms(
        model,
        reader.bundle.train_eval,
        indices,
        norm=norm,
        batch_size=16,
        task=reader.task,
        labels=reader.true_labels(indices),
    )
    x, y = pool_items(reader, indices)
    expected = brute_grad_norms(model, x.double(), _true_mask_ce(y), norm)
    assert norms[UNLABELLED_IMAGE] == 0.0 and expected.min(initial=1.0) == 0.0
    assert_close_to_scale(norms, expected, rel=1e-10)


def test_topk_overlap_equals_a_brute_force_count_with_the_true_masks(reader):
    records = topk_overlap(reader)
    assert len(records) == 2 * 2 * 2  # strategies x trials x selecting cycles
    check_topk_overlap(reader, records, _true_mask_ce, budget=3, candidates=30)


def test_gradnorm_decrease_follows_the_runs_reduction(reader):
    records = gradnorm_decrease(reader)
    assert len(records) == 2 * 2 * 2 and {r["scheme"] for r in records} == {"entropy"}

    def max_pixel_entropy(logits: torch.Tensor, _i: int) -> torch.Tensor:
        """The run's reduction, max: the entropy of the image's most uncertain pixel."""
        p = torch.softmax(logits, dim=1)
        return (-(p * torch.log_softmax(logits, dim=1)).sum(dim=1)).amax()

    check_gradnorm_decrease(reader, records, max_pixel_entropy)


def test_generalization_gap_is_in_miou(reader, run_dir, capsys):
    records = generalization_gap(reader.rows)
    by = {(r["strategy"], r["cycle"]): r for r in records}
    for (strategy, cycle), r in by.items():
        rows = [x for x in reader.rows if (x["strategy"], x["cycle"]) == (strategy, cycle)]
        gaps = [100 * (x["train_miou"] - x["test_miou"]) for x in rows]
        assert r["gap_mean"] == pytest.approx(np.mean(gaps))
        assert r["gap_std"] == pytest.approx(np.std(gaps, ddof=1))
        assert r["test_miou"] == pytest.approx(100 * np.mean([x["test_miou"] for x in rows]))
    assert main(["analyze", "generalization-gap", str(run_dir)]) == 0
    assert "Training mIoU on the labelled set minus test mIoU" in capsys.readouterr().out
    with open(run_dir / "analysis" / "generalization_gap.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[3:7] == ["train_miou", "test_miou", "gap_mean", "gap_std"]
    assert main(["analyze", "timing", str(run_dir)]) == 0
    assert "| entropy-gradnorm |" in capsys.readouterr().out


def test_commands_on_a_segmentation_run(run_dir, tmp_path, capsys):
    assert main(["analyze", "topk-overlap", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cross-entropy with the true mask" in out and "/ 3" in out
    assert main(["analyze", "gradnorm-decrease", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Test mIoU per cycle" in md and "## Test pixel accuracy per cycle" in md
    # Eq. 3's terms are per-sample cross-entropies of [N, C] logits: refused, in one line
    capsys.readouterr()
    assert main(["analyze", "influence", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a segmentation run" in err and "classification" in err


def test_influence_refuses_through_the_api_too(reader):
    with pytest.raises(ConfigError, match="implemented for classification runs only"):
        influence(reader)


def test_a_classification_model_or_unknown_data_is_refused(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("model: null", "model: smallcnn"))
    assert "model: smallcnn" in (copy / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="smallcnn is a classification model but dataset"):
        RunReader(copy, bundle=_bundle()).model("random", 0, 0)
    # a run made with data given in Python (bundle=): the fix is to give it again
    (copy / "config.yaml").write_text(text.replace(f"dataset: {DATASET}", "dataset: nowhere"))
    assert main(["analyze", "topk-overlap", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'nowhere' is not registered" in err
    assert "RunReader(DIR, bundle=...)" in err
