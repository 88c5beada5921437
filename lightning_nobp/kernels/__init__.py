"""Kernels and their pure-PyTorch reference twins (stochastic rounding for now)."""

from lightning_nobp.kernels.stochastic_rounding import stochastic_round

__all__ = ["stochastic_round"]
