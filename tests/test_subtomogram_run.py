"""3-D subtomograms through the experiment layer: a run with cnn3d on simulated volumes (results,
resume), the model's keyword arguments from the config (``model_params``), 2-D / 3-D model and
data mismatches refused before anything is written, and ``demo --task subtomogram``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from gradnorm_al.cli import main
from gradnorm_al.data import load_dataset
from gradnorm_al.data.subtomograms import datasets as subtomo_datasets
from gradnorm_al.data.subtomograms.simulate import SimulationParams
from gradnorm_al.errors import ConfigError
from gradnorm_al.experiment import config as config_module
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.results import read_results
from gradnorm_al.experiment.runner import model_factory, run_experiment

# 3 classes x 8 volumes of 12^3: 18 in the pool, 6 in the test set
SMALL = SimulationParams(classes=3, per_class=8, size=12, voxel_size=16.0, snr=0.5, seed=1)


@pytest.fixture
def small_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subtomo_datasets, "SIM_PARAMS", SMALL)


def _config(**changes) -> ExperimentConfig:
    values = dict(
        dataset="subtomograms-sim",
        model="cnn3d",
        model_params={"width": 4, "hidden": 16},
        strategies=["random", "entropy-gradnorm"],
        trials=1,
        cycles=2,
        initial_fraction=0.3,
        budget_fraction=0.2,
        epochs=1,
        lr=0.05,
        batch_size=4,
    )
    values.update(changes)
    return ExperimentConfig(**values)


def test_a_cnn3d_run_on_simulated_volumes_writes_accuracy_and_resumes_the_same(
    tmp_path: Path, small_sim: None
) -> None:
    config = _config()
    result = run_experiment(config, tmp_path / "run", progress=False)
    rows = read_results(tmp_path / "run" / "results.csv", config)
    assert [(r["strategy"], r["cycle"], r["num_labeled"]) for r in rows] == [
        ("random", 0, 5),
        ("random", 1, 9),
        ("entropy-gradnorm", 0, 5),
        ("entropy-gradnorm", 1, 9),
    ]  # 30% of 18, then + 20% of 18 (3.6 -> 4)
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
    # the model's keyword arguments are part of the recorded protocol
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["model_params"] == {"width": 4, "hidden": 16}
    again = run_experiment(config, tmp_path / "run", resume=True, progress=False)
    assert again.rows == result.rows


def test_model_params_reach_the_model(small_sim: None) -> None:
    bundle = load_dataset("subtomograms-sim")
    name, factory = model_factory(_config(model_params={"width": 4}), bundle)
    model = factory()
    assert name == "cnn3d"
    assert [block[0].out_channels for block in model.blocks] == [4, 8, 16]
    _, default = model_factory(_config(model_params={}), bundle)
    assert default().blocks[0][0].out_channels == 32


@pytest.mark.parametrize(
    "params, message",
    [
        ({"depth": 3}, r"model cnn3d does not take depth; it takes: .*width"),
        ({"width": "8"}, r"model cnn3d: width must be an integer"),
        ({"num_classes": 3}, r"model_params sets num_classes, which the dataset determines"),
    ],
)
def test_bad_model_params_are_refused_before_anything_is_written(
    tmp_path: Path, small_sim: None, params: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_experiment(_config(model_params=params), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_model_params_of_the_datasets_default_model_are_checked_too(
    tmp_path: Path, small_sim: None
) -> None:
    config = _config(model=None, model_params={"depth": 3})  # cnn3d: the dataset's default
    with pytest.raises(ConfigError, match="model cnn3d does not take depth"):
        run_experiment(config, tmp_path / "run", progress=False)


def test_model_params_from_a_config_file(tmp_path: Path, small_sim: None) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("dataset: subtomograms-sim\nmodel: cnn3d\nmodel_params: {width: 8}\n")
    assert ExperimentConfig.from_yaml(path).model_params == {"width": 8}
    path.write_text("dataset: subtomograms-sim\nmodel: cnn3d\nmodel_params: {width: 2.5}\n")
    config = ExperimentConfig.from_yaml(path)  # checked against the model when a run starts
    with pytest.raises(ConfigError, match="model cnn3d: width must be an integer"):
        run_experiment(config, tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "dataset, model, message",
    [
        ("subtomograms-sim", "smallcnn", "model smallcnn is a 2-D .* holds 3-D volumes; use a 3-D"),
        ("digits", "cnn3d", "model cnn3d is a 3-D .* holds 2-D images; use a 2-D model"),
        ("digits", "resnet3d", "model resnet3d is a 3-D"),
    ],
)
def test_a_2d_model_on_volumes_and_a_3d_model_on_images_are_refused(
    tmp_path: Path, small_sim: None, dataset: str, model: str, message: str
) -> None:
    config = _config(dataset=dataset, model=model, model_params={})
    with pytest.raises(ConfigError, match=message):
        run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_subtomogram_demo_runs_through_the_cli(
    tmp_path: Path, small_sim: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = config_module.demo_config("subtomogram")
    assert (demo.dataset, demo.model) == ("subtomograms-sim", "cnn3d")
    assert demo.model_params == {"width": 8}
    assert demo.strategies == ["random", "entropy-gradnorm", "entropy"] and demo.trials == 3

    def short(task: str) -> ExperimentConfig:
        return replace(config_module.demo_config(task), trials=1, cycles=2, epochs=1)

    monkeypatch.setattr("gradnorm_al.cli.demo.demo_config", short)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--task", "subtomogram", "--quiet"]) == 0
    out = tmp_path / "gradnorm-al-demo-subtomogram"
    rows = read_results(out / "results.csv")
    assert [(r["strategy"], r["cycle"]) for r in rows] == [
        (s, c) for s in ("random", "entropy-gradnorm", "entropy") for c in (0, 1)
    ]
    assert "Test accuracy" in (out / "summary.md").read_text()
