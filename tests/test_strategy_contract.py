"""The contract every registered strategy keeps, checked on real digits with a tiny real model.

Parametrised over the whole registry (timm's habit): a strategy is tested the day it is
registered. For each one, set up the way ``run_trial`` does it (``prepare_model``, then
``auxiliary``, then training, then selection with a trainer for committees):

(a) exactly ``k`` distinct candidates, all among the context's candidates;
(b) the same seeds give the same selection (everything built twice from the same seeds);
(c) selection leaves the task model's parameters, buffers and every submodule's train/eval mode
    as it found them (and those of an auxiliary module trained with it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_context
from torch import nn

from gradnorm_al.errors import ConfigError
from gradnorm_al.models import create_model
from gradnorm_al.strategies import SAMPLERS, STRATEGIES, create_strategy
from gradnorm_al.train import TrainConfig, fit

# Tiny hyper-parameters for strategies that train or sample something; a strategy not listed
# runs with its defaults.
TINY = {
    "qbc": {"members": 2},
    "mc-dropout": {"samples": 3},
    "vaal": {"iterations": 3, "batch_size": 16, "latent_dim": 4, "width": 8, "hidden": 16},
    "sraal": {"iterations": 3, "batch_size": 16, "latent_dim": 4, "width": 8, "hidden": 16},
    "uncertain-gcn": {"hidden": 8, "steps": 5},
    "core-gcn": {"hidden": 8, "steps": 5},
    "ll4al": {"hidden": 4},
}
TRAIN = TrainConfig(epochs=1, batch_size=16)
LABELED = np.arange(0, 30)
CANDIDATES = np.arange(30, 70)
K = 5
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread


def selected_indices(result) -> np.ndarray:
    """The pool indices a strategy returned: an array, or a selection object's ``.indices``."""
    return np.asarray(result.indices if hasattr(result, "indices") else result)


def _build(strategy, model_seed: int) -> nn.Module:
    """A fresh task model as the loop builds it: seeded, then ``strategy.prepare_model``; a
    narrow smallcnn (conv-BN-ReLU blocks, an ``embed`` and a ``classifier``) keeps it fast."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        model = create_model("smallcnn", num_classes=10, in_channels=1, width=8)
        return strategy.prepare_model(model)


def _state(module: nn.Module | None) -> tuple[dict[str, torch.Tensor], list[bool]]:
    if module is None:
        return {}, []
    tensors = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    return tensors, [m.training for m in module.modules()]


def _assert_unchanged(module: nn.Module | None, before, what: str) -> None:
    tensors, modes = _state(module)
    assert modes == before[1], f"{what}: a submodule's train/eval mode changed"
    assert tensors.keys() == before[0].keys(), f"{what}: parameters or buffers added or removed"
    for key, value in tensors.items():
        assert torch.equal(value, before[0][key]), f"{what}: {key} changed"


def _select(
    name: str,
    bundle,
    *,
    check_unchanged: bool = False,
    scores: np.ndarray | None = None,
    only_scores: bool = False,
) -> np.ndarray:
    """Everything from fixed seeds: strategy, task model (+ auxiliary) trained on LABELED, a
    context with a trainer, one selection of K. ``scores``: the scorer's own scores, computed
    once before (the scorer part of a SCORER@SAMPLER pair then only hands them to its sampler)."""
    strategy = create_strategy(name, **TINY.get(name.split("@")[0], {}))
    if scores is not None:
        strategy.score = lambda ctx: scores
    model = _build(strategy, model_seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        auxiliary = strategy.auxiliary(model)
    fit(model, bundle.train, LABELED, TRAIN, device=CPU, seed=2, auxiliary=auxiliary)

    def trainer(indices: np.ndarray, seed: int) -> nn.Module:
        member = _build(strategy, model_seed=seed)
        fit(member, bundle.train, indices, TRAIN, device=CPU, seed=seed)
        return member

    # a mixed train/eval state, so that a strategy that flips modes and restores the wrong
    # ones (or none) is caught
    model.train()
    model.blocks[0].eval()
    aux_module = None if auxiliary is None else auxiliary.module
    before, aux_before = _state(model), _state(aux_module)
    ctx = make_context(
        model, bundle.train_eval, CANDIDATES, LABELED, seed=3, batch_size=32, trainer=trainer
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)  # the loop seeds torch for the selection too
        if only_scores:
            return strategy.score(ctx)
        chosen = selected_indices(strategy(ctx, K))
    if check_unchanged:
        _assert_unchanged(model, before, f"{name}: the task model")
        _assert_unchanged(aux_module, aux_before, f"{name}: the auxiliary module")
    return chosen


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_keeps_the_selection_contract(name, small_digits):
    first = _select(name, small_digits, check_unchanged=True)
    # (a) k distinct candidates
    assert first.shape == (K,) and np.issubdtype(first.dtype, np.integer)
    assert len(np.unique(first)) == K
    assert np.isin(first, CANDIDATES).all() and not np.isin(first, LABELED).any()
    # (b) deterministic: rebuilt from the same seeds, the same selection (order included)
    again = _select(name, small_digits)
    np.testing.assert_array_equal(again, first)


def _scorers() -> list[str]:
    return [n for n in STRATEGIES.names() if getattr(create_strategy(n), "has_scores", False)]


PAIRS = [(s, m) for s in _scorers() for m in SAMPLERS.names() if m != "top-k"]
_SCORES: dict[str, np.ndarray] = {}


@pytest.mark.parametrize("scorer, sampler", PAIRS)
def test_every_scorer_with_every_sampler_keeps_the_contract(scorer, sampler, small_digits):
    """The scorer's scores (its own contract is above) through every sampler: k distinct
    candidates, seeded, the model left as it was by the sampler's own passes (features)."""
    name = f"{scorer}@{sampler}"
    if sampler == "power" and not create_strategy(scorer).nonnegative_scores:
        with pytest.raises(ConfigError, match="non-negative"):
            create_strategy(name)  # refused before any training, by design
        return
    if scorer not in _SCORES:
        _SCORES[scorer] = np.asarray(_select(scorer, small_digits, only_scores=True))
    scores = _SCORES[scorer]
    first = _select(name, small_digits, check_unchanged=True, scores=scores)
    assert first.shape == (K,) and len(np.unique(first)) == K
    assert np.isin(first, CANDIDATES).all()
    np.testing.assert_array_equal(_select(name, small_digits, scores=scores), first)
