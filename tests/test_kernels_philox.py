"""Philox streams: the Triton kernels (interpreter on CPU) against their PyTorch twins."""

from __future__ import annotations

import pytest
import torch

from lightning_nobp.kernels.philox import philox_noise, reference_noise, reference_uniform, triton_stream
from lightning_nobp.kernels.triton_support import interpreting

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs Triton with TRITON_INTERPRET=1")
SEEDS = [0, 7, 2**62 + 12345, 2**63 - 1]


@needs_interpreter
@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_and_rademacher_streams_are_bit_exact(seed: int) -> None:
    numel = 515  # not a multiple of the 4 or 128 values one Philox call yields
    assert torch.equal(triton_stream(seed, numel, "uniform", "cpu"), reference_uniform(seed, numel))
    assert torch.equal(triton_stream(seed, numel, "rademacher", "cpu"), reference_noise(seed, numel, "rademacher"))


@needs_interpreter
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_gaussian_stream_agrees_to_float_rounding(seed: int) -> None:
    kernel = triton_stream(seed, 1024, "gaussian", "cpu")
    reference = reference_noise(seed, 1024, "gaussian")
    assert (kernel - reference).abs().max() < 1e-5


def test_streams_have_the_right_distribution_and_depend_on_the_seed() -> None:
    normal = reference_noise(3, 200_000, "gaussian")
    assert abs(float(normal.mean())) < 0.01 and abs(float(normal.std()) - 1.0) < 0.01
    signs = reference_noise(3, 200_000, "rademacher")
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(float(signs.mean())) < 0.01
    uniform = reference_uniform(3, 200_000)
    assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0 and abs(float(uniform.mean()) - 0.5) < 0.01
    assert not torch.equal(reference_noise(4, 1000, "gaussian"), normal[:1000])
    # a prefix of a longer stream is the shorter stream: element i depends only on (seed, i)
    assert torch.equal(reference_noise(3, 1000, "gaussian"), normal[:1000])


def test_philox_noise_has_the_requested_shape_and_rejects_unknown_distributions() -> None:
    assert philox_noise(1, (3, 5), "gaussian", torch.device("cpu")).shape == (3, 5)
    with pytest.raises(ValueError, match="gaussian"):
        philox_noise(1, (3,), "uniformish", torch.device("cpu"))


@pytest.mark.parametrize("seed", SEEDS)
def test_numpy_reference_equals_the_torch_reference_bit_for_bit(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU computes the reference's words in numpy; other devices take the torch path: the same bits."""
    import numpy as np

    from lightning_nobp.kernels import philox

    numel = 1027  # not a multiple of the 4 or 128 values one Philox call yields
    on_numpy = {kind: reference_noise(seed, numel, kind) for kind in ("gaussian", "rademacher")}
    on_numpy["uniform"] = reference_uniform(seed, numel)
    monkeypatch.setattr(philox, "NUMPY_ON_CPU", False)
    assert torch.equal(on_numpy["uniform"], reference_uniform(seed, numel))
    for kind in ("gaussian", "rademacher"):
        assert torch.equal(on_numpy[kind], reference_noise(seed, numel, kind)), kind
    # counters whose high word is set (a stream longer than 2**34 elements): the high word enters Philox too
    counters = np.array([0, 1, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3], dtype=np.uint64)
    words = torch.stack(philox.philox_words(seed, torch.from_numpy(counters.view(np.int64))), dim=-1)
    assert torch.equal(torch.from_numpy(philox.numpy_philox_words(seed, counters).view(np.int64)), words)
    assert not torch.equal(words[3], words[0])  # counter 2**32 is not counter 0
