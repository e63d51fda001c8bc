"""The configuration of an experiment: one flat record, loadable from YAML, validated early."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..data.augment import AUGMENTATIONS
from ..errors import ConfigError, ConfigFileError, read_text
from ..loop import LoopConfig
from ..options import from_mapping, option, to_mapping, validate
from ..strategies.gradnorm import SCALAR_NORMS
from ..tasks import REDUCTIONS
from ..train import TrainConfig

T = TypeVar("T")


@dataclass
class _Setup:
    """What a run compares and where: the options besides the schedule and the recipe."""

    dataset: str = option("digits", "dataset name (see `gradnorm-al list`)")
    model: str | None = option(None, "model name", none="the dataset's default")
    strategies: list[str] = option(
        ["random", "entropy-gradnorm"],
        "strategy name, or SCORER@SAMPLER (e.g. entropy-gradnorm@power); repeat to compare "
        "several on the same seeds",
        flag="--strategy",
        append=True,
        metavar="S",
    )
    trials: int = option(3, "number of trials", ge=1)
    seed: int = option(0, "trial t uses seed + t", ge=0)
    device: str = option("cpu", "cpu, cuda or cuda:N")
    data_root: str | None = option(None, "where the dataset files are", metavar="DIR")
    download: bool = option(
        False, "download the dataset into --data-root if missing (needs network)"
    )
    norm: str = option(
        "tensor-sum",
        "aggregation of the gradnorm strategies: tensor-sum (published code) or l2 (Eq. 5); egl "
        "keeps its own (l2; set it in strategy_params)",
        choices=SCALAR_NORMS,
    )
    reduction: str = option(
        "mean",
        "segmentation: how per-pixel scores (entropy, entropy-gradnorm's loss) become one per "
        "image: mean, sum or max over the pixels",
        choices=REDUCTIONS,
    )
    pool_size: int | None = option(
        None, "use a fixed seeded random pool of this many training samples", ge=1, none="all"
    )
    strategy_params: dict[str, dict[str, Any]] = option(
        {}, "per strategy name, its hyper-parameters (config files only)", cli=False
    )
    model_params: dict[str, Any] = option(
        {},
        "keyword arguments of the model's factory, e.g. {width: 8} for cnn3d (config files "
        "only; num_classes and in_channels come from the dataset)",
        cli=False,
    )
    augment: str = option(
        "dataset",
        "training augmentation: dataset (the dataset's own: crops and flips for CIFAR, SVHN, "
        "Caltech101, ImageNet and segmentation, none for digits, MNIST, Fashion-MNIST and "
        "subtomograms), none, crop (random shifts by up to 1/8 of the side) or crop-flip (and "
        "horizontal flips)",
        choices=AUGMENTATIONS,
    )
    keep_models: bool = option(
        False,
        "save every cycle's trained model under DIR/models (needed by `analyze topk-overlap`, "
        "`influence` and `gradnorm-decrease`)",
    )


@dataclass
class ExperimentConfig(TrainConfig, LoopConfig, _Setup):
    """Every option of ``gradnorm-al run``, flat; defaults follow the published protocol.

    The fields are declared once, where they belong: the setup above, the active-learning
    schedule in :class:`~gradnorm_al.loop.LoopConfig`, the training recipe in
    :class:`~gradnorm_al.train.TrainConfig`. Validation, YAML keys and command-line flags are
    derived from those declarations (:mod:`gradnorm_al.options`).
    """

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(
        cls, values: dict[str, Any], base: ExperimentConfig | None = None
    ) -> ExperimentConfig:
        """``base`` (or the defaults) updated with ``values``; keys may use - or _."""
        config = from_mapping(cls, values, base)
        config.check()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, base: ExperimentConfig | None = None) -> ExperimentConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file; give a YAML file")
        try:
            text = read_text(path, "save it as UTF-8 text", ConfigFileError)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        values, lines = _load_yaml(path, text)
        try:
            return cls.from_dict(values, base)
        except ConfigError as err:
            # the line of the first option that is wrong on its own (else the first line)
            line = next(
                (lines.get(str(k), 1) for k, v in values.items() if _refused(cls, k, v, base)), 1
            )
            raise ConfigFileError(path, line, str(err), "correct or remove that option") from None

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---------------------------------------------------------------- views
    def loop_config(self) -> LoopConfig:
        return _part(LoopConfig, self)

    def train_config(self) -> TrainConfig:
        return _part(TrainConfig, self)

    # ---------------------------------------------------------------- validation
    def check(self) -> None:
        """Raise ConfigError for a value of the wrong type or outside its declared range, or for
        an inconsistent combination (data-free checks; the schedule is checked against the pool
        size by :meth:`LoopConfig.validate`)."""
        validate(self)
        if not self.strategies:
            raise ConfigError("give at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"a strategy is listed twice: {self.strategies}")


def _load_yaml(path: Path, text: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping of a YAML config file and the line of each key; ConfigFileError naming the
    line for invalid YAML, a file that is not a mapping, or a key given twice."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problem = f"character {chr(exc.character)!r} is not allowed in YAML"
        raise ConfigFileError(path, line, problem, "delete it") from None
    except yaml.YAMLError as exc:
        # the start of an unclosed bracket or quote, else where the parser stopped
        context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        problem, where = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
        if mark is None or not context or context.startswith("while parsing a block"):
            context, mark = None, where
        what = problem or str(exc).splitlines()[0]
        if context and where is not None:
            what = f"{context}: {what} on line {where.line + 1}"
        line = mark.line + 1 if mark is not None else 1
        raise ConfigFileError(
            path, line, f"not valid YAML ({what})", "correct the YAML syntax there"
        ) from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigFileError(
            path,
            node.start_mark.line + 1 if node is not None else 1,
            f"the file must hold a mapping of options (option: value), not a "
            f"{type(values).__name__}",
            "write one `option: value` per line",
        )
    lines: dict[str, int] = {}  # by the key's text
    for key_node, _ in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in lines:
            raise ConfigFileError(
                path, line, f"option {key!r} is already set on line {lines[key]}", "keep one"
            )
        lines[key] = line
    return values, lines


def _refused(cls: type[ExperimentConfig], key: Any, value: Any, base: Any) -> bool:
    """Whether the option ``key: value`` alone is refused."""
    try:
        cls.from_dict({key: value}, base)
    except ConfigError:
        return True
    return False


def _part(cls: type[T], config: ExperimentConfig) -> T:
    """The ``cls`` (a base of ExperimentConfig) holding ``config``'s values of its fields."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


