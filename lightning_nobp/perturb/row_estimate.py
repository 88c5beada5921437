"""The gradient of a row-local layer (``find_row_local_layers``) from its members' per-row losses.

With antithetic pairs ``k`` and per-row loss contributions ``c_{k,n}``, ``d_{k,n} = (c+ - c-) / (2 sigma)`` is
the change of loss row ``n`` along the member's perturbation. For a row-local ``nn.Linear`` that perturbation
moves output row ``n`` by ``u_{k,n} = E_k h_n + e_k`` (``h_n``: the layer's input row, ``E_k = A_k B_k^T`` its
weight noise, ``e_k`` its bias noise), so ``d_{k,n} ~ u_{k,n} . g_n`` with ``g_n`` the loss row's gradient at the
layer's output, and ``E[u u^T] = (|h_n|^2 + 1) I``. Hence

    g_n ~ sum_k d_{k,n} u_{k,n} / (K (|h_n|^2 + 1)),    dL/dW ~ sum_n g_n h_n^T,    dL/db ~ sum_n g_n,

an unbiased estimate whose noise is that of estimating an ``out``-dimensional ``g_n`` from ``K`` directions (small
when ``out <= K``: a classifier's head), instead of an ``out * in``-dimensional gradient from ``K`` scalars.
"""

from __future__ import annotations

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
