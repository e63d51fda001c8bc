"""Shared fixtures: small real data (a slice of scikit-learn's digits), tiny models, and the one
float comparison of computed tensors (against the scale of the whole quantity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradnorm_al.data import DatasetBundle, load_dataset, tensor_dataset


@pytest.fixture(scope="session")
def digits() -> DatasetBundle:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def small_digits(digits: DatasetBundle) -> DatasetBundle:
    """The first 300 pool images and 120 test images of digits: fast loops on real data."""
    x_tr, y_tr = digits.train.tensors
    x_te, y_te = digits.test.tensors
    train = tensor_dataset(x_tr[:300], y_tr[:300].numpy())
    test = tensor_dataset(x_te[:120], y_te[:120].numpy())
    return DatasetBundle(
        name="digits-small",
        train=train,
        train_eval=train,
        test=test,
        train_targets=y_tr[:300].numpy(),
        test_targets=y_te[:120].numpy(),
        num_classes=10,
        in_channels=1,
        image_size=(8, 8),
        default_model="smallcnn",
    )


class TwoHeads(nn.Module):
    """An MLP with an unused auxiliary head (its parameters get no gradient) and a tuple output."""

    def __init__(self, d_in: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True))
        self.head = nn.Linear(16, num_classes)
        self.unused_head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def engine_against_loop(model, x, *, rel: float, warn: bool = False, chunk_size=None) -> list:
    """Per-tensor squared-norm check of the batched engine against one backward per sample (the
    entropy loss): relative L2 error of the whole [N, T] norm matrix below ``rel``, a
    FallbackWarning exactly when ``warn``. Returns the fallback messages."""
    import warnings

    from gradnorm_al.pergrad import (
        FallbackWarning,
        per_sample_grad_norms,
        per_sample_grad_norms_loop,
    )
    from gradnorm_al.strategies import entropy_loss

    ref = per_sample_grad_norms_loop(model, x, entropy_loss, norm="per-tensor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = per_sample_grad_norms(
            model, x, entropy_loss, norm="per-tensor", chunk_size=chunk_size
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert bool(messages) == warn, messages
    assert ours.shape == ref.shape and ours.dtype == torch.float64
    assert ref.norm() > 0
    diff = float((ours - ref).norm())
    assert diff <= rel * float(ref.norm()), diff / float(ref.norm())
    return messages


def assert_close_to_scale(
    actual, expected, *, rel: float, scale: float | None = None, msg: object = ""
) -> None:
    """Every entry of ``actual`` is within ``rel * scale`` of ``expected`` (same shape), where the
    scale is that of the whole quantity: ``max |expected|`` over every entry, in float64, unless
    given (pass it when ``expected`` is zero in exact arithmetic).

    Why not entry by entry: an entry that is zero in exact arithmetic (a bias followed by a
    normalisation, a detached-p gradient) is rounding noise whose size depends on the machine, so
    a relative error per entry or column passes on one machine and fails on another. Against the
    scale of the whole gradient or score vector a correct float64 computation agrees to ~1e-12.
    Accepts tensors, arrays and sequences; ``msg`` prefixes the failure message.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if not e.numel():
        return
    scale = float(e.abs().max() if scale is None else scale)
    assert scale > 0 and np.isfinite(scale), f"the scale must be positive and finite, not {scale}"
    assert torch.isfinite(a).all(), "actual has non-finite entries"
    err = (a - e).abs()
    worst = int(err.flatten().argmax())
    ratio = float(err.max()) / scale
    worst_a, worst_e = float(a.flatten()[worst]), float(e.flatten()[worst])
    assert ratio <= rel, (
        f"{msg}{': ' if msg else ''}max |actual - expected| = {ratio:.3g} x the scale {scale:.3g}"
        f" > {rel:g} (worst at flat index {worst}: {worst_a!r} vs {worst_e!r})"
    )


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    several intra-op threads on a busy 2-core machine make every small step many times slower
    (measured: the strategy contract file 37 s with two threads, 6 s with one), so run the
    module single-threaded and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_context(
    model,
    pool,
    candidates,
    labeled=(),
    *,
    seed: int = 0,
    num_classes: int = 10,
    batch_size: int = 128,
    trainer=None,
    task=None,
):
    """A SelectionContext on the CPU with a seeded rng and int64 index arrays."""
    from gradnorm_al.strategies import SelectionContext

    return SelectionContext(
        model=model,
        pool=pool,
        candidates=np.asarray(candidates, dtype=np.int64),
        labeled=np.asarray(labeled, dtype=np.int64),
        num_classes=num_classes,
        device=torch.device("cpu"),
        rng=np.random.default_rng(seed),
        batch_size=batch_size,
        trainer=trainer,
        task=task,
    )


