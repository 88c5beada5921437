"""The direct update path (no gradient buffers) and stochastic rounding of low-precision weights."""

from __future__ import annotations

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.kernels import stochastic_round

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype: torch.dtype) -> None:
    values = torch.full((100_000,), 0.1 + 3e-5) * torch.linspace(1, 3, 100_000)
    rounded = stochastic_round(values, dtype, seed=1).float()
    assert abs(rounded.mean() / values.mean() - 1) < 0.01
    grid = values.to(dtype).float()
    assert (rounded != grid).any()  # it does not simply round to nearest
    assert torch.equal(rounded, stochastic_round(values, dtype, seed=1).float())  # reproducible from the seed


def test_small_updates_accumulate_with_stochastic_rounding_and_vanish_with_nearest() -> None:
    weights_sr = torch.full((10_000,), 0.1, dtype=torch.bfloat16)
    weights_rn = weights_sr.clone()
    start = float(weights_sr[0])
    update, steps = 2e-5, 200  # 100x smaller than bf16's grid step at 0.1 (2^-11 ~ 4.9e-4 half-step)
    for step in range(steps):
        weights_sr = stochastic_round(weights_sr.float() + update, torch.bfloat16, seed=step)
        weights_rn = (weights_rn.float() + update).to(torch.bfloat16)
    expected = update * steps
    assert abs((float(weights_sr.float().mean()) - start) / expected - 1) < 0.05
    assert float(weights_rn.float().mean()) - start < 0.1 * expected  # round-to-nearest lost the updates


def test_overflow_is_clamped_never_inf() -> None:
    rounded = stochastic_round(torch.tensor([1e30, -1e30, 7e4]), torch.float16, seed=0)
    assert torch.isfinite(rounded).all() and rounded.abs().max() == torch.finfo(torch.float16).max


class PlainSGD(DigitsClassifier):
    def __init__(self, weight_decay: float = 0.0, gamma: float = 0.7, **sgd_options: float | bool) -> None:
        super().__init__(lr=3e-3)
        self.weight_decay = weight_decay
        self.gamma = gamma
        self.sgd_options = sgd_options

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=3e-3, weight_decay=self.weight_decay, **self.sgd_options)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class GradBuffers(Callback):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        self.seen.append(any(p.grad is not None for p in pl_module.parameters()))


def fit(
    update: str, weight_decay: float = 0.0, sgd_options: dict | None = None, **kwargs
) -> tuple[DigitsClassifier, GradBuffers]:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = PlainSGD(weight_decay, **(sgd_options or {}))
    buffers = GradBuffers()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(), update=update),
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[buffers],
        **quiet_trainer_kwargs(**kwargs),
    )
    trainer.fit(model, train)
    return model, buffers


def test_direct_path_equals_sgd_on_the_grad_path_and_keeps_no_gradient_buffers(no_backprop: None) -> None:
    grad_model, grad_buffers = fit("grad", weight_decay=0.01)
    direct_model, direct_buffers = fit("direct", weight_decay=0.01)
    assert all(grad_buffers.seen) and len(direct_buffers.seen) == len(grad_buffers.seen) == 18
    assert not any(direct_buffers.seen)  # no per-parameter buffers at any optimizer step
    for p, q in zip(grad_model.parameters(), direct_model.parameters()):
        # float32 rounding only: the paths sum the window's noise in different orders (a different basis or
        # update would differ by 1e-3)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    pl.seed_everything(0)
    initial = PlainSGD()
    assert not torch.equal(initial.net[0].weight, direct_model.net[0].weight)


