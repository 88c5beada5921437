"""Counter-based Philox4x32-10 random streams: Triton's generator and a pure-PyTorch twin with the same output.

A stream is a pure function of ``(seed, element index)``: the update kernel regenerates every member's noise in
registers instead of reading it from memory, and the reference twin on the CPU produces the same numbers. Integer
and uniform streams are bit-exact between the two; Gaussian streams agree to a few ulps (``log``/``cos`` differ
between libdevice and torch), see ``docs/lowbit.md``.

On the CPU the reference computes the Philox words in numpy: its ``uint64`` multiplies wrap and shift logically,
which saves the masks torch's signed ``int64`` needs, and makes the streams and the fused low-bit update faster on
the CPU (``python benchmarks/throughput/lowbit.py --device cpu --formats fp8_e4m3`` measures the update; figures in
``docs/results.md``): the stochastic rounding of a low-bit update on the CPU spent most of its time there. Both
paths give the same bits (tested).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_nobp.kernels.triton_support import triton, tl, use_triton

DISTRIBUTIONS = ("gaussian", "rademacher")

_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # 2^-31, as Triton's uint_to_uniform_float writes it

#: compute the reference's Philox words in numpy for CPU tensors (tests switch it off to check the torch path, the
#: one other devices take, on the CPU)
NUMPY_ON_CPU = True


def _mulhilo(constant: int, value: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``constant * value`` for uint32 values held in int64.

    The int64 product wraps modulo 2^64, which keeps both 32-bit words of the (< 2^64) true product intact.
    """
    product = value * constant
    return (product >> 32) & _MASK32, product & _MASK32


