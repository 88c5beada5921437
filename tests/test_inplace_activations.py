"""Activations computed in place in a batched population's forward (``lightning_nobp.perturb.inplace_activations``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.algorithms import EggRoll, OpenES
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.inplace_activations import activations_after_linear, activations_in_place


class SharedActivation(nn.Module):
    """The same ReLU module in the Sequential and called on its own in ``forward``: never switched."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.net = nn.Sequential(nn.Linear(4, 8), self.act, nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.act(x[:, :3])


class MySequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def test_only_activations_right_after_a_linear_in_a_plain_sequential_are_found() -> None:
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(),  # found
        nn.Linear(8, 8), nn.SiLU(),  # found
        nn.Linear(8, 8), nn.ReLU(inplace=True),  # already in place
        nn.Linear(8, 8), nn.RReLU(),  # random slopes: not switched
        nn.Linear(8, 8), nn.GELU(),  # no in-place mode
        nn.LayerNorm(8), nn.ReLU(),  # not after a Linear
        nn.Linear(8, 8), MySequential(nn.Linear(8, 8), nn.ReLU()),  # a Sequential subclass may do anything
    )  # fmt: skip
    pairs = activations_after_linear([model])
    assert [(model[i], model[i + 1]) for i in (0, 2)] == pairs
    assert activations_after_linear([SharedActivation()]) == []


def test_the_context_switches_and_restores_even_after_an_exception() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ELU())
    pairs = activations_after_linear([model])
    with activations_in_place(pairs):
        assert model[1].inplace and model[3].inplace
    assert not model[1].inplace and not model[3].inplace
    with pytest.raises(RuntimeError, match="boom"), activations_in_place(pairs):
        raise RuntimeError("boom")
    assert not model[1].inplace and not model[3].inplace


def test_hooks_that_could_hold_the_output_keep_the_activation_out_of_place() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    pairs = activations_after_linear([model])
    kept = []
    handle = model[0].register_forward_hook(lambda module, args, output: kept.append(output))
    with activations_in_place(pairs):
        assert not model[1].inplace and model[3].inplace
        model(torch.randn(2, 4))
    handle.remove()
    assert (kept[0] < 0).any()  # the kept pre-activation output was not overwritten
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        with activations_in_place(pairs):
            assert not model[1].inplace and not model[3].inplace
    finally:
        handle.remove()


@pytest.mark.parametrize("activation", [nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.Hardswish], ids=lambda a: a.__name__)
@pytest.mark.parametrize("algorithm", [EggRoll(population=8, sigma=0.05), OpenES(population=6, sigma=0.05)])
def test_batched_fitness_is_bit_identical_to_out_of_place_activations(activation, algorithm) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), activation(), nn.Linear(16, 12), activation(), nn.Linear(12, 3))
    x, targets = torch.randn(32, 6), torch.randint(0, 3, (32,))
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    assert len(estimator.evaluation.in_place_activations) == 2

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), targets)

    population = algorithm.ask(3)
    switched = estimator.evaluate_batched(population, loss)
    estimator.evaluation.in_place_activations = []
    reference = estimator.evaluate_batched(population, loss)
    assert torch.equal(switched, reference)
    assert len(set(reference.tolist())) == len(population)
    assert not model[1].inplace and not model[3].inplace
