"""Per-row estimates: loss rows recorded exactly, row-local layers found, and a better head gradient than before."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras, ExecutionOptions
from lightning_nobp.algorithms import EggRoll, MeZO, OpenES, Population
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator, RowEstimateOptions
from lightning_nobp.perturb.direct_step import DirectHyperparameters
from lightning_nobp.perturb.row_estimate import row_local_gradient
from lightning_nobp.perturb.row_losses import RowLocalLayer, RowLossRecorder, find_row_local_layers
from lightning_nobp.pytorch import NoBackpropStrategy
from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


def _recorded(compute) -> tuple[torch.Tensor, torch.Tensor | None]:
    recorder = RowLossRecorder()
    with recorder:
        value = compute()
    return value, recorder.rows


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "sum"}, {"ignore_index": 2}, {"weight": torch.linspace(0.5, 2.0, 5)}],
    ids=["mean", "sum", "ignore_index", "class_weight"],
)
def test_cross_entropy_rows_add_up_to_the_loss(kwargs: dict) -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    flat_logits, flat_target = logits.reshape(12, 5), target.reshape(12)
    expected = F.cross_entropy(flat_logits, flat_target, **kwargs)
    value, rows = _recorded(lambda: F.cross_entropy(flat_logits, flat_target, **kwargs))
    assert rows is not None and rows.shape == (12,)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(rows.sum(), expected)
    unreduced = F.cross_entropy(flat_logits, flat_target, **(kwargs | {"reduction": "none"}))
    assert torch.equal(rows == 0, unreduced == 0)  # ignored rows contribute nothing
    if kwargs.get("ignore_index") == 2:
        assert bool((rows[flat_target == 2] == 0).all())


def test_other_recognized_losses_and_what_is_not_recorded() -> None:
    torch.manual_seed(0)
    prediction, target = torch.randn(6, 3), torch.randn(6, 3)
    for loss in (F.mse_loss, F.binary_cross_entropy_with_logits):
        target_ = target if loss is F.mse_loss else target.sigmoid()
        value, rows = _recorded(lambda: loss(prediction, target_))
        torch.testing.assert_close(value, loss(prediction, target_))
        torch.testing.assert_close(rows, loss(prediction, target_, reduction="none").sum(1) / prediction.numel())
    log_probs, labels = torch.randn(6, 4).log_softmax(-1), torch.randint(0, 4, (6,))
    value, rows = _recorded(lambda: F.nll_loss(log_probs, labels))
    torch.testing.assert_close(rows, F.nll_loss(log_probs, labels, reduction="none") / 6)
    # label smoothing: passed through, nothing recorded; two losses: no rows (which would they be?)
    value, rows = _recorded(lambda: F.cross_entropy(log_probs, labels, label_smoothing=0.1))
    assert rows is None
    torch.testing.assert_close(value, F.cross_entropy(log_probs, labels, label_smoothing=0.1))
    value, rows = _recorded(lambda: F.cross_entropy(log_probs, labels) + F.mse_loss(prediction, target))
    assert rows is None


class BatchCentered(nn.Module):
    """A hidden layer whose output is centered over the batch (rows mix) and a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.head((h - h.mean(0)).relu())


def test_only_layers_whose_rows_stay_apart_are_row_local() -> None:
    torch.manual_seed(0)
    model = BatchCentered()
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    candidates = [RowLocalLayer(model.hidden, 0, 1), RowLocalLayer(model.head, 2, 3)]
    found = find_row_local_layers(candidates, lambda: F.cross_entropy(model(x), y), lambda: None)
    assert [layer.module for layer in found] == [model.head]
    # a loss over the batch mean of the logits: no layer is row-local
    found = find_row_local_layers(candidates, lambda: model(x).mean(0).square().sum(), lambda: None)
    assert found == []


