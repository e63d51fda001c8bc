"""Run an experiment: every strategy x trial on the same seeds, results written as they come."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..atomic import atomic_write_text, is_temporary, remove_temporaries
from ..data import DatasetBundle, load_dataset
from ..data.augment import training_augmentation
from ..errors import ConfigError, GradnormALError, RunDirectoryError, WriteError
from ..learner import ActiveLearner
from ..loop import LoopConfig, run_trial
from ..models import MODELS, SEGMENTATION_MODELS, VOLUME_MODELS, create_model
from ..options import check_arguments
from ..oracles import DatasetOracle
from ..reports.summary import write_summary
from ..seeding import POOL_SUBSET, rng
from ..strategies import Strategy, check_task, create_strategy
from ..strategies.base import split_spec
from ..strategies.gradnorm import GRADNORM_SCORERS
from ..tasks import ClassificationTask, SegmentationTask, Task
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
from .lock import LOCK_FILE, run_lock
from .results import RESULTS_FILE, SELECTIONS_FILE, ResultsStore

CONFIG_FILE = "config.yaml"
ANALYSIS_DIR = "analysis"  # where `gradnorm-al analyze` writes by default
#: the files a run (and a report or analysis of it, written into its folder) writes at its top
RUN_FILES = (
    CONFIG_FILE,
    RESULTS_FILE,
    SELECTIONS_FILE,
    "summary.md",
    "curves.png",
    "report.html",
)
#: its folders, with the pattern of the files it writes in each
RUN_FOLDERS = {
    STATE_DIR: re.compile(r"^.+\.t\d+\.pt$"),
    MODELS_DIR: re.compile(r"^.+\.t\d+\.c\d+\.pt$"),
    ANALYSIS_DIR: re.compile(r"^.+\.(md|csv|png|pt|json)$"),
}
#: options a resumed run may change: where the data is and what computes; not the protocol
RESUMABLE_OPTIONS = ("device", "data_root", "download")
#: options added after runs were first recorded, with the value they had before: recorded in a
#: run's protocol only when set otherwise, so that older runs still resume
LATER_OPTIONS: dict[str, Any] = {
    "reduction": "mean",
    "model_params": {},
    "eval_batch_size": 256,
    "amp": "none",
    "channels_last": False,
    "augment": "dataset",
}


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
        check_model_params(config.model, config.model_params)


def check_model_params(name: str, params: dict[str, Any]) -> None:
    """ConfigError unless model ``name`` exists and takes ``params`` (declared, typed,
    in range); ``num_classes`` and ``in_channels`` are the dataset's, never given."""
    factory = MODELS.get(name)
    fixed = sorted({"num_classes", "in_channels"} & set(params))
    if fixed:
        raise ConfigError(
            f"model_params sets {', '.join(fixed)}, which the dataset determines; remove it"
        )
    check_arguments(factory, params, f"model {name}")


def model_factory(
    config: ExperimentConfig, bundle: DatasetBundle
) -> tuple[str, Callable[[], nn.Module]]:
    """The run's model name (``config.model`` or the dataset's default) and a factory of fresh
    models with its ``model_params``, checked against the dataset's task."""
    name = config.model or bundle.default_model
    check_model_params(name, config.model_params)
    factory = partial(
        create_model,
        name,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        **config.model_params,
    )
    check_model_task(name, factory(), bundle)
    return name, factory


def _holds_run(out_dir: Path) -> bool:
    try:
        ExperimentConfig.from_yaml(out_dir / CONFIG_FILE)
    except (GradnormALError, OSError):
        return False
    return True