def philox_words(seed: int, counters: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four uint32 words (in int64 tensors) of Philox4x32-10 at counter ``(counter_lo, counter_hi, 0, 0)``.

    Args:
        seed: a 64-bit seed; its low and high words are the Philox key, as in ``triton.language.randint4x``.
        counters: int64 counters (any shape).
    """
    counters = counters.to(torch.int64)
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        high_b, low_b = _mulhilo(_ROUND_B, c2)
        high_a, low_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def numpy_philox_words(seed: int, counters: np.ndarray) -> np.ndarray:
    """:func:`philox_words` in numpy: the four words of every counter as a ``uint64`` array ``[len(counters), 4]``.

    A product of two 32-bit words fits ``uint64`` exactly, so its high word is a plain (logical) shift.

    Args:
        seed: a 64-bit seed (the Philox key's low and high words).
        counters: non-negative integer counters (1-D).
    """
    counters = np.asarray(counters, dtype=np.uint64)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    c0, c1 = counters & mask, counters >> shift
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    round_a, round_b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        product_b, product_a = c2 * round_b, c0 * round_a
        high_b, high_a = product_b >> shift, product_a >> shift
        high_b ^= c1
        high_b ^= np.uint64(k0)
        high_a ^= c3
        high_a ^= np.uint64(k1)
        product_b &= mask
        product_a &= mask
        c0, c1, c2, c3 = high_b, product_b, high_a, product_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return np.stack((c0, c1, c2, c3), axis=-1)


def _numpy_uniform(words: np.ndarray) -> Tensor:
    """:func:`_to_uniform` of ``uint64`` words in numpy (``~x`` is the fold of a negative int32 ``x``)."""
    signed = words.astype(np.uint32).view(np.int32)
    folded = signed ^ (signed >> 31)
    return torch.from_numpy(folded.astype(np.float32) * np.float32(_UNIFORM_SCALE))


def _on_numpy(device: torch.device | str) -> bool:
    return NUMPY_ON_CPU and torch.device(device).type == "cpu"


def _to_uniform(word: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float``: reinterpret as int32, fold negatives, scale to [0, 1)."""
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _counter_range(start: int, numel: int, per_call: int) -> tuple[int, int, int]:
    """``(first counter, counters, skip)``: the counters that hold elements ``start .. start+numel-1`` of a stream
    with ``per_call`` elements per counter, and how many elements of the first counter come before ``start``."""
    first = start // per_call
    skip = start - first * per_call
    return first, -(-(skip + numel) // per_call), skip


def _numpy_words_for(seed: int, numel: int, per_call: int, first: int = 0) -> np.ndarray:
    """:func:`_words_for` in numpy: a ``uint64`` array ``[counters, 4]``."""
    count = -(-numel // per_call)
    return numpy_philox_words(seed, np.arange(first, first + count, dtype=np.uint64))


def _words_for(seed: int, numel: int, per_call: int, device: torch.device | str, first: int = 0) -> Tensor:
    """The Philox words of counters ``first .. first + ceil(numel / per_call) - 1``, as int64 ``[counters, 4]``."""
    if _on_numpy(device):  # every word is below 2**32: the same values as int64
        return torch.from_numpy(_numpy_words_for(seed, numel, per_call, first).view(np.int64))
    count = -(-numel // per_call)
    counters = torch.arange(first, first + count, dtype=torch.int64, device=device)
    return torch.stack(philox_words(seed, counters), dim=-1)


def reference_words(seed: int, numel: int, device: torch.device | str = "cpu", start: int = 0) -> Tensor:
    """The uint32 word (in int64) of the uniform stream's elements ``start .. start+numel-1``: element ``i`` is word
    ``i % 4`` of Philox at counter ``i // 4`` (Triton's ``_word(seed, i, 4)``)."""
    first, counters, skip = _counter_range(start, numel, 4)
    return _words_for(seed, 4 * counters, 4, device, first).view(-1)[skip : skip + numel]


def reference_uniform(seed: int, numel: int, device: torch.device | str = "cpu", start: int = 0) -> Tensor:
    """Uniform float32 in [0, 1): element ``i`` (from ``start``) is word ``i % 4`` of Philox at counter ``i // 4``."""
    first, counters, skip = _counter_range(start, numel, 4)
    if _on_numpy(device):
        words = _numpy_words_for(seed, 4 * counters, 4, first).reshape(-1)[skip : skip + numel]
        return _numpy_uniform(words)
    return _to_uniform(_words_for(seed, 4 * counters, 4, device, first).view(-1)[skip : skip + numel])


def reference_normal(seed: int, numel: int, device: torch.device | str = "cpu", start: int = 0) -> Tensor:
    """Standard normal float32: Box-Muller on the word pairs (0, 1) and (2, 3) of counter ``i // 4``.

    Element ``i`` (from ``start``) is the cosine (``i`` even) or sine (``i`` odd) branch of pair ``(i % 4) // 2``.
    """
    first, counters, skip = _counter_range(start, numel, 4)
    words = _words_for(seed, 4 * counters, 4, device, first)
    u1 = _to_uniform(words[:, 0::2]).clamp_min(1.0e-7)  # [counters, 2]: words 0 and 2
    u2 = _to_uniform(words[:, 1::2])  # words 1 and 3
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 6.283185307179586 * u2
    normals = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)  # [counters, 2, 2]
    return normals.view(-1)[skip : skip + numel]


def reference_rademacher(seed: int, numel: int, device: torch.device | str = "cpu", start: int = 0) -> Tensor:
    """+1 or -1: element ``i`` (from ``start``) is bit ``i % 32`` of word ``(i // 32) % 4`` of Philox at counter
    ``i // 128``."""
    first, counters, skip = _counter_range(start, numel, 128)
    words = _words_for(seed, 128 * counters, 128, device, first).view(-1, 1)
    bits = (words >> torch.arange(32, device=words.device)) & 1
    return bits.view(-1)[skip : skip + numel].to(torch.float32).mul_(2.0).sub_(1.0)


def reference_noise(
    seed: int, numel: int, distribution: str, device: torch.device | str = "cpu", start: int = 0
) -> Tensor:
    """The reference stream of ``distribution`` (``"gaussian"`` or ``"rademacher"``), elements ``start ..
    start+numel-1``."""
    if distribution == "gaussian":
        return reference_normal(seed, numel, device, start)
    if distribution == "rademacher":
        return reference_rademacher(seed, numel, device, start)
    raise ValueError(f"unknown distribution {distribution!r}: use one of {DISTRIBUTIONS}")


if triton is not None:

    @triton.jit
    def _word(seed, offsets, PER_CALL: tl.constexpr):
        """Word ``(offsets // (PER_CALL // 4)) % 4`` of Philox at counter ``offsets // PER_CALL``."""
        w0, w1, w2, w3 = tl.randint4x(seed, offsets // PER_CALL)
        lane = (offsets // (PER_CALL // 4)) % 4
        return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))

    @triton.jit
    def uniform_at(seed, offsets):
        """The uniform stream of ``reference_uniform`` at int64 ``offsets``."""
        return tl.uint_to_uniform_float(_word(seed, offsets, 4))

    @triton.jit
    def normal_at(seed, offsets):
        """The Gaussian stream of ``reference_normal`` at int64 ``offsets``."""
        w0, w1, w2, w3 = tl.randint4x(seed, offsets // 4)
        second_pair = (offsets % 4) >= 2
        u1 = tl.uint_to_uniform_float(tl.where(second_pair, w2, w0))
        u2 = tl.uint_to_uniform_float(tl.where(second_pair, w3, w1))
        u1 = tl.maximum(1.0e-7, u1)
        radius = tl.sqrt(-2.0 * tl.log(u1))
        angle = 6.283185307179586 * u2
        return tl.where((offsets % 2) == 0, radius * tl.cos(angle), radius * tl.sin(angle))

    @triton.jit
    def rademacher_at(seed, offsets):
        """The Rademacher stream of ``reference_rademacher`` at int64 ``offsets``."""
        word = _word(seed, offsets, 128)
        bit = (word >> (offsets % 32).to(tl.uint32)) & 1
        return bit.to(tl.float32) * 2.0 - 1.0

    @triton.jit
    def noise_at(seed, offsets, GAUSSIAN: tl.constexpr):
        """One member's noise at ``offsets``: the Gaussian or the Rademacher stream."""
        if GAUSSIAN:
            return normal_at(seed, offsets)
        return rademacher_at(seed, offsets)

    @triton.jit
    def _stream_kernel(out_ptr, seed, numel, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        if KIND == 0:
            values = uniform_at(seed, offsets)
        elif KIND == 1:
            values = normal_at(seed, offsets)
        else:
            values = rademacher_at(seed, offsets)
        tl.store(out_ptr + offsets, values, mask=mask)


_KINDS = {"uniform": 0, "gaussian": 1, "rademacher": 2}


def triton_stream(seed: int, numel: int, kind: str, device: torch.device | str) -> Tensor:
    """The Triton stream ``kind`` (``uniform``, ``gaussian``, ``rademacher``) at offsets 0..numel-1."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use the reference streams)")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    block = 256
    _stream_kernel[(triton.cdiv(numel, block),)](out, seed, numel, KIND=_KINDS[kind], BLOCK=block)
    return out


@torch.library.custom_op("lightning_nobp::philox_noise", mutates_args=())
def _philox_noise_op(seed: int, numel: int, distribution: str, device: torch.device) -> Tensor:
    if use_triton(torch.device(device)):
        return triton_stream(seed, numel, distribution, device)
    return reference_noise(seed, numel, distribution, device)


@_philox_noise_op.register_fake
def _(seed: int, numel: int, distribution: str, device: torch.device) -> Tensor:
    return torch.empty(numel, dtype=torch.float32, device=device)


def philox_noise(seed: int, shape: torch.Size | tuple[int, ...], distribution: str, device: torch.device) -> Tensor:
    """Float32 noise of ``shape`` from the counter stream ``seed`` (element ``i`` at offset ``i``).

    Runs the Triton generator on CUDA and the PyTorch twin elsewhere; both give the same stream. A custom op
    (``lightning_nobp::philox_noise``) with a fake implementation, so it also runs under ``FakeTensorMode``.

    Args:
        seed: the stream's 63-bit seed (see ``derive_seed``).
        shape: the noise shape.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        device: where to generate it.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    return _philox_noise_op(seed, numel, distribution, torch.device(device)).view(shape)
