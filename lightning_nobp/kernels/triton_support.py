"""Optional Triton: the kernels' one switch between a Triton launch and the pure-PyTorch reference twin.

Triton is an optional dependency (``pip install lightning-nobp[lowbit]``). Kernels run on CUDA devices; everywhere
else the reference twin runs. Tests run the Triton kernels on CPU tensors with ``TRITON_INTERPRET=1`` (set before
the first import of this package).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # pragma: no cover - exercised by the environment, not by a branch of our code
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton: Any = None  # type: ignore[no-redef]
    tl: Any = None  # type: ignore[no-redef]


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether a kernel for tensors on ``device`` runs as Triton (CUDA with Triton installed) or as the reference."""
    return triton is not None and device.type == "cuda" and not interpreting()
