"""ForwardGradient: exact directional derivatives by JVP, an unbiased estimate, digits through Trainer and Fabric."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_nobp import ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import ForwardGradient
from lightning_nobp.data import load_digits_split
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.jvp import directional_derivatives

from conftest import BackpropCalled, quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.fixture
def one_thread():
    """One torch thread: faster for these small models, and steady when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ban_backprop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``no_backprop`` fixture, applied mid-test (after the reference gradient was computed by autograd)."""

    def banned(*args: Any, **kwargs: Any) -> None:
        raise BackpropCalled("backpropagation was called")

    monkeypatch.setattr(torch.Tensor, "backward", banned)
    monkeypatch.setattr(torch.autograd, "backward", banned)
    monkeypatch.setattr(torch.autograd, "grad", banned)


def small_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, torch.randn(64, 8), torch.randint(0, 3, (64,))


def true_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def test_ask_and_tell() -> None:
    algorithm = ForwardGradient(directions=3)
    population = algorithm.ask(5)
    assert len(population) == 3 and population.sigma == 1.0
    assert all(m.sign == 1.0 for m in population.members)
    assert len({m.noise_seed for m in population.members}) == 3
    assert algorithm.ask(5) == population and algorithm.ask(6) != population
    assert algorithm.uses_jvp and algorithm.forwards_per_step == 3
    estimate = algorithm.tell(population, torch.tensor([3.0, -6.0, 0.0]))
    assert torch.allclose(estimate.coefficients, torch.tensor([1.0, -2.0, 0.0]))
    assert algorithm.tell(population, torch.tensor([1.0, float("nan"), 0.0])).skipped


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"directions": 0}, "directions must be an integer"),
        ({"mode": "activity"}, "only mode='weight'"),
        ({"distribution": "uniform"}, "choose one of"),
        ({"direction_chunk": 0}, "positive integer"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ForwardGradient(**kwargs)


@pytest.mark.parametrize("batched", [True, False])
def test_directional_derivatives_equal_autograd_along_each_direction(
    batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = small_problem()
    gradient = true_gradient(model, x, y)
    loss_at_theta = F.cross_entropy(model(x), y).item()
    ban_backprop(monkeypatch)
    algorithm = ForwardGradient(directions=4)
    params = list(model.parameters())
    stored = [p.detach().clone() for p in params]
    estimator = PopulationEstimator(algorithm, [model], params)
    population = algorithm.ask(1)
    derivatives, losses = directional_derivatives(
        estimator, population, lambda: F.cross_entropy(model(x), y), batched=batched
    )
    for member, derivative, loss in zip(population.members, derivatives, losses):
        expected = sum(
            float((g * algorithm.noise(member.noise_seed, i, p)).sum())
            for i, (g, p) in enumerate(zip(gradient, params))
        )
        assert float(derivative) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert float(loss) == pytest.approx(loss_at_theta, rel=1e-6)
    assert estimator.batching is (True if batched else None)
    assert all(torch.equal(p, s) for p, s in zip(params, stored))  # the weights were never written


def test_estimate_is_unbiased_many_directions_match_the_true_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = small_problem()
    gradient = torch.cat([g.flatten() for g in true_gradient(model, x, y)])
    ban_backprop(monkeypatch)
    directions = 6000  # 195 parameters: the mean of N estimates has cosine about 1/sqrt(1 + d/N) ~ 0.98
    algorithm = ForwardGradient(directions=directions, direction_chunk=1000)
    params = list(model.parameters())
    estimator = PopulationEstimator(algorithm, [model], params)
    population = algorithm.ask(3)
    derivatives, _ = directional_derivatives(estimator, population, lambda: F.cross_entropy(model(x), y))
    estimate = algorithm.tell(population, derivatives)
    estimator.accumulate_gradient(population, estimate.coefficients)  # the strategies' .grad path
    estimated = torch.cat([p.grad.flatten() for p in params])
    cosine = float(F.cosine_similarity(estimated, gradient, dim=0))
    single = torch.cat(
        [algorithm.noise(population.members[0].noise_seed, i, p).flatten() for i, p in enumerate(params)]
    )
    single_cosine = float(F.cosine_similarity(single * derivatives[0], gradient, dim=0))
    print(f"cosine to the true gradient: {directions} directions {cosine:.3f}, one direction {single_cosine:.3f}")
    assert cosine >= 0.95
    assert float(estimated.norm() / gradient.norm()) == pytest.approx(1.0, abs=0.25)  # unbiased in scale too
    assert abs(single_cosine) < 0.5  # one direction alone is far from the gradient: the average does the work


class UsesItem(DigitsClassifier):
    """A training_step that vmap cannot batch (``.item()``), so directions fall back to one at a time."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if loss.item() > 1e6:
            raise RuntimeError("diverged")
        return loss


