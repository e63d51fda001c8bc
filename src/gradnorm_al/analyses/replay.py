"""Reading a finished (or interrupted) run folder back cycle by cycle, for the model-based
analyses: which samples were labelled, scored and selected in every cycle, and the task model
T^c each cycle trained (saved by ``gradnorm-al run --keep-models``).

Nothing here re-runs training: the labelled sets follow from the seeded initial pool plus
selections.jsonl, the candidates from the seeded subset draw, exactly as :func:`run_trial` made
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DATASETS, DatasetBundle, load_dataset
from ..errors import FileFormatError, RunDirectoryError, UnknownNameError
from ..experiment.checkpoint import MODELS_DIR, load_model, model_path
from ..experiment.config import ExperimentConfig
from ..experiment.results import (
    RESULTS_FILE,
    SELECTIONS_FILE,
    SelectionRecord,
    read_results,
    read_selections,
)
from ..experiment.runner import (
    bundle_task,
    model_factory,
    read_run_config,
    resolve_device,
    strategy_kwargs,
)
from ..loop import cycle_candidates
from ..oracles import DatasetOracle
from ..pool import Pool
from ..seeding import INIT_POOL, POOL_SUBSET, rng
from ..strategies import Strategy, create_strategy
from ..tasks import Task
from .base import Log


@dataclass(frozen=True)
class CycleView:
    """One cycle of one strategy x trial.

    ``labeled``: the pool indices T^c was trained on. ``candidates``: the indices scored in this
    cycle and ``selected``: those it chose, in selection order (both None in a cycle that did not
    select, the last).
    """

    strategy: str
    trial: int
    cycle: int
    labeled: np.ndarray
    candidates: np.ndarray | None
    selected: np.ndarray | None


class RunReader:
    """A run folder opened for analysis.

    Parameters
    ----------
    run_dir : a folder written by ``gradnorm-al run``.
    bundle : the data, if not the run's own ``dataset`` (custom data, tests); the run's pool
        subset is applied to it as in the run.
    device : where to put models (default: the run's device if available, else the cpu).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        bundle: DatasetBundle | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunDirectoryError(f"run folder {run_dir} does not exist; give a run folder")
        self.config: ExperimentConfig = read_run_config(self.run_dir)
        self._bundle = bundle
        if device is None:
            device = self.config.device
            if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                device = "cpu"
        self.device = resolve_device(str(device))
        path = self.run_dir / RESULTS_FILE
        if not path.is_file():
            raise RunDirectoryError(f"{run_dir} holds no {RESULTS_FILE}; no cycle has finished")
        self.rows = read_results(path, self.config)
        self.selections_path = self.run_dir / SELECTIONS_FILE
        self._selections: dict[tuple[str, int, int], SelectionRecord] = {}
        if self.selections_path.is_file():
            self._selections = read_selections(self.selections_path)

    @cached_property
    def bundle(self) -> DatasetBundle:
        c = self.config
        if self._bundle is None and c.dataset not in DATASETS:
            raise UnknownNameError(
                f"{self.run_dir}'s dataset {c.dataset!r} is not registered (known: "
                f"{', '.join(DATASETS.names())}); register it, or open the run in Python with "
                "RunReader(DIR, bundle=...) and the data it was run on"
            )
        bundle = self._bundle or load_dataset(c.dataset, c.data_root, c.download)
        if c.pool_size is not None:
            bundle = bundle.with_pool_subset(c.pool_size, rng(c.seed, POOL_SUBSET))
        return bundle

    @cached_property
    def task(self) -> Task:
        """The run's task, rebuilt as the runner built it: classification, or segmentation with
        the data's ignore index and the run's ``reduction``."""
        return bundle_task(self.bundle, self.config.reduction)

    @cached_property
    def oracle(self) -> DatasetOracle:
        """The true labels of the pool (class indices; segmentation: masks), as the run's
        learner got them."""
        bundle = self.bundle
        source = bundle.train_targets if bundle.train_targets is not None else bundle.train_eval
        return DatasetOracle(source)

    def true_labels(self, indices: np.ndarray) -> torch.Tensor:
        """The true labels of pool ``indices``, checked and stacked by the run's task: int64
        [M] class indices, or [M, H, W] masks (the task's ``mask_dtype``)."""
        return self.task.collate(self.oracle.labels(np.asarray(indices, dtype=np.int64)))

    @property
    def strategies(self) -> list[str]:
        """The run's strategies that finished at least one cycle, in config order."""
        done = {r["strategy"] for r in self.rows}
        return [s for s in self.config.strategies if s in done]

    def trials(self, strategy: str) -> list[int]:
        return sorted({r["trial"] for r in self.rows if r["strategy"] == strategy})

    def seed(self, trial: int) -> int:
        return self.config.seed + trial

    def strategy(self, name: str) -> Strategy:
        return create_strategy(name, **strategy_kwargs(self.config, name))

    def cycles(self, strategy: str, trial: int) -> list[CycleView]:
        """Every finished cycle of ``strategy`` in ``trial``, in order."""
        finished = sorted(
            r["cycle"] for r in self.rows if r["strategy"] == strategy and r["trial"] == trial
        )
        loop = self.config.loop_config()
        seed = self.seed(trial)
        pool = Pool.initial(self.bundle.pool_size, loop.initial_fraction, rng(seed, INIT_POOL))
        views = []
        for cycle in finished:
            labeled = pool.labeled()
            record = self._selections.get((strategy, trial, cycle))
            selected = None if record is None else record.indices
            if record is None and cycle < loop.cycles - 1:  # its row comes after its selection
                raise RunDirectoryError(
                    f"{self.selections_path} lacks the selection of {strategy} trial {trial} cycle "
                    f"{cycle}, which {RESULTS_FILE} lists as finished; restore the file: "
                    f"`gradnorm-al run --resume {self.run_dir}` rewrites it from the run's "
                    "checkpoints"
                )
            candidates = None
            if record is not None:
                candidates = cycle_candidates(pool.unlabeled(), loop.subset_size, seed, cycle)
                if not np.isin(selected, candidates).all():
                    raise FileFormatError(
                        self.selections_path,
                        record.line,
                        f"{strategy} trial {trial} cycle {cycle} selected samples that were not "
                        "its candidates (this selections.jsonl does not belong to the folder's "
                        "config.yaml, or the data under its data_root changed since the run)",
                        "give the run folder as `gradnorm-al run` wrote it, with its data",
                    )
                pool.label(selected, cycle + 1)
            views.append(CycleView(strategy, trial, cycle, labeled, candidates, selected))
        return views

    def require_models(self) -> None:
        """Raise the fix unless the run kept its per-cycle models."""
        if not (self.run_dir / MODELS_DIR).is_dir():
            raise RunDirectoryError(
                f"{self.run_dir} kept no per-cycle models, which this analysis needs; run it with "
                "--keep-models (gradnorm-al run ... --keep-models)"
            )

    @cached_property
    def _model_factory(self) -> Callable[[], nn.Module]:
        """Fresh models of the run's kind, checked against its data once."""
        return model_factory(self.config, self.bundle)[1]

    def model(self, strategy: str, trial: int, cycle: int) -> nn.Module:
        """T^c: the task model of ``cycle`` after its training, in eval mode on the device."""
        state = load_model(
            model_path(self.run_dir, strategy, trial, cycle),
            strategy=strategy,
            trial=trial,
            seed=self.seed(trial),
            cycle=cycle,
        )
        net = self.strategy(strategy).prepare_model(self._model_factory())
        net.load_state_dict(state)
        return net.to(self.device).eval()


def loss_scheme(reader: RunReader, strategy: str) -> str:
    """The unsupervised loss whose gradient norm a strategy is judged by: a gradnorm strategy's
    own; for the others the entropy (equal, value and gradient, to the published expected loss)."""
    return getattr(reader.strategy(strategy), "scheme", "entropy")


def on_replayed_run(write: Callable[..., str]) -> Callable[..., str]:
    """The run function of an analysis (see :class:`~.base.Analysis`) from its
    ``write(reader, out_dir, ..., log=...)``: the run folder is opened as a :class:`RunReader` on
    the ``device`` option's device, the other options go to ``write`` by name."""

    def run(
        run_dir: Path, out_dir: Path | None, log: Log, *, device: str | None, **options: Any
    ) -> str:
        return write(RunReader(run_dir, device=device), out_dir, log=log, **options)

    return run
