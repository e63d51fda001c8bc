"""Options declared once: validation, YAML keys and command-line flags derived from the
declarations (gradnorm_al.options), for the experiment config and every registered strategy."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml

from gradnorm_al import STRATEGIES, ConfigError, ExperimentConfig, create_strategy
from gradnorm_al.cli import build_parser, main
from gradnorm_al.experiment.presets import _values, load_preset, preset_names
from gradnorm_al.experiment.runner import validate_names
from gradnorm_al.loop import LoopConfig
from gradnorm_al.options import (
    OneOf,
    Range,
    add_arguments,
    check_arguments,
    describe,
    from_mapping,
    option,
    option_fields,
    to_mapping,
    validate,
)
from gradnorm_al.train import TrainConfig

# The flags of `gradnorm-al run` before they were derived (README and --help documented them).
RUN_FLAGS = {
    "--preset",
    "--config",
    "--dataset",
    "--model",
    "--strategy",
    "--trials",
    "--cycles",
    "--initial-fraction",
    "--budget-fraction",
    "--subset-size",
    "--pool-size",
    "--reduction",
    "--epochs",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--milestones",
    "--gamma",
    "--batch-size",
    "--eval-batch-size",
    "--num-workers",
    "--amp",
    "--channels-last",
    "--augment",
    "--score-batch-size",
    "--norm",
    "--reinit-each-cycle",
    "--keep-models",
    "--seed",
    "--device",
    "--data-root",
    "--download",
    # not config options
    "--out",
    "--overwrite",
    "--quiet",
    "--resume",
    "-h",
    "--help",
}

# A config.yaml as the runner wrote it before this change (ExperimentConfig.to_yaml()).
OLD_RUN_CONFIG = """\
dataset: digits
model: null
strategies:
- random
- qbc
trials: 3
seed: 0
device: cpu
data_root: null
download: false
norm: tensor-sum
pool_size: null
strategy_params:
  qbc:
    members: 3
