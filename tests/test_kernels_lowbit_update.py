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


def group_terms(rows: int, cols: int, gaussian: bool, parts: str) -> UpdateTerms:
    """Terms with some of: ``s`` three noise streams, ``l`` a rank-3 term, ``1`` a rank-1 term, ``d`` a dense term."""
    generator = torch.Generator().manual_seed(rows * cols)
    rank = 1 if "1" in parts else 3
    low_rank = "l" in parts or "1" in parts
    return UpdateTerms(
        decay=0.999,
        seeds=torch.tensor([11, 2**62 + 5, 123]) if "s" in parts else None,
        coefficients=torch.tensor([1e-3, -2e-3, 5e-4]) if "s" in parts else None,
        gaussian=gaussian,
        factor_a=torch.randn(rows, rank, generator=generator) * 1e-2 if low_rank else None,
        factor_b=torch.randn(cols, rank, generator=generator) * 1e-1 if low_rank else None,
        dense=torch.randn(rows, cols, generator=generator) * 1e-3 if "d" in parts else None,
    )


@needs_interpreter
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gaussian", [True, False])
def test_grouped_update_is_one_launch_bit_identical_to_the_twin(kind: str, gaussian: bool) -> None:
    """Weights of different widths (both row-tile widths of a launch) and terms, in one launch: every weight gets
    the bits the twin gives it alone (scales and codes), and moved."""
    from lightning_nobp.kernels.lowbit_update import triton_grouped_update

    if kind in ("fp8_e4m3", "int8"):
        shapes = [(24, 96), (5, 32), (3, 256), (40, 64)]
    else:
        shapes = [(24, 96), (5, 32), (3, 256), (17, 320)]
    parts = ["sld", "s", "1d", "l"]
    layouts = [random_layout(kind, rows, cols, seed=i) for i, (rows, cols) in enumerate(shapes)]
    kernel, reference = [clone_layout(x) for x in layouts], [clone_layout(x) for x in layouts]
    terms = [group_terms(rows, cols, gaussian, p) for (rows, cols), p in zip(shapes, parts)]
    triton_grouped_update(kernel, terms, [5, 6, 7, 8])
    for layout, term, seed in zip(reference, terms, [5, 6, 7, 8]):
        reference_update(layout, term, seed)
    for k, r, start in zip(kernel, reference, layouts):
        assert torch.equal(k.scale.view(torch.uint8), r.scale.view(torch.uint8))
        assert torch.equal(k.qdata.view(torch.uint8), r.qdata.view(torch.uint8))
        assert (reference_dequantize(r) - reference_dequantize(start)).abs().mean() > 1e-4


@needs_interpreter
@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_rows_off_the_philox_counters_take_the_per_element_streams(kind: str) -> None:
    """A row width not divisible by 4 (rows do not start on a Philox counter): the same bits as the twin."""
    from lightning_nobp.kernels.lowbit_update import triton_grouped_update

    layouts = [random_layout(kind, 6, 33, seed=1), random_layout(kind, 4, 16, seed=2)]
    kernel, reference = [clone_layout(x) for x in layouts], [clone_layout(x) for x in layouts]
    terms = [group_terms(6, 33, True, "sld"), group_terms(4, 16, True, "s")]
    triton_grouped_update(kernel, terms, [3, 4])
    for layout, term, seed in zip(reference, terms, [3, 4]):
        reference_update(layout, term, seed)
    for k, r in zip(kernel, reference):
        assert torch.equal(k.scale, r.scale) and torch.equal(k.qdata.view(torch.uint8), r.qdata.view(torch.uint8))


def test_grouped_update_takes_one_group_per_kind_and_distribution() -> None:
    from lightning_nobp.kernels.lowbit_update import grouped_update

    layouts = [random_layout(k, 8, 64, seed=i) for i, k in enumerate(["fp8_e4m3", "fp8_e4m3", "nvfp4", "int8"])]
    alone = [clone_layout(x) for x in layouts]
    terms = [group_terms(8, 64, True, "sd") for _ in layouts]
    terms[1] = group_terms(8, 64, False, "s")
    assert grouped_update([(x, t, i) for i, (x, t) in enumerate(zip(layouts, terms))]) == 4
    for i, (x, t) in enumerate(zip(alone, terms)):
        reference_update(x, t, i)
    assert all(torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) for a, b in zip(layouts, alone))
    same = [clone_layout(x) for x in layouts[:2]]
    assert grouped_update([(x, group_terms(8, 64, True, "s"), 0) for x in same]) == 1


def test_a_row_too_wide_for_the_registers_is_refused_with_the_fix() -> None:
    from lightning_nobp.kernels import lowbit_update

    if lowbit_update.triton is None:
        pytest.skip("needs Triton")
    with pytest.raises(ValueError, match="store it in bf16"):
        lowbit_update._row_widths([64, lowbit_update.MAX_ROW_WIDTH + 1])
