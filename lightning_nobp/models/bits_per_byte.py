"""``BitsPerByte``: a torchmetrics metric, the mean next-byte cross-entropy in bits over every predicted byte."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class BitsPerByte(Metric):
    """Mean negative log-likelihood per predicted byte, in bits (``nats / ln 2``), summed over batches and processes.

    ``update(logits, targets)`` takes logits ``(..., vocab)`` and byte targets ``(...)``; every target counts
    once, so batches of different sizes are weighted by their bytes.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor) -> None:
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(), reduction="sum"
        )
        self.nats += nll.double()
        self.count += targets.numel()

    def compute(self) -> Tensor:
        return (self.nats / self.count.clamp(min=1) / math.log(2)).float()