def _run_files(out_dir: Path) -> list[Path]:
    """What a run wrote in ``out_dir``: its files, the files of its folders, temporaries."""
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]
    for folder, pattern in RUN_FOLDERS.items():
        if (out_dir / folder).is_dir():
            found += [
                p
                for p in sorted((out_dir / folder).iterdir())
                if p.is_file() and (pattern.match(p.name) or is_temporary(p.name))
            ]
    found += [p for p in out_dir.iterdir() if p.is_file() and is_temporary(p.name)]
    return found


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a new run (call it holding the folder's lock).

    A folder that holds a run is refused unless ``overwrite``, which removes only what that run
    (and a report or analysis written into it) wrote: files of the user's own stay. A folder
    holding files a run would write, but no run, is refused either way, and ``overwrite`` of a
    non-empty folder that holds no run is refused: nothing of the user's is ever replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    holds_run = _holds_run(out_dir)
    ours = _run_files(out_dir)
    if holds_run and not overwrite:
        raise RunDirectoryError(
            f"{out_dir} already holds a run; choose another --out, continue it with --resume "
            f"{out_dir}, or pass --overwrite to replace it"
        )
    if not holds_run:
        # a killed writer's temporary files are ours to remove (we hold the lock)
        others = [n.name for n in out_dir.iterdir() if n.name != LOCK_FILE]
        others = [n for n in others if not is_temporary(n)]
        clash = [n for n in others if n in RUN_FILES or n in RUN_FOLDERS]
        if clash or (overwrite and others):
            what = f"files a run writes ({', '.join(sorted(clash))})" if clash else "files"
            raise RunDirectoryError(
                f"{out_dir} holds {what} but no run (no readable {CONFIG_FILE}); nothing in it is "
                "replaced: choose an empty or new --out"
            )
    try:
        for path in ours:
            path.unlink()
        for folder in RUN_FOLDERS:
            with contextlib.suppress(OSError):  # kept when the user's own files are in it
                (out_dir / folder).rmdir()
    except OSError as err:
        raise WriteError(f"cannot clear output folder {out_dir}: {err.strerror or err}") from None


def strategy_kwargs(config: ExperimentConfig, name: str) -> dict:
    """The keyword arguments of strategy ``name``: its ``strategy_params``, and the run's
    ``norm`` for the gradnorm scorers (egl keeps its own, ``l2`` unless its params say)."""
    params = dict(config.strategy_params.get(name, {}))
    if split_spec(name)[0] in GRADNORM_SCORERS:
        params.setdefault("norm", config.norm)
    return params


def bundle_task(bundle: DatasetBundle, reduction: str = "mean") -> Task:
    """The task of a packaged dataset: classification, or segmentation with its ignore index;
    ``reduction``: how per-pixel scores become one per image."""
    if bundle.task == "segmentation":
        return SegmentationTask(bundle.num_classes, bundle.ignore_index, reduction)
    return ClassificationTask(bundle.num_classes, reduction)


def check_model_task(model_name: str, model: nn.Module, bundle: DatasetBundle) -> None:
    """Refuse a classification model on per-pixel labels and a per-pixel model on class labels,
    a 3-D model (:data:`~gradnorm_al.models.VOLUME_MODELS`) on images and a 2-D one on
    volumes."""
    volumes = len(bundle.image_size) == 3
    if (model_name in VOLUME_MODELS) != volumes:
        have = "3-D volumes" if volumes else "2-D images"
        fix = (
            f"use a 3-D model ({', '.join(VOLUME_MODELS)})"
            if volumes
            else "use a 2-D model (see `gradnorm-al list`)"
        )
        kind = "3-D (volume)" if model_name in VOLUME_MODELS else "2-D (image)"
        raise ConfigError(
            f"model {model_name} is a {kind} model but dataset {bundle.name} holds {have}; {fix}"
        )
    dense = bool(getattr(model, "dense", False))
    if dense != bundle.dense:
        kind = "per-pixel (segmentation)" if dense else "classification"
        fix = (
            f"use a segmentation model ({', '.join(SEGMENTATION_MODELS)})"
            if bundle.dense
            else "use a classification model (see `gradnorm-al list`)"
        )
        raise ConfigError(
            f"model {model_name} is a {kind} model but dataset {bundle.name} is "
            f"{bundle.task}; {fix}"
        )


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
    reduction: str = "mean",
    augment: str = "dataset",
) -> ActiveLearner:
    """The learner of one benchmark trial on a packaged dataset: its task, the dataset's own
    labels as the oracle, the training augmentation chosen by ``augment`` (see
    :func:`~gradnorm_al.data.augment.training_augmentation`; ``dataset``: the training view, and
    for dense data the dataset's joint augmentation of images and masks)."""
    train_pool, batch_augment = training_augmentation(bundle, augment)
    return ActiveLearner(
        model_factory,
        bundle.train_eval,
        bundle_task(bundle, reduction),
        strategy,
        oracle=DatasetOracle(
            bundle.train_targets if bundle.train_targets is not None else bundle.train_eval
        ),
        train=train,
        train_pool=train_pool,
        augment=batch_augment,
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

    Nothing is lost: the folder is locked for the whole call (a second writer gets
    :class:`~gradnorm_al.errors.RunLockedError` naming the holder); on resume every state is read
    (checksum verified, its recorded configuration compared with ``config``) before results.csv
    is first rewritten, so it never holds fewer finished rows than before; temporary files of a
    killed writer are removed.

    Under torchrun (``torchrun --nproc_per_node N -m gradnorm_al run ...``) every process runs
    this call: the model trains under DistributedDataParallel, per-candidate scoring and
    evaluation are split between the processes, and only rank 0 locks and writes the folder (a
    resume's states are read there and sent to the others); see :mod:`gradnorm_al.distributed`.
    """
    started = time.perf_counter()
    config.check()
    validate_names(config)
    device = distributed.setup(resolve_device(config.device))
    distributed.check_batch_size(config.batch_size)
    out = Path(out_dir)
    if resume:
        read_run_config(out)  # raises the explanation when there is no run to resume
    # everything that can refuse the options or the data comes before the folder is touched
    if bundle is None:
        bundle = load_dataset(config.dataset, config.data_root, config.download)
    if config.pool_size is not None:
        bundle = bundle.with_pool_subset(config.pool_size, rng(config.seed, POOL_SUBSET))
    loop, train = config.loop_config(), config.train_config()
    loop.validate(bundle.pool_size)
    strategies = {
        name: create_strategy(name, **strategy_kwargs(config, name)) for name in config.strategies
    }
    model_name, factory = model_factory(config, bundle)
    training_augmentation(bundle, config.augment)  # refuses crops of what is not an image
    task = bundle_task(bundle, config.reduction)
    for strategy in strategies.values():
        check_task(strategy, task)
    plan = _Plan(config, bundle, loop, train, strategies, model_name, factory, device)
    with contextlib.ExitStack() as held:  # rank 0 holds the folder's lock for every process
        distributed.on_rank0(lambda: held.enter_context(run_lock(out)))
        return _run_locked(plan, out, started, overwrite, resume, progress, log)


@dataclass
class _Plan:
    """What a run computes, checked before its folder is touched."""

    config: ExperimentConfig
    bundle: DatasetBundle
    loop: LoopConfig
    train: TrainConfig
    strategies: dict[str, Strategy]
    model_name: str
    model_factory: Callable[[], nn.Module]
    device: torch.device


def _check_no_stray_states(out: Path, config: ExperimentConfig) -> None:
    """Refuse a resume whose config.yaml no longer lists a strategy or trial that has a state:
    its finished rows would drop out of results.csv."""
    folder = out / STATE_DIR
    if not folder.is_dir():
        return
    wanted = {state_path(out, s, t).name for s in config.strategies for t in range(config.trials)}
    for path in sorted(folder.iterdir()):
        if RUN_FOLDERS[STATE_DIR].match(path.name) and path.name not in wanted:
            raise RunDirectoryError(
                f"{path} holds finished cycles of a strategy or trial that {out / CONFIG_FILE} no "
                "longer lists; a resumed run must keep its protocol: restore config.yaml, or "
                "start a new run in another --out"
            )


def protocol(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved options that define a run's results (all but :data:`RESUMABLE_OPTIONS`),
    recorded in every state and compared on ``--resume``."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_OPTIONS and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])
    }


def _run_locked(
    plan: _Plan,
    out: Path,
    started: float,
    overwrite: bool,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> ExperimentResult:
    config, bundle, loop, train = plan.config, plan.bundle, plan.loop, plan.train
    strategies, model_name, device = plan.strategies, plan.model_name, plan.device
    model_factory = plan.model_factory
    main = distributed.is_main()  # the process that writes, logs and shows progress
    if not main:
        progress, log = False, lambda _msg: None
    recorded = protocol(config)

    def open_folder() -> dict[tuple[str, int], Any]:
        if resume:
            remove_temporaries(out)  # a killed writer's; we hold the lock, so none is live
        else:
            prepare_out_dir(out, overwrite)
            atomic_write_text(out / CONFIG_FILE, config.to_yaml())
        states = {}
        if resume:
            _check_no_stray_states(out, config)
            for trial in range(config.trials):
                for name in strategies:
                    path = state_path(out, name, trial)
                    if path.exists():
                        states[name, trial] = load_state(
                            path,
                            strategy=name,
                            trial=trial,
                            seed=config.seed + trial,
                            config=recorded,
                        )
        return states

    states = distributed.on_rank0(open_folder)  # read on rank 0, sent to every process
    store = ResultsStore(out, write=main)
    if resume:  # every finished row back before the first rewrite: never fewer rows than before
        for state in states.values():
            for record in state.records:
                store.add(record, flush=False)
        store.flush()
    processes = distributed.world_size()
    log(
        f"{bundle.name}: pool {bundle.pool_size}, test {len(bundle.test)}, model {model_name}, "
        f"budget {loop.budget(bundle.pool_size)} per cycle, {config.cycles} cycles, "
        f"{config.trials} trial(s), device {device}"
        + (f" x {processes} processes" if processes > 1 else "")
    )
    for trial in range(config.trials):
        for name, strategy in strategies.items():
            seed = config.seed + trial
            path = state_path(out, name, trial)
            state = states.get((name, trial))
            if state is not None:
                if state.next_cycle >= config.cycles:
                    log(f"trial {trial} {name}: finished before, kept")
                    continue
                log(f"trial {trial} {name}: resuming at cycle {state.next_cycle}")

            def checkpoint(s, path=path, name=name, trial=trial, seed=seed) -> None:
                save_state(path, s, strategy=name, trial=trial, seed=seed, config=recorded)

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
                reduction=config.reduction,
                augment=config.augment,
            )
            records = run_trial(
                learner,
                test=bundle.test,
                schedule=loop,
                trial=trial,
                on_cycle=store.add,
                on_state=checkpoint if main else None,
                on_trained=keep if config.keep_models and main else None,
                resume=state,
            )
            metric = next(iter(records[-1].metrics)) if records else "test_accuracy"
            values = " ".join(f"{100 * r.metrics[metric]:.1f}" for r in records)
            log(
                f"trial {trial} {name}: {metric.replace('_', ' ')} {values} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    table = write_summary(store.rows, config.to_dict(), out) if main else ""
    return ExperimentResult(out, store.rows, table, time.perf_counter() - started)
