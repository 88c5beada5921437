"""The member layers: every layer type computes with theta + delta, stored weights stay bit-identical, and the
installation changes nothing outside an evaluation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.perturb import MemberLayers, ParameterOwners, Perturbation, PopulationEstimator
from lightning_nobp.perturb.member_layers import perturbed_value


class EveryLayer(nn.Module):
    """Linear, Embedding, Conv2d, MultiheadAttention, LayerNorm, biases, a bare Parameter and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8 + 2 * 4 * 4, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(8))  # bare parameter of the root module

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h) * self.scale
        pooled = self.conv(image).flatten(1)
        h = self.proj(torch.cat([h.mean(1), pooled], dim=1))
        return self.head(h)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (3, 5), generator=generator), torch.randn(3, 1, 4, 4, generator=generator)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())  # deduplicated: the tied weight appears once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layer_computes_with_the_perturbed_weights_and_storage_is_untouched(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = EveryLayer().to(dtype)
    tokens, image = inputs()
    image = image.to(dtype)
    params = trainable(model)
    before = snapshot(model)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    algorithm = MeZO(eps=1e-2)
    estimator = PopulationEstimator(algorithm, [model], params)
    population = algorithm.ask(3)
    member = population.members[1]

    # the reference: a copy whose parameters really hold theta + eps * sign * z
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, (p, q) in enumerate(zip(params, trainable(reference))):
            delta = algorithm.noise(member.noise_seed, index, p) * (population.sigma * member.sign)
            q.copy_(perturbed_value(p, delta))
        expected = reference(tokens, image)
        clean = model(tokens, image)

    estimator.probe_parameter_reads(population, lambda: model(tokens, image).float().sum())
    with torch.no_grad(), estimator.perturbation(population, member):
        got = model(tokens, image)
    # float32 attention may round the last bit differently between two equal computations on some CPUs (seen on an
    # AVX2-only EPYC, before and after this check was written); the perturbation moves the output far more
    tolerance = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert float((got - clean).abs().max()) > 1000 * tolerance and not torch.equal(got, clean)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.data_ptr() == storage[name], name
        assert isinstance(p, nn.Parameter)


def test_only_the_running_layer_is_swapped() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    params = trainable(model)
    seen: list[bool] = []

    def spy(module: nn.Module, args: object) -> None:
        seen.append(model[0].weight is params[0])  # layer 0 holds its stored weight while layer 1 runs

    model[1].register_forward_pre_hook(spy)
    algorithm = MeZO()
    estimator = PopulationEstimator(algorithm, [model], params)
    population = algorithm.ask(0)
    with torch.no_grad(), estimator.perturbation(population, population.members[0]):
        model(torch.randn(2, 4))
    assert seen == [True]


