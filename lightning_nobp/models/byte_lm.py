"""Byte-level language models as LightningModules: the shared evaluation (bits per byte) and the GPT model.

Both ``GPTLanguageModel`` and the n-gram baselines of ``models/ngram.py`` report validation and test bits per byte
through the same code, so their figures on the same ``ByteTextDataModule`` split compare directly.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_nobp.models.bits_per_byte import BitsPerByte
from lightning_nobp.models.gpt import GPT, GPTConfig


def split_tokens(batch: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs ``[:, :-1]`` and next-byte targets ``[:, 1:]`` of a ``(batch, block + 1)`` byte tensor, as int64."""
    tokens = batch.long()
    return tokens[:, :-1], tokens[:, 1:]


class ByteLanguageModel(pl.LightningModule):
    """Base class: ``logits(inputs)`` gives next-byte logits; validation/test log ``val_bpb``/``test_bpb``."""

    held_out_metric = "test_bpb"

    def __init__(self) -> None:
        super().__init__()
        self.val_bpb = BitsPerByte()
        self.test_bpb = BitsPerByte()

    def logits(self, inputs: Tensor) -> Tensor:
        """Next-byte logits ``(batch, time, 256)`` for input bytes ``(batch, time)``."""
        raise NotImplementedError

    def _evaluate(self, batch: Tensor, metric: BitsPerByte, name: str) -> None:
        inputs, targets = split_tokens(batch)
        metric(self.logits(inputs), targets)
        self.log(name, metric, prog_bar=True, batch_size=inputs.shape[0])

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.val_bpb, "val_bpb")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.test_bpb, "test_bpb")


class GPTLanguageModel(ByteLanguageModel):
    """A byte-level GPT (``models/gpt.py``) trained on next-byte cross-entropy; reports bits per byte.

    Args:
        preset: size of the model: ``"tiny"``, ``"small"``, ``"gpt-100m"`` or ``"gpt-1b"``.
        block_size: longest context (the data module's ``block_size``); ``None`` keeps the preset's.
        n_layer: transformer blocks (``None`` keeps the preset's).
        n_head: attention heads (``None`` keeps the preset's).
        n_embd: residual width (``None`` keeps the preset's).
        dropout: dropout probability.
        attention: ``"sdpa"`` (fused kernels) or ``"math"`` (batches a whole ES population under ``vmap`` on CPU).
        alibi_slope: the first attention head's ALiBi slope (each next head's is ``2 ** (-8 / n_head)`` times
            smaller): every head's scores fall linearly with the distance to the key, so attention prefers recent
            bytes from the first step on. ``None``: no ALiBi (learned position embeddings only).
        tie_weights: share the output head's weight with the token embedding (``False``: a separate head, which
            ``NoBackpropStrategy`` can estimate from per-row losses).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: peak learning rate.
        weight_decay: weight decay of the optimizer.
        momentum: SGD momentum (``NoBackpropStrategy(update="direct")`` keeps its buffer in the optimizer state).
        betas: Adam's moment decay rates.
        warmup_steps: linear warm-up steps (0: none).
        decay_steps: steps of a cosine decay to ``min_lr_ratio * lr`` after warm-up (0: constant).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay_over_max_time: run the cosine decay over the Trainer's ``max_time`` instead of ``decay_steps``: its
            progress is the training time spent over the budget (Lightning's ``Timer``, restored on resume), so the
            learning rate anneals by the end of the budget on a fast machine and on a slow one alike. Needs
            ``Trainer(max_time=...)``; the schedule then depends on the machine's speed.
    """

    def __init__(
        self,
        preset: str = "small",
        block_size: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        dropout: float = 0.0,
        attention: str = "sdpa",
        alibi_slope: float | None = None,
        tie_weights: bool = True,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        decay_steps: int = 0,
        min_lr_ratio: float = 0.1,
        decay_over_max_time: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        overrides = dict(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        config = GPTConfig.preset(
            preset,
            dropout=dropout,
            attention=attention,
            alibi_slope=alibi_slope,
            tie_weights=tie_weights,
            **{k: v for k, v in overrides.items() if v is not None},
        )
        self.model = GPT(config)

    def logits(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        inputs, targets = split_tokens(batch)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # type: ignore[override]
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer={hp.optimizer!r}: choose 'adam', 'adamw' or 'sgd'")
        timer = self._budget_timer() if hp.decay_over_max_time else None
        if hp.warmup_steps <= 0 and hp.decay_steps <= 0 and timer is None:
            return opt

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if timer is not None:
                spent = timer.time_elapsed("train")
                progress = min(1.0, spent / max(spent + timer.time_remaining("train"), 1e-9))
                # rank 0's clock for every process: their updates must stay identical
                progress = self.trainer.strategy.broadcast(progress)
            elif hp.decay_steps <= 0:
                return 1.0
            else:
                progress = min(1.0, (step - hp.warmup_steps) / hp.decay_steps)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _budget_timer(self) -> Timer:
        """The Trainer's ``Timer`` (it exists when ``max_time`` is set), for ``decay_over_max_time``."""
        trainer = self._trainer
        timer = None if trainer is None else next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining("train") is None:
            raise ValueError(
                "GPTLanguageModel(decay_over_max_time=True) decays the learning rate over the Trainer's time budget:"
                " set Trainer(max_time=...) (e.g. --trainer.max_time 00:00:10:00), or use decay_steps instead"
            )
        return timer
