"""The analyses that read a run's per-cycle models (``run --keep-models``): the replayed cycles,
Table 1's top-K overlap, Appendix A.2's gradient-norm decrease and Table 2 / Fig. 3's influence
terms, each against a brute-force recomputation."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_to_scale,
    check_gradnorm_decrease,
    check_topk_overlap,
    pool_items,
)

from gradnorm_al.analyses.gradnorm_decrease import gradnorm_decrease
from gradnorm_al.analyses.influence import InfluenceSettings, influence, influence_terms
from gradnorm_al.analyses.replay import RunReader
from gradnorm_al.analyses.topk_overlap import topk_overlap
from gradnorm_al.cli import main
from gradnorm_al.errors import RunDirectoryError
from gradnorm_al.experiment import ExperimentConfig, run_experiment
from gradnorm_al.seeding import ANALYSIS, rng
from gradnorm_al.strategies.base import top_k
from gradnorm_al.strategies.gradnorm import entropy_loss, gradnorm_scores
from gradnorm_al.train import accuracy

STRATEGIES = ["random", "entropy-gradnorm"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_this_module():
    """The run and its replays in this module on one thread (the same float reductions), and
    the caller's thread count back afterwards: later modules compare runs made in-process with
    runs made by subprocesses, which use the default count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run on 300 digits: 2 trials x 3 cycles, candidates a seeded subset of 120."""
    config = ExperimentConfig(
        dataset="digits",
        pool_size=300,
        model="smallcnn",
        strategies=STRATEGIES,
        trials=2,
        cycles=3,
        epochs=3,
        batch_size=32,
        lr=0.05,
        subset_size=120,
        keep_models=True,
    )
    out = tmp_path_factory.mktemp("run")
    run_experiment(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def reader(run_dir):
    return RunReader(run_dir)


def test_keep_models_writes_every_cycle_and_the_replay_reproduces_the_run(reader, run_dir):
    assert len(list((run_dir / "models").glob("*.pt"))) == 2 * 2 * 3
    bundle = reader.bundle
    for row in reader.rows:
        s, t, c = row["strategy"], row["trial"], row["cycle"]
        view = reader.cycles(s, t)[c]
        model = reader.model(s, t, c)
        # the saved model and the replayed labelled set give the accuracies the run recorded
        test = accuracy(model, bundle.test, device=reader.device)
        train = accuracy(model, bundle.train_eval, view.labeled, device=reader.device)
        assert math.isclose(test, row["test_accuracy"], abs_tol=1e-12)
        assert math.isclose(train, row["train_accuracy"], abs_tol=1e-12)
        assert len(view.labeled) == row["num_labeled"]
        if view.selected is not None:
            assert len(view.candidates) == 120 and np.isin(view.selected, view.candidates).all()
            assert not np.isin(view.candidates, view.labeled).any()


def test_replayed_candidates_and_model_reproduce_the_gradnorm_selection(reader):
    for view in reader.cycles("entropy-gradnorm", 1)[:-1]:
        model = reader.model("entropy-gradnorm", 1, view.cycle)
        x, _ = pool_items(reader, view.candidates)
        scores = gradnorm_scores(model, x, scheme="entropy").numpy()
        np.testing.assert_array_equal(
            top_k(scores, view.candidates, len(view.selected)), view.selected
        )


def test_topk_overlap_equals_a_brute_force_count(reader):
    records = topk_overlap(reader)
    assert len(records) == 2 * 2 * 2  # strategies x trials x selecting cycles

    def true_loss(y):
        return lambda out, i: F.cross_entropy(out, y[i : i + 1])

    check_topk_overlap(reader, records, true_loss, budget=15, candidates=120)


def test_gradnorm_decrease_equals_a_brute_force_fraction(reader):
    records = gradnorm_decrease(reader)
    assert len(records) == 2 * 2 * 2 and {r["scheme"] for r in records} == {"entropy"}
    check_gradnorm_decrease(reader, records, lambda out, i: entropy_loss(out)[0])


def test_analyze_commands_write_tables(run_dir, capsys):
    assert main(["analyze", "topk-overlap", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "# Top-K overlap" in out and "| entropy-gradnorm |" in out and "/ 15" in out
    with open(run_dir / "analysis" / "topk_overlap.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    assert main(["analyze", "gradnorm-decrease", str(run_dir), "--quiet", "--norm", "l2"]) == 0
    assert "l2 norm" in capsys.readouterr().out
    assert (run_dir / "analysis" / "gradnorm_decrease.csv").exists()


def test_a_run_without_kept_models_is_refused_with_the_fix(tmp_path, capsys, small_digits):
    config = ExperimentConfig(
        model="smallcnn", strategies=["random"], trials=1, cycles=2, epochs=1, batch_size=32
    )
    run_experiment(config, tmp_path, progress=False, bundle=small_digits)
    assert main(["analyze", "topk-overlap", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--keep-models" in err and err.count("\n") == 1


INFLUENCE = dict(eval_samples=60, hessian_samples=40, tol=1e-4, max_iter=100)


def _settings(**more) -> InfluenceSettings:
    return InfluenceSettings(**INFLUENCE, **more)


@pytest.mark.parametrize("at", ["next", "selection"])
def test_influence_terms_against_independent_autograd(reader, at):
    """Eq. 3 per candidate = s . grad CE(x, y) by one backward per candidate; s solves
    (H + damping I) s = g_bar with H and g_bar from plain autograd on the same samples."""
    strategy, trial, cycle = "entropy-gradnorm", 0, 0
    t = influence_terms(reader, strategy, trial, cycle, _settings(at=at))
    assert t["report"].converged and t["damping"] > 0 and t["lambda_min"] < t["lambda_max"]
    views = reader.cycles(strategy, trial)
    view = views[cycle]
    model = reader.model(strategy, trial, cycle + 1 if at == "next" else cycle)
    params = [p for p in model.parameters() if p.requires_grad]
    # the same seeded subsets the analysis drew
    generator = rng(reader.seed(trial), ANALYSIS, cycle)
    eval_idx = np.sort(generator.choice(len(reader.bundle.test), 60, replace=False))
    base = views[cycle + 1] if at == "next" else view
    hessian_idx = (  # a set of 40 or fewer is used whole
        base.labeled
        if len(base.labeled) <= 40
        else np.sort(generator.choice(base.labeled, 40, replace=False))
    )
    xt, yt = zip(*(reader.bundle.test[int(i)] for i in eval_idx))
    g_bar = torch.autograd.grad(
        F.cross_entropy(model(torch.stack(xt)), torch.as_tensor([int(y) for y in yt])), params
    )
    xh, yh = pool_items(reader, hessian_idx)
    grads = torch.autograd.grad(F.cross_entropy(model(xh), yh), params, create_graph=True)
    s = t["s"]
    hs = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, s)), params)
    residual = torch.cat([(h + t["damping"] * v - g).flatten() for h, v, g in zip(hs, s, g_bar)])
    g_norm = torch.cat([g.flatten() for g in g_bar]).norm()
    assert float(residual.norm() / g_norm) < 2e-4
    # Target: one backward per candidate (first 12)
    x, y = pool_items(reader, view.candidates[:12])
    expected = []
    for i in range(12):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        expected.append(sum(float((gi.double() * si.double()).sum()) for gi, si in zip(g, s)))
    # float32 gradients: agreement to float32 accuracy at the scale of the whole vector
    assert_close_to_scale(np.asarray(t["target"])[:12], expected, rel=1e-5)
    # Cauchy-Schwarz: |Approx-1| <= Approx-2; Approx-3 is ||s|| times the l2 score at T^c, and
    # the run's (tensor-sum) score at T^c reproduces the selection
    slack = 1e-5 * float(np.max(t["approx2"]))
    assert np.all(np.abs(t["approx1"]) <= np.asarray(t["approx2"]) + slack)
    selecting = reader.model(strategy, trial, cycle)
    x_all, _ = pool_items(reader, view.candidates)
    l2 = gradnorm_scores(selecting, x_all, scheme="entropy", norm="l2").numpy()
    assert_close_to_scale(t["approx3"], t["s_norm"] * l2, rel=1e-6)
    if at == "selection":
        assert_close_to_scale(t["approx2"], t["approx3"], rel=1e-6)
    k = len(view.selected)
    np.testing.assert_array_equal(top_k(t["eq5"], view.candidates, k), view.selected)


def test_influence_terms_refuse_a_cycle_without_what_they_need(reader):
    with pytest.raises(RunDirectoryError, match="followed by a trained cycle"):
        influence_terms(reader, "entropy-gradnorm", 0, 2)  # the last cycle selects nothing
    with pytest.raises(RunDirectoryError, match="no selection at cycle 2"):
        influence_terms(reader, "entropy-gradnorm", 0, 2, InfluenceSettings(at="selection"))


@pytest.mark.slow
def test_influence_table_overlap_is_a_brute_force_count_and_the_command_writes_fig3(
    reader, run_dir, capsys
):
    records = influence(reader, _settings())
    assert {(r["trial"], r["cycle"]) for r in records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    r = records[0]
    t = influence_terms(reader, "entropy-gradnorm", r["trial"], r["cycle"], _settings())
    k = r["budget"]
    by_eq3 = set(np.asarray(t["candidates"])[np.argsort(-t["target"], kind="stable")[:k]])
    by_eq5 = set(np.asarray(t["candidates"])[np.argsort(-t["eq5"], kind="stable")[:k]])
    assert r["overlap"] == len(by_eq3 & by_eq5)
    assert r["target"] == pytest.approx(float(np.mean(t["target"])))
    assert r["chance"] == pytest.approx(15 * 15 / 120)
    args = ["analyze", "influence", str(run_dir), "--quiet", "--eval-samples", "30"]
    args += ["--hessian-samples", "20", "--curvature", "gauss-newton"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "## Table 2" in out and "gauss-newton" in out and "did not converge" not in out
    assert (run_dir / "analysis" / "influence_terms.png").stat().st_size > 1000
    with open(run_dir / "analysis" / "influence.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_influence_needs_a_gradnorm_strategy(tmp_path, capsys, small_digits):
    config = ExperimentConfig(
        model="smallcnn",
        strategies=["random"],
        trials=1,
        cycles=2,
        epochs=1,
        batch_size=32,
        keep_models=True,
    )
    run_experiment(config, tmp_path, progress=False, bundle=small_digits)
    reader = RunReader(tmp_path, bundle=small_digits)
    with pytest.raises(RunDirectoryError, match="no gradnorm strategy"):
        influence(reader)
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "influence", str(tmp_path), "--damping", "x"])
    assert exit_.value.code == 2
    assert "expected a number or auto" in capsys.readouterr().err