@pytest.mark.parametrize(
    "sgd_options",
    [{"momentum": 0.9}, {"momentum": 0.8, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True}],
    ids=["momentum", "dampening", "nesterov"],
)
def test_direct_path_momentum_is_torch_sgds_momentum_without_gradient_buffers(no_backprop: None, sgd_options) -> None:
    grad_model, _ = fit("grad", sgd_options=sgd_options)
    direct_model, direct_buffers = fit("direct", sgd_options=sgd_options)
    plain_model, _ = fit("direct")
    assert not any(direct_buffers.seen)
    for p, q, plain in zip(grad_model.parameters(), direct_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # the buffer in optimizer.state, as SGD keeps it
        assert (q - plain).abs().max() > 1e-4  # momentum changed the path


def test_direct_momentum_keeps_its_buffer_out_of_non_finite_estimates() -> None:
    from lightning_nobp.perturb.direct_step import MOMENTUM_BUFFER, DirectHyperparameters, momentum_direction

    settings, state = DirectHyperparameters(lr=0.1, momentum=0.9), {}
    first = momentum_direction(torch.tensor([3.0, -4.0]), state, settings, normalize=True, buffer_dtype=torch.bfloat16)
    torch.testing.assert_close(first, torch.tensor([3.0, -4.0]) / 12.5**0.5)  # normalized: unit RMS
    kept = state[MOMENTUM_BUFFER].clone()
    assert kept.dtype == torch.bfloat16
    skipped = momentum_direction(torch.tensor([float("nan"), 1.0]), state, settings, True, torch.bfloat16)
    assert torch.equal(skipped, torch.zeros(2)) and torch.equal(state[MOMENTUM_BUFFER], kept)
    second = momentum_direction(torch.tensor([0.0, 5.0]), state, settings, True, torch.bfloat16)
    expected = 0.9 * kept.float() + torch.tensor([0.0, 5.0]) / 12.5**0.5  # b <- m b + e (e at unit RMS)
    torch.testing.assert_close(second, expected / expected.square().mean().sqrt(), rtol=1e-2, atol=1e-2)


def test_direct_path_trains_bf16_weights_with_stochastic_rounding(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = PlainSGD(gamma=1.0)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=1e-2), update="direct"),
        precision="bf16-true",
        max_epochs=60,
        **quiet_trainer_kwargs(),
    )
    before = trainer.test(model, test, verbose=False)[0]["test_acc"]
    trainer.fit(model, train)
    after = trainer.test(model, test, verbose=False)[0]["test_acc"]
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    assert after > before + 0.25, (before, after)


class RMSpropClassifier(DigitsClassifier):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=1e-3)


class AMSGradClassifier(DigitsClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, amsgrad=True)


def test_direct_path_refuses_optimizers_it_cannot_honour_and_clipping() -> None:
    train, _ = digits_loaders()
    trainer = pl.Trainer(strategy=NoBackpropStrategy(update="direct"), max_steps=1, **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match=r"SGD.*Adam or AdamW.*RMSprop cannot be honoured.*update='grad'"):
        trainer.fit(RMSpropClassifier(), train)
    trainer = pl.Trainer(strategy=NoBackpropStrategy(update="direct"), max_steps=1, **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match=r"Adam with amsgrad=True cannot be honoured"):
        trainer.fit(AMSGradClassifier(), train)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(update="direct"), gradient_clip_val=1.0, max_steps=1, **quiet_trainer_kwargs()
    )
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.fit(PlainSGD(), train)
    with pytest.raises(ValueError, match="choose one of"):
        NoBackpropStrategy(update="inplace")  # type: ignore[arg-type]


def test_fabric_direct_path_updates_in_place_without_gradients() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=FabricNoBackpropStrategy(update="direct"))
    fabric.launch()
    module = nn.Linear(4, 2)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    before = [p.detach().clone() for p in module.parameters()]
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def closure() -> torch.Tensor:
        loss = F.mse_loss(model(x), y)
        fabric.backward(loss)
        return loss

    optimizer.step(closure)
    assert all(p.grad is None for p in module.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_direct_adam_step_is_torchs_adam_on_the_estimate(name: str) -> None:
    """Three steps of the direct path with Adam's or AdamW's settings move float32 weights as torch's optimizer does
    when fed the same estimate as its gradient, and keep the moments under its keys."""
    from lightning_nobp.algorithms import EggRoll
    from lightning_nobp.perturb import PopulationEstimator
    from lightning_nobp.perturb.direct_step import DirectHyperparameters

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizers = [getattr(torch.optim, name)(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    algorithm = EggRoll(population=8, rank=1, sigma=1e-2, extras=None)
    estimators = [PopulationEstimator(algorithm, [m], list(m.parameters())) for m in models]
    for step in range(3):
        population = algorithm.ask(step)
        fitness = estimators[0].evaluate(population, lambda: F.cross_entropy(models[0](x), y))
        coefficients = algorithm.tell(population, fitness).coefficients
        for p in models[0].parameters():
            p.grad = None
        estimators[0].accumulate_gradient(population, coefficients)  # reference: torch's own step on it
        optimizers[0].step()
        settings = [DirectHyperparameters.from_group(optimizers[1].param_groups[0])] * 4
        states = [optimizers[1].state[p] for p in models[1].parameters()]
        estimators[1].apply_update([(population, coefficients)], settings, step, states=states)
        for reference, direct in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(direct, reference, rtol=1e-5, atol=1e-6)
    state = optimizers[1].state[next(models[1].parameters())]
    assert set(state) == {"exp_avg", "exp_avg_sq", "step"} and int(state["step"]) == 3
