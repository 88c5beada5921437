"""Input subspaces: data-fed layers found, principal bases right, noise inside them, installed between steps."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras
from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator
from lightning_nobp.perturb.input_subspace import WHITENING, InputSubspaces, principal_basis
from lightning_nobp.pytorch import NoBackpropStrategy
from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


def _low_rank_inputs(rows: int = 512, width: int = 40, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Inputs whose energy lies in ``rank`` directions (decaying), plus a little isotropic noise."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(width, rank, generator=generator))[0]
    strength = torch.logspace(1, 0, rank)
    return (torch.randn(rows, rank, generator=generator) * strength) @ mixing.t() + 0.01 * torch.randn(
        rows, width, generator=generator
    )


def test_principal_basis_keeps_the_energy_with_the_fewest_directions() -> None:
    x = _low_rank_inputs()
    moment = x.t() @ x / len(x)
    values = torch.linalg.eigvalsh(moment.double()).flip(0)
    for energy in (0.5, 0.9, 0.999):
        basis = principal_basis(moment, energy)
        assert basis is not None
        directions, scales = basis
        kept = directions.shape[1]
        assert float(values[:kept].sum()) >= energy * float(values.sum()) - 1e-9
        assert float(values[: kept - 1].sum()) < energy * float(values.sum())  # one fewer would not do
        torch.testing.assert_close(directions.t() @ directions, torch.eye(kept), atol=1e-5, rtol=0)
        # partial whitening: scales ~ lambda^-1/4, and E[(x . b)^2] = E[|x|^2] for b = P (scales * s)
        captured = (directions.t().double() @ moment.double() @ directions.double()).diagonal()
        torch.testing.assert_close(
            scales.double() / scales[0].double(), (captured / captured[0]).pow(-WHITENING), rtol=1e-3, atol=0
        )
        torch.testing.assert_close(
            float((captured * scales.double().square()).sum()), float(moment.trace()), rtol=1e-4, atol=0
        )
    assert principal_basis(torch.zeros(5, 5), 0.9) is None
    assert principal_basis(torch.full((5, 5), float("nan")), 0.9) is None


class InputNormalized(nn.Module):
    """A trained input scale before the first layer: no layer is fed by the data."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(40))
        self.first = nn.Linear(40, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(x * self.scale).relu())


def _estimator_with_subspaces(net: nn.Module, algorithm: EggRoll | OpenES) -> PopulationEstimator:
    assert algorithm.input_subspace is not None
    options = EstimatorOptions(input_subspace=algorithm.input_subspace)
    return PopulationEstimator(algorithm, [net], list(net.parameters()), options=options)


def _step(estimator: PopulationEstimator, algorithm: EggRoll | OpenES, loss, seed: int) -> None:
    population = algorithm.ask(seed)
    if not estimator.probed:
        estimator.probe_parameter_reads(population, loss)
    fitness = estimator.evaluate_members(population, loss)
    estimator.accumulate_gradient(population, algorithm.tell(population, fitness).coefficients)
    estimator.install_input_bases()  # the step ends


def test_only_layers_fed_by_the_data_get_a_basis() -> None:
    x, y = _low_rank_inputs(rows=64), torch.randint(0, 3, (64,))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    algorithm = EggRoll(population=8)
    estimator = _estimator_with_subspaces(mlp, algorithm)
    _step(estimator, algorithm, lambda: F.cross_entropy(mlp(x), y), seed=1)
    assert estimator.input_subspaces is not None and list(estimator.input_subspaces.subspaces.layers or {}) == [0]
    assert set(algorithm.input_bases) == {id(mlp[0].weight)}
    assert algorithm.input_bases[id(mlp[0].weight)][0].shape[1] < 40

    normalized = InputNormalized()
    algorithm = EggRoll(population=8)
    estimator = _estimator_with_subspaces(normalized, algorithm)
    _step(estimator, algorithm, lambda: F.cross_entropy(normalized(x), y), seed=1)
    assert estimator.input_subspaces is not None and estimator.input_subspaces.subspaces.layers == {}
    assert algorithm.input_bases == {}