def test_trainer_falls_back_to_one_direction_at_a_time(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = UsesItem(lr=5e-3)
    strategy = NoBackpropStrategy(algorithm=ForwardGradient(directions=2))
    trainer = pl.Trainer(strategy=strategy, max_steps=3, **quiet_trainer_kwargs())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="one at a time"):
        trainer.fit(model, train)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


class NoMomentum(DigitsClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_direct_update_equals_the_grad_path(no_backprop: None) -> None:
    """Same seeds, same data: update='direct' reaches the weights SGD reaches through ``.grad``."""
    weights = []
    for update in ("grad", "direct"):
        pl.seed_everything(0)
        train, _ = digits_loaders(shuffle=False)
        model = NoMomentum(lr=5e-3)
        strategy = NoBackpropStrategy(algorithm=ForwardGradient(directions=4), update=update)
        pl.Trainer(strategy=strategy, max_steps=5, **quiet_trainer_kwargs()).fit(model, train)
        weights.append([p.detach().clone() for p in model.parameters()])
        if update == "direct":
            assert all(p.grad is None for p in model.parameters())
    for grad_path, direct in zip(*weights):
        assert torch.allclose(grad_path, direct, atol=1e-6)


def test_each_direction_on_its_own_slice_of_the_batch(no_backprop: None) -> None:
    """member_data='pair_slices' gives every direction its own slice (the vmapped JVP takes per-member inputs)."""
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = NoMomentum(lr=5e-3)
    strategy = NoBackpropStrategy(
        algorithm=ForwardGradient(directions=4), execution=ExecutionOptions(member_data="pair_slices")
    )
    trainer = pl.Trainer(strategy=strategy, max_steps=3, **quiet_trainer_kwargs())
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, train)
    assert strategy.engine.estimator(trainer.optimizers[0], [model]).batching is True
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_alias_selects_forward_gradient() -> None:
    assert "nobp_fgrad" in StrategyRegistry and "nobp_fgrad" in STRATEGY_REGISTRY
    trainer = pl.Trainer(strategy="nobp_fgrad", **quiet_trainer_kwargs(max_steps=1))
    assert isinstance(trainer.strategy, NoBackpropStrategy)
    assert isinstance(trainer.strategy.algorithm, ForwardGradient)


def test_fabric_loop_learns_digits_with_forward_gradients(no_backprop: None) -> None:
    L.seed_everything(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=FabricNoBackpropStrategy(ForwardGradient(directions=8)))
    fabric.launch()
    train, test = load_digits_split()
    (x_train, y_train), (x_test, y_test) = train.tensors, test.tensors
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9))
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        for batch in torch.randperm(len(y_train), generator=generator).split(128):
            x, y = x_train[batch], y_train[batch]

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                return loss

            optimizer.step(closure)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    print(f"fabric digits ForwardGradient: {accuracy:.3f} after {fabric.strategy.steps} steps")
    assert accuracy >= 0.8
    assert fabric.strategy.last_metrics["directional_derivative"] > 0


@pytest.mark.slow
def test_forward_gradient_reaches_95_percent_on_digits_within_three_minutes(
    no_backprop: None, one_thread: None
) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = DigitsClassifier(lr=1e-2, momentum=0.9, step_size=20)  # the user's SGD and StepLR, their own knobs
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=ForwardGradient(directions=16)),
        max_epochs=80,
        max_time={"minutes": 3},
        log_every_n_steps=10,
        **quiet_trainer_kwargs(),
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    logged = dict(trainer.logged_metrics)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(f"digits ForwardGradient: test accuracy {accuracy:.3f} after {trainer.global_step} steps in {seconds:.1f} s")
    assert seconds < 185 and accuracy >= 0.95
    assert float(logged["nobp/forwards_per_step"]) == 17  # 16 JVPs + the official pass
