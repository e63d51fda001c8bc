"""The configuration of an experiment: one flat record, loadable from YAML, validated early."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..loop import LoopConfig
from ..train import TrainConfig


@dataclass
class ExperimentConfig:
    """Every option of ``gradnorm-al run``; defaults follow the published protocol."""

    dataset: str = "digits"
    model: str | None = None  # None: the dataset's default model
    strategies: list[str] = field(default_factory=lambda: ["random", "entropy-gradnorm"])
    trials: int = 3
    seed: int = 0  # trial t uses seed + t
    device: str = "cpu"
    data_root: str | None = None
    download: bool = False
    norm: str = "tensor-sum"  # for gradnorm strategies: "tensor-sum" (published) or "l2" (Eq. 5)
    pool_size: int | None = None  # a seeded random pool of this many training samples (CPU scale)
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_models: bool = False  # save every cycle's trained model (for `gradnorm-al analyze`)
    # the active-learning schedule (LoopConfig)
    cycles: int = 7
    initial_fraction: float = 0.10
    budget_fraction: float = 0.05
    subset_size: int | None = None
    reinit_each_cycle: bool = False
    score_batch_size: int = 128
    # training (TrainConfig)
    epochs: int = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] | None = None  # None: 80% of the epochs
    gamma: float = 0.1
    batch_size: int = 128
    num_workers: int = 0  # training DataLoader workers (torchvision datasets; GPU runs)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(
        cls, values: dict[str, Any], base: ExperimentConfig | None = None
    ) -> ExperimentConfig:
        """``base`` (or the defaults) updated with ``values``; keys may use - or _."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        updates = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name == "strategy":  # singular accepted for convenience
                name = "strategies"
            if name == "strategies" and isinstance(value, str):
                value = [value]
            if name not in known:
                raise ConfigError(
                    f"unknown option {key!r}; known options: {', '.join(sorted(known))}"
                )
            updates[name] = value
        config = dataclasses.replace(base or cls(), **updates)
        config.check_types()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, base: ExperimentConfig | None = None) -> ExperimentConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file; give a YAML file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of options")
        return cls.from_dict(values, base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---------------------------------------------------------------- views
    def loop_config(self) -> LoopConfig:
        return LoopConfig(
            cycles=self.cycles,
            initial_fraction=self.initial_fraction,
            budget_fraction=self.budget_fraction,
            subset_size=self.subset_size,
            reinit_each_cycle=self.reinit_each_cycle,
            score_batch_size=self.score_batch_size,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            milestones=self.milestones,
            gamma=self.gamma,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )

    # ---------------------------------------------------------------- validation
    def check_types(self) -> None:
        """Raise ConfigError for values of the wrong type or outside their range (data-free checks;
        the schedule is checked against the pool size by :meth:`LoopConfig.validate`)."""

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("trials", "cycles", "epochs", "batch_size", "score_batch_size"):
            value = getattr(self, name)
            need(
                is_int(value) and value >= 1,
                f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
            )
        need(self.epochs >= 1, "epochs must be at least 1")
        need(
            is_int(self.seed) and self.seed >= 0,
            f"seed must be a non-negative integer, got {self.seed!r}",
        )
        for name in ("initial_fraction", "budget_fraction"):
            value = getattr(self, name)
            need(
                is_num(value) and 0.0 < value <= 1.0,
                f"{name.replace('_', '-')} must be in (0, 1], got {value!r}",
            )
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            need(
                is_num(value) and value >= 0,
                f"{name.replace('_', '-')} must be a number >= 0, got {value!r}",
            )
        need(
            is_int(self.num_workers) and self.num_workers >= 0,
            f"num-workers must be an integer >= 0, got {self.num_workers!r}",
        )
        for name in ("subset_size", "pool_size"):
            value = getattr(self, name)
            need(
                value is None or (is_int(value) and value >= 1),
                f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
            )
        need(
            self.milestones is None
            or (
                isinstance(self.milestones, list)
                and all(is_int(m) and m >= 1 for m in self.milestones)
            ),
            f"milestones must be a list of epochs >= 1, got {self.milestones!r}",
        )
        need(
            isinstance(self.strategies, list)
            and len(self.strategies) > 0
            and all(isinstance(s, str) for s in self.strategies),
            "give at least one strategy",
        )
        need(
            len(set(self.strategies)) == len(self.strategies),
            f"a strategy is listed twice: {self.strategies}",
        )
        need(
            isinstance(self.strategy_params, dict)
            and all(isinstance(v, dict) for v in self.strategy_params.values()),
            "strategy_params must map strategy names to mappings of parameters",
        )
        need(
            isinstance(self.keep_models, bool),
            f"keep-models must be true or false, got {self.keep_models!r}",
        )
        need(isinstance(self.dataset, str), "dataset must be a name")
        need(self.model is None or isinstance(self.model, str), "model must be a name")
        need(isinstance(self.device, str), "device must be 'cpu', 'cuda' or 'cuda:N'")


def demo_config() -> ExperimentConfig:
    """The embedded demo: digits, the two gradnorm schemes against random, entropy, core-set and
    MC dropout, Algorithm 1 at CPU scale (3 trials, 7 cycles 10% -> 40%, warm start), a few
    minutes on 2 CPU cores."""
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