def test_a_step_uses_the_basis_it_started_with_and_the_next_one_the_new_basis() -> None:
    """Bases computed during a step are installed after its update: the update matches the evaluated noise."""
    x, y = _low_rank_inputs(rows=64), torch.randint(0, 3, (64,))

    def gradients(subspaces: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], EggRoll, nn.Sequential]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3))
        algorithm = EggRoll(population=8, extras=EstimatorExtras(input_subspace=0.9 if subspaces else None))
        estimator = (
            _estimator_with_subspaces(net, algorithm)
            if subspaces
            else PopulationEstimator(algorithm, [net], list(net.parameters()))
        )
        steps = []
        for seed in (1, 2):
            _step(estimator, algorithm, lambda: F.cross_entropy(net(x), y), seed)
            steps.append([p.grad.clone() for p in net.parameters()])
            for p in net.parameters():
                p.grad = None
        return steps[0], steps[1], algorithm, net

    first, second, algorithm, net = gradients(subspaces=True)
    plain_first, plain_second, _, _ = gradients(subspaces=False)
    for with_basis, without in zip(first, plain_first):
        torch.testing.assert_close(with_basis, without)  # no basis during step 1
    assert not torch.allclose(second[0], plain_second[0])
    directions, _ = algorithm.input_bases[id(net[0].weight)]
    # step 2's first-layer estimate lies in the basis's span; the isotropic one does not
    outside = second[0] - second[0] @ directions @ directions.t()
    assert float(outside.norm()) < 1e-4 * float(second[0].norm())
    plain_outside = plain_second[0] - plain_second[0] @ directions @ directions.t()
    assert float(plain_outside.norm()) > 0.1 * float(plain_second[0].norm())


@pytest.mark.parametrize(
    "make", [lambda: EggRoll(population=4), lambda: OpenES(population=4), lambda: MeZO(input_subspace=0.97)]
)
def test_noise_and_update_stay_inside_the_subspace(make: Callable[[], EggRoll | OpenES | MeZO]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 10)
    algorithm = make()
    directions = torch.linalg.qr(torch.randn(10, 3))[0]
    scales = torch.tensor([1.0, 2.0, 3.0])
    isotropic = algorithm.noise(7, 0, weight)
    algorithm.set_input_basis(weight, (directions, scales))
    noise = algorithm.noise(7, 0, weight)
    torch.testing.assert_close(noise, noise @ directions @ directions.t())  # every row inside the subspace
    assert float((isotropic - isotropic @ directions @ directions.t()).norm()) > 0.5 * float(isotropic.norm())
    # unit Gaussian coordinates times the installed scales, along each basis direction
    coordinates = torch.stack([algorithm.noise(seed, 0, weight) @ directions for seed in range(300)])
    torch.testing.assert_close(coordinates.std(dim=(0, 1)), scales, rtol=0.12, atol=0)
    torch.testing.assert_close(algorithm.noise(7, 0, weight), noise)  # a pure function of the seed
    combined = algorithm.combine({7: 0.5, 9: -2.0}, 0, weight)
    torch.testing.assert_close(combined, 0.5 * noise - 2.0 * algorithm.noise(9, 0, weight))
    assert algorithm.noise_stream(7, 0, weight) is None  # low-bit kernels must not regenerate isotropic noise
    restored = pickle.loads(pickle.dumps(algorithm))
    assert restored.input_bases == {}
    algorithm.set_input_basis(weight, None)
    torch.testing.assert_close(algorithm.noise(7, 0, weight), isotropic)


def test_first_layer_estimate_is_closer_to_the_gradient_inside_the_subspace() -> None:
    """Inputs with their energy in a few directions: the first layer's estimate has a higher cosine with the
    true gradient when its noise stays inside their principal subspace."""
    x = _low_rank_inputs(rows=256, width=200, rank=8)
    y = (x @ torch.randn(200, 5, generator=torch.Generator().manual_seed(1))).argmax(1)
    cosines: dict[bool, list[float]] = {True: [], False: []}
    for subspace in (True, False):
        for seed in range(6):
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(200, 32), nn.ReLU(), nn.Linear(32, 5))
            true = torch.autograd.grad(F.cross_entropy(net(x), y), net[0].weight)[0]
            algorithm = EggRoll(population=64, extras=EstimatorExtras(input_subspace=0.97 if subspace else None))
            if subspace:
                algorithm.set_input_basis(net[0].weight, principal_basis(x.t() @ x / len(x), 0.97))
            net.requires_grad_(False)
            estimator = PopulationEstimator(algorithm, [net], list(net.parameters()))
            _step(estimator, algorithm, lambda: F.cross_entropy(net(x), y), seed=100 + seed)
            estimate = net[0].weight.grad
            cosines[subspace].append(float(F.cosine_similarity(estimate.flatten(), true.flatten(), dim=0)))
    inside, everywhere = sum(cosines[True]) / 6, sum(cosines[False]) / 6
    assert inside > 2 * everywhere and inside > 0.1, cosines


