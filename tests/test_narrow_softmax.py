"""``NarrowSoftmaxMode``: the same losses as PyTorch, through the fast path only where it applies."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lightning_nobp.perturb import narrow_softmax
from lightning_nobp.perturb.narrow_softmax import NarrowSoftmaxMode, transposed_log_softmax


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes that went through the transposed path."""
    calls: list[tuple[int, ...]] = []
    original = narrow_softmax.transposed_log_softmax

    def counting(logits: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(logits.shape))
        return original(logits)

    monkeypatch.setattr(narrow_softmax, "transposed_log_softmax", counting)
    return calls


@pytest.mark.parametrize("classes", [2, 10, 15])
def test_transposed_log_softmax_matches_pytorch(classes: int) -> None:
    logits = torch.randn(3, 97, classes) * 5
    torch.testing.assert_close(transposed_log_softmax(logits), torch.log_softmax(logits, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 3}, {"weight": torch.rand(10) + 0.5}],
    ids=["mean", "sum", "none", "ignore_index", "weight"],
)
def test_cross_entropy_is_unchanged_and_takes_the_fast_path(counted, options: dict) -> None:
    logits, target = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    expected = F.cross_entropy(logits, target, **options)
    with NarrowSoftmaxMode():
        got = F.cross_entropy(logits, target, **options)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert counted == [(64, 10)]


def test_log_softmax_spellings_take_the_fast_path(counted) -> None:
    logits = torch.randn(8, 5, 10)
    expected = torch.log_softmax(logits, -1)
    with NarrowSoftmaxMode():
        results = [F.log_softmax(logits, dim=-1), torch.log_softmax(logits, 2), logits.log_softmax(-1)]
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    assert len(counted) == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),  # smoothing: PyTorch's own
        lambda x, y: F.cross_entropy(x, torch.softmax(torch.randn_like(x), -1)),  # probability targets
        lambda x, y: F.cross_entropy(torch.randn(4, 32), y[:4]),  # 32 classes: the native kernel is fast
        lambda x, y: torch.log_softmax(x, 0),  # not the last dimension
        lambda x, y: F.log_softmax(x, -1, dtype=torch.float64),  # dtype conversion
        lambda x, y: F.cross_entropy(x.to(torch.bfloat16), y),  # bf16 logits
    ],
    ids=["label_smoothing", "probability_targets", "wide", "first_dim", "dtype", "bf16"],
)
def test_other_calls_pass_through_unchanged(counted, call) -> None:
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    expected = call(logits, target)
    torch.manual_seed(0)
    with NarrowSoftmaxMode():
        got = call(logits, target)
    torch.testing.assert_close(got, expected)
    assert counted == []


def test_under_vmap_every_member_gets_its_own_loss(counted) -> None:
    members, target = torch.randn(6, 32, 10), torch.randint(0, 10, (32,))
    expected = torch.stack([F.cross_entropy(m, target) for m in members])
    with NarrowSoftmaxMode():
        got = torch.func.vmap(lambda logits: F.cross_entropy(logits, target))(members)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert counted == [(32, 10)]


def test_population_estimator_uses_the_mode_on_cpu_with_the_same_fitness(counted) -> None:
    from torch import nn

    from lightning_nobp.algorithms import EggRoll
    from lightning_nobp.perturb import PopulationEstimator

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    algorithm = EggRoll(population=8, sigma=0.05)
    estimator = PopulationEstimator(algorithm, [net], list(net.parameters()))
    population = algorithm.ask(7)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    assert estimator.evaluation.narrow_softmax
    fast = estimator.evaluate_members(population, loss)
    assert counted, "the population's cross-entropy did not take the transposed path"
    estimator.evaluation.loss_context = contextlib.nullcontext
    counted.clear()
    native = estimator.evaluate_members(population, loss)
    assert counted == []
    torch.testing.assert_close(fast, native, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_picked_negative_log_probs_equal_nll_loss_bit_for_bit(weighted: bool) -> None:
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(64, 10), -1)
    target = torch.randint(0, 10, (64,))
    target[[3, 17]] = -100  # ignored rows
    weight = torch.rand(10) + 0.5 if weighted else None
    expected = F.nll_loss(log_probs, target, weight=weight, reduction="none")
    assert torch.equal(narrow_softmax.picked_negative_log_probs(log_probs, target, weight), expected)
    assert float(expected[3]) == 0.0
    stacked = torch.log_softmax(torch.randn(4, 64, 10), -1)  # under vmap, as the population's evaluation runs it
    batched = torch.func.vmap(lambda lp: narrow_softmax.picked_negative_log_probs(lp, target, weight))(stacked)
    for member in range(4):
        assert torch.equal(batched[member], F.nll_loss(stacked[member], target, weight=weight, reduction="none"))


def test_a_row_recorder_doing_the_modes_work_records_the_same_rows(counted) -> None:
    """With per-row estimates the population's forward runs under one mode, the recorder, which takes the fast
    forms itself: the same rows and loss, and the transposed path taken (for the loss and a bare log_softmax)."""
    from lightning_nobp.perturb.row_losses import RowLossRecorder

    members, target = torch.randn(4, 32, 10) * 3, torch.randint(0, 10, (32,))
    recorded = {}
    for narrow in (False, True):
        recorder = RowLossRecorder(narrow_softmax=narrow)

        def member_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            recorder.reset()
            with recorder:
                loss = F.cross_entropy(logits, target)
                probabilities = torch.log_softmax(logits, -1).exp()
            return loss, recorder.rows, probabilities

        recorded[narrow] = torch.func.vmap(member_loss)(members)
    for slow, fast in zip(recorded[False], recorded[True]):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    assert counted == [(32, 10), (32, 10)]  # the recorder's own fast forms, only when asked
