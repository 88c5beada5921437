"""A Fabric loop trains after changing ``optimizer.step()`` to ``optimizer.step(closure)``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.strategies import STRATEGY_REGISTRY
from torch import nn

from lightning_nobp.algorithms import MeZO
from lightning_nobp.data import load_digits_split
from lightning_nobp.fabric import NoBackpropStrategy


def make_fabric(strategy: object = None) -> L.Fabric:
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy or NoBackpropStrategy(algorithm=MeZO()))
    fabric.launch()
    return fabric


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(features).argmax(-1) == labels).float().mean())


def test_a_fabric_loop_with_a_closure_trains_digits(no_backprop: None) -> None:
    L.seed_everything(0)
    fabric = make_fabric()
    train, test = load_digits_split()
    x_train, y_train = train.tensors
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=3e-4, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    x_test, y_test = test.tensors
    before = accuracy(model, x_test, y_test)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        for batch in torch.randperm(len(y_train), generator=generator).split(128):
            x, y = x_train[batch], y_train[batch]

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                return loss

            loss = optimizer.step(closure)
            assert torch.isfinite(loss)
    after = accuracy(model, x_test, y_test)
    print(f"fabric digits: {before:.3f} -> {after:.3f}")
    assert after >= 0.8
    assert fabric.strategy.steps == 250 * 12


def test_backward_without_a_closure_names_the_one_line_fix() -> None:
    fabric = make_fabric()
    model, optimizer = fabric.setup(nn.Linear(4, 2), torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1))
    loss = model(torch.randn(3, 4)).sum()
    with pytest.raises(RuntimeError, match=r"optimizer\.step\(closure\)") as error:
        fabric.backward(loss)
    assert "def closure():" in str(error.value)
    with pytest.raises(RuntimeError, match=r"optimizer\.step\(closure\)"):
        optimizer.step()


def test_nan_closure_loss_skips_the_step_with_weights_untouched() -> None:
    fabric = make_fabric()
    module = nn.Linear(4, 2)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    before = [p.detach().clone() for p in module.parameters()]

    def closure() -> torch.Tensor:
        loss = model(torch.randn(3, 4)).sum() * float("nan")
        fabric.backward(loss)
        return loss

    optimizer.step(closure)
    assert fabric.strategy.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), before))


def test_fabric_alias_is_registered() -> None:
    assert "nobp_mezo" in STRATEGY_REGISTRY
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy="nobp_mezo")
    assert isinstance(fabric.strategy, NoBackpropStrategy)
    assert isinstance(fabric.strategy.algorithm, MeZO)


def test_a_one_device_script_without_launch_trains_like_one_with_launch() -> None:
    """One-device Fabric scripts never call launch(): the strategy works as Fabric's single-device ones do."""
    results = []
    for launch in (False, True):
        torch.manual_seed(0)
        fabric = L.Fabric(accelerator="cpu", devices=1, strategy=NoBackpropStrategy(algorithm=MeZO(), seed=3))
        if launch:
            fabric.launch()
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-2))
        x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
        losses = []
        for _ in range(20):

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                return loss

            losses.append(float(optimizer.step(closure)))
        with fabric.no_backward_sync(model):  # accepted without launch(), as for single-device strategies
            pass
        results.append([p.detach().clone() for p in model.parameters()])
        assert losses[-1] < losses[0]
    for without, with_launch in zip(*results):
        assert torch.equal(without, with_launch)


def test_several_devices_still_need_launch() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=NoBackpropStrategy(algorithm=MeZO()))
    with pytest.raises(RuntimeError, match="launch"):
        fabric.setup(nn.Linear(2, 2))