keep_models: false
cycles: 7
initial_fraction: 0.1
budget_fraction: 0.05
subset_size: 50
reinit_each_cycle: false
score_batch_size: 128
epochs: 200
lr: 0.1
momentum: 0.9
weight_decay: 0.0005
milestones:
- 3
gamma: 0.1
batch_size: 128
num_workers: 0
"""
OLD_KEYS = list(yaml.safe_load(OLD_RUN_CONFIG))  # the keys before the change, in their order
# options added since, after the option they follow, with the value older files mean
ADDED = {
    "reduction": ("norm", "mean"),
    "model_params": ("strategy_params", {}),
    "eval_batch_size": ("batch_size", 256),
    "amp": ("num_workers", "none"),
    "channels_last": ("amp", False),
    "augment": ("model_params", "dataset"),
}
YAML_KEYS = list(OLD_KEYS)
for _key, (_after, _) in ADDED.items():
    YAML_KEYS.insert(YAML_KEYS.index(_after) + 1, _key)


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def _yaml(tmp_path: Path, text: str) -> ExperimentConfig:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return ExperimentConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------
# the command line


def test_derived_run_flags_are_todays_flags() -> None:
    flags = {s for action in _run_parser()._actions for s in action.option_strings}
    assert flags == RUN_FLAGS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--dataset", "mnist"], {"dataset": "mnist"}),
        (["--model", "smallcnn"], {"model": "smallcnn"}),
        (["--strategy", "random", "--strategy", "qbc"], {"strategies": ["random", "qbc"]}),
        (["--trials", "2"], {"trials": 2}),
        (["--cycles", "4"], {"cycles": 4}),
        (["--initial-fraction", "0.2"], {"initial_fraction": 0.2}),
        (["--budget-fraction", "0.1"], {"budget_fraction": 0.1}),
        (["--subset-size", "500"], {"subset_size": 500}),
        (["--pool-size", "1000"], {"pool_size": 1000}),
        (["--epochs", "5"], {"epochs": 5}),
        (["--lr", "0.05"], {"lr": 0.05}),
        (["--momentum", "0.5"], {"momentum": 0.5}),
        (["--weight-decay", "1e-4"], {"weight_decay": 1e-4}),
        (["--milestones", "3", "7"], {"milestones": [3, 7]}),
        (["--gamma", "0.2"], {"gamma": 0.2}),
        (["--batch-size", "32"], {"batch_size": 32}),
        (["--num-workers", "4"], {"num_workers": 4}),
        (["--score-batch-size", "64"], {"score_batch_size": 64}),
        (["--norm", "l2"], {"norm": "l2"}),
        (["--reinit-each-cycle"], {"reinit_each_cycle": True}),
        (["--keep-models"], {"keep_models": True}),
        (["--seed", "7"], {"seed": 7}),
        (["--device", "cuda:1"], {"device": "cuda:1"}),
        (["--data-root", "/data"], {"data_root": "/data"}),
        (["--download"], {"download": True}),
        (["--preset", "fmnist", "--config", "x.yaml"], {"preset": "fmnist", "config": "x.yaml"}),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_every_documented_flag_parses_to_its_option(
    argv: list[str], expected: dict[str, Any]
) -> None:
    args = vars(build_parser().parse_args(["run", *argv]))
    given = {k: v for k, v in args.items() if k not in ("command", "out", "overwrite", "quiet")}
    assert given == expected  # options not given stay absent: the config file keeps them
    options = {k: v for k, v in given.items() if k not in ("preset", "config")}
    config = ExperimentConfig.from_dict(options)
    for name, value in options.items():
        assert getattr(config, name) == value


def test_run_help_shows_the_declared_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in (
        "--epochs EPOCHS epochs per cycle (default: 200)",
        "--trials TRIALS number of trials (default: 3)",
        "(default: 0.0005)",  # weight decay
        "(default: random entropy-gradnorm)",  # strategies
        "--milestones EPOCH [EPOCH ...]",
        "(default: 80% of the epochs)",  # what None means
        "--subset-size SUBSET_SIZE random unlabelled candidates scored per cycle (default: all)",
        "--norm {tensor-sum,l2}",
    ):
        assert text in out
    assert (
        "--eval-batch-size EVAL_BATCH_SIZE batch size for the test and training metrics "
        "(large images: lower it) (default: 256)"
    ) in out
    assert "strategy-params" not in out and "model-params" not in out


def test_help_follows_a_changed_default() -> None:
    @dataclass
    class Toy:
        steps: int = option(5, "number of steps", ge=1)
        rate: float = option(0.25, "a rate")
        on: bool = option(True, "a switch that is on")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    help_text = " ".join(parser.format_help().split())
    assert "--steps STEPS number of steps (default: 5)" in help_text
    assert "a rate (default: 0.25)" in help_text
    assert parser.parse_args(["--no-on"]).on is False  # a switch on by default can be turned off
    assert vars(parser.parse_args([])) == {}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--norm", "linf"], "argument --norm: invalid choice: 'linf'"),
    ],
)
def test_command_line_type_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", *argv, "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


# ---------------------------------------------------------------------------------------------
# YAML files: strict types, ranges, keys


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('keep_models: "no"\n', "keep-models must be true or false, got 'no'"),
        ("download: 1\n", "download must be true or false, got 1"),
        ("epochs: true\n", "epochs must be an integer >= 1, got True"),
        ("epochs: 10.0\n", "epochs must be an integer >= 1, got 10.0"),
        ("trials: '3'\n", "trials must be an integer >= 1, got '3'"),
        ('lr: "0.1"\n', "lr must be a number > 0, got '0.1'"),
        ("lr: .nan\n", "lr must be a number > 0, got nan"),
        ("momentum: false\n", "momentum must be a number >= 0, got False"),
        (
            "weight_decay: 5e-4\n",  # YAML 1.1 reads a number with an exponent but no dot as text
            "weight-decay must be a number >= 0, got '5e-4' (YAML reads this as a string; "
            "write 5.0e-4)",
        ),
        ("initial_fraction: 0\n", "initial-fraction must be a number in (0, 1], got 0"),
        ("budget_fraction: 1.5\n", "budget-fraction must be a number in (0, 1], got 1.5"),
        ("seed: -1\n", "seed must be an integer >= 0, got -1"),
        ("subset_size: 0\n", "subset-size must be an integer >= 1 or null, got 0"),
        ("milestones: [0, 5]\n", "milestones must be a list of integers >= 1 or null, got [0, 5]"),
        ("milestones: 5\n", "milestones must be a list of integers >= 1 or null, got 5"),
        ("norm: per-tensor\n", "norm must be one of 'tensor-sum', 'l2', got 'per-tensor'"),
        ("model: 3\n", "model must be a string or null, got 3"),
        ("strategies: [random, 3]\n", "strategies must be a list of strings, got ['random', 3]"),
        (
            "strategy_params: {qbc: 3}\n",
            "strategy-params must be a mapping of strings to mappings, got {'qbc': 3}",
        ),
        ("strategies: []\n", "give at least one strategy"),
        ("strategies: [random, random]\n", "a strategy is listed twice"),
    ],
)
def test_yaml_values_are_checked_strictly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _yaml(tmp_path, text)
    # the file and line, then what is wrong, then the fix
    where = f"{tmp_path / 'exp.yaml'}:1: "
    assert str(exc.value).startswith(where + message) and "\n" not in str(exc.value)
    assert str(exc.value).endswith("; correct or remove that option")


def test_unknown_keys_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _yaml(tmp_path, "epochs: 3\nepoch: 3\n")
    message = str(exc.value).removesuffix("; correct or remove that option")
    assert message.startswith(f"{tmp_path / 'exp.yaml'}:2: unknown option 'epoch'; known options: ")
    assert message.split("known options: ")[1].split(", ") == sorted(YAML_KEYS)


def test_keys_with_dashes_the_flag_name_and_one_strategy(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "initial-fraction: 0.2\nstrategy: qbc\nweight_decay: 5.0e-4\n")
    assert (config.initial_fraction, config.strategies, config.weight_decay) == (0.2, ["qbc"], 5e-4)


def test_yaml_keys_and_their_order_are_todays() -> None:
    assert len(YAML_KEYS) == 32
    assert list(ExperimentConfig().to_dict()) == YAML_KEYS
    assert list(yaml.safe_load(ExperimentConfig().to_yaml())) == YAML_KEYS


def test_a_run_folders_config_yaml_from_before_loads_unchanged(tmp_path: Path) -> None:
    config = _yaml(tmp_path, OLD_RUN_CONFIG)
    assert config.strategies == ["random", "qbc"]
    assert config.strategy_params == {"qbc": {"members": 3}}
    assert (config.subset_size, config.milestones, config.weight_decay) == (50, [3], 5e-4)
    # written back the same, with the options added since at the value they had before
    expected = {**yaml.safe_load(OLD_RUN_CONFIG), **{k: v for k, (_, v) in ADDED.items()}}
    written = yaml.safe_load(config.to_yaml())
    assert list(written.items()) == [(k, expected[k]) for k in YAML_KEYS]
    assert config.to_yaml().startswith(OLD_RUN_CONFIG.split("norm:")[0])  # same text before


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_with_its_values(name: str) -> None:
    config = load_preset(name)
    values = {k: v for k, v in _values(name).items() if k != "description"}
    assert values, name
    for key, value in values.items():
        assert getattr(config, key) == value, key


# ---------------------------------------------------------------------------------------------
# the experiment config is derived from LoopConfig and TrainConfig


def test_every_option_is_declared_with_help() -> None:
    helps = {a.dest: a.help for a in _run_parser()._actions}
    for f, annotation in option_fields(ExperimentConfig):
        assert f.metadata, f"{f.name} is not declared with option()"
        describe(annotation)  # a type the options can check
        if f.name not in ("strategy_params", "model_params"):  # config files only
            assert helps[f.name] and not helps[f.name].startswith(" ("), f.name


def test_loop_and_train_options_are_declared_once() -> None:
    own = ExperimentConfig.__dict__.get("__annotations__", {})
    assert own == {}  # ExperimentConfig adds no fields: they come from its bases
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for part in (LoopConfig, TrainConfig):
        for f in dataclasses.fields(part):
            assert f.name in names
            assert _field(ExperimentConfig, f.name) is f  # the same declaration, not a copy


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_loop_and_train_views_carry_every_value() -> None:
    changed = {
        "cycles": 3,
        "initial_fraction": 0.3,
        "budget_fraction": 0.2,
        "subset_size": 40,
        "reinit_each_cycle": True,
        "score_batch_size": 16,
        "epochs": 9,
        "lr": 0.01,
        "momentum": 0.5,
        "weight_decay": 0.0,
        "milestones": [4],
        "gamma": 0.5,
        "batch_size": 8,
        "num_workers": 2,
    }
    config = ExperimentConfig.from_dict(changed)
    assert config.loop_config() == LoopConfig(**{k: changed[k] for k in LoopConfig.__annotations__})
    train = config.train_config()
    assert train == TrainConfig(**{k: v for k, v in changed.items() if hasattr(train, k)})
    assert type(config.loop_config()) is LoopConfig and type(train) is TrainConfig


def test_eval_batch_size_is_an_option_for_large_images() -> None:
    # full-size Cityscapes images: 256 per evaluation batch would not fit a GPU
    config = ExperimentConfig.from_dict({"eval-batch-size": 8})
    assert config.train_config().eval_batch_size == 8
    with pytest.raises(ConfigError, match="eval-batch-size must be an integer >= 1, got 0"):
        ExperimentConfig.from_dict({"eval_batch_size": 0})


# ---------------------------------------------------------------------------------------------
# strategy hyper-parameters, declared in the factories' signatures


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_accepts_its_own_defaults(name: str) -> None:
    factory = STRATEGIES.get(name)
    defaults = {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    check_arguments(factory, defaults, f"strategy {name}")
    assert create_strategy(name, **defaults).name == name


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mc-dropout", {"samples": "25"}, "strategy mc-dropout: samples must be an integer >= 2"),
        ("mc-dropout", {"samples": 25.0}, "strategy mc-dropout: samples must be an integer >= 2"),
        ("qbc", {"members": True}, "strategy qbc: members must be an integer >= 2, got True"),
        ("qbc", {"bootstrap": "no"}, "strategy qbc: bootstrap must be true or false, got 'no'"),
        ("ll4al", {"margin": -1}, "strategy ll4al: margin must be a number >= 0, got -1"),
        ("core-gcn", {"max_candidates": 0}, "strategy core-gcn: max_candidates must be an integer"),
        ("vaal", {"lr": "5e-4"}, "strategy vaal: lr must be a number, got '5e-4'"),
        ("vaal", {"epochs": 0}, "strategy vaal: epochs must be an integer >= 1, got 0"),
        ("sraal", {"iterations": 1.5}, "strategy sraal: iterations must be an integer or null"),
        (
            "entropy-gradnorm",
            {"norm": "per-tensor"},
            "strategy entropy-gradnorm: norm must be one of 'tensor-sum', 'l2', got 'per-tensor'",
        ),
        ("random", {"k": 1}, "strategy random does not take k; it takes: no parameters"),
        ("qbc", {"member": 3}, "strategy qbc does not take member; it takes: bootstrap, "),
    ],
)
def test_strategy_parameters_are_checked_from_their_declaration(
    name: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        create_strategy(name, **params)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_strategy_parameters_of_a_config_fail_before_any_data_is_read() -> None:
    config = ExperimentConfig(
        dataset="no-such-data-is-read", strategies=["qbc"], strategy_params={"qbc": {"members": 1}}
    )
    with pytest.raises(ConfigError, match="strategy qbc: members must be an integer >= 2, got 1"):
        validate_names(config)


def test_a_new_factory_is_checked_the_same_way() -> None:
    def top_k_sampler(
        k: Annotated[int, Range(ge=1)] = 1,
        mode: Annotated[str, OneOf(("greedy", "stochastic"))] = "greedy",
        temperature: Annotated[float, Range(gt=0)] | None = None,
        tag: Any = None,
    ) -> None: ...

    check_arguments(top_k_sampler, {"k": 3, "temperature": None, "tag": object()}, "sampler t")
    for params, message in [
        ({"k": 0}, "sampler t: k must be an integer >= 1, got 0"),
        ({"mode": "g"}, "sampler t: mode must be one of 'greedy', 'stochastic', got 'g'"),
        ({"temperature": 0.0}, "sampler t: temperature must be a number > 0 or null, got 0.0"),
        ({"kk": 1}, "sampler t does not take kk; it takes: k, mode, tag, temperature"),
    ]:
        with pytest.raises(ConfigError) as exc:
            check_arguments(top_k_sampler, params, "sampler t")
        assert str(exc.value) == message


# ---------------------------------------------------------------------------------------------
# the helpers on their own


@dataclass
class _Toy:
    count: int = option(2, "a count", ge=0, lt=10)
    share: float | None = option(None, "a share", gt=0.0, le=1.0)
    names: list[str] = option(["a"], "names", append=True)
    sizes: list[int] = option([1, 2], "sizes", ge=1)
    mode: str = option("x", "a mode", choices=("x", "y"))
    hidden: int = option(0, "not an option", exposed=False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": 10}, "count must be an integer in [0, 10), got 10"),
        ({"count": -1}, "count must be an integer in [0, 10), got -1"),
        ({"share": 0.0}, "share must be a number in (0, 1] or null, got 0.0"),
        ({"share": float("inf")}, "share must be a number in (0, 1] or null, got inf"),
        ({"sizes": [1, 0]}, "sizes must be a list of integers >= 1, got [1, 0]"),
        ({"sizes": (1, 2)}, "sizes must be a list of integers >= 1, got (1, 2)"),
        ({"mode": "z"}, "mode must be one of 'x', 'y', got 'z'"),
        ({"hidden": 1}, "unknown option 'hidden'; known options: count, mode, names, share, sizes"),
    ],
)
def test_from_mapping_refusals(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_mapping(_Toy, values)
    assert str(exc.value) == message


def test_from_mapping_updates_a_base_and_round_trips() -> None:
    base = _Toy(count=3)
    toy = from_mapping(_Toy, {"share": 1, "names": "b"}, base)
    assert (toy.count, toy.share, toy.names) == (3, 1, ["b"])  # an int is a number
    assert base.share is None  # the base is not changed
    assert to_mapping(toy) == {
        "count": 3,
        "share": 1,
        "names": ["b"],
        "sizes": [1, 2],
        "mode": "x",
    }
    assert from_mapping(_Toy, to_mapping(toy)) == toy
    assert _Toy().sizes is not _Toy().sizes  # list defaults are copied


def test_validate_checks_an_instance_built_in_python() -> None:
    validate(_Toy())
    with pytest.raises(ConfigError, match=r"^count must be an integer in \[0, 10\), got 2.0$"):
        validate(_Toy(count=2.0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^toy maker: count must be"):
        validate(_Toy(count=True), "toy maker")


def test_range_words() -> None:
    assert str(Range(ge=1)) == ">= 1"
    assert str(Range(gt=0)) == "> 0"
    assert str(Range(le=5)) == "<= 5"
    assert str(Range(gt=0, le=1)) == "in (0, 1]"
    assert str(Range(ge=0, lt=1)) == "in [0, 1)"
    assert 0.5 in Range(gt=0, lt=1) and 0 not in Range(gt=0, lt=1) and 1 not in Range(gt=0, lt=1)
