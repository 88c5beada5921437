"""Shared fixtures: backprop banned, two CPU threads, Triton interpreter without a GPU, quiet Trainers."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; must be set before lightning_nobp defines them
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)


class BackpropCalled(AssertionError):
    """Raised when a test that bans backpropagation sees a backward pass."""


@pytest.fixture
def no_backprop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way into autograd's backward pass raise."""

    def banned(*args: Any, **kwargs: Any) -> None:
        raise BackpropCalled("backpropagation was called")

    monkeypatch.setattr(torch.Tensor, "backward", banned)
    monkeypatch.setattr(torch.autograd, "backward", banned)
    monkeypatch.setattr(torch.autograd, "grad", banned)


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Trainer arguments for fast CPU tests: no logger, no checkpoints, no progress bar."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
