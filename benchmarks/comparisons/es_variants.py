"""Screen evolution-strategy update variants on Fashion-MNIST in plain PyTorch, before building one into the package.

A self-contained low-rank ES (rank 1, antithetic pairs, centered ranks, the user's Adam) on the peers' MLP
(784-256-10, batch 256), fast enough to try a variant in a minute of CPU. Variants:

* ``--noise input_subspace --subspace K``: the first layer's input factors ``b`` are drawn in the span of the top
  ``K`` principal directions of its inputs (a running second moment, re-decomposed every 50 steps) instead of all
  784 pixel directions; the estimate's expectation is the gradient projected on that span.
* ``--grow T``: the population doubles every time the step count passes ``T, 3T, 7T, ...`` (up to 1024), a
  variance schedule that leaves the user's learning rate alone.
* ``--sigma``, ``--population``, ``--lr``: the usual knobs.

Test accuracy is measured at eight points and at the end of the CPU-time budget (evaluation excluded from the
clock); one torch thread. JSON to ``--out``.

    python benchmarks/comparisons/es_variants.py --noise full --steps 3000
    python benchmarks/comparisons/es_variants.py --noise input_subspace --subspace 64 --steps 3000
    python benchmarks/comparisons/es_variants.py --grow 300 --population 16 --cpu-seconds 75
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def centered_ranks(losses: Tensor) -> Tensor:
    """Ranks of the losses scaled to ``[-0.5, 0.5]`` (the highest loss gets ``+0.5``)."""
    ranks = torch.empty_like(losses)
    ranks[losses.argsort()] = torch.arange(len(losses), dtype=losses.dtype)
    return ranks / (len(losses) - 1) - 0.5


def top_subspace(second_moment: Tensor, k: int) -> Tensor:
    """The ``(n, k)`` orthonormal basis of the ``k`` leading eigenvectors of a symmetric matrix."""
    _, vectors = torch.linalg.eigh(second_moment)
    return vectors[:, -k:].contiguous()


def run(
    noise: str,
    subspace: int,
    population: int,
    lr: float,
    sigma: float,
    steps: int,
    cpu_seconds: float,
    grow: int,
    seed: int,
    beta1: float = 0.9,
    shaping: str = "centered_rank",
) -> dict:
    """Train the MLP and return its accuracy curve.

    Args:
        noise: ``"full"`` or ``"input_subspace"`` (first layer's input factors in the inputs' leading subspace).
        subspace: ``K``, the subspace dimension.
        population: members per step (the starting population with ``grow``); even.
        lr: Adam's learning rate.
        sigma: perturbation scale.
        steps: most steps.
        cpu_seconds: stop after this much process CPU time (0: no limit).
        grow: double the population at ``grow * (2^j - 1)`` steps (0: fixed population).
        seed: seed of the initial weights, batches and noise.
        beta1: Adam's first-moment decay (0.9 is PyTorch's default; closer to 1 averages the estimate over more
            steps).
        shaping: ``"centered_rank"`` or ``"zscore"`` (losses standardized over the population: with antithetic
            pairs, each pair's loss difference divided by the population's standard deviation).
    """
    from lightning_nobp.data import load_fashion_mnist

    torch.set_num_threads(1)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    x_train, y_train = train.tensors[0].view(len(train), -1).float(), train.tensors[1]
    x_test, y_test = test.tensors[0].view(len(test), -1).float(), test.tensors[1]
    torch.manual_seed(seed)
    first, second = torch.nn.Linear(784, 256), torch.nn.Linear(256, 10)
    params = [first.weight, first.bias, second.weight, second.bias]
    for param in params:
        param.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))
    batch, chunk = 256, 16
    second_moment, basis = torch.zeros(784, 784), None
    curve: list[tuple[int, float, float, int]] = []
    spent = 0.0
    checkpoints = {max(1, steps * i // 8) for i in range(1, 9)}
    for step in range(steps):
        started = time.process_time()
        size = population
        if grow:
            size = min(1024, population * 2 ** int(math.log2(1 + step / grow)))
        index = torch.randint(0, len(x_train), (batch,))
        x, y = x_train[index], y_train[index]
        base = torch.addmm(first.bias, x, first.weight.t())
        pairs = size // 2
        if noise == "input_subspace":
            second_moment.mul_(0.99).addmm_(x.t(), x, alpha=0.01 / batch)
            if step % 50 == 0:
                basis = top_subspace(second_moment, subspace)
            b1 = torch.randn(pairs, subspace) @ basis.t()
        else:
            b1 = torch.randn(pairs, 784)
        a1, e1 = torch.randn(pairs, 256), torch.randn(pairs, 256)
        a2, b2, e2 = torch.randn(pairs, 10), torch.randn(pairs, 256), torch.randn(pairs, 10)
        a1, e1, a2, e2 = (torch.cat([t, -t]) for t in (a1, e1, a2, e2))
        b1, b2 = torch.cat([b1, b1]), torch.cat([b2, b2])
        losses = []
        width = min(chunk, size)
        for start in range(0, size, width):
            part = slice(start, start + width)
            xb = x @ b1[part].t()
            hidden = base.unsqueeze(0) + sigma * xb.t().unsqueeze(-1) * a1[part].unsqueeze(1)
            hidden = (hidden + sigma * e1[part].unsqueeze(1)).relu_()
            logits = hidden @ second.weight.t() + sigma * (hidden @ b2[part].unsqueeze(-1)) * a2[part].unsqueeze(1)
            logits = logits + second.bias + sigma * e2[part].unsqueeze(1)
            member_losses = F.cross_entropy(logits.reshape(-1, 10), y.repeat(width), reduction="none")
            losses.append(member_losses.view(width, batch).mean(1))
        fitness = torch.cat(losses)
        if shaping == "zscore":
            shaped = (fitness - fitness.mean()) / fitness.std().clamp_min(1e-12)
        else:
            shaped = centered_ranks(fitness)
        weights = shaped / (sigma * size)
        first.weight.grad = (a1 * weights[:, None]).t() @ b1
        first.bias.grad = (e1 * weights[:, None]).sum(0)
        second.weight.grad = (a2 * weights[:, None]).t() @ b2
        second.bias.grad = (e2 * weights[:, None]).sum(0)
        optimizer.step()
        spent += time.process_time() - started
        done = cpu_seconds and spent >= cpu_seconds
        if step + 1 in checkpoints or done:
            with torch.no_grad():
                accuracy = float((second(first(x_test).relu()).argmax(1) == y_test).float().mean())
            curve.append((step + 1, round(spent, 2), accuracy, size))
            print(f"step {step + 1:6d}  cpu {spent:7.1f} s  population {size:5d}  test accuracy {accuracy:.4f}")
        if done:
            break
    return {"curve": [dict(zip(("step", "cpu_s", "accuracy", "population"), row)) for row in curve]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", choices=("full", "input_subspace"), default="full")
    parser.add_argument("--subspace", type=int, default=64)
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr (the peers' backprop user's: 1e-3)")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--cpu-seconds", type=float, default=0.0)
    parser.add_argument("--grow", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shaping", choices=("centered_rank", "zscore"), default="centered_rank")
    parser.add_argument("--beta1", type=float, default=0.9, help="Adam's first-moment decay")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "es_variants")
    args = parser.parse_args()
    if args.population % 2:
        parser.error("--population must be even (antithetic pairs)")
    options = {k: v for k, v in vars(args).items() if k != "out"}
    result = {"options": options, **run(**options)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        f"{args.noise}-k{args.subspace}-p{args.population}-lr{args.lr:g}-s{args.sigma:g}-g{args.grow}"
        f"-b{args.beta1:g}-{args.shaping}.json"
    )
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