def test_low_rank_and_dense_noise_give_the_same_estimate() -> None:
    torch.manual_seed(0)
    d, h = torch.randn(5, 7), torch.randn(7, 6)
    a, b, e = torch.randn(5, 3, 2), torch.randn(5, 6, 2), torch.randn(5, 3)
    low_rank = row_local_gradient(d, h, (a, b), e)
    dense = row_local_gradient(d, h, a @ b.transpose(1, 2), e)
    torch.testing.assert_close(low_rank[0], dense[0])
    torch.testing.assert_close(low_rank[1], dense[1])
    # the reference: g_n = sum_k d_kn u_kn / (K (|h_n|^2 + 1)), u_kn = E_k h_n + e_k
    u = torch.einsum("koi,ni->kno", a @ b.transpose(1, 2), h) + e.unsqueeze(1)
    g = (d.unsqueeze(-1) * u).sum(0) / (5 * (h.square().sum(1) + 1)).unsqueeze(1)
    torch.testing.assert_close(low_rank[0], g.t() @ h)
    torch.testing.assert_close(low_rank[1], g.sum(0))


def _head_setup(seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    loss = F.cross_entropy(net(x), y)
    true_head = torch.autograd.grad(loss, net[2].weight)[0]
    return net, x, y, true_head


def _evaluated(
    algorithm: EggRoll | OpenES,
    net: nn.Module,
    loss: Callable[[], torch.Tensor],
    seed: int,
    row_estimates: bool = True,
    batched: bool = True,
) -> tuple[PopulationEstimator, Population, torch.Tensor]:
    """One step's population of ``algorithm`` evaluated on ``net`` by a fresh estimator."""
    options = EstimatorOptions(rows=RowEstimateOptions(enabled=row_estimates))
    estimator = PopulationEstimator(algorithm, [net], list(net.parameters()), options=options)
    population = algorithm.ask(seed)
    estimator.probe_parameter_reads(population, loss)
    return estimator, population, estimator.evaluate_members(population, loss, batched=batched)


def _head_estimate(algorithm: EggRoll | OpenES, row_estimates: bool, seed: int, batched: bool) -> tuple[float, float]:
    """Cosine with the true head gradient, and the estimate's norm."""
    net, x, y, true_head = _head_setup(seed)
    estimator, population, fitness = _evaluated(
        algorithm, net, lambda: F.cross_entropy(net(x), y), seed, row_estimates, batched
    )
    estimator.accumulate_gradient(population, algorithm.tell(population, fitness).coefficients)
    head = net[2].weight.grad
    return float(F.cosine_similarity(head.flatten(), true_head.flatten(), dim=0)), float(head.norm())


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_member_at_a_time"])
@pytest.mark.parametrize("algorithm", [EggRoll, OpenES])
def test_per_row_estimate_of_a_head_is_closer_to_its_gradient(algorithm: type, batched: bool) -> None:
    with_rows, without_rows = [], []
    for seed in range(4):
        es = algorithm(population=16, sigma=1e-2)
        cosine, norm = _head_estimate(es, True, seed, batched)
        es_off = algorithm(population=16, sigma=1e-2)
        cosine_off, norm_off = _head_estimate(es_off, False, seed, batched)
        with_rows.append(cosine)
        without_rows.append(cosine_off)
        assert norm == pytest.approx(norm_off, rel=1e-4)  # the scale of the estimate it replaces
    assert min(with_rows) > 0.5
    assert sum(with_rows) / 4 > 3 * max(sum(without_rows) / 4, 0.05)


def test_a_regularized_loss_turns_per_row_estimates_off_with_a_warning() -> None:
    net, x, y, _ = _head_setup(0)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y) + 1e-2 * net[0].weight.square().sum()

    with pytest.warns(UserWarning, match="per-row estimates are off"):
        estimator, _, _ = _evaluated(EggRoll(population=16), net, loss, 0)
    assert estimator.rows.enabled is False


