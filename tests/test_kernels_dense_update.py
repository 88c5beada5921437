"""The fused dense update and perturbed copy of bf16/float32 weights against their PyTorch twins."""

from __future__ import annotations

import pytest
import torch

from lightning_nobp.kernels import dense_update
from lightning_nobp.kernels.dense_update import (
    dense_perturbed,
    dense_update_,
    reference_dense_perturbed,
    reference_dense_update_,
    round_to_bf16,
    triton_dense_perturbed,
    triton_dense_update_,
)
from lightning_nobp.kernels.lowbit_update import UpdateTerms
from lightning_nobp.kernels.philox import reference_noise, reference_words
from lightning_nobp.kernels.triton_support import interpreting

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs Triton with TRITON_INTERPRET=1")


def terms(rows: int, cols: int, gaussian: bool = True, parts: str = "sld") -> UpdateTerms:
    generator = torch.Generator().manual_seed(1)
    return UpdateTerms(
        decay=0.999,
        seeds=torch.tensor([11, 2**62 + 5, 123456789]) if "s" in parts else None,
        coefficients=torch.tensor([1e-3, -2e-3, 5e-4]) if "s" in parts else None,
        gaussian=gaussian,
        factor_a=torch.randn(rows, 4, generator=generator) * 1e-2 if "l" in parts else None,
        factor_b=torch.randn(cols, 4, generator=generator) * 1e-1 if "l" in parts else None,
        dense=torch.randn(rows, cols, generator=generator) * 1e-3 if "d" in parts else None,
    )


def weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gaussian", [True, False])
@pytest.mark.parametrize("parts", ["sld", "s", "l", "d"])
def test_fused_dense_update_is_bit_identical_to_its_twin(dtype, gaussian, parts) -> None:
    kernel, reference = weight(24, 96, dtype), weight(24, 96, dtype)
    update = terms(24, 96, gaussian, parts)
    triton_dense_update_(kernel, update, rounding_seed=777)
    reference_dense_update_(reference, update, rounding_seed=777)
    if gaussian and "s" in parts:
        # Gaussian streams agree to a few ulps (libdevice's log/cos against torch's): a rounding decision may flip
        assert (kernel != reference).float().mean() <= (0.05 if dtype == torch.bfloat16 else 0.5)
        torch.testing.assert_close(
            kernel.float(), reference.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7
        )
    else:
        assert torch.equal(kernel, reference) and kernel.view(-1).view(torch.uint8).equal(
            reference.view(-1).view(torch.uint8)
        )
    assert not torch.equal(reference, weight(24, 96, dtype))  # the update moved the weight


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gaussian", [True, False])
def test_perturbed_copy_is_bit_identical_to_its_twin(dtype, gaussian) -> None:
    w = weight(16, 40, dtype)
    seeds, scales = torch.tensor([5, 2**61 + 3]), torch.tensor([1e-2, -1e-2])
    kernel = triton_dense_perturbed(w, seeds, scales, gaussian)
    reference = reference_dense_perturbed(w, seeds, scales, gaussian)
    if gaussian:  # a few ulps apart before the cast (see above)
        assert (kernel != reference).float().mean() <= (0.05 if dtype == torch.bfloat16 else 0.5)
        torch.testing.assert_close(
            kernel.float(), reference.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7
        )
    else:
        assert torch.equal(kernel, reference)
    assert torch.equal(w, weight(16, 40, dtype))  # a copy: the weight is untouched


