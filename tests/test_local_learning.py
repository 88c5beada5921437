"""Local learning (Forward-Forward, Mono-Forward): hand-derived local rules, locality, digits and Fashion-MNIST."""

from __future__ import annotations

import time

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import ForwardForward, MonoForward, quietest_features
from lightning_nobp.algorithms.local import readout_update
from lightning_nobp.data import load_digits_split
from lightning_nobp.data.digits import batched_loader
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.perturb.local import LocalLearner

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.fixture
def one_thread():
    """One torch thread: faster for these small models, and steady when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_and_data(out: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(out, 5) * 0.8
    bias = torch.randn(out) * 0.1
    return weight, bias, torch.rand(16, 5), torch.randint(0, 3, (16,))


def autograd_gradients(loss_of, weight: torch.Tensor, bias: torch.Tensor, *extra: torch.Tensor):
    leaves = [t.clone().requires_grad_(True) for t in (weight, bias, *extra)]
    loss = loss_of(*leaves)
    return [g for g in torch.autograd.grad(loss, leaves)], float(loss)


@pytest.mark.parametrize("position", [0, 1])
def test_forward_forward_rule_is_the_gradient_of_its_local_loss(position: int) -> None:
    weight, bias, positive, _ = layer_and_data()
    negative = torch.rand(16, 5)
    rule = ForwardForward(threshold=0.5)

    def local_loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def goodness(x: torch.Tensor) -> torch.Tensor:
            x = x if position == 0 else x / (x.norm(dim=1, keepdim=True) + 1e-8)
            return F.linear(x, w, b).relu().square().mean(1)

        both = torch.cat([F.softplus(0.5 - goodness(positive)), F.softplus(goodness(negative) - 0.5)])
        return both.mean()

    (grad_w, grad_b), loss = autograd_gradients(local_loss, weight, bias)
    update = rule.hidden_update(position, weight, bias, {"positive": positive, "negative": negative}, torch.zeros(16))
    assert torch.allclose(update.weight, grad_w, atol=1e-6) and torch.allclose(update.bias, grad_b, atol=1e-6)
    assert update.loss == pytest.approx(loss, rel=1e-5)


def test_mono_forward_rule_is_the_gradient_of_its_local_cross_entropy() -> None:
    weight, bias, x, labels = layer_and_data()
    rule = MonoForward(projection_lr=1e-3)
    rule.classes = 3
    projection = rule.projection(0, 6, x.device).clone()

    def local_loss(w: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, w, b).relu() @ m.t(), labels)

    (grad_w, grad_b, grad_m), loss = autograd_gradients(local_loss, weight, bias, projection)
    update = rule.hidden_update(0, weight, bias, {"data": x}, labels)
    assert torch.allclose(update.weight, grad_w, atol=1e-6) and torch.allclose(update.bias, grad_b, atol=1e-6)
    assert update.loss == pytest.approx(loss, rel=1e-5)
    # the projection took one Adam step against its own gradient: its first move is -lr * sign(grad)
    moved = rule.projections[0] - projection
    assert torch.allclose(moved, -1e-3 * grad_m.sign(), atol=1e-6)


def test_readout_rule_is_the_gradient_of_cross_entropy() -> None:
    weight, bias, x, labels = layer_and_data(out=3)
    (grad_w, grad_b), loss = autograd_gradients(lambda w, b: F.cross_entropy(F.linear(x, w, b), labels), weight, bias)
    update = readout_update(weight, bias, x, labels)
    assert torch.allclose(update.weight, grad_w, atol=1e-6) and torch.allclose(update.bias, grad_b, atol=1e-6)
    assert update.loss == pytest.approx(loss, rel=1e-5)


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("make_rule", [ForwardForward, MonoForward], ids=["ff", "mono"])
def test_no_error_signal_crosses_layers(make_rule, no_backprop: None) -> None:
    """A layer's update is the same whatever the layers after it are: nothing flows back from them."""
    train, _ = load_digits_split()
    batch = tuple(t[:64] for t in train.tensors)
    model = ThreeLayers()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        learner = LocalLearner(make_rule(), model, list(model.parameters()))  # fresh rule: same projections
        learner.step(batch, lambda b: model(b[0]), step_seed=7)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    before = gradients()
    assert learner_order(model) == ["body.0", "body.2", "head"]
    with torch.no_grad():
        model.body[2].weight.mul_(-3.0)  # change everything downstream of the first layer
        model.head.weight.normal_()
    after = gradients()
    assert torch.equal(before["body.0.weight"], after["body.0.weight"])
    assert torch.equal(before["body.0.bias"], after["body.0.bias"])
    assert not torch.equal(before["body.2.weight"], after["body.2.weight"])  # its own weights changed


def learner_order(model: nn.Module) -> list[str]:
    learner = LocalLearner(ForwardForward(), model, list(model.parameters()))
    learner.step((torch.rand(4, 64), torch.randint(0, 10, (4,))), lambda b: model(b[0]), step_seed=0)
    model.zero_grad(set_to_none=True)
    return learner.order


