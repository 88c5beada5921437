"""Per-row estimates of a causal sequence model's embeddings (``EstimatorExtras(per_row_embeddings=True)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras
from lightning_nobp.algorithms import EggRoll, OpenES
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator
from lightning_nobp.perturb.row_estimate import embedding_row_gradient
from lightning_nobp.perturb.row_losses import RowLocalLayer, find_row_local_layers

VOCAB, DIM, LENGTH, BATCH = 12, 6, 5, 3


class TinySequenceModel(nn.Module):
    """Token and position embeddings, a mixing of positions (causal, bidirectional or none) and a head.

    Args:
        mixing: ``"causal"`` (each position adds the mean of the earlier ones: attention's reach), ``"all"`` (the
            mean of every position: a bidirectional model) or ``"none"`` (positions never meet).
        padding_idx: the token embedding's padding row.
    """

    def __init__(self, mixing: str = "causal", padding_idx: int | None = None) -> None:
        super().__init__()
        self.mixing = mixing
        self.wte = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.wpe = nn.Embedding(LENGTH, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        if self.mixing == "causal":
            earlier = x.cumsum(1) - x
            x = x + torch.tanh(earlier / torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1))
        elif self.mixing == "all":
            x = x + torch.tanh(x.mean(1, keepdim=True))
        return self.head(torch.tanh(x))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    return tokens, torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)


def _loss(model: TinySequenceModel, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def _found(model: TinySequenceModel, loss) -> set[str]:
    names = {module: name for name, module in model.named_modules()}
    candidates = [RowLocalLayer(model.wte, 0, None), RowLocalLayer(model.wpe, 1, None), RowLocalLayer(model.head, 2, 3)]
    return {names[layer.module] for layer in find_row_local_layers(candidates, loss, lambda: None)}


def test_embeddings_qualify_in_a_causal_model_only() -> None:
    torch.manual_seed(0)
    tokens, targets = _batch(0)
    causal = TinySequenceModel("causal")
    assert _found(causal, lambda: _loss(causal, tokens, targets)) == {"wte", "wpe", "head"}
    # a bidirectional model: the last position's embedding reaches every loss row
    bidirectional = TinySequenceModel("all")
    assert _found(bidirectional, lambda: _loss(bidirectional, tokens, targets)) == {"head"}
    # a sequence classifier (one loss row per sequence, from the last position): no row structure to use
    classifier = TinySequenceModel("causal")
    labels = targets[:, 0]
    assert _found(classifier, lambda: F.cross_entropy(classifier(tokens)[:, -1], labels)) == set()


def _same_row_gradient(model: TinySequenceModel, tokens: torch.Tensor, targets: torch.Tensor) -> tuple:
    """Autograd references (for the test only): ``sum over n, m reading the same row v of dL_n / dx_m`` for the
    token and the position embedding, and their true gradients."""
    token_rows = model.wte(tokens)
    position_rows = model.wpe(torch.arange(LENGTH)).expand(BATCH, -1, -1)
    x = token_rows + position_rows
    if model.mixing == "causal":
        x = x + torch.tanh((x.cumsum(1) - x) / torch.arange(1, LENGTH + 1).view(1, -1, 1))
    logits = model.head(torch.tanh(x)).flatten(0, 1)
    rows = F.cross_entropy(logits, targets.flatten(), reduction="none") / targets.numel()
    flat_tokens = tokens.flatten()
    flat_positions = torch.arange(LENGTH).repeat(BATCH)
    token_reference = torch.zeros(VOCAB, DIM)
    position_reference = torch.zeros(LENGTH, DIM)
    for n in range(rows.numel()):
        (jacobian,) = torch.autograd.grad(rows[n], token_rows, retain_graph=True)  # dL_n / dx_m for every m
        jacobian = jacobian.reshape(-1, DIM)
        token_reference[flat_tokens[n]] += jacobian[flat_tokens == flat_tokens[n]].sum(0)
        position_reference[flat_positions[n]] += jacobian[flat_positions == flat_positions[n]].sum(0)
    true_token, true_position = torch.autograd.grad(rows.sum(), [model.wte.weight, model.wpe.weight])
    return token_reference, position_reference, true_token, true_position, rows


def test_the_estimate_measures_the_paths_to_the_losses_of_positions_reading_the_same_row() -> None:
    """With exact directional derivatives and many pairs, the estimate converges to the same-row reference; with
    positions that never meet, that reference is the true gradient."""
    torch.manual_seed(0)
    tokens, targets = _batch(1)
    for mixing in ("causal", "none"):
        model = TinySequenceModel(mixing)
        token_reference, position_reference, true_token, true_position, _ = _same_row_gradient(model, tokens, targets)
        pairs = 20000
        for weight, indices, reference in (
            (model.wte.weight, tokens.flatten(), token_reference),
            (model.wpe.weight, torch.arange(LENGTH).repeat(BATCH), position_reference),
        ):
            noise = torch.randn(pairs, weight.shape[0], DIM)
            # d_kn = sum_m dL_n/dx_m . E_k[i_m]: the first-order change of loss row n along pair k's noise
            differences = _directional_derivatives(model, weight, noise, tokens, targets)
            estimate = embedding_row_gradient(differences, indices, noise, weight.shape[0])
            cosine = F.cosine_similarity(estimate.flatten(), reference.flatten(), dim=0)
            assert cosine > 0.98, (mixing, cosine)
            torch.testing.assert_close(estimate.norm(), reference.norm(), rtol=0.05, atol=0.0)
        if mixing == "none":
            torch.testing.assert_close(token_reference, true_token, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(position_reference, true_position, rtol=1e-4, atol=1e-6)
        else:  # the causal model's cross-position paths are left out: a different vector
            assert not torch.allclose(token_reference, true_token, rtol=1e-2, atol=1e-4)


def _rows_at(model: TinySequenceModel, weight: nn.Parameter, value: torch.Tensor, tokens, targets) -> torch.Tensor:
    name = "wte" if weight is model.wte.weight else "wpe"
    params = {f"{name}.weight": value}
    logits = torch.func.functional_call(model, params, (tokens,))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") / targets.numel()


def _directional_derivatives(model, weight, noise, tokens, targets) -> torch.Tensor:
    """``(K, N)``: every loss row's derivative along every noise (forward-mode, the test's reference)."""

    def along(direction: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda w: _rows_at(model, weight, w, tokens, targets), (weight.detach(),), (direction,))[
            1
        ]

    return torch.vmap(along, chunk_size=2000)(noise)


def test_factor_and_dense_noise_give_the_same_estimate() -> None:
    torch.manual_seed(0)
    d, indices = torch.randn(7, 10), torch.randint(0, VOCAB, (10,))
    a, b = torch.randn(7, VOCAB, 2), torch.randn(7, DIM, 2)
    from_factors = embedding_row_gradient(d, indices, (a, b), VOCAB)
    dense = embedding_row_gradient(d, indices, a @ b.transpose(1, 2), VOCAB)
    torch.testing.assert_close(from_factors, dense)
    expected = torch.zeros(VOCAB, DIM)
    for n, row in enumerate(indices.tolist()):
        expected[row] += sum(d[k, n] * (a[k] @ b[k].t())[row] for k in range(7)) / 7
    torch.testing.assert_close(from_factors, expected)
    unread = sorted(set(range(VOCAB)) - set(indices.tolist()))
    assert bool((from_factors[unread] == 0).all())


def _estimated(algorithm: EggRoll | OpenES, model: TinySequenceModel, seed: int) -> PopulationEstimator:
    tokens, targets = _batch(seed)
    options = EstimatorOptions.of(algorithm)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)
    population = algorithm.ask(seed)
    loss = lambda: _loss(model, tokens, targets)  # noqa: E731
    estimator.probe_parameter_reads(population, loss)
    fitness = estimator.evaluate_members(population, loss)
    estimator.accumulate_gradient(population, algorithm.tell(population, fitness).coefficients)
    return estimator


@pytest.mark.parametrize("algorithm", [EggRoll, OpenES])
def test_per_row_embeddings_estimate_a_model_without_cross_position_paths_far_better(algorithm: type) -> None:
    """Through the estimator: with positions that never meet, the per-row estimate of the token embedding is
    unbiased and much closer to the true gradient than evolution strategies' estimate of the same population."""
    cosines: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(3):
        tokens, targets = _batch(seed)
        for per_row in (True, False):
            torch.manual_seed(seed)
            model = TinySequenceModel("none")
            (true_token,) = torch.autograd.grad(_loss(model, tokens, targets), [model.wte.weight])
            estimator = _estimated(
                algorithm(
                    population=256,
                    sigma=1e-3,
                    extras=EstimatorExtras(per_row_embeddings=per_row, input_subspace=None),
                ),
                model,
                seed,
            )
            names = {model.wte: "wte", model.wpe: "wpe", model.head: "head"}
            assert {names[layer.module] for layer in estimator.rows.row_local} == (
                {"wte", "wpe", "head"} if per_row else {"head"}
            )
            cosine = F.cosine_similarity(model.wte.weight.grad.flatten(), true_token.flatten(), dim=0)
            cosines[per_row].append(float(cosine))
    # every member also perturbs the head and the position embedding: their effect on each row is the estimate's noise
    mean_with, mean_without = sum(cosines[True]) / 3, sum(cosines[False]) / 3
    assert mean_with > 0.45 and mean_with > 2 * max(mean_without, 0.1), cosines


def test_the_padding_row_is_never_estimated() -> None:
    torch.manual_seed(0)
    model = TinySequenceModel("causal", padding_idx=0)
    estimator = _estimated(
        EggRoll(population=16, extras=EstimatorExtras(per_row_embeddings=True, input_subspace=None)), model, 0
    )
    assert model.wte in {layer.module for layer in estimator.rows.row_local}
    assert bool((model.wte.weight.grad[0] == 0).all())
    assert float(model.wte.weight.grad[1:].abs().sum()) > 0


def test_per_row_embeddings_need_per_row_estimates() -> None:
    with pytest.raises(ValueError, match="per_row_estimates=True"):
        EstimatorExtras(per_row_estimates=False, per_row_embeddings=True)
