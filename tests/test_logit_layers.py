"""The exact gradient of the layer computing a cross-entropy's logits (``exact_head_gradient``)."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras
from lightning_nobp.algorithms import EggRoll, OpenES
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator, RowEstimateOptions
from lightning_nobp.perturb.update import merged_weights
from lightning_nobp.perturb.logit_layers import cross_entropy_layer_gradient, find_logit_layers
from lightning_nobp.perturb.row_losses import CrossEntropyTargets, RowLocalLayer, RowLossRecorder
from lightning_nobp.pytorch import NoBackpropStrategy
from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum"}, {"ignore_index": 2}, {"weight": "classes"}, {"weight": "classes", "ignore_index": 1}],
    ids=["mean", "sum", "ignore_index", "class_weights", "class_weights_and_ignore_index"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_the_exact_gradient_is_autograds(options: dict, bias: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(12, 5, bias=bias)
    h, y = torch.randn(40, 12), torch.randint(0, 5, (40,))
    if options.get("weight") == "classes":
        options = options | {"weight": torch.rand(5) + 0.5}
    loss = F.cross_entropy(head(h), y, **options)
    expected = torch.autograd.grad(loss, list(head.parameters()))
    targets = CrossEntropyTargets(
        y, options.get("weight"), options.get("ignore_index", -100), "sum" if "reduction" in options else "mean"
    )
    weight_gradient, bias_gradient = cross_entropy_layer_gradient(
        h, head.weight.detach(), None if head.bias is None else head.bias.detach(), targets
    )
    torch.testing.assert_close(weight_gradient, expected[0])
    if bias:
        torch.testing.assert_close(bias_gradient, expected[1])
    else:
        assert bias_gradient is None


def test_the_gradient_is_the_same_computed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    h, w, b, y = torch.randn(50, 8), torch.randn(6, 8), torch.randn(6), torch.randint(0, 6, (50,))
    targets = CrossEntropyTargets(y, None, -100, "mean")
    whole = cross_entropy_layer_gradient(h, w, b, targets)
    monkeypatch.setattr("lightning_nobp.perturb.logit_layers.GRADIENT_CHUNK_ELEMENTS", 6 * 7)  # 7 rows at a time
    chunked = cross_entropy_layer_gradient(h, w, b, targets)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_the_recorder_keeps_the_targets_of_one_cross_entropy_only() -> None:
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    recorder = RowLossRecorder()
    with recorder:
        F.cross_entropy(logits, y, ignore_index=3)
    assert recorder.targets is not None and recorder.targets.ignore_index == 3
    assert torch.equal(recorder.targets.target, y)
    for call in (
        lambda: F.cross_entropy(logits, y, label_smoothing=0.1),  # no rows either
        lambda: F.nll_loss(logits.log_softmax(-1), y),  # rows, but the logits are not its input
        lambda: F.cross_entropy(logits.t().unsqueeze(0), y.unsqueeze(0)),  # classes along dimension 1 of 3
    ):
        recorder.reset()
        with recorder:
            call()
        assert recorder.targets is None


class Head(nn.Module):
    """A two-layer classifier whose logits reach the loss through ``transform``."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.hidden = nn.Linear(10, 16)
        self.head = nn.Linear(16, 4)
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(torch.relu(self.hidden(x))))


@pytest.mark.parametrize(
    ("transform", "loss_options", "found"),
    [
        (lambda z: z, {}, True),
        (lambda z: z.to(torch.bfloat16).float().reshape(-1, 4), {}, True),  # a cast and a reshape change nothing
        (lambda z: z / 2.0, {}, False),  # a temperature
        (lambda z: 5.0 * torch.tanh(z / 5.0), {}, False),  # a soft cap
        (lambda z: z, {"label_smoothing": 0.1}, False),
    ],
    ids=["plain", "cast_and_reshape", "temperature", "soft_cap", "label_smoothing"],
)
def test_only_a_layer_whose_output_is_the_logits_qualifies(transform, loss_options: dict, found: bool) -> None:
    torch.manual_seed(0)
    net = Head(transform)
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    layers = [RowLocalLayer(net.hidden, 0, 1), RowLocalLayer(net.head, 2, 3)]
    qualified = find_logit_layers(layers, lambda: F.cross_entropy(net(x), y, **loss_options), lambda: None)
    assert [layer.module for layer in qualified] == ([net.head] if found else [])


