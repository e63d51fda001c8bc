"""Run an experiment: every strategy x trial on the same seeds, results written as they come."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..data import DatasetBundle, load_dataset
from ..errors import ConfigError, RunDirectoryError
from ..learner import ActiveLearner
from ..loop import LoopConfig, run_trial
from ..models import MODELS, create_model
from ..oracles import DatasetOracle
from ..reports.summary import write_summary
from ..seeding import POOL_SUBSET, rng
from ..strategies import Strategy, accepted_params, create_strategy
from ..tasks import ClassificationTask
from ..train import TrainConfig
from .checkpoint import (
    MODELS_DIR,
    STATE_DIR,
    load_state,
    model_path,
    save_model,
    save_state,
    state_path,
)
from .config import ExperimentConfig
from .results import RESULTS_FILE, SELECTIONS_FILE, ResultsStore

CONFIG_FILE = "config.yaml"
RUN_FILES = (
    CONFIG_FILE,
    RESULTS_FILE,
    SELECTIONS_FILE,
    "summary.md",
    "curves.png",
    STATE_DIR,
    MODELS_DIR,
)


@dataclass
class ExperimentResult:
    out_dir: Path
    rows: list[dict]
    table: str
    seconds: float


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return device


def validate_names(config: ExperimentConfig) -> None:
    """Fail fast, before any data is read, on unknown names and bad strategy parameters."""
    for name in config.strategies:
        create_strategy(name, **strategy_kwargs(config, name))  # cheap: no data, no model
    for name in config.strategy_params:
        if name not in config.strategies:
            raise ConfigError(f"strategy_params names {name!r}, which is not among the strategies")
    if config.model is not None:
        MODELS.get(config.model)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding another run unless ``overwrite``; then clear that run's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"output path {out_dir} exists and is not a folder")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirectoryError(
            f"{out_dir} already holds a run ({', '.join(existing)}); choose another --out or "
            "pass --overwrite"
        )
    try:
        for name in existing:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(
            f"cannot use output folder {out_dir}: {err.strerror or err}"
        ) from None


def strategy_kwargs(config: ExperimentConfig, name: str) -> dict:
    params = dict(config.strategy_params.get(name, {}))
    if "norm" in accepted_params(name):
        params.setdefault("norm", config.norm)
    return params


def bundle_learner(
    bundle: DatasetBundle,
    model_factory: Callable[[], nn.Module],
    strategy: Strategy,
    *,
    train: TrainConfig,
    schedule: LoopConfig,
    device: torch.device,
    seed: int,
    name: str | None = None,
    progress: bool = False,
) -> ActiveLearner:
    """The learner of one benchmark trial on a packaged dataset: classification, the dataset's
    own labels as the oracle, augmentation on the training view only."""
    return ActiveLearner(
        model_factory,
        bundle.train_eval,
        ClassificationTask(bundle.num_classes),
        strategy,
        oracle=DatasetOracle(bundle.train_targets),
        train=train,
        train_pool=bundle.train,
        device=device,
        seed=seed,
        batch_size=schedule.score_batch_size,
        reinit=schedule.reinit_each_cycle,
        name=name,
        progress=progress,
    )


def read_run_config(out_dir: str | Path) -> ExperimentConfig:
    """The configuration a run folder was started with (for ``--resume``)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(
            f"{out_dir} holds no run to resume ({CONFIG_FILE} is missing); start it with "
            "gradnorm-al run --out DIR"
        )
    return ExperimentConfig.from_yaml(path)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
    bundle: DatasetBundle | None = None,
) -> ExperimentResult:
    """Run every strategy of ``config`` for every trial and write the run folder.

    All strategies of trial t use seed ``config.seed + t`` (same initial pool, same initial
    model). After every cycle the trial's state (labelled pool, model, auxiliary module, records
    so far) is written atomically to ``state/<strategy>.t<trial>.pt`` (with ``keep_models``, the
    cycle's trained model to ``models/<strategy>.t<trial>.c<cycle>.pt`` too) and then results.csv
    and selections.jsonl are rewritten atomically; config.yaml comes first, summary.md and
    curves.png at the end. ``resume=True`` continues the run in ``out_dir`` (started with this
    ``config``) from its checkpoints: finished cycles are neither recomputed nor lost, and the
    results equal an uninterrupted run's (CPU, same seed). ``bundle`` overrides loading
    ``config.dataset`` (for tests and custom data).
    """
    started = time.perf_counter()
    config.check()
    validate_names(config)
    device = resolve_device(config.device)
    out = Path(out_dir)
    if resume and not (out / CONFIG_FILE).is_file():
        read_run_config(out)  # raises the explanation
    if bundle is None:
        bundle = load_dataset(config.dataset, config.data_root, config.download)
    if config.pool_size is not None:
        bundle = bundle.with_pool_subset(config.pool_size, rng(config.seed, POOL_SUBSET))
    loop, train = config.loop_config(), config.train_config()
    loop.validate(bundle.pool_size)
    strategies = {
        name: create_strategy(name, **strategy_kwargs(config, name)) for name in config.strategies
    }
    model_name = config.model or bundle.default_model
    model_factory = partial(
        create_model, model_name, num_classes=bundle.num_classes, in_channels=bundle.in_channels
    )
    if not resume:
        prepare_out_dir(out, overwrite)
        atomic_write_text(out / CONFIG_FILE, config.to_yaml())
    store = ResultsStore(out)
    log(
        f"{bundle.name}: pool {bundle.pool_size}, test {len(bundle.test)}, model {model_name}, "
        f"budget {loop.budget(bundle.pool_size)} per cycle, {config.cycles} cycles, "
        f"{config.trials} trial(s), device {device}"
    )
    for trial in range(config.trials):
        for name, strategy in strategies.items():
            seed = config.seed + trial
            path = state_path(out, name, trial)
            state = None
            if resume and path.exists():
                state = load_state(path, strategy=name, trial=trial, seed=seed)
                for record in state.records:
                    store.add(record, flush=False)
                store.flush()
                if state.next_cycle >= config.cycles:
                    log(f"trial {trial} {name}: finished before, kept")
                    continue
                log(f"trial {trial} {name}: resuming at cycle {state.next_cycle}")

            def checkpoint(s, path=path, name=name, trial=trial, seed=seed) -> None:
                save_state(path, s, strategy=name, trial=trial, seed=seed)

            def keep(cycle, model, name=name, trial=trial, seed=seed) -> None:
                save_model(
                    model_path(out, name, trial, cycle),
                    model.state_dict(),
                    strategy=name,
                    trial=trial,
                    seed=seed,
                    cycle=cycle,
                )

            t0 = time.perf_counter()
            learner = bundle_learner(
                bundle,
                model_factory,
                strategy,
                train=train,
                schedule=loop,
                device=device,
                seed=seed,
                name=f"{name} t{trial}",
                progress=progress,
            )
            records = run_trial(
                learner,
                test=bundle.test,
                schedule=loop,
                trial=trial,
                on_cycle=store.add,
                on_state=checkpoint,
                on_trained=keep if config.keep_models else None,
                resume=state,
            )
            accs = " ".join(f"{100 * r.test_accuracy:.1f}" for r in records)
            log(f"trial {trial} {name}: test accuracy {accs} ({time.perf_counter() - t0:.1f}s)")
    table = write_summary(store.rows, config.to_dict(), out)
    return ExperimentResult(out, store.rows, table, time.perf_counter() - started)
