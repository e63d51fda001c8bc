"""The active learner: a task model, a pool, a task, a strategy and the labels given so far.

Any training loop and any source of labels can drive it::

    learner = ActiveLearner(model, pool, ClassificationTask(10), "entropy-gradnorm")
    learner.update(first_indices, first_labels)   # labels from the caller ...
    learner.fit()
    picked = learner.query(32)                     # pool indices, best first
    learner.update(picked)                         # ... or from the oracle

Labels enter only through :meth:`ActiveLearner.update`, given by the caller or fetched from the
learner's :class:`~gradnorm_al.oracles.Oracle`; training and the labelled-set metrics read only
those labels, never the pool's own targets.

Seeds: every random choice is derived from ``seed`` and the learner's ``cycle`` (the number of
queries made so far; see :mod:`gradnorm_al.seeding`), so a learner restored from
:meth:`~ActiveLearner.state_dict` continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from . import distributed
from ._torch import seeded_cpu, snapshot
from .errors import ConfigError, NonFiniteError, PoolError
from .oracles import Oracle
from .pool import Pool
from .seeding import AUXILIARY_INIT, MODEL_INIT, STRATEGY, TRAIN, derive_seed, rng
from .strategies import Selection, SelectionContext, Strategy, check_task, create_strategy
from .tasks import Task
from .train import Auxiliary, TrainConfig, evaluate, fit

ModelFactory = Callable[[], nn.Module]


class ActiveLearner:
    """Pool-based active learning over one task model.

    Parameters
    ----------
    model : the task model, or a zero-argument factory building a fresh one. With a factory every
        build is seeded (``reinit`` and committee members get fresh ones); with a module, fresh
        copies are made by ``reset_parameters()`` on a copy of the module as given.
    pool : the unlabelled pool, a Dataset whose items are inputs or ``(input, ...)`` tuples; pool
        index i is ``pool[i]``. What the strategy scores (no augmentation).
    task : what the labels are (:class:`~gradnorm_al.tasks.ClassificationTask`, ...).
    strategy : a :class:`~gradnorm_al.strategies.Strategy` or a strategy name
        (``"entropy-gradnorm"``, ``"entropy@power"``, see ``gradnorm-al list``).
    oracle : answers :meth:`update` calls made without labels (None: labels must be given).
    train : the training recipe (default :class:`~gradnorm_al.train.TrainConfig`).
    train_pool : the same items as ``pool`` with training augmentation (default ``pool``).
    augment : a joint augmentation of every training batch, ``(inputs, labels, generator) ->
        (inputs, labels)``, for labels that move with the pixels (segmentation masks: see
        :class:`~gradnorm_al.data.augment.RandomCropFlip`); seeded like the batch order.
    device, seed : where the model runs; the seed every random choice derives from.
    batch_size : forward/backward batch size over candidates when querying.
    reinit : a fresh model at every :meth:`fit` (default: keep it, the published warm start).
    name, progress : the label and switch of progress bars.

    Attributes
    ----------
    model : the task model (None before the first :meth:`fit`).
    cycle : the number of queries made so far; labels given now are recorded with this cycle.
    queries : one ``{"cycle", "indices", "scores"}`` record per :meth:`query` call.
    """

    def __init__(
        self,
        model: nn.Module | ModelFactory,
        pool: Dataset,
        task: Task,
        strategy: Strategy | str = "entropy-gradnorm",
        *,
        oracle: Oracle | None = None,
        train: TrainConfig | None = None,
        train_pool: Dataset | None = None,
        augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        batch_size: int = 128,
        reinit: bool = False,
        name: str | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigError(f"task must be a gradnorm_al Task, got {type(task).__name__}")
        if oracle is not None and not callable(getattr(oracle, "labels", None)):
            raise ConfigError("oracle must have a labels(indices) method (see gradnorm_al.Oracle)")
        if train_pool is not None and len(train_pool) != len(pool):
            raise ConfigError(
                f"train_pool holds {len(train_pool)} items and pool {len(pool)}: they must be "
                "the same items (train_pool only adds augmentation)"
            )
        self.strategy = create_strategy(strategy) if isinstance(strategy, str) else strategy
        check_task(self.strategy, task)
        self.pool, self.task, self.oracle = pool, task, oracle
        self.train_pool = pool if train_pool is None else train_pool
        if augment is not None and not callable(augment):
            raise ConfigError(
                "augment must be a function (inputs, labels, generator) -> (inputs, labels)"
            )
        self.augment = augment
        self.train_config = train if train is not None else TrainConfig()
        self.device = torch.device(device)
        self.seed, self.batch_size, self.reinit = seed, batch_size, reinit
        self.name = name if name is not None else self.strategy.name
        self.progress = progress
        if isinstance(model, nn.Module):
            self._given: nn.Module | None = model
            template = copy.deepcopy(model)
            self._factory: ModelFactory = lambda: _reset(copy.deepcopy(template))
        elif callable(model):
            self._given, self._factory = None, model
        else:
            raise ConfigError("model must be an nn.Module or a function returning one")
        self._state = Pool(len(pool))
        self._labels: dict[int, torch.Tensor] = {}
        self.model: nn.Module | None = None
        self.auxiliary: Auxiliary | None = None
        self.cycle = 0
        self.queries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ the labelled set
    @property
    def pool_size(self) -> int:
        return self._state.size

    @property
    def labeled(self) -> np.ndarray:
        """Sorted int64 pool indices of the labelled samples."""
        return self._state.labeled()

    @property
    def unlabeled(self) -> np.ndarray:
        """Sorted int64 pool indices of the unlabelled samples."""
        return self._state.unlabeled()

    @property
    def labeled_at(self) -> np.ndarray:
        """int64 [N]: the cycle each sample was labelled in (0 = before the first query), or -1."""
        return self._state.labeled_at.copy()

    def labels(self, indices: np.ndarray | Sequence[int] | None = None) -> torch.Tensor:
        """The labels given for ``indices`` (default: every labelled sample, sorted), stacked."""
        idx = self.labeled if indices is None else np.asarray(indices, dtype=np.int64)
        missing = [int(i) for i in idx if int(i) not in self._labels]
        if missing:
            raise PoolError(f"pool index {missing[0]} has no label ({len(missing)} such indices)")
        if len(idx) == 0:
            return self.task.collate([])
        return torch.stack([self._labels[int(i)] for i in idx])

    def update(self, indices: np.ndarray | Sequence[int], labels: Any = None) -> None:
        """Label the pool samples ``indices`` with ``labels`` (one per index), or with the
        oracle's answers when ``labels`` is None. Nothing changes unless every index is a
        distinct unlabelled pool index and every label is valid for the task."""
        idx = self._state.check_unlabeled(indices)
        if labels is None:
            if self.oracle is None:
                raise PoolError(
                    "update() got no labels and the learner has no oracle: pass the labels, "
                    "or give ActiveLearner an oracle"
                )
            labels = self.oracle.labels(idx.copy())
        rows = self.task.collate(labels)
        if len(rows) != len(idx):
            raise PoolError(f"{len(rows)} labels for {len(idx)} indices; give one label each")
        self._state.label(idx, self.cycle)
        for i, row in zip(idx.tolist(), rows):
            self._labels[i] = row

    # ------------------------------------------------------------------ the model
    def _build(self, model_seed: int) -> nn.Module:
        with seeded_cpu(model_seed):
            return self.strategy.prepare_model(self._factory()).to(self.device)

    def _build_task_model(self) -> None:
        built = self.cycle if self.reinit else 0
        if self._given is not None and self.model is None:
            model = self.strategy.prepare_model(self._given).to(self.device)
            self._given = None  # the caller's module is the first model; later ones are fresh
        else:
            model = self._build(derive_seed(self.seed, MODEL_INIT, built))
        with seeded_cpu(derive_seed(self.seed, AUXILIARY_INIT, built)):
            self.model, self.auxiliary = model, self.strategy.auxiliary(model)

    def fit(self) -> ActiveLearner:
        """Train the task model on the labelled samples (a fresh optimizer and schedule; a fresh
        model first if there is none yet or ``reinit``)."""
        labeled = self.labeled
        if len(labeled) == 0:
            raise PoolError("no labelled samples to train on: call update(indices, labels) first")
        if self.model is None or self.reinit:
            self._build_task_model()
        assert self.model is not None
        with self._named(diverged=True):
            fit(
                self.model,
                self.train_pool,
                labeled,
                self.train_config,
                device=self.device,
                seed=derive_seed(self.seed, TRAIN, self.cycle),
                progress=self.progress,
                desc=f"train {self.name} c{self.cycle}",
                auxiliary=self.auxiliary,
                task=self.task,
                targets=self.labels(labeled),
                augment=self.augment,
            )
        return self

    @contextlib.contextmanager
    def _named(self, what: str = "", diverged: bool = False) -> Iterator[None]:
        """Re-raise a :class:`NonFiniteError` with the cycle (and step) it happened in; a model
        that ``diverged`` in training is dropped: never scored, evaluated or saved."""
        try:
            yield
        except NonFiniteError as err:
            if diverged:
                self.model = None
            raise NonFiniteError(f"cycle {self.cycle}, {what}{err}") from None

    def _trained_member(self, indices: np.ndarray, member_seed: int) -> nn.Module:
        """A fresh model trained like the task model on the labelled rows ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        member = self._build(member_seed)
        fit(
            member,
            self.train_pool,
            idx,
            self.train_config,
            device=self.device,
            seed=member_seed,
            task=self.task,
            targets=self.labels(idx),
            augment=self.augment,
        )
        return member

    def evaluate(
        self, dataset: Dataset, indices: np.ndarray | None = None, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """The task's metrics of the model on a labelled ``dataset`` (its own targets)."""
        with self._named():
            return evaluate(
                self._fitted(),
                dataset,
                self.task.metric_accumulator(),
                indices,
                device=self.device,
                batch_size=batch_size or self.train_config.eval_batch_size,
            )

    def evaluate_labeled(self) -> dict[str, float]:
        """The task's metrics on the labelled pool samples, with the labels given to the learner
        (the training accuracy of the paper's Table 3)."""
        labeled = self.labeled
        with self._named():
            return evaluate(
                self._fitted(),
                self.pool,
                self.task.metric_accumulator(),
                labeled,
                device=self.device,
                batch_size=self.train_config.eval_batch_size,
                targets=self.labels(labeled),
            )

    def _fitted(self) -> nn.Module:
        if self.model is None:
            raise PoolError("the learner has no trained model yet: call fit() first")
        return self.model

    # ------------------------------------------------------------------ selection
    def query(self, k: int, candidates: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """The ``k`` pool indices the strategy picks among ``candidates`` (default: every
        unlabelled sample), in pick order; the selection and its scores are appended to
        :attr:`queries`, and :attr:`cycle` advances by one. Under torchrun every process calls
        it alike: per-candidate scoring is split between them, and all get rank 0's
        selection."""
        if candidates is None:
            cand = self.unlabeled
        else:
            cand = np.asarray(candidates, dtype=np.int64)
            if cand.ndim != 1 or len(np.unique(cand)) != len(cand):
                raise PoolError("candidates must be distinct pool indices")
            if cand.size and (cand.min() < 0 or cand.max() >= self.pool_size):
                raise PoolError(f"a candidate is out of range for a pool of {self.pool_size}")
            if (self._state.labeled_at[cand] >= 0).any():
                raise PoolError("a candidate is already labelled; candidates must be unlabelled")
        ctx = SelectionContext(
            model=self._fitted(),
            pool=self.pool,
            candidates=cand,
            labeled=self.labeled,
            num_classes=self.task.num_classes,
            device=self.device,
            rng=rng(self.seed, STRATEGY, self.cycle),
            batch_size=self.batch_size,
            progress=self.progress,
            trainer=self._trained_member,
            task=self.task,
            sharded=distributed.is_distributed(),
            amp=self.train_config.amp,
        )
        with seeded_cpu(derive_seed(self.seed, STRATEGY, self.cycle)):
            with self._named("selection: "):
                selection: Selection = self.strategy.query(ctx, k)
        # every process computed the selection; rank 0's is the one (a GPU's arithmetic need
        # not repeat bit for bit on every process)
        mine, selection = selection, distributed.broadcast_object(selection)
        if not np.array_equal(mine.indices, selection.indices):
            warnings.warn(
                f"cycle {self.cycle}: process {distributed.rank()} selected other samples than "
                "rank 0 (arithmetic that differs between devices); rank 0's selection is used",
                stacklevel=2,
            )
        self.queries.append(
            {
                "cycle": self.cycle,
                "indices": selection.indices.tolist(),
                "scores": None if selection.scores is None else selection.scores.tolist(),
            }
        )
        self.cycle += 1
        return selection.indices

    @property
    def last_scores(self) -> np.ndarray | None:
        """float64 scores of the last query's picks, in pick order (None: the strategy has none)."""
        if not self.queries or self.queries[-1]["scores"] is None:
            return None
        return np.asarray(self.queries[-1]["scores"], dtype=np.float64)

    # ------------------------------------------------------------------ state
    def state_dict(self, *, include_model: bool = True) -> dict[str, Any]:
        """Everything needed to continue: cycle, labelled set with its labels, query records, and
        (``include_model``) copies of the model and auxiliary module states. Tensors and plain
        containers only: it loads with ``torch.load(weights_only=True)``."""
        keep = include_model and self.model is not None
        return {
            "cycle": self.cycle,
            "pool": self._state.state_dict(),
            "labels": self.labels(),
            "queries": copy.deepcopy(self.queries),
            "model": snapshot(self.model) if keep else None,
            "auxiliary": snapshot(self.auxiliary.module) if keep and self.auxiliary else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A state without ``labels`` (written before labels were
        stored) gets them from the oracle again."""
        pool = Pool(self.pool_size)
        pool.load_state_dict(state["pool"])
        labeled = pool.labeled()
        labels = state.get("labels")
        if labels is None:
            if self.oracle is None:
                raise PoolError("the state holds no labels and the learner has no oracle")
            labels = self.oracle.labels(labeled.copy())
        rows = self.task.collate(labels)
        if len(rows) != len(labeled):
            raise PoolError(f"the state holds {len(rows)} labels for {len(labeled)} samples")
        self._state, self._labels = pool, dict(zip(labeled.tolist(), rows))
        self.cycle = int(state["cycle"])
        self.queries = copy.deepcopy(list(state.get("queries", [])))
        self.model, self.auxiliary = None, None
        if state.get("model") is not None:
            self._build_task_model()
            assert self.model is not None
            self.model.load_state_dict(state["model"])
            if self.auxiliary is not None and state.get("auxiliary") is not None:
                self.auxiliary.module.load_state_dict(state["auxiliary"])


def _reset(model: nn.Module) -> nn.Module:
    """``reset_parameters()`` on every submodule that has one (a fresh initialisation)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model
