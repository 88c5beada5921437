"""A hand-written low-rank evolution strategy in plain PyTorch (no Lightning): the framework's overhead, visible.

EGGROLL-style, as published: every member perturbs each ``nn.Linear`` weight by ``sigma * a b^T`` (rank 1, ``a``
and ``b`` standard normal) and its bias by ``sigma * c``, in antithetic pairs; the members' losses on the same
batch become centered ranks, and ``-sum_i r_i E_i / (P sigma)`` is the loss-gradient estimate given to the user's
optimizer (Adam). The population's forward is one batched program: the first layer's shared input is multiplied
by the weight once and by the members' ``b`` once, later layers use ``torch.matmul`` over the members.
``benchmarks/comparisons/peers.py`` runs it as method ``plain-es`` on the same MLP, initial weights, batch and budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def centered_ranks(fitness: Tensor) -> Tensor:
    """Ranks of ``fitness`` scaled to ``[-0.5, 0.5]`` (higher fitness, higher rank).

    Args:
        fitness: one value per member.
    """
    ranks = torch.empty_like(fitness)
    ranks[fitness.argsort()] = torch.arange(len(fitness), dtype=fitness.dtype)
    return ranks / max(len(fitness) - 1, 1) - 0.5


class LowRankES:
    """Rank-1 antithetic ES over a ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations.

    Args:
        net: the network (its ``nn.Linear`` layers are perturbed; other modules are applied as they are).
        optimizer: the optimizer of ``net``'s parameters (it receives the estimate as ``.grad``).
        population: members per step (even: antithetic pairs).
        sigma: noise scale.
        generator: source of the noise.
    """

    def __init__(
        self, net: nn.Sequential, optimizer: torch.optim.Optimizer, population: int, sigma: float,
        generator: torch.Generator,
    ) -> None:  # fmt: skip
        if population % 2:
            raise ValueError(f"LowRankES(population={population}): antithetic pairs need an even population")
        self.net, self.optimizer, self.generator = net, optimizer, generator
        self.population, self.sigma = population, sigma
        half = population // 2
        self.signs = torch.cat([torch.ones(half), -torch.ones(half)])

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One ES step on the batch ``(x, y)``; returns the members' mean losses."""
        half, sigma, g = self.population // 2, self.sigma, self.generator
        noise: list[tuple[nn.Linear, Tensor, Tensor, Tensor]] = []
        with torch.no_grad():
            h = x.flatten(1)
            for module in self.net:
                if not isinstance(module, nn.Linear):
                    h = module(h)
                    continue
                a = torch.randn(half, module.out_features, generator=g)
                b = torch.randn(half, module.in_features, generator=g)
                c = torch.randn(half, module.out_features, generator=g)
                a_signed = torch.cat([a, -a]) * sigma  # the pair's second member: minus the same perturbation
                c_signed = torch.cat([c, -c]) * sigma
                if h.dim() == 2:  # the shared input: one product with W and one with the members' b
                    base = F.linear(h, module.weight, module.bias).unsqueeze(0)
                    projected = (h @ b.T).T.repeat(2, 1).unsqueeze(-1)  # (P, B, 1)
                else:
                    base = F.linear(h, module.weight, module.bias)
                    projected = torch.matmul(h, torch.cat([b, b]).unsqueeze(-1))
                h = base + projected * a_signed.unsqueeze(1) + c_signed.unsqueeze(1)
                noise.append((module, a, b, c))
            losses = F.cross_entropy(h.flatten(0, 1), y.repeat(self.population), reduction="none")
            losses = losses.view(self.population, -1).mean(1)
            ranks = centered_ranks(-losses)
            weights = (ranks[:half] - ranks[half:]) / (self.population * sigma)  # antithetic: r+ E - r- E
            for module, a, b, c in noise:
                module.weight.grad = -torch.einsum("p,po,pi->oi", weights, a, b)
                module.bias.grad = -(weights @ c)
        self.optimizer.step()
        return losses