class CountingDigits(DigitsClassifier):
    """The digits user model with Adam."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(algorithm, **strategy_kwargs) -> NoBackpropStrategy:
    pl.seed_everything(0, verbose=False)
    model = CountingDigits()
    train, _ = digits_loaders(batch_size=128)
    strategy = NoBackpropStrategy(algorithm=algorithm, **strategy_kwargs)
    trainer = pl.Trainer(strategy=strategy, **quiet_trainer_kwargs(max_steps=3))
    trainer.fit(model, train)
    return strategy


def test_the_trainer_uses_per_row_estimates_for_the_head_only_where_they_apply(no_backprop: None) -> None:
    strategy = _fit(EggRoll(population=32))
    (estimator,) = strategy.engine._estimators.values()
    assert [layer.module for layer in estimator.rows.row_local] == [strategy.lightning_module.net[2]]
    # off when asked, with MeZO (no population), and when every pair sees its own samples
    for algorithm, kwargs in (
        (EggRoll(population=32, extras=EstimatorExtras(per_row_estimates=False)), {}),
        (MeZO(), {}),
        (EggRoll(population=32), {"execution": ExecutionOptions(member_data="pair_slices")}),
    ):
        strategy = _fit(algorithm, **kwargs)
        (estimator,) = strategy.engine._estimators.values()
        assert not estimator.rows.row_local, (algorithm, kwargs)


def test_per_row_max_outputs_widens_which_layers_qualify(no_backprop: None) -> None:
    """The hidden layer (128 outputs) is row-local too, but wider than a population of 32's 16 pairs: it takes
    per-row estimates only when ``per_row_max_outputs`` allows it."""
    strategy = _fit(EggRoll(population=32, extras=EstimatorExtras(per_row_max_outputs=128)))
    (estimator,) = strategy.engine._estimators.values()
    net = strategy.lightning_module.net
    assert [layer.module for layer in estimator.rows.row_local] == [net[0], net[2]]
    strategy = _fit(EggRoll(population=32, extras=EstimatorExtras(per_row_max_outputs=127)))
    (estimator,) = strategy.engine._estimators.values()
    assert [layer.module for layer in estimator.rows.row_local] == [strategy.lightning_module.net[2]]
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="per_row_max_outputs"):
            EggRoll(extras=EstimatorExtras(per_row_max_outputs=bad))


class _HeadCalls(pl.Callback):
    """Counts the head's forward calls during each training batch."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._calls = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.net[2].register_forward_hook(lambda *args: setattr(self, "_calls", self._calls + 1))

    def on_train_batch_start(self, *args: object) -> None:
        self._calls = 0

    def on_train_batch_end(self, *args: object) -> None:
        self.per_batch.append(self._calls)


def test_the_official_pass_supplies_the_head_inputs(no_backprop: None) -> None:
    """After the first step (which searches the row-local layers), a step runs the head twice: the official pass
    (whose inputs the estimate reuses) and one batched call for the whole population; no extra forward."""
    pl.seed_everything(0, verbose=False)
    model = CountingDigits()
    train, _ = digits_loaders(batch_size=128)
    counter = _HeadCalls()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(
            algorithm=EggRoll(population=32, extras=EstimatorExtras(input_subspace=None))
        ),  # no observation passes
        callbacks=[counter],
        **quiet_trainer_kwargs(max_steps=4),
    )
    trainer.fit(model, train)
    assert counter.per_batch[1:] == [2, 2, 2]