def _head_gradient_cosine(algorithm: EggRoll | OpenES, exact: bool, batched: bool, seed: int) -> tuple[float, float]:
    """Cosine of the head's estimate with its true gradient, and the estimate's norm."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 12))  # 12 outputs, 4 antithetic pairs
    x, y = torch.randn(64, 20), torch.randint(0, 12, (64,))
    true_head = torch.autograd.grad(F.cross_entropy(net(x), y), net[2].weight)[0]
    estimator = PopulationEstimator(
        algorithm,
        [net],
        list(net.parameters()),
        options=EstimatorOptions(rows=RowEstimateOptions(enabled=True, max_outputs=12, exact_head=exact)),
    )
    population = algorithm.ask(seed)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    estimator.probe_parameter_reads(population, loss)
    fitness = estimator.evaluate_members(population, loss, batched=batched)
    coefficients = algorithm.tell(population, fitness).coefficients
    estimator.accumulate_gradient(population, coefficients)
    assert estimator.rows.logit_layers == ({2} if exact else None)  # the head's weight
    head = net[2].weight.grad
    merged = merged_weights([(population, coefficients)])
    replaced = algorithm.combine(merged, 2, net[2].weight)  # the evolution-strategies estimate the head's replaces
    assert float(head.norm()) == pytest.approx(float(replaced.norm()), rel=1e-4)
    return float(F.cosine_similarity(head.flatten(), true_head.flatten(), dim=0)), float(head.norm())


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_member_at_a_time"])
@pytest.mark.parametrize("algorithm", [EggRoll, OpenES])
def test_the_head_takes_its_exact_gradient_at_the_estimates_scale(algorithm: type, batched: bool) -> None:
    for seed in range(3):
        cosine, norm = _head_gradient_cosine(
            algorithm(population=8, sigma=1e-2, extras=EstimatorExtras(exact_head_gradient=True)), True, batched, seed
        )
        per_row, per_row_norm = _head_gradient_cosine(algorithm(population=8, sigma=1e-2), False, batched, seed)
        assert cosine > 0.999  # the gradient at the stored weights (the inputs come from a perturbed forward)
        assert per_row < 0.9  # 4 pairs see a 4-dimensional projection of each row's 12-dimensional gradient
        assert norm == pytest.approx(per_row_norm, rel=0.5)  # the same scale (the members' losses differ a little)


def _member_losses(algorithm: EggRoll | OpenES, train_head: bool, exact: bool, batched: bool) -> torch.Tensor:
    """The members' losses of a 2-layer classifier whose head comes last in the trained parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 12))
    x, y = torch.randn(64, 20), torch.randint(0, 12, (64,))
    params = list(net.parameters()) if train_head else list(net[0].parameters())
    estimator = PopulationEstimator(
        algorithm,
        [net],
        params,
        options=EstimatorOptions(rows=RowEstimateOptions(enabled=True, max_outputs=32, exact_head=exact)),
    )
    population = algorithm.ask(0)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    estimator.probe_parameter_reads(population, loss)
    fitness = estimator.evaluate_members(population, loss, batched=batched)
    assert estimator.unperturbed_indices() == ({2, 3} if exact and train_head else set())
    return fitness


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_member_at_a_time"])
@pytest.mark.parametrize("algorithm", [EggRoll, OpenES])
def test_members_do_not_perturb_a_head_that_takes_its_exact_gradient(algorithm: type, batched: bool) -> None:
    frozen_head = _member_losses(algorithm(population=8, sigma=0.1), False, False, batched)
    exact = _member_losses(
        algorithm(population=8, sigma=0.1, extras=EstimatorExtras(exact_head_gradient=True)), True, True, batched
    )
    per_row = _member_losses(algorithm(population=8, sigma=0.1), True, False, batched)
    torch.testing.assert_close(exact, frozen_head)  # the head's weight and bias are left as they are stored
    assert not torch.allclose(per_row, frozen_head, rtol=1e-3)  # an estimated head is perturbed


