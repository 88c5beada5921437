"""Whether a forward-only step reads anything back to the host, on the GPT presets.

One EggRoll step and one MeZO step (both as published, ``update="direct"``, the fused kernels' route every CUDA
run takes): the members' evaluation, ``tell_on_device`` and the on-device update, after one warm-up step. On CUDA
the step runs under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call; on the CPU
a dispatch mode counts ``aten._local_scalar_dense`` (what ``.item()``, ``float(t)`` and ``bool(t)`` dispatch to).
Writes JSON: per algorithm, ``host_reads`` (CPU) or ``error`` (CUDA; ``null`` when none) and ``synchronisation_free``.

    python benchmarks/micro/sync_check.py --device cuda --preset gpt-1b --out sync_check.json
    python benchmarks/micro/sync_check.py --device cpu --preset tiny
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.algorithms.base import Algorithm
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.direct_step import DirectHyperparameters
from lightning_nobp.perturb.estimator import EstimatorOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from reports import write_report  # noqa: E402


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """``set_sync_debug_mode("error")`` within the context."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def one_step(estimator: PopulationEstimator, algorithm: Algorithm, loss, seed: int) -> None:
    """Evaluation, ``tell_on_device`` and the on-device update of one step."""
    population = algorithm.ask(seed)
    with torch.no_grad():
        members = list(range(len(population.members)))
        estimator.prefetch_noise(population, members)
        fitness = estimator.evaluate_members(population, loss)
        estimate = algorithm.tell_on_device(population, fitness)
        settings = [DirectHyperparameters(1e-4)] * len(estimator.params)
        estimator.apply_update_on_device([(population, estimate.coefficients)], settings, seed, True, estimate.applies)


def check(model: GPT, algorithm: Algorithm, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """One warm step, then one watched step."""
    options = EstimatorOptions.of(algorithm, fused=True)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)

    def loss() -> torch.Tensor:
        return model.loss(inputs, targets)

    one_step(estimator, algorithm, loss, 0)
    result: dict = {"algorithm": repr(algorithm), "device_resident": estimator.device_resident}
    if inputs.device.type == "cuda":
        try:
            with cuda_sync_errors():
                one_step(estimator, algorithm, loss, 1)
            result["error"] = None
        except RuntimeError as error:
            result["error"] = str(error).splitlines()[0]
        result["synchronisation_free"] = result["error"] is None
    else:
        with HostReads() as reads:
            one_step(estimator, algorithm, loss, 1)
        result["host_reads"] = reads.count
        result["synchronisation_free"] = reads.count == 0
    estimator.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", help="GPT size (see GPTConfig.preset)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sync_check.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = GPTConfig.preset(args.preset)
    torch.manual_seed(0)
    with device:
        model = GPT(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    seq_len = min(args.seq_len, config.block_size)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, seq_len + 1), device=device)
    algorithms = {
        "eggroll": EggRoll(population=8, rank=1, sigma=1e-3, extras=None),
        "mezo": MeZO(directions=1, input_subspace=None),
    }
    report = {
        "torch": torch.__version__,
        "device": args.device,
        "preset": args.preset,
        "checks": {name: check(model, a, tokens[:, :-1], tokens[:, 1:]) for name, a in algorithms.items()},
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