def test_twin_blocks_give_the_values_of_one_pass(monkeypatch) -> None:
    """Blocks of rows read each stream at the right offsets: the result equals the update formed densely."""
    rows, cols = 37, 50
    update = terms(rows, cols, parts="sld")
    w = weight(rows, cols, torch.float32)
    expected = w * torch.tensor(0.999)
    for seed, coefficient in zip(update.seeds.tolist(), update.coefficients.tolist()):
        expected = expected + torch.tensor(coefficient) * reference_noise(seed, rows * cols, "gaussian").view(
            rows, cols
        )
    expected = expected + update.factor_a @ update.factor_b.T + update.dense
    monkeypatch.setattr(dense_update, "TWIN_BLOCK_ELEMENTS", 3 * cols + 7)  # blocks of 3 rows, last one short
    reference_dense_update_(w, update, rounding_seed=1)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
    copy = reference_dense_perturbed(weight(rows, cols, torch.float32), update.seeds, update.coefficients, True)
    monkeypatch.setattr(dense_update, "TWIN_BLOCK_ELEMENTS", 1 << 20)
    whole = reference_dense_perturbed(weight(rows, cols, torch.float32), update.seeds, update.coefficients, True)
    assert torch.equal(copy, whole)


def test_bf16_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    values = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16 (1 + 2^-7)
    words = reference_words(3, values.numel())
    rounded = round_to_bf16(values, words).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, abs=2e-5)
    huge = round_to_bf16(torch.tensor([1e39, -1e39]), torch.tensor([2**32 - 1, 2**32 - 1]))
    assert torch.isfinite(huge).all()  # clamped to the largest bf16, never inf


def test_nearest_bf16_is_torchs_cast() -> None:
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(4)) * 10
    values[:3] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)])  # ties go to even
    assert torch.equal(dense_update.nearest_bf16(values), values.to(torch.bfloat16))


def test_custom_ops_run_under_fake_tensors_without_allocating() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")
        dense_update_(w, UpdateTerms(decay=1.0, seeds=torch.tensor([1]), coefficients=torch.tensor([1e-3])), 5)
        copy = dense_perturbed(w, torch.tensor([1]), torch.tensor([1e-3]), True)
    assert copy.shape == w.shape and copy.device.type == "cuda" and copy.dtype == torch.bfloat16


def test_bad_dtype_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match="bf16 or float32"):
        dense_update_(torch.zeros(2, 2, dtype=torch.float16), UpdateTerms(), 0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_update_is_one_launch_bit_identical_to_the_twin(dtype) -> None:
    """A table of weights of different shapes and terms: one launch, each weight as the twin updates it alone."""
    from lightning_nobp.kernels.dense_update import triton_grouped_dense_update_

    shapes = [(24, 96), (7, 33), (130,), (16, 16)]
    parts = ["sld", "s", "s", "l"]
    kernel = [weight(*(s if len(s) == 2 else (s[0], 1)), dtype).view(s) for s in shapes]
    reference = [w.clone() for w in kernel]
    updates = []
    for shape, part in zip(shapes, parts):
        rows, cols = shape[0], (shape[1] if len(shape) == 2 else 1)
        updates.append(terms(rows, cols, gaussian=False, parts=part))
    triton_grouped_dense_update_(kernel, updates, [5, 6, 7, 8])
    for w, update, seed in zip(reference, updates, [5, 6, 7, 8]):
        reference_dense_update_(w, update, seed)
    for k, r, start in zip(
        kernel, reference, [weight(*(s if len(s) == 2 else (s[0], 1)), dtype).view(s) for s in shapes]
    ):
        assert torch.equal(k, r)
        assert not torch.equal(k, start)


def test_grouped_update_counts_one_call_per_group() -> None:
    from lightning_nobp.kernels.dense_update import grouped_dense_update_

    bf16 = [weight(8, 8, torch.bfloat16) for _ in range(3)]
    fp32 = [weight(8, 8, torch.float32) for _ in range(2)]
    single = [w.clone() for w in bf16 + fp32]
    update = terms(8, 8, gaussian=True, parts="s")
    launches = grouped_dense_update_([(w, update, i) for i, w in enumerate(bf16 + fp32)])
    assert launches == 2  # one per dtype
    for i, (w, alone) in enumerate(zip(bf16 + fp32, single)):
        dense_update_(alone, update, i)
        assert torch.equal(w, alone)
