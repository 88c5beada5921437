"""Batched population evaluation (torch.func.vmap over the user's code) against the member-by-member loop."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras, ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.perturb import PopulationEstimator

from conftest import quiet_trainer_kwargs
from test_perturb_forward import EveryLayer, inputs
from user_models import DigitsClassifier, digits_loaders


@pytest.mark.parametrize(
    "algorithm",
    [EggRoll(population=8, rank=2, sigma=0.05), OpenES(population=6, sigma=0.05), MeZO(eps=1e-2, directions=3)],
    ids=["eggroll", "openes", "mezo"],
)
def test_vmap_and_loop_give_the_same_fitness(algorithm) -> None:
    torch.manual_seed(0)
    model = EveryLayer()
    tokens, image = inputs()
    targets = torch.randint(0, 11, (3,))
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(tokens, image), targets)

    estimator.probe_parameter_reads(algorithm.ask(0), loss)
    population = algorithm.ask(4)
    looped = estimator.evaluate(population, loss)
    batched = estimator.evaluate_batched(population, loss)
    chunked = estimator.evaluate_batched(population, loss, chunk=2)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, looped, rtol=1e-5, atol=1e-5)
    assert len(set(looped.tolist())) == len(population)  # the members really differ


def test_linear_and_embedding_layers_take_the_low_rank_correction_not_a_perturbed_matrix() -> None:
    model = nn.Sequential(nn.Embedding(9, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    algorithm = EggRoll(population=4)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    noise = estimator.noise.chunk(algorithm.ask(0), [0, 1, 2, 3])
    dense, low_rank = noise.dense, noise.low_rank
    assert set(low_rank) == {0, 1, 3}  # the embedding and the two Linear weights
    assert set(dense) == {2, 4}  # the biases
    a, b = low_rank[1]
    assert a.shape == (4, 5, 1) and b.shape == (4, 6, 1)
    tied = EveryLayer()  # embed.weight is also head.weight; conv, attention and norms stay dense
    estimator = PopulationEstimator(algorithm, [tied], list(tied.parameters()))
    names = [name for name, _ in tied.named_parameters()]
    low_rank = estimator.noise.chunk(algorithm.ask(0), [0, 1]).low_rank
    # attention reads out_proj.weight without calling out_proj, so it stays dense
    assert {names[i] for i in low_rank} == {"embed.weight", "proj.weight"}


@pytest.mark.parametrize("bias", [True, False])
def test_batched_hidden_layers_compute_with_whole_member_weights_and_agree_with_the_correction(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU in float32, an ``nn.Linear`` fed a batched population's rows (here the second and third layers) takes
    each member's whole weight ``W + A B^T`` (and perturbed bias): the same fitness as the shared product plus the
    low-rank correction, and the stored weights come back untouched."""
    from lightning_nobp.perturb import member_layers as forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=bias), nn.ReLU(), nn.Linear(16, 12, bias=bias), nn.Tanh(),
                          nn.Linear(12, 3, bias=bias))  # fmt: skip
    x, targets = torch.randn(32, 6), torch.randint(0, 3, (32,))
    stored = [p.detach().clone() for p in model.parameters()]
    algorithm = EggRoll(population=8, rank=2, sigma=0.05, extras=EstimatorExtras(input_subspace=None))
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), targets)

    population = algorithm.ask(3)
    chosen: list[tuple[int, bool]] = []
    rule = forward.per_member_weight_is_cheaper

    def recorded(module: nn.Module, inputs: torch.Tensor) -> bool:
        chosen.append((module.in_features, rule(module, inputs)))
        return chosen[-1][1]

    monkeypatch.setattr(forward, "per_member_weight_is_cheaper", recorded)
    whole = estimator.evaluate_batched(population, loss)
    assert sorted(set(chosen)) == [(6, False), (12, True), (16, True)]  # the data-fed layer keeps the correction
    monkeypatch.setattr(forward, "per_member_weight_is_cheaper", lambda module, inputs: False)
    corrected = estimator.evaluate_batched(population, loss)
    looped = estimator.evaluate(population, loss)
    torch.testing.assert_close(whole, corrected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, looped, rtol=1e-5, atol=1e-6)
    assert len(set(whole.tolist())) == len(population)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), stored))


