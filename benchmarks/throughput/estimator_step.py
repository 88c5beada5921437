"""CPU time of one forward-only step on the Fashion-MNIST MLP (784-256-10), without Lightning around it.

One step is what the strategy does between ``training_step`` and the optimizer: evaluate the population
(``PopulationEstimator.evaluate_members``: batched with ``vmap`` for ES, one member at a time for MeZO), ``tell``,
and write the estimate into ``.grad``. The clock is this process's CPU time (``time.process_time``) with one torch
thread, so the figure holds on a machine shared with other jobs; compare two versions of the package by running
the script with each on ``PYTHONPATH``.

    python benchmarks/throughput/estimator_step.py --algorithm eggroll --population 64
    python benchmarks/throughput/estimator_step.py --algorithm mezo
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.perturb import PopulationEstimator


def measure(algorithm_name: str, population: int, chunk: int | None, steps: int, batch: int = 256) -> dict:
    """Milliseconds of CPU per step, averaged over ``steps`` steps after three warm-up steps.

    Args:
        algorithm_name: ``"eggroll"`` or ``"mezo"``.
        population: EggRoll's population (ignored by MeZO).
        chunk: EggRoll's ``population_chunk``.
        steps: timed steps.
        batch: samples per step (random inputs shaped like Fashion-MNIST).
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.rand(batch, 784), torch.randint(0, 10, (batch,))
    algorithm = (
        EggRoll(population=population, population_chunk=chunk) if algorithm_name == "eggroll" else MeZO(directions=1)
    )
    estimator = PopulationEstimator(algorithm, [net], list(net.parameters()))

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    estimator.probe_parameter_reads(algorithm.ask(0), loss)

    def step(seed: int) -> None:
        population_ = algorithm.ask(seed)
        fitness = estimator.evaluate_members(population_, loss)
        estimate = algorithm.tell(population_, fitness)
        estimator.accumulate_gradient(population_, estimate.coefficients)
        for param in net.parameters():
            param.grad = None

    for seed in range(3):
        step(seed)
    started = time.process_time()
    for seed in range(steps):
        step(100 + seed)
    seconds = (time.process_time() - started) / steps
    members = len(algorithm.ask(0))
    return {
        "algorithm": repr(algorithm),
        "cpu_ms_per_step": seconds * 1e3,
        "sample_forwards_per_cpu_second": members * batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=("eggroll", "mezo"), default="eggroll")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--keep-freed-cpu-memory", action="store_true", help="tune malloc as NoBackpropStrategy does on the CPU"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.keep_freed_cpu_memory:
        from lightning_nobp.cpu_allocator import keep_freed_cpu_memory

        if not keep_freed_cpu_memory():
            parser.error("--keep-freed-cpu-memory needs glibc")
    print(json.dumps(measure(args.algorithm, args.population, args.chunk, args.steps, args.batch)))


if __name__ == "__main__":
    main()
