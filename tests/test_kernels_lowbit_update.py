"""The fused low-bit update and perturbed-weight kernels against their PyTorch twins; stochastic rounding."""

from __future__ import annotations

import pytest
import torch

from lightning_nobp.kernels.lowbit_grids import GRID_MAX, stochastic_round_to_grid
from lightning_nobp.kernels.lowbit_update import (
    UpdateTerms,
    quantize_into,
    reference_dequantize,
    reference_update,
    triton_update,
)
from lightning_nobp.kernels.perturbed_weight import reference_perturbed_weight, triton_perturbed_weight
from lightning_nobp.kernels.triton_support import interpreting

from lowbit_helpers import KINDS, clone_layout, random_layout

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs Triton with TRITON_INTERPRET=1")


def update_terms(rows: int, cols: int, gaussian: bool) -> UpdateTerms:
    generator = torch.Generator().manual_seed(1)
    return UpdateTerms(
        decay=0.999,
        seeds=torch.tensor([11, 2**62 + 5, 123456789]),
        coefficients=torch.tensor([1e-3, -2e-3, 5e-4]),
        gaussian=gaussian,
        factor_a=torch.randn(rows, 6, generator=generator) * 1e-2,
        factor_b=torch.randn(cols, 6, generator=generator) * 1e-1,
        dense=torch.randn(rows, cols, generator=generator) * 1e-3,
    )


def grid_steps_apart(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """How many grid steps separate two dequantized weights with identical scales (elementwise, rounded)."""
    gap = (a - b).abs()
    magnitude = torch.maximum(a.abs(), b.abs())
    if kind == "int8":
        return gap
    relative_step = 1 / 8 if kind == "fp8_e4m3" else 1 / 2
    return gap / (magnitude * relative_step).clamp_min(1e-30)


@needs_interpreter
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gaussian", [True, False])
def test_fused_update_matches_its_reference_twin(kind: str, gaussian: bool) -> None:
    layout = random_layout(kind, rows=24, cols=96)
    kernel, reference = clone_layout(layout), clone_layout(layout)
    terms = update_terms(24, 96, gaussian)
    triton_update(kernel, terms, rounding_seed=777)
    reference_update(reference, terms, rounding_seed=777)
    assert torch.equal(kernel.scale.view(torch.uint8), reference.scale.view(torch.uint8))
    differ = kernel.qdata.view(torch.uint8) != reference.qdata.view(torch.uint8)
    assert differ.float().mean() <= 1e-4 or differ.sum() <= 1  # a 2304-element tile: at most one element
    # the update really moved the weight, and (for row kinds, whose scale is exact) stayed close to the float sum
    moved = reference_dequantize(reference) - reference_dequantize(layout)
    assert moved.abs().mean() > 1e-4
    if differ.any():
        steps = grid_steps_apart(reference_dequantize(kernel), reference_dequantize(reference), kind)
        assert steps[differ.view(kernel.qdata.shape)[..., : steps.shape[1]]].max() <= 1.01


@needs_interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_weight_kernel_matches_its_twin_and_leaves_storage_alone(kind: str) -> None:
    layout = random_layout(kind, rows=8, cols=64)
    stored = layout.qdata.clone()
    for gaussian in (True, False):
        kernel = triton_perturbed_weight(layout, [5, 9], [1e-2, -3e-3], gaussian, torch.float32)
        reference = reference_perturbed_weight(layout, [5, 9], [1e-2, -3e-3], gaussian, torch.float32)
        assert (kernel - reference).abs().max() <= 1e-6
        assert (reference - reference_dequantize(layout)).abs().mean() > 1e-3
    assert torch.equal(layout.qdata, stored)


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_rounding_is_unbiased_on_every_grid(kind: str) -> None:
    limit = GRID_MAX[kind]
    generator = torch.Generator().manual_seed(0)
    for value in (0.3 * limit, 0.0173 * limit, -0.61 * limit, 1.3):
        draws = torch.full((100_000,), float(value))
        uniform = torch.rand(100_000, generator=generator)
        rounded = stochastic_round_to_grid(draws, uniform, kind)
        assert len(rounded.unique()) == 2  # the two neighbours
        assert abs(float(rounded.mean()) - value) <= 0.01 * abs(value)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_updates_accumulate_with_stochastic_rounding_and_vanish_with_round_to_nearest(kind: str) -> None:
    layout = random_layout(kind, rows=64, cols=256, spread=0.02)  # 16k weights: the mean drift is precise
    start = reference_dequantize(layout)
    row_scale_step = (start.abs().amax(dim=1, keepdim=True) / GRID_MAX[kind]).mean()  # about one grid step
    drift = float(row_scale_step) / 100  # 100x smaller than a grid step
    steps = 200
    stochastic, nearest = clone_layout(layout), clone_layout(layout)
    for step in range(steps):
        reference_update(stochastic, UpdateTerms(dense=torch.full_like(start, drift)), rounding_seed=step)
        values = reference_dequantize(nearest) + drift
        quantize_into(nearest, values, torch.full_like(values, 0.5))
    expected = drift * steps
    measured = float((reference_dequantize(stochastic) - start).mean())
    lost = float((reference_dequantize(nearest) - start).mean())
    assert abs(measured - expected) <= 0.05 * expected
    assert abs(lost) < 0.2 * expected  # round-to-nearest loses the updates
