"""The gradient of a row-local layer (``find_row_local_layers``) from its members' per-row losses.

With antithetic pairs ``k`` and per-row loss contributions ``c_{k,n}``, ``d_{k,n} = (c+ - c-) / (2 sigma)`` is
the change of loss row ``n`` along the member's perturbation. For a row-local ``nn.Linear`` that perturbation
moves output row ``n`` by ``u_{k,n} = E_k h_n + e_k`` (``h_n``: the layer's input row, ``E_k = A_k B_k^T`` its
weight noise, ``e_k`` its bias noise), so ``d_{k,n} ~ u_{k,n} . g_n`` with ``g_n`` the loss row's gradient at the
layer's output, and ``E[u u^T] = (|h_n|^2 + 1) I``. Hence

    g_n ~ sum_k d_{k,n} u_{k,n} / (K (|h_n|^2 + 1)),    dL/dW ~ sum_n g_n h_n^T,    dL/db ~ sum_n g_n,

an unbiased estimate whose noise is that of estimating an ``out``-dimensional ``g_n`` from ``K`` directions (small
when ``out <= K``: a classifier's head), instead of an ``out * in``-dimensional gradient from ``K`` scalars.

An ``nn.Embedding`` of a causal sequence model moves output row ``n`` by ``u_{k,n} = E_k[i_n]`` (row ``i_n`` of its
noise, ``i_n`` the token or position index), which reaches loss row ``n`` directly and later rows through
attention. The same sum ``g_n ~ sum_k d_{k,n} E_k[i_n] / K`` then measures ``sum_m dL_n/dx_m`` over the positions
``m`` that read the same embedding row as ``n`` (the position ``n`` itself included: ``E[E_k[i] E_k[j]^T] = 0``
for ``i != j``), and ``dL/dW[v] ~ sum_{n: i_n = v} g_n``: exact for the paths from an embedding row to the losses
at the positions that read it, with the paths to the losses of other positions left out. A biased estimate, with
the noise of a ``dim``-dimensional one instead of evolution strategies' ``vocab * dim``-dimensional one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_local_gradient(
    differences: Tensor,
    inputs: Tensor,
    weight_noise: tuple[Tensor, Tensor] | Tensor,
    bias_noise: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Estimate a row-local ``nn.Linear``'s gradient from per-row directional derivatives.

    Args:
        differences: ``d`` ``(K, N)``: ``(c+ - c-) / (2 sigma)`` per antithetic pair and loss row.
        inputs: ``h`` ``(N, in)``: the layer's unperturbed input rows.
        weight_noise: the pairs' weight noise: factors ``(A (K, out, r), B (K, in, r))`` with ``E = A B^T``, or
            dense ``E`` ``(K, out, in)``.
        bias_noise: the pairs' bias noise ``e`` ``(K, out)``, or ``None`` (no trained bias).

    Returns:
        ``(dL/dW (out, in), dL/db (out,) or None)`` in float32.
    """
    d = differences.float()
    h = inputs.float()
    pairs, rows = d.shape
    if isinstance(weight_noise, tuple):
        a, b = (factor.float() for factor in weight_noise)
        rank = a.shape[-1]
        # one matrix product each: B_k^T h_n for every pair, then sum_k d_{k,n} (B_k^T h_n) A_k^T
        projected = (h @ b.permute(1, 0, 2).reshape(b.shape[1], pairs * rank)).view(rows, pairs, rank)
        weighted = (projected * d.t().unsqueeze(-1)).reshape(rows, pairs * rank)
        row_gradients = weighted @ a.permute(0, 2, 1).reshape(pairs * rank, a.shape[1])
    else:
        noise = weight_noise.float()  # (K, out, in)
        moved = (h @ noise.permute(2, 0, 1).reshape(noise.shape[2], -1)).view(rows, pairs, noise.shape[1])
        row_gradients = (moved * d.t().unsqueeze(-1)).sum(1)
    variance = h.square().sum(1)
    if bias_noise is not None:
        row_gradients = row_gradients + d.t() @ bias_noise.float()
        variance = variance + 1.0
    row_gradients = row_gradients / (len(d) * variance.clamp_min(1e-12)).unsqueeze(1)
    weight_gradient = row_gradients.t() @ h
    return weight_gradient, (row_gradients.sum(0) if bias_noise is not None else None)


def embedding_row_gradient(
    differences: Tensor, indices: Tensor, weight_noise: tuple[Tensor, Tensor] | Tensor, num_embeddings: int
) -> Tensor:
    """Estimate a causal model's ``nn.Embedding`` gradient from per-row directional derivatives (see above).

    Args:
        differences: ``d`` ``(K, N)``: ``(c+ - c-) / (2 sigma)`` per antithetic pair and loss row.
        indices: ``(N,)``: the embedding row each loss row's position read (int64).
        weight_noise: the pairs' noise: factors ``(A (K, num_embeddings, r), B (K, dim, r))`` with ``E = A B^T``,
            or dense ``E`` ``(K, num_embeddings, dim)``.
        num_embeddings: rows of the embedding.

    Returns:
        ``dL/dW`` ``(num_embeddings, dim)`` in float32; rows no position read are zero.
    """
    d = differences.float()
    pairs = d.shape[0]
    if isinstance(weight_noise, tuple):
        a, b = (factor.float() for factor in weight_noise)
        rank = a.shape[-1]
        # sum_k d_{k,n} A_k[i_n] B_k^T as one matrix product over (pair, rank)
        picked = a[:, indices, :] * d.unsqueeze(-1)  # (K, N, r)
        weighted = picked.permute(1, 0, 2).reshape(len(indices), pairs * rank)
        row_gradients = weighted @ b.permute(0, 2, 1).reshape(pairs * rank, b.shape[1])
    else:
        noise = weight_noise.float()  # (K, num_embeddings, dim)
        row_gradients = torch.einsum("kn,knd->nd", d, noise[:, indices, :])
    row_gradients = row_gradients / pairs
    gradient = row_gradients.new_zeros(num_embeddings, row_gradients.shape[1])
    return gradient.index_add_(0, indices, row_gradients)
