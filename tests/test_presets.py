"""Shipped presets: published protocol, names that resolve, CLI use; pool subsets; report CLI."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest
import yaml

from gradnorm_al.cli import main
from gradnorm_al.data.subtomograms import datasets as subtomo_datasets
from gradnorm_al.data.subtomograms.simulate import SimulationParams
from gradnorm_al.errors import ConfigError
from gradnorm_al.experiment import load_preset, preset_names
from gradnorm_al.experiment.presets import preset_description
from gradnorm_al.experiment.runner import run_experiment, validate_names
from gradnorm_al.strategies import check_task, create_strategy
from gradnorm_al.tasks import SegmentationTask

PAPER = ["paper-caltech101", "paper-cifar10", "paper-cifar100", "paper-imagenet", "paper-svhn"]


def test_every_preset_is_valid_and_the_paper_ones_follow_the_published_protocol():
    assert preset_names() == sorted(
        [*PAPER, "paper-cityscapes", "subtomograms-large", "fmnist", "mnist"]
    )
    for name in preset_names():
        config = load_preset(name)
        validate_names(config)  # every strategy and model exists
        assert config.initial_fraction == 0.10 and config.budget_fraction == 0.05
    for name in PAPER:
        c = load_preset(name)
        assert (c.epochs, c.lr, c.momentum, c.weight_decay, c.milestones, c.batch_size) == (
            200,
            0.1,
            0.9,
            5e-4,
            [160],
            128,
        )
        assert c.gamma == 0.1 and not c.reinit_each_cycle and c.device == "cuda"
        assert (c.cycles, c.trials) == ((5, 2) if name == "paper-imagenet" else (7, 3))
        assert "entropy-gradnorm" in c.strategies and "random" in c.strategies
    assert load_preset("paper-cifar10").subset_size == 25000
    assert load_preset("paper-cifar10").model == "resnet18-cifar"
    assert load_preset("paper-svhn").dataset == "svhn"
    assert load_preset("paper-caltech101").model == "resnet18"
    assert load_preset("paper-imagenet").model == "vgg16"
    for name, dataset in (("fmnist", "fashion-mnist"), ("mnist", "mnist")):
        c = load_preset(name)
        assert c.dataset == dataset and c.device == "cpu" and c.pool_size == 10000


def test_the_cityscapes_preset_is_the_segmentation_protocol_and_says_where_numbers_come_from():
    c = load_preset("paper-cityscapes")
    validate_names(c)
    assert (c.dataset, c.model, c.device) == ("cityscapes", "drn-d-22", "cuda")
    assert c.strategies == ["random", "entropy", "entropy-gradnorm"]
    assert (c.cycles, c.trials, c.initial_fraction, c.budget_fraction) == (7, 3, 0.10, 0.05)
    assert (c.epochs, c.lr, c.momentum, c.weight_decay, c.milestones, c.batch_size) == (
        50,
        0.01,
        0.9,
        1e-4,
        [40],
        8,
    )
    assert c.subset_size is None and not c.reinit_each_cycle
    assert (c.score_batch_size, c.eval_batch_size) == (8, 8)
    task = SegmentationTask(19)
    for name in c.strategies:  # every strategy runs on the dense task
        check_task(create_strategy(name), task)
    with pytest.raises(ConfigError, match="expected-gradnorm"):
        check_task(create_strategy("expected-gradnorm"), task)
    # 10% of 2,975 then +5% per cycle: 298 images, +149 per cycle, to 1,192 (40%)
    assert c.loop_config().budget(2975) == 149 and round(0.10 * 2975) == 298
    description = preset_description("paper-cityscapes")
    assert "DRN authors' defaults" in description and "our choices" in description
    text = (resources.files("gradnorm_al") / "presets" / "paper-cityscapes.yaml").read_text()
    for fact in ("xulabs/aitom", "fyu/drn", "688x688", "our choice", "from scratch"):
        assert fact in text, fact


def test_the_subtomogram_preset_is_gpu_scale_and_its_strategies_run_on_volumes(
    tmp_path, monkeypatch
):
    c = load_preset("subtomograms-large")
    validate_names(c)
    assert (c.dataset, c.model, c.model_params, c.device) == (
        "subtomograms-sim-large", "cnn3d", {}, "cuda",
    )  # fmt: skip
    large = subtomo_datasets.SIM_LARGE_PARAMS
    assert large.classes * large.per_class >= 10_000 and large.classes > 5
    assert (large.size, large.snr, large.tilt) == (32, 0.05, (-60.0, 60.0))
    assert (
        "our choice"
        in (resources.files("gradnorm_al") / "presets" / "subtomograms-large.yaml").read_text()
    )
    # the same protocol on the CPU, at toy scale: every strategy of the preset runs on volumes
    tiny = SimulationParams(classes=3, per_class=6, size=12, voxel_size=16.0, snr=1.0, seed=2)
    monkeypatch.setattr(subtomo_datasets, "SIM_LARGE_PARAMS", tiny)
    small = replace(c, device="cpu", trials=1, cycles=2, epochs=1, batch_size=4,
                    model_params={"width": 4, "hidden": 8}, initial_fraction=0.3,
                    budget_fraction=0.2)  # fmt: skip
    result = run_experiment(small, tmp_path / "run", progress=False)
    assert sorted({r["strategy"] for r in result.rows}) == sorted(c.strategies)
    assert len(result.rows) == 2 * len(c.strategies)


def test_presets_command_and_unknown_names(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names())
    assert main(["run", "--preset", "paper-cifar1000"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "paper-cifar10" in err and err.count("\n") == 1


def test_a_preset_with_overrides_runs_on_a_seeded_pool_subset_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--preset", "fmnist", "--dataset", "digits", "--pool-size", "300"]
    args += ["--strategy", "random", "--trials", "1", "--cycles", "2", "--epochs", "1"]
    assert main([*args, "--quiet", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    # the preset's training recipe, the command line's overrides
    assert config["lr"] == 0.05 and config["batch_size"] == 64 and config["pool_size"] == 300
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[3]) for r in rows] == [30, 45]  # 10% and 15% of 300
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "random" in html
    assert main(["report", str(out), str(out)]) == 2  # merging needs --out (and distinct runs)
