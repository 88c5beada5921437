"""A step on the fused kernels' route reads nothing back to the host: no ``.item()``, ``float(tensor)`` or
``bool(tensor)`` between the start of its evaluation and the end of its update."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_nobp import ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO, OpenES

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what ``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)`` dispatch to."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountingStrategy(NoBackpropStrategy):
    """Counts host reads over ``backward``: the members' evaluation, tell and the update."""

    reads: list[int]

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        with HostReads() as reads:
            result = super().backward(closure_loss, optimizer, *args, **kwargs)
        self.reads.append(reads.count)
        return result


class SGDDigits(DigitsClassifier):
    """Plain SGD without momentum (momentum buffers take the host path)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


PLAIN = dict(extras=None)  # the published method: no per-row estimates, no input subspace


@pytest.mark.parametrize(
    "algorithm",
    [
        EggRoll(population=8, rank=1, sigma=1e-2, **PLAIN),
        OpenES(population=6, sigma=1e-2, **PLAIN),
        MeZO(eps=1e-3, directions=2, input_subspace=None),
    ],
    ids=["eggroll", "openes", "mezo"],
)
@pytest.mark.parametrize("direct_step", ["sgd", "normalized"])
def test_no_host_reads_inside_a_step(algorithm, direct_step) -> None:
    torch.manual_seed(0)
    module = SGDDigits(lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    strategy = CountingStrategy(
        algorithm=algorithm, update="direct", direct_step=direct_step, execution=ExecutionOptions(fused_kernels=True)
    )
    strategy.reads = []
    train, _ = digits_loaders(batch_size=64, shuffle=False)
    trainer = pl.Trainer(strategy=strategy, max_steps=3, log_every_n_steps=1000, **quiet_trainer_kwargs())
    trainer.fit(module, train)
    assert strategy.reads == [0, 0, 0]
    estimator = next(iter(strategy.engine._estimators.values()))
    assert estimator.device_resident
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))  # every weight was updated
    assert int(strategy.skipped_steps) == 0


def test_a_step_with_a_non_finite_loss_is_skipped_on_the_device() -> None:
    """The gate stays on the device: the weights do not move (weight decay included), the skip is counted."""

    class NaNAtFirstStep(SGDDigits):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * torch.where(torch.tensor(self.trainer.global_step == 0), float("nan"), 1.0)

    torch.manual_seed(0)
    module = NaNAtFirstStep(lr=1e-3)
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8, rank=1, sigma=1e-2, **PLAIN),
        update="direct",
        execution=ExecutionOptions(fused_kernels=True),
    )
    train, _ = digits_loaders(batch_size=64, shuffle=False)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(strategy=strategy, max_steps=1, **quiet_trainer_kwargs())
    trainer.fit(module, train)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
    assert int(strategy.skipped_steps) == 1


@pytest.mark.parametrize("shaping", ["centered_rank", "zscore", "sign", None])
def test_tell_on_device_equals_tell(shaping) -> None:
    """The masked, branch-free tell gives tell's coefficients and statistics, and skips where tell skips."""
    algorithm = EggRoll(population=8, rank=1, sigma=0.1, fitness_shaping=shaping, **PLAIN)
    population = algorithm.ask(0)
    nan = float("nan")
    for fitness in (
        torch.randn(8, generator=torch.Generator().manual_seed(3)),
        torch.tensor([1.0, 2, nan, 3, 4, 5, 6, 7]),
        torch.ones(8),
        torch.tensor([nan] * 6 + [1.0, 2]),
    ):
        host, device = algorithm.tell(population, fitness), algorithm.tell_on_device(population, fitness)
        if host.coefficients is None:
            assert not bool(device.applies) and bool((device.coefficients == 0).all())
            continue
        assert bool(device.applies)
        torch.testing.assert_close(device.coefficients, host.coefficients, rtol=1e-6, atol=1e-7)  # a few ulps
        for name, value in host.stats.items():
            assert float(device.stats[name]) == pytest.approx(value, abs=1e-6), name


def test_mezo_tell_on_device_equals_tell() -> None:
    algorithm = MeZO(eps=1e-3, directions=2, input_subspace=None)
    population = algorithm.ask(0)
    finite = algorithm.tell_on_device(population, torch.tensor([1.0, 1.5, 2.0, 1.0]))
    assert torch.equal(finite.coefficients, algorithm.tell(population, torch.tensor([1.0, 1.5, 2.0, 1.0])).coefficients)
    broken = algorithm.tell_on_device(population, torch.tensor([1.0, float("inf"), 2.0, 1.0]))
    assert not bool(broken.applies) and bool((broken.coefficients == 0).all())


def test_sync_check_benchmark_on_the_tiny_gpt(tmp_path) -> None:
    """``benchmarks/micro/sync_check.py`` (what the GPU check runs under sync debug mode) on the CPU: no host reads."""
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro")
    sys.path.insert(0, benchmarks)
    try:
        import sync_check
    finally:
        sys.path.remove(benchmarks)
    report = sync_check.main(
        ["--device", "cpu", "--preset", "tiny", "--seq-len", "16", "--out", str(tmp_path / "s.json")]
    )
    for check in report["checks"].values():
        assert check["device_resident"] and check["host_reads"] == 0 and check["synchronisation_free"]