def test_trainer_observes_the_first_layer_and_respects_the_option() -> None:
    for energy, expect_basis in ((0.97, True), (None, False)):
        pl.seed_everything(0)
        model = DigitsClassifier()
        algorithm = EggRoll(population=8, extras=EstimatorExtras(input_subspace=energy))
        strategy = NoBackpropStrategy(algorithm=algorithm)
        trainer = pl.Trainer(strategy=strategy, max_steps=5, **quiet_trainer_kwargs())
        trainer.fit(model, digits_loaders(batch_size=64)[0])
        first = next(module for module in model.modules() if isinstance(module, nn.Linear))
        assert (id(first.weight) in algorithm.input_bases) is expect_basis
        assert len(algorithm.input_bases) == int(expect_basis)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, True, "0.9"])
def test_bad_input_subspace_names_the_fix(value: object) -> None:
    with pytest.raises(ValueError, match=r"MeZO\(input_subspace=.*fraction in \(0, 1\]"):
        MeZO(input_subspace=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EstimatorExtras\(input_subspace=.*fraction in \(0, 1\]"):
        EstimatorExtras(input_subspace=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm_class", [EggRoll, OpenES])
def test_extras_must_be_an_option_group(algorithm_class: type) -> None:
    with pytest.raises(TypeError, match="pass EstimatorExtras"):
        algorithm_class(extras={"input_subspace": 0.9})


def test_resuming_mid_observation_continues_exactly(tmp_path) -> None:
    """A checkpoint taken while the bases are still being observed resumes to the same weights as a straight run."""

    def fit(max_epochs: int, ckpt_path: str | None = None, save: bool = False) -> tuple[DigitsClassifier, pl.Trainer]:
        pl.seed_everything(0)
        model = DigitsClassifier()
        strategy = NoBackpropStrategy(algorithm=EggRoll(population=8))
        kwargs = quiet_trainer_kwargs(max_epochs=max_epochs, limit_train_batches=10)
        if save:
            kwargs.update(enable_checkpointing=True, default_root_dir=tmp_path)
        trainer = pl.Trainer(strategy=strategy, **kwargs)
        trainer.fit(model, digits_loaders(batch_size=64, shuffle=False)[0], ckpt_path=ckpt_path)
        return model, trainer

    straight, _ = fit(max_epochs=2)
    _, trainer = fit(max_epochs=1, save=True)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["lightning_nobp"]["input_subspaces"][0]
    assert saved["evaluations"] == 10 and saved["layers"] == [0] and saved["moments"]  # mid-observation
    resumed, _ = fit(max_epochs=2, ckpt_path=str(path))
    for expected, got in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(expected, got)


def test_the_search_copies_only_the_inputs_of_data_fed_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large model's activations are fingerprinted, not kept: only the data-fed layer's input is copied."""
    import lightning_nobp.perturb.input_subspace as module

    x = _low_rank_inputs(rows=16)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    copies: list[tuple[int, ...]] = []
    rows = module._rows

    def counted(value: torch.Tensor) -> torch.Tensor:
        copies.append(tuple(value.shape))
        return rows(value)

    monkeypatch.setattr(module, "_rows", counted)
    subspaces = InputSubspaces(0.97)
    shift = {"on": False}

    mlp[1].register_forward_hook(lambda m, a, out: out + 1.0 if shift["on"] else out)  # "perturbed weights"

    def run() -> None:
        with torch.no_grad():
            mlp(x)

    def moved() -> None:
        shift["on"] = True
        run()

    seen = subspaces.search({0: mlp[0], 2: mlp[2], 4: mlp[4]}, run, moved)
    assert list(seen) == [0] and subspaces.layers == {0: mlp[0]}
    assert copies == [(16, 40)]
    torch.testing.assert_close(seen[0][0], x)
