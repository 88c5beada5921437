"""The population's evaluation under ``torch.compile``: same fitness as eager, no graph breaks, eager fallback."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn


from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.estimator import EstimatorOptions

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders

PLAIN = dict(extras=None)  # the published method: no per-row estimates, no input subspace


def mlp_and_loss() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    return model, lambda: F.cross_entropy(model(x), y)


def gpt_and_loss() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", attention="math")).eval()  # sdpa has no vmap rule on the CPU
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    return model, lambda: model.loss(tokens[:, :-1], tokens[:, 1:])


def estimator(model: nn.Module, algorithm, compile: bool) -> PopulationEstimator:
    options = EstimatorOptions.of(algorithm, compile=compile)
    return PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)


@pytest.mark.parametrize("build", [mlp_and_loss, gpt_and_loss], ids=["mlp", "gpt"])
def test_compiled_member_evaluation_has_no_graph_breaks_and_the_eager_fitness(build) -> None:
    model, loss = build()
    algorithm = EggRoll(population=8, rank=1, sigma=1e-2, population_chunk=4, **PLAIN)
    population = algorithm.ask(3)
    eager = estimator(model, algorithm, compile=False)
    expected = eager.evaluate_batched(population, loss, chunk=4)
    eager.close()
    compiled = estimator(model, algorithm, compile=True)

    evaluation = compiled.evaluation
    chunk = compiled.noise.chunk(population, [0, 1, 2, 3])
    explanation = torch._dynamo.explain(evaluation.compiled.chunk_losses)(
        *evaluation.compiled.arguments(loss, chunk, frozenset(), None)
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    fitness = compiled.evaluate_batched(population, loss, chunk=4)
    assert evaluation.compiled.calls == 2  # both chunks went through the compiled function
    torch.testing.assert_close(fitness, expected, rtol=1e-5, atol=1e-5)
    # the members differ from each other: the noise reached the compiled graph
    assert fitness.unique().numel() == len(population)


def test_one_graph_serves_every_step() -> None:
    model, loss = mlp_and_loss()
    algorithm = EggRoll(population=8, rank=1, sigma=1e-2, population_chunk=4, **PLAIN)
    compiled = estimator(model, algorithm, compile=True)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for step in range(4):
            compiled.evaluate_batched(algorithm.ask(step), loss, chunk=4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
    assert compiled.evaluation.compiled.calls == 8


class ItemInTrainingStep(DigitsClassifier):
    """A training_step that reads a Python number from a tensor: a graph break."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if loss.item() > 1e9:
            raise RuntimeError("unreachable")
        return loss


def fit(module: pl.LightningModule, compile: bool, steps: int) -> NoBackpropStrategy:
    train, _ = digits_loaders(batch_size=64, shuffle=False)
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8, rank=1, sigma=1e-2, population_chunk=4, **PLAIN),
        compile=compile,
    )
    trainer = pl.Trainer(strategy=strategy, max_steps=steps, **quiet_trainer_kwargs())
    trainer.fit(module, train)
    return strategy


def test_trainer_compiles_the_population_and_trains_like_eager() -> None:
    torch.manual_seed(0)
    eager_module = DigitsClassifier(lr=1e-2)
    compiled_module = DigitsClassifier(lr=1e-2)
    compiled_module.load_state_dict(eager_module.state_dict())
    fit(eager_module, compile=False, steps=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be compiled.*")
        strategy = fit(compiled_module, compile=True, steps=3)
    estimator = next(iter(strategy.engine._estimators.values()))
    assert estimator.evaluation.compiled.calls == 6  # 3 steps x 2 chunks
    for (name, eager), compiled in zip(eager_module.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6, msg=name)


def test_a_graph_break_falls_back_to_eager_with_one_warning() -> None:
    torch.manual_seed(0)
    module = ItemInTrainingStep(lr=1e-2)
    with pytest.warns(UserWarning, match="cannot be compiled") as record:
        strategy = fit(module, compile=True, steps=3)
    assert sum("cannot be compiled" in str(w.message) for w in record) == 1
    assert "compile=False" in next(str(w.message) for w in record if "cannot be compiled" in str(w.message))
    estimator = next(iter(strategy.engine._estimators.values()))
    assert not estimator.evaluation.compiled.enabled
    assert estimator.evaluation.compiled.calls == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
