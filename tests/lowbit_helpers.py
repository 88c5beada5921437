"""Low-bit layouts for kernel tests, built through the package's own quantization."""

from __future__ import annotations

import torch

from lightning_nobp.kernels.lowbit_update import LowBitLayout
from lightning_nobp.lowbit import layout_of, quantize_weight

KINDS = ("fp8_e4m3", "int8", "nvfp4", "mxfp4")


def random_layout(kind: str, rows: int = 16, cols: int = 64, seed: int = 0, spread: float = 0.05) -> LowBitLayout:
    """A freshly quantized random weight of ``kind``, with rows of different magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * spread
    weight *= torch.logspace(-1, 1, rows).unsqueeze(1)  # rows differ in scale
    return layout_of(quantize_weight(weight, kind))


def clone_layout(layout: LowBitLayout) -> LowBitLayout:
    per_tensor = None if layout.per_tensor_scale is None else layout.per_tensor_scale.clone()
    return LowBitLayout(layout.kind, layout.qdata.clone(), layout.scale.clone(), per_tensor)