def test_bf16_losses_keep_per_row_estimates_on() -> None:
    """The rows' float32 sum differs from a bf16 loss by rounding; only a changed loss turns the estimates off."""
    import warnings

    net, x, y, _ = _head_setup(0)
    net, x = net.to(torch.bfloat16), x.to(torch.bfloat16)
    algorithm = EggRoll(population=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator, population, fitness = _evaluated(algorithm, net, lambda: F.cross_entropy(net(x), y), 0)
    assert estimator.rows.enabled is True
    estimator.accumulate_gradient(population, algorithm.tell(population, fitness).coefficients)
    assert net[2].weight.grad is not None and bool(torch.isfinite(net[2].weight.grad).all())


def test_a_population_evaluated_in_chunks_gives_the_same_head_estimate() -> None:
    heads = []
    for chunk in (None, 4):
        net, x, y, _ = _head_setup(0)
        algorithm = EggRoll(population=16, population_chunk=chunk)
        estimator, population, fitness = _evaluated(algorithm, net, lambda: F.cross_entropy(net(x), y), 5)
        estimator.accumulate_gradient(population, algorithm.tell(population, fitness).coefficients)
        heads.append(net[2].weight.grad.clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-6)


def test_the_direct_update_applies_the_same_per_row_estimate() -> None:
    """``update="direct"`` (low-bit weights' path) writes ``-lr *`` the estimate the ``.grad`` path would hold."""
    written = []
    for direct in (False, True):
        net, x, y, _ = _head_setup(0)
        before = net[2].weight.detach().clone()
        algorithm = EggRoll(population=16)
        estimator, population, fitness = _evaluated(algorithm, net, lambda: F.cross_entropy(net(x), y), 3)
        coefficients = algorithm.tell(population, fitness).coefficients
        assert estimator.rows.row_local
        if direct:
            settings = [DirectHyperparameters(0.5)] * len(estimator.params)
            estimator.apply_update([(population, coefficients)], settings, 7)
            written.append((before - net[2].weight.detach()) / 0.5)
        else:
            estimator.accumulate_gradient(population, coefficients)
            written.append(net[2].weight.grad.clone())
    torch.testing.assert_close(written[1], written[0], rtol=1e-4, atol=1e-6)


def test_low_bit_weights_train_with_per_row_estimates(no_backprop: None) -> None:
    from lightning_nobp import LowBitPrecision

    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(lr=3e-3, momentum=0.0)  # plain SGD: what the direct path honours
    train, _ = digits_loaders(batch_size=128)
    strategy = NoBackpropStrategy(algorithm=EggRoll(population=32), direct_step="normalized")
    trainer = pl.Trainer(strategy=strategy, plugins=[LowBitPrecision("fp8_e4m3")], **quiet_trainer_kwargs(max_steps=3))
    trainer.fit(model, train)
    (estimator,) = strategy.engine._estimators.values()
    assert strategy.engine.update == "direct"
    assert [layer.module for layer in estimator.rows.row_local] == [model.net[2]]
    assert all(
        bool(torch.isfinite(p.dequantize() if hasattr(p, "dequantize") else p).all()) for p in model.parameters()
    )


class TiedHead(nn.Module):
    """An embedding whose weight the output layer shares (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).tanh())


def test_a_head_tied_to_an_embedding_is_not_estimated_from_rows() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    tokens, targets = torch.randint(0, 6, (16,)), torch.randint(0, 6, (16,))
    estimator, _, _ = _evaluated(EggRoll(population=16), model, lambda: F.cross_entropy(model(tokens), targets), 0)
    assert estimator.rows.row_local == []


def test_pair_differences_leave_out_pairs_with_a_non_finite_row() -> None:
    from lightning_nobp.algorithms.base import Member, Population
    from lightning_nobp.perturb.row_estimates import _pair_differences

    population = EggRoll(population=8).ask(3)
    table = torch.randn(8, 5)
    seeds, differences = _pair_differences(population, table)
    assert seeds == [m.noise_seed for m in population.members[0::2]]
    torch.testing.assert_close(differences, (table[0::2] - table[1::2]) / (2 * population.sigma))
    table[3, 2] = float("nan")  # the second pair's minus member
    seeds, differences = _pair_differences(population, table)
    assert seeds == [population.members[i].noise_seed for i in (0, 4, 6)]
    torch.testing.assert_close(differences, (table[[0, 4, 6]] - table[[1, 5, 7]]) / (2 * population.sigma))
    shuffled = Population(tuple(reversed(population.members)), population.sigma)  # (-, +) order
    seeds, differences = _pair_differences(shuffled, table.flip(0))
    assert seeds == [population.members[i].noise_seed for i in (6, 4, 0)]
    torch.testing.assert_close(differences, (table[[6, 4, 0]] - table[[7, 5, 1]]) / (2 * population.sigma))
    table[[0, 4]] = float("inf")
    assert _pair_differences(population, table) is None  # one finite pair left
    lone = Population((Member(1, 1.0), Member(1, -1.0)), 0.1)
    assert _pair_differences(lone, torch.zeros(2, 3)) is None