def test_models_and_batches_it_cannot_handle_get_clear_errors() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="found none"):
        LocalLearner(ForwardForward(), conv, list(conv.parameters()))
    mixed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 10))
    with pytest.raises(ValueError, match=r"also holds \['0.weight', '0.bias'\]"):
        LocalLearner(ForwardForward(), mixed, list(mixed.parameters()))
    model = ThreeLayers()
    with pytest.raises(ValueError, match="no submodule named"):
        LocalLearner(ForwardForward(layers=["body.9"]), model, [])
    with pytest.raises(ValueError, match="not nn.Linear"):
        LocalLearner(ForwardForward(layers=["body.1"]), model, [])
    learner = LocalLearner(ForwardForward(), model, list(model.parameters()))
    with pytest.raises(TypeError, match=r"\(inputs, labels, \.\.\.\)"):
        learner.step({"x": torch.rand(4, 64)}, lambda b: model(b["x"]), 0)
    with pytest.raises(TypeError, match="labels of shape"):
        learner.step((torch.rand(4, 64), torch.rand(4, 10)), lambda b: model(b[0]), 0)
    with pytest.raises(ValueError, match="update='grad'"):
        NoBackpropStrategy(algorithm=ForwardForward(), update="direct")
    with pytest.raises(ValueError, match="Trainer"):
        FabricNoBackpropStrategy(algorithm=MonoForward())


def test_alias_selects_forward_forward() -> None:
    assert "nobp_ff" in StrategyRegistry and "nobp_ff" in STRATEGY_REGISTRY
    trainer = pl.Trainer(strategy="nobp_ff", **quiet_trainer_kwargs(max_steps=1))
    assert isinstance(trainer.strategy.algorithm, ForwardForward)


class AdamDigits(DigitsClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit(model: pl.LightningModule, rule, train, epochs: int, minutes: float = 3) -> tuple[pl.Trainer, float]:
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=rule),
        max_epochs=epochs,
        max_time={"seconds": int(minutes * 60)},
        log_every_n_steps=5,
        **quiet_trainer_kwargs(),
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    return trainer, time.perf_counter() - start


@pytest.mark.slow
def test_forward_forward_reaches_93_percent_on_digits(no_backprop: None, one_thread: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = AdamDigits(lr=3e-3)  # at 1e-2 the read-out peaks near 98 % after ~1000 steps, then degrades
    x_train = load_digits_split()[0].tensors[0]
    rule = ForwardForward(label_features=quietest_features(x_train, 10))  # digits' own always-blank pixels
    trainer, seconds = fit(model, rule, train, epochs=150)
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    x_test, y_test = load_digits_split()[1].tensors
    learner = trainer.strategy.engine.learner(trainer.optimizers[0], model)
    by_goodness = float((learner.goodness_predictions(x_test, lambda b: model(b[0])) == y_test).float().mean())
    wrong = (y_test + 1) % 10
    layer = model.net[0]
    separation = rule.separation(
        layer.weight,
        layer.bias,
        rule.variants(x_test, y_test, 10, 0)["positive"],
        rule.variants(x_test, wrong, 10, 0)["positive"],
    )
    print(
        f"digits Forward-Forward: test accuracy {accuracy:.3f} (read-out), {by_goodness:.3f} (goodness over labels),"
        f" positive > negative goodness {separation:.3f}, {trainer.global_step} steps in {seconds:.1f} s"
    )
    assert accuracy >= 0.93
    assert separation >= 0.9 and by_goodness >= 0.5  # the hidden layer itself learned FF's objective
    assert {"nobp/local_loss/net.0", "nobp/local_loss/net.2"} <= set(logged)


@pytest.mark.slow
def test_mono_forward_learns_digits(no_backprop: None, one_thread: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = AdamDigits(lr=1e-2)
    trainer, seconds = fit(model, MonoForward(), train, epochs=60)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(f"digits Mono-Forward: test accuracy {accuracy:.3f}, {trainer.global_step} steps in {seconds:.1f} s")
    assert accuracy >= 0.93


class FashionMLP(pl.LightningModule):
    """An ordinary 784-256-10 classifier with Adam."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule, lr", [(ForwardForward(), 3e-3), (MonoForward(), 1e-3)], ids=["ForwardForward", "MonoForward"]
)
def test_fashion_mnist_accuracy_is_reported(rule, lr: float, no_backprop: None, one_thread: None) -> None:
    from lightning_nobp.data.fashion_mnist import fashion_mnist_available, load_fashion_mnist

    if not fashion_mnist_available():
        pytest.skip("dataset-fashion-mnist is not installed")
    L.seed_everything(0)
    train = batched_loader(load_fashion_mnist("train"), 256, shuffle=True)
    test = batched_loader(load_fashion_mnist("test"), 2048, shuffle=False)
    model = FashionMLP(lr=lr)
    trainer, seconds = fit(model, rule, train, epochs=3, minutes=2)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(
        f"Fashion-MNIST {type(rule).__name__}: test accuracy {accuracy:.3f} after {trainer.global_step} steps"
        f" in {seconds:.1f} s"
    )
    assert accuracy >= 0.75


def test_local_learning_benchmark_smoke(tmp_path) -> None:
    """The equal-wall-clock benchmark runs every method and writes its JSON and PNG (smoke: 1 s per method)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("matplotlib", reason="the benchmark's plot needs the `bench` extra")
    root = Path(__file__).resolve().parents[1]
    out, png = tmp_path / "local.json", tmp_path / "local.png"
    result = subprocess.run(
        [sys.executable, "benchmarks/comparisons/local_learning.py", "--smoke", "--out", str(out), "--plot", str(png)],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    expected = {"backprop", "mezo", "eggroll", "forward_gradient", "forward_forward", "mono_forward"}
    assert set(report["methods"]) == expected
    for method in report["methods"].values():
        assert method["steps"] > 0 and 0.0 <= method["test_accuracy"] <= 1.0
        assert method["training_seconds"] >= 1.0 and method["curve"] and method["memory_bytes"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