#: the tasks `gradnorm-al demo --task` runs
DEMO_TASKS = ("classification", "segmentation", "subtomogram")


def demo_config(task: str = "classification") -> ExperimentConfig:
    """The embedded demo of ``task``.

    classification: digits, the two gradnorm schemes against random, entropy, core-set and MC
    dropout, Algorithm 1 at CPU scale (3 trials, 7 cycles 10% -> 40%, warm start), a few
    minutes on 2 CPU cores. segmentation: see :func:`segmentation_demo_config`; subtomogram:
    :func:`subtomogram_demo_config`."""
    if task == "segmentation":
        return segmentation_demo_config()
    if task == "subtomogram":
        return subtomogram_demo_config()
    if task != "classification":
        raise ConfigError(f"no demo for task {task!r}; use one of {', '.join(DEMO_TASKS)}")
    return ExperimentConfig(
        dataset="digits",
        model="smallcnn",
        strategies=[
            "random",
            "entropy",
            "core-set",
            "mc-dropout",
            "entropy-gradnorm",
            "expected-gradnorm",
        ],
        trials=3,
        cycles=7,
        initial_fraction=0.10,
        budget_fraction=0.05,
        epochs=DEMO_EPOCHS,
        lr=0.05,
        batch_size=32,
    )


DEMO_EPOCHS = 30


def segmentation_demo_config() -> ExperimentConfig:
    """The segmentation demo: random vs entropy-gradnorm vs entropy on the offline brain MRI
    slices with fcn-small, 3 trials, under 10 minutes on 2 CPU cores."""
    return ExperimentConfig(
        dataset="brain-mri",
        model="fcn-small",
        strategies=["random", "entropy-gradnorm", "entropy"],
        trials=3,
        cycles=7,
        initial_fraction=0.10,
        budget_fraction=0.05,
        epochs=20,
        lr=0.05,
        batch_size=8,
    )


def subtomogram_demo_config() -> ExperimentConfig:
    """The 3-D demo: random vs entropy-gradnorm vs entropy on simulated cryo-ET subtomograms
    (``subtomograms-sim``: 5 macromolecules, 16^3, SNR 0.1, missing wedge +-60 degrees) with
    ``cnn3d`` at a quarter of its width, 3 trials, under 10 minutes on 2 CPU cores."""
    return ExperimentConfig(
        dataset="subtomograms-sim",
        model="cnn3d",
        model_params={"width": 8},
        strategies=["random", "entropy-gradnorm", "entropy"],
        trials=3,
        cycles=7,
        initial_fraction=0.10,
        budget_fraction=0.05,
        epochs=10,
        lr=0.05,
        batch_size=16,
    )