@pytest.mark.parametrize("lost", ["record", "targets"])
def test_an_unperturbed_head_is_left_alone_when_the_step_has_no_exact_gradient(lost: str) -> None:
    torch.manual_seed(0)
    algorithm = EggRoll(population=8, sigma=0.1, extras=EstimatorExtras(exact_head_gradient=True))
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 12))
    x, y = torch.randn(64, 20), torch.randint(0, 12, (64,))
    estimator = PopulationEstimator(
        algorithm,
        [net],
        list(net.parameters()),
        options=EstimatorOptions(rows=RowEstimateOptions(enabled=True, max_outputs=32, exact_head=True)),
    )
    population = algorithm.ask(0)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    estimator.probe_parameter_reads(population, loss)
    coefficients = algorithm.tell(population, estimator.evaluate_members(population, loss)).coefficients
    if lost == "record":  # as if the step's per-row record were lost (another population's update)
        estimator.rows._record = None
    else:  # the loss's cross-entropy targets were not recorded
        assert estimator.rows._record is not None
        estimator.rows._record = (*estimator.rows._record[:3], None)
    estimator.accumulate_gradient(population, coefficients)
    assert net[2].weight.grad is None and net[2].bias.grad is None  # its evolution-strategies estimate is noise
    assert net[0].weight.grad is not None


def test_exact_head_gradient_needs_per_row_estimates() -> None:
    with pytest.raises(ValueError, match="per_row_estimates=True or exact_head_gradient=False"):
        EstimatorExtras(per_row_estimates=False, exact_head_gradient=True)
    assert "exact_head_gradient=True" in repr(EggRoll(extras=EstimatorExtras(exact_head_gradient=True)))


class TemperatureDigits(DigitsClassifier):
    """The digits model with its logits divided by a temperature before the loss."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x) / 2.0, y)
        self.log("train_loss", loss)
        return loss


def _fit(model: pl.LightningModule, algorithm: EggRoll, **precision) -> NoBackpropStrategy:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders(batch_size=128)
    strategy = NoBackpropStrategy(algorithm=algorithm, **({"direct_step": "normalized"} if precision else {}))
    trainer = pl.Trainer(strategy=strategy, **precision, **quiet_trainer_kwargs(max_steps=3))
    trainer.fit(model, train)
    return strategy


def test_the_trainer_gives_the_head_its_exact_gradient(no_backprop: None) -> None:
    model = DigitsClassifier()
    strategy = _fit(model, EggRoll(population=32, extras=EstimatorExtras(exact_head_gradient=True)))
    (estimator,) = strategy.engine._estimators.values()
    head_index = next(i for i, p in enumerate(estimator.params) if p is model.net[2].weight)
    assert estimator.rows.logit_layers == {head_index}
    with pytest.warns(UserWarning, match="no layer's output is the logits"):
        strategy = _fit(TemperatureDigits(), EggRoll(population=32, extras=EstimatorExtras(exact_head_gradient=True)))
    (estimator,) = strategy.engine._estimators.values()
    assert estimator.rows.logit_layers == set()  # searched once, none: the head keeps its per-row estimate


def test_a_low_bit_head_takes_its_exact_gradient(no_backprop: None) -> None:
    from lightning_nobp import LowBitPrecision

    model = DigitsClassifier(lr=3e-3, momentum=0.0)
    head_before = model.net[2].weight.detach().clone()
    strategy = _fit(
        model,
        EggRoll(population=32, extras=EstimatorExtras(exact_head_gradient=True)),
        plugins=[LowBitPrecision("fp8_e4m3")],
    )
    (estimator,) = strategy.engine._estimators.values()
    assert len(estimator.rows.logit_layers) == 1
    head = model.net[2].weight.dequantize().float()
    assert bool(torch.isfinite(head).all()) and not torch.equal(head, head_before)
