"""Counter-based seeds: every random direction is a pure function of integer counters.

A direction is never stored. It is regenerated from ``derive_seed(base_seed, step, micro_batch, member, ...)``
whenever it is needed, so every process agrees on it, a resumed run draws the same directions as an
uninterrupted one, and a whole run can be replayed from its seeds and fitness scalars.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> int:
    """One round of SplitMix64, a well-mixed bijection on 64-bit integers."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mixed_state(counters: tuple[int, ...]) -> int:
    """The SplitMix64 state after absorbing ``counters`` (``derive_seed`` before its final shift)."""
    state = 0x243F6A8885A308D3  # arbitrary non-zero start (digits of pi)
    for counter in counters:
        if counter < 0:
            raise ValueError(f"seed counters must be non-negative integers, got {counters}")
        state = _splitmix64(state ^ (counter & _MASK64))
    return state


def derive_seed(*counters: int) -> int:
    """Hash a tuple of non-negative integer counters into a 63-bit seed.

    Args:
        *counters: integers such as (base seed, global step, micro-batch, member, parameter index).

    Returns:
        A seed in ``[0, 2**63)``, suitable for ``torch.Generator.manual_seed``. Different counter tuples give
        unrelated seeds; the same tuple always gives the same seed, on every machine and process.
    """
    return _mixed_state(counters) >> 1


# SplitMix64's constants as numpy unsigned integers: numpy's uint64 wraps and shifts logically, so a whole array of
# states mixes in a few operations with the same bits as ``_splitmix64``
_NP_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_NP_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_NP_MIX2 = np.uint64(0x94D049BB133111EB)


def _np_mix_(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a numpy ``uint64`` array, in place."""
    z ^= z >> np.uint64(30)
    z *= _NP_MIX1
    z ^= z >> np.uint64(27)
    z *= _NP_MIX2
    z ^= z >> np.uint64(31)
    return z


def derive_seed_range(*prefix: int, count: int) -> list[int]:
    """``[derive_seed(*prefix, i) for i in range(count)]`` with the last round computed for all ``i`` at once
    (numpy's wrapping ``uint64``: the same bits), e.g. the noise seeds of a population's members.

    Args:
        *prefix: the leading counters (base seed, step, ...).
        count: how many consecutive final counters, from 0.
    """
    z = np.arange(count, dtype=np.uint64) ^ np.uint64(_mixed_state(prefix))
    z += _NP_GOLDEN_GAMMA
    return (_np_mix_(z) >> np.uint64(1)).tolist()
