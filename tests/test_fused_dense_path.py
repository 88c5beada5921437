"""Dense float weights on the fused kernels' route (what CUDA parameters take): members perturbed one layer at a
time from Philox streams, updates in one pass per weight, peak memory at inference's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.kernels.dense_update import dense_update_
from lightning_nobp.kernels.lowbit_update import UpdateTerms
from lightning_nobp.kernels.philox import philox_noise
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.direct_step import DirectHyperparameters
from lightning_nobp.perturb.estimator import EstimatorOptions

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"


def mlp(dtype: torch.dtype = torch.float32, bias: bool = True) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16, bias=bias), nn.Tanh(), nn.Linear(16, 3, bias=bias)).to(dtype)
    x, y = torch.randn(8, 12, dtype=dtype), torch.randint(0, 3, (8,))
    return model, lambda: F.cross_entropy(model(x).float(), y)


def fused(algorithm, model: nn.Module) -> PopulationEstimator:
    options = EstimatorOptions.of(algorithm, fused=True)
    return PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)


def stream_noise(algorithm, seed: int, index: int, param: torch.Tensor) -> torch.Tensor:
    stream_seed, distribution = algorithm.noise_stream(seed, index, param)
    return philox_noise(stream_seed, param.shape, distribution, param.device)


@pytest.mark.parametrize(
    "algorithm",
    [
        MeZO(eps=1e-2, directions=2, input_subspace=None),
        OpenES(population=4, sigma=1e-2, extras=None),
    ],
    ids=["mezo", "openes"],
)
def test_members_take_their_streams_noise_one_layer_at_a_time(algorithm) -> None:
    model, loss = mlp()
    estimator = fused(algorithm, model)
    assert estimator.noise.streamed == {0, 1, 2, 3}
    assert estimator.noise.one_member_at_a_time()  # no whole-model stack of dense noise
    population = algorithm.ask(5)
    fitness = estimator.evaluate_members(population, loss)
    saved = [p.detach().clone() for p in model.parameters()]
    for k, member in enumerate(population.members):
        with torch.no_grad():
            for index, p in enumerate(model.parameters()):
                p.copy_(
                    saved[index] + population.sigma * member.sign * stream_noise(algorithm, member.noise_seed, index, p)
                )
            expected = loss()
            for p, value in zip(model.parameters(), saved):
                p.copy_(value)
        torch.testing.assert_close(fitness[k], expected, rtol=1e-5, atol=1e-6)


def test_fused_update_writes_the_streams_estimate() -> None:
    algorithm = MeZO(eps=1e-2, directions=2, input_subspace=None)
    model, loss = mlp()
    estimator = fused(algorithm, model)
    population = algorithm.ask(1)
    estimate = algorithm.tell(population, estimator.evaluate_members(population, loss))
    before = [p.detach().clone() for p in model.parameters()]
    lr = 0.1
    norm = estimator.apply_update([(population, estimate.coefficients)], [DirectHyperparameters(lr)] * 4, 3)
    assert torch.isfinite(torch.as_tensor(norm))
    for index, (p, old) in enumerate(zip(model.parameters(), before)):
        step = sum(
            c * member.sign * stream_noise(algorithm, member.noise_seed, index, p)
            for c, member in zip(estimate.coefficients.tolist(), population.members)
        )
        torch.testing.assert_close(p.detach(), old - lr * step, rtol=1e-5, atol=1e-6)


def test_fused_low_rank_update_equals_the_dense_one() -> None:
    """EggRoll's factors go into the kernel: the same update as forming A B^T densely (float32; no biases, whose
    noise would come from different sources on the two routes)."""
    algorithm = EggRoll(population=8, rank=2, sigma=1e-2, extras=None)
    results = []
    for use_kernels in (False, True):
        model, loss = mlp(bias=False)
        options = EstimatorOptions.of(algorithm, fused=use_kernels)
        estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)
        population = algorithm.ask(2)
        estimate = algorithm.tell(population, estimator.evaluate_members(population, loss))
        settings = [DirectHyperparameters(0.05, weight_decay=0.01)] * 2
        estimator.apply_update([(population, estimate.coefficients)], settings, 9, normalize=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for dense, kernel in zip(*results):
        torch.testing.assert_close(kernel, dense, rtol=1e-5, atol=1e-6)


def test_bf16_update_below_the_grid_step_is_kept_on_average() -> None:
    """Stochastic rounding inside the fused update: a step of a twentieth of bf16's grid step moves the weights
    by that step on average (rounding to nearest would leave them all where they are)."""
    weight = torch.full((256, 256), 0.25, dtype=torch.bfloat16)  # grid step 2^-9 at 0.25
    dense_update_(weight, UpdateTerms(dense=torch.full((256, 256), 1e-4)), rounding_seed=11)
    moved = weight.float() - 0.25
    assert set(moved.unique().tolist()) == {0.0, 2**-9}
    assert moved.mean().item() == pytest.approx(1e-4, rel=0.05)


def test_memory_benchmark_on_a_small_preset(tmp_path) -> None:
    """The full-scale measurement (FakeTensorMode on a fake CUDA device) on the small GPT: MeZO at inference's
    peak, an EggRoll chunk within 10 % of inference on the same tokens."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import memory
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "memory.json"
    report = memory.main(
        ["--preset", "small", "--seq-len", "128", "--chunk", "8", "--population", "8", "--out", str(out)]
    )
    assert out.exists() and report["weights_dtype"] == "bf16"
    assert report["peak_bytes"]["inference"] > 2 * report["parameters"]  # the bf16 weights, and activations
    assert report["mezo_peak_over_inference"] <= 1.05
    assert report["eggroll_peak_over_inference"] <= 1.10


def test_an_update_of_every_weight_is_one_launch_per_dtype() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    algorithm = EggRoll(population=8, rank=1, sigma=1e-2, extras=None)
    model, loss = mlp(torch.bfloat16)
    estimator = fused(algorithm, model)
    population = algorithm.ask(4)
    estimate = algorithm.tell_on_device(population, estimator.evaluate_members(population, loss))
    with Calls() as calls:
        estimator.apply_update_on_device(
            [(population, estimate.coefficients)], [DirectHyperparameters(1e-2)] * 4, 1, True, estimate.applies
        )
    assert calls.names.count("lightning_nobp.grouped_dense_update_.default") == 1  # 2 weights, 2 biases, one launch
    assert "lightning_nobp.dense_update_.default" not in calls.names


def test_fused_momentum_on_float32_weights_keeps_its_buffer() -> None:
    """SGD momentum on the fused route: two steps equal the unfused route's, and the stored buffer is the
    momentum of the estimates (not the step: a float32 weight's direction is its buffer itself)."""
    algorithm = EggRoll(population=8, rank=2, sigma=1e-2, extras=None)
    results, buffers = [], []
    for use_kernels in (False, True):
        model, loss = mlp(bias=False)
        options = EstimatorOptions.of(algorithm, fused=use_kernels)
        estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)
        states: list[dict] = [{}, {}]
        for step in range(2):
            population = algorithm.ask(step)
            estimate = algorithm.tell(population, estimator.evaluate_members(population, loss))
            settings = [DirectHyperparameters(0.05, momentum=0.9)] * 2
            estimator.apply_update([(population, estimate.coefficients)], settings, 9, states=states)
        results.append([p.detach().clone() for p in model.parameters()])
        buffers.append([state["momentum_buffer"].clone() for state in states])
    for dense, kernel in zip(results[0] + buffers[0], results[1] + buffers[1]):
        torch.testing.assert_close(kernel, dense, rtol=1e-5, atol=1e-6)