def test_parameters_read_outside_their_module_are_found_and_perturbed() -> None:
    class ReadsChildWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + x @ self.inner.weight.t()  # second read bypasses inner's forward

    model = ReadsChildWeight()
    params = trainable(model)
    algorithm = MeZO(eps=1e-2)
    estimator = PopulationEstimator(algorithm, [model], params)
    population = algorithm.ask(0)
    member = population.members[0]
    x = torch.randn(2, 4)
    estimator.probe_parameter_reads(population, lambda: model(x).sum())
    assert estimator.owners.read_outside == {0}  # the weight, not the bias
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, (p, q) in enumerate(zip(params, trainable(reference))):
            q.add_(algorithm.noise(member.noise_seed, index, p) * population.sigma)
        expected = reference(x)
        with estimator.perturbation(population, member):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_exception_inside_a_forward_restores_the_stored_weights() -> None:
    class Failing(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not isinstance(self.weight, nn.Parameter)  # the perturbed weight is swapped in
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Failing(4, 4))
    params = trainable(model)
    before = snapshot(model)
    layers = MemberLayers(ParameterOwners([model], params))
    with pytest.raises(RuntimeError, match="boom"):
        ones = Perturbation(delta_fn=lambda i, p: torch.ones_like(p, dtype=torch.float32))
        with torch.no_grad(), layers.perturbed(ones):
            model(torch.randn(2, 4))
    for name, p in model.named_parameters():
        assert p is dict(model.named_parameters())[name] and torch.equal(p, before[name])
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_no_trainable_parameters_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="configure_optimizers"):
        PopulationEstimator(MeZO(), [nn.Linear(2, 2)], [])


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("input_shape", [(6,), (5, 6), (2, 5, 6)])
def test_low_rank_correction_with_a_folded_bias_equals_the_perturbed_layer(rank: int, input_shape: tuple) -> None:
    """The weight's correction also adds the bias's perturbation (the layer runs with its stored bias)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    layers = MemberLayers(ParameterOwners([layer], [layer.weight, layer.bias]))
    a, b, bias_delta = torch.randn(4, rank), torch.randn(6, rank), torch.randn(4)
    x = torch.randn(input_shape)
    expected = nn.functional.linear(x, layer.weight + a @ b.t(), layer.bias + bias_delta)
    with torch.no_grad(), layers.perturbed(Perturbation(low_rank={0: (a, b)}, dense={1: bias_delta})):
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # a batched population: every member's output, and the stored parameters never change
    members_a, members_b, members_delta = torch.randn(3, 4, rank), torch.randn(3, 6, rank), torch.randn(3, 4)
    stored = snapshot(layer)

    def member_output(a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with layers.perturbed(Perturbation(low_rank={0: (a, b)}, dense={1: delta})):
            return layer(x)

    with torch.no_grad():
        batched = torch.func.vmap(member_output)(members_a, members_b, members_delta)
        for m in range(3):
            weight = layer.weight + members_a[m] @ members_b[m].t()
            reference = nn.functional.linear(x, weight, layer.bias + members_delta[m])
            torch.testing.assert_close(batched[m], reference, rtol=1e-5, atol=1e-5)
    for name, p in layer.named_parameters():
        assert torch.equal(p, stored[name]), name


def test_member_layers_are_installed_once_and_change_nothing_outside_an_evaluation() -> None:
    """The installed forwards call the class's own forward when no perturbation is active: same outputs, same
    parameters and state_dict; evaluations register no hooks; copies and pickles of the module carry no
    installation; closing the estimator gives every module its own forward back."""
    torch.manual_seed(0)
    model = EveryLayer()
    tokens, image = inputs()
    with torch.no_grad():
        clean = model(tokens, image)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    algorithm = MeZO(eps=1e-2)
    estimator = PopulationEstimator(algorithm, [model], trainable(model))
    installed = [m for m in model.modules() if "forward" in m.__dict__]
    assert {type(m).__name__ for m in installed} == {
        "Embedding", "Conv2d", "MultiheadAttention", "NonDynamicallyQuantizableLinear", "LayerNorm", "Linear",
        "EveryLayer",
    }  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, image), clean, rtol=0, atol=0)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items())

    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    population = algorithm.ask(0)
    estimator.probe_parameter_reads(population, lambda: model(tokens, image))
    with torch.no_grad():
        perturbed = estimator.evaluate(population, lambda: model(tokens, image).float().sum())
    assert len(set(perturbed.tolist())) == len(population)
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks

    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (copied, unpickled):
        for module in other.modules():
            forward = module.__dict__.get("forward")
            assert forward is None or forward.__self__ is module  # the class's forward, bound to the copy
        with torch.no_grad():
            torch.testing.assert_close(other(tokens, image), clean, rtol=0, atol=0)
    estimator.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, image), clean, rtol=0, atol=0)


def test_layer_norm_takes_its_gain_and_bias_noise_elementwise() -> None:
    """A LayerNorm's perturbed gain and bias give the output of a LayerNorm holding them, also for a batch of
    members under vmap (the normalization itself is shared)."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    layers = MemberLayers(ParameterOwners([norm], [norm.weight, norm.bias]))
    x = torch.randn(3, 6)
    gains, shifts = torch.randn(4, 6), torch.randn(4, 6)

    def member(gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        with layers.perturbed(Perturbation(dense={0: gain, 1: shift})):
            return norm(x)

    with torch.no_grad():
        batched = torch.func.vmap(member)(gains, shifts)
        for m in range(4):
            expected = nn.functional.layer_norm(x, (6,), norm.weight + gains[m], norm.bias + shifts[m])
            torch.testing.assert_close(batched[m], expected, rtol=1e-5, atol=1e-6)


def test_two_estimators_over_one_module_each_compute_their_own_members() -> None:
    """One estimator per optimizer over the same modules: each takes the layers over while it evaluates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    algorithm = EggRoll(population=6, rank=1, sigma=0.05, extras=None)
    population = algorithm.ask(2)
    first = PopulationEstimator(algorithm, [model], list(model.parameters()))
    alone = first.evaluate_batched(population, loss)
    second = PopulationEstimator(algorithm, [model], list(model.parameters()))
    torch.testing.assert_close(second.evaluate_batched(population, loss), alone, rtol=0, atol=0)
    torch.testing.assert_close(first.evaluate_batched(population, loss), alone, rtol=0, atol=0)
    torch.testing.assert_close(first.evaluate(population, loss), alone)
    first.close()
    second.close()
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