def bundle_trial(bundle, strategy, *, loop, train, seed=0, factory=None, **kwargs):
    """run_trial on a DatasetBundle with the learner the runner builds (smallcnn by default)."""
    from functools import partial

    from gradnorm_al.experiment.runner import bundle_learner
    from gradnorm_al.loop import run_trial

    factory = factory or partial(create_model_smallcnn)
    learner = bundle_learner(
        bundle, factory, strategy, train=train, schedule=loop, device=torch.device("cpu"), seed=seed
    )
    return run_trial(learner, test=bundle.test, schedule=loop, trial=0, **kwargs)


def create_model_smallcnn():
    from gradnorm_al import create_model

    return create_model("smallcnn", num_classes=10, in_channels=1)


# ------------------------------------------- brute-force references for the replayed analyses
def pool_items(reader, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels (class indices [M] or masks [M, H, W]) of a replayed run's pool samples,
    by plain item access."""
    items = [reader.bundle.train_eval[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def brute_grad_norms(model, x, loss_of, norm: str = "tensor-sum") -> np.ndarray:
    """One backward pass per sample of ``loss_of(output [1, ...], i)`` (None: no loss, norm 0);
    ``norm`` tensor-sum (sum of per-tensor L2 norms) or l2."""
    import math

    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        loss = loss_of(model(x[i : i + 1]), i)
        if loss is None:
            out.append(0.0)
            continue
        grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
        sq = [float(g.double().pow(2).sum()) for g in grads]
        out.append(sum(math.sqrt(v) for v in sq) if norm == "tensor-sum" else math.sqrt(sum(sq)))
    return np.asarray(out)


def check_topk_overlap(reader, records, true_loss, *, budget: int, candidates: int) -> None:
    """Each Table 1 record recounted: the top-K candidates by one backward per candidate of
    ``true_loss(labels)(output, i)`` against the K the strategy selected."""
    for r in records:
        view = reader.cycles(r["strategy"], r["trial"])[r["cycle"]]
        model = reader.model(r["strategy"], r["trial"], r["cycle"])
        x, y = pool_items(reader, view.candidates)
        norms = brute_grad_norms(model, x, true_loss(y))
        k = len(view.selected)
        top = {int(view.candidates[i]) for i in np.argsort(-norms, kind="stable")[:k]}
        assert r["overlap"] == len(top & {int(i) for i in view.selected})
        assert r["budget"] == k == budget and r["candidates"] == candidates


def check_gradnorm_decrease(reader, records, loss_of) -> None:
    """Each A.2 record recomputed: the selected samples' norms of ``loss_of(output, i)`` at T^c
    and T^(c+1), one backward per sample."""
    for r in records:
        view = reader.cycles(r["strategy"], r["trial"])[r["cycle"]]
        x, _ = pool_items(reader, view.selected)
        before, after = (
            brute_grad_norms(reader.model(r["strategy"], r["trial"], c), x, loss_of)
            for c in (r["cycle"], r["cycle"] + 1)
        )
        np.testing.assert_allclose(r["norm_at_selection"], before.mean(), rtol=1e-5)
        np.testing.assert_allclose(r["norm_after_training"], after.mean(), rtol=1e-5)
        # a sample whose two norms agree to float32 noise could flip; none here is that close
        assert np.min(np.abs(after - before) / before) > 1e-4
        assert r["decreased"] == pytest.approx(np.mean(after < before))