def test_whole_member_weights_only_where_they_save_memory_traffic() -> None:
    from lightning_nobp.perturb.member_layers import per_member_weight_is_cheaper

    hidden, wide = nn.Linear(128, 10), nn.Linear(784, 256)
    seen: list[bool] = []

    def check(layer: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
        seen.append(per_member_weight_is_cheaper(layer, rows))
        return rows.sum()

    torch.func.vmap(lambda rows: check(hidden, rows))(torch.zeros(4, 256, 128))  # a head on 256 rows: cheaper
    torch.func.vmap(lambda rows: check(hidden, rows))(torch.zeros(4, 2, 128))  # 2 rows: the correction is cheaper
    torch.func.vmap(lambda rows: check(wide, rows))(torch.zeros(4, 256, 784))  # 784 x 256 per member: too large
    torch.func.vmap(lambda rows: check(hidden, rows))(torch.zeros(4, 256, 128, dtype=torch.bfloat16))
    assert seen == [True, False, False, False]
    assert not per_member_weight_is_cheaper(hidden, torch.zeros(256, 128))  # a shared input (not batched)


class ItemInTrainingStep(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if loss.item() > 100:  # data-dependent Python control flow: vmap cannot batch this
            return loss * 0
        return loss


def test_unbatchable_training_step_falls_back_to_the_loop_with_one_warning(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    strategy = NoBackpropStrategy(algorithm=EggRoll(population=8))
    trainer = pl.Trainer(strategy=strategy, max_steps=4, **quiet_trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ItemInTrainingStep(), train)
    messages = [str(w.message) for w in caught if "one at a time" in str(w.message)]
    assert len(messages) == 1 and "item()" in messages[0]
    assert trainer.global_step == 4
    estimator = strategy.engine.estimator(trainer.optimizers[0], [trainer.lightning_module])
    assert estimator.batching is False


def test_batched_and_looped_training_end_at_the_same_weights() -> None:
    def train(batched: bool) -> list[torch.Tensor]:
        pl.seed_everything(0)
        loader, _ = digits_loaders()
        model = DigitsClassifier(lr=1e-3)
        strategy = NoBackpropStrategy(
            algorithm=EggRoll(population=8, population_chunk=4), execution=ExecutionOptions(population_batching=batched)
        )
        pl.Trainer(strategy=strategy, max_steps=5, **quiet_trainer_kwargs()).fit(model, loader)
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(train(True), train(False)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_population_chunk_must_divide_the_population() -> None:
    with pytest.raises(ValueError, match="positive divisor of the population, e.g. population_chunk=16"):
        EggRoll(population=64, population_chunk=24)
    assert EggRoll(population=64, population_chunk=16).population_chunk == 16


class RecordsBatchSizes(DigitsClassifier):
    def __init__(self) -> None:
        super().__init__(lr=1e-3)
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(batch[0].shape[-2] if batch[0].dim() > 1 else 1)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("batched", [True, False])
def test_pair_slices_give_each_antithetic_pair_its_own_slice_of_the_batch(batched: bool) -> None:
    pl.seed_everything(0)
    loader, _ = digits_loaders(batch_size=128)
    model = RecordsBatchSizes()
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8, extras=EstimatorExtras(input_subspace=None)),
        execution=ExecutionOptions(member_data="pair_slices", population_batching=batched),
    )
    pl.Trainer(strategy=strategy, max_steps=2, **quiet_trainer_kwargs()).fit(model, loader)
    assert strategy.reuse_official_pass is False
    # per step: the official pass on the whole batch, then the members on 128 / 4 pairs = 32 samples each
    # (batched: one vmapped call per step, its per-member view also 32 samples)
    member_calls = 1 if batched else 8
    assert model.sizes[-(1 + member_calls) :] == [128] + [32] * member_calls


@pytest.mark.parametrize("batched", [True, False])
def test_a_batch_shorter_than_the_pairs_shares_its_samples_round_robin(batched: bool) -> None:
    """The loader's last batch (here 3 samples for 4 pairs) trains, with one warning, instead of stopping the fit."""
    pl.seed_everything(0)
    x, y = torch.randn(11, 64), torch.randint(0, 10, (11,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # batches of 8 and 3
    model = RecordsBatchSizes()
    before = [p.detach().clone() for p in model.parameters()]
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8, extras=EstimatorExtras(input_subspace=None)),
        execution=ExecutionOptions(member_data="pair_slices", population_batching=batched),
    )
    with pytest.warns(UserWarning, match="share its samples, one each"):
        pl.Trainer(strategy=strategy, max_epochs=1, **quiet_trainer_kwargs()).fit(model, loader)
    member_calls = 1 if batched else 8
    assert model.sizes[-(1 + member_calls) :] == [3] + [1] * member_calls  # one sample per pair
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_pair_slices_match_a_loop_over_explicit_slices() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    algorithm = EggRoll(population=6, sigma=0.1)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    population = algorithm.ask(0)
    groups = population.groups()

    def stacked(members):
        picked = torch.tensor([groups[i] for i in members])
        return x.view(3, 4, 4)[picked], y.view(3, 4)[picked]

    def loss(inputs):
        xs, ys = inputs
        return F.cross_entropy(model(xs), ys)

    looped = estimator.evaluate(population, loss, member_inputs=stacked)
    batched = estimator.evaluate_batched(population, loss, member_inputs=stacked)
    expected = []
    for index, member in enumerate(population.members):
        with torch.no_grad(), estimator.perturbation(population, member):
            g = groups[index]
            expected.append(float(F.cross_entropy(model(x[4 * g : 4 * g + 4]), y[4 * g : 4 * g + 4])))
    torch.testing.assert_close(looped, torch.tensor(expected))
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_unknown_member_data_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        NoBackpropStrategy(execution=ExecutionOptions(member_data="per_member"))  # type: ignore[arg-type]


def test_batched_evaluation_keeps_the_stacked_dense_noise_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """MeZO's dense noise is stacked per member: past the byte budget the members go in chunks, same losses."""
    import lightning_nobp.perturb.member_noise as noise_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    algorithm = MeZO(directions=4, input_subspace=None)
    population = algorithm.ask(1)
    whole = PopulationEstimator(algorithm, [net], list(net.parameters()))
    whole.probe_parameter_reads(population, loss)
    expected = whole.evaluate_batched(population, loss)

    monkeypatch.setattr(noise_module, "STACKED_NOISE_BYTES", 3 * 4 * sum(p.numel() for p in net.parameters()))
    chunked = PopulationEstimator(algorithm, [net], list(net.parameters()))
    chunked.probe_parameter_reads(population, loss)
    sizes: list[int] = []
    stack = chunked.noise.chunk

    def recording(population_, members, *args):  # type: ignore[no-untyped-def]
        sizes.append(len(members))
        return stack(population_, members, *args)

    monkeypatch.setattr(chunked.noise, "chunk", recording)
    torch.testing.assert_close(chunked.evaluate_batched(population, loss), expected)
    assert sizes == [3, 3, 2]


@pytest.mark.parametrize(
    "algorithm", [MeZO(eps=1e-2, directions=3), OpenES(population=6, sigma=0.05)], ids=["mezo", "openes"]
)
def test_dense_noise_in_an_input_subspace_is_evaluated_through_the_shared_basis(algorithm) -> None:
    """A data-fed layer's input-subspace noise ``E_s = A_s P^T`` is evaluated as ``x W^T + (x P) A_s^T`` with the
    basis ``P`` shared by the batched members (not vmapped): the same fitness as the members' whole weights, and
    the same update as the dense noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x, targets = torch.randn(32, 12), torch.randint(0, 3, (32,))
    basis = torch.linalg.qr(torch.randn(12, 4))[0]
    algorithm.set_input_basis(model[0].weight, (basis, torch.tensor([2.0, 1.5, 1.0, 0.5])))
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), targets)

    estimator.probe_parameter_reads(algorithm.ask(0), loss)
    population = algorithm.ask(3)
    noise = estimator.noise.chunk(population, list(range(len(population))))
    dense, low_rank = noise.dense, noise.low_rank
    assert set(low_rank) == {0} and set(dense) == {1, 2, 3}  # the data-fed weight, through its basis
    factors, shared = low_rank[0]
    assert factors.shape == (len(population), 16, 4) and shared.shape == (12, 4)  # one basis for every member
    seeds = [m.noise_seed for m in population.members]
    signs = torch.tensor([m.sign for m in population.members]).view(-1, 1, 1)
    expected = algorithm.stacked_noise(seeds, 0, model[0].weight) * signs
    torch.testing.assert_close(factors @ shared.t() / population.sigma, expected, atol=1e-5, rtol=0)
    looped = estimator.evaluate(population, loss)
    batched = estimator.evaluate_batched(population, loss)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    weights = {seed: float(i + 1) for i, seed in enumerate(dict.fromkeys(seeds))}
    stacked = algorithm.stacked_noise(list(weights), 0, model[0].weight)
    by_members = (torch.tensor(list(weights.values())) @ stacked.view(len(weights), -1)).view(16, 12)
    torch.testing.assert_close(algorithm.combine(weights, 0, model[0].weight), by_members, atol=1e-5, rtol=1e-5)
