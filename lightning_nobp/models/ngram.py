"""``ByteNGramModel``: unigram and bigram byte baselines counted from the training split (no optimizer).

It shares the evaluation of ``ByteLanguageModel``, so its bits per byte on the held-out split are computed by the
same code as the GPT's: the figure a byte-level model has to beat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.models.byte_lm import ByteLanguageModel, split_tokens


class ByteNGramModel(ByteLanguageModel):
    """Counts bytes (``order=1``) or byte pairs (``order=2``) over one pass of the training data, add-``smoothing``.

    Train it for one epoch (``trainer.max_epochs: 1``): each training step adds the batch's counts; no gradient,
    no optimizer.

    Args:
        order: 1 for the unigram model, 2 for the bigram model (next byte given the previous one).
        smoothing: pseudo-count added to every count (Laplace smoothing when 1).
    """

    def __init__(self, order: int = 2, smoothing: float = 1.0) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"ByteNGramModel(order={order}): choose 1 (unigram) or 2 (bigram)")
        if smoothing <= 0:
            raise ValueError(f"ByteNGramModel(smoothing={smoothing}): must be > 0 so unseen bytes keep a probability")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.register_buffer("counts", torch.zeros(256, 256, dtype=torch.float64))

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        inputs, targets = split_tokens(batch)
        previous = inputs if self.hparams.order == 2 else torch.zeros_like(inputs)
        pairs = (previous * 256 + targets).flatten()
        self.counts += torch.bincount(pairs, minlength=256 * 256).view(256, 256).to(self.counts)

    def logits(self, inputs: Tensor) -> Tensor:
        smoothed = self.counts + self.hparams.smoothing
        log_probs = (smoothed / smoothed.sum(-1, keepdim=True)).log().float()
        rows = inputs if self.hparams.order == 2 else torch.zeros_like(inputs)
        return log_probs[rows]

    def configure_optimizers(self) -> None:  # type: ignore[override]
        return None
