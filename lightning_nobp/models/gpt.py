"""``GPT``: a small byte-level decoder-only transformer (nanoGPT/litgpt style) for recipes and benchmarks.

A plain ``torch.nn.Module``: pre-LayerNorm blocks, causal self-attention through
``scaled_dot_product_attention``, a 4x GELU MLP, learned position embeddings and an output head tied to the
token embedding. Bytes are the tokens, so the vocabulary is 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt-100m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt-1b": dict(n_layer=22, n_head=16, n_embd=2048, block_size=1024),
}


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`.

    Parameter count with ``bias=False`` and tied embeddings: ``12 * n_layer * n_embd**2`` in the blocks, plus
    ``(vocab_size + block_size) * n_embd`` embeddings, plus ``(2 * n_layer + 1) * n_embd`` LayerNorm weights.
    The presets come to: ``"tiny"`` 0.12M, ``"small"`` 0.85M, ``"gpt-100m"`` 85.9M and ``"gpt-1b"``
    1,110,009,856 (22 layers of width 2048: the 1.11B-parameter GPT of the reference anchors in DESIGN.md).

    Args:
        vocab_size: number of token ids (256 for bytes).
        block_size: longest sequence the position embedding covers.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout probability on attention weights and residual branches (0 disables it).
        bias: whether Linear and LayerNorm layers have a bias.
        tie_weights: whether the output head shares its weight with the token embedding.
        attention: ``"sdpa"`` (``scaled_dot_product_attention``, fused kernels) or ``"math"`` (explicit matmul,
            mask and softmax: every op has a ``torch.func.vmap`` batching rule, so a whole ES population runs as one
            batched forward on CPU, where the fused CPU kernel falls back to one member at a time).
    """

    vocab_size: int = 256
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    tie_weights: bool = True
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"GPTConfig: attention={self.attention!r}: choose 'sdpa' or 'math'")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> GPTConfig:
        """A named size: ``"tiny"``, ``"small"``, ``"gpt-100m"`` or ``"gpt-1b"``.

        Args:
            name: the preset's name.
            **overrides: fields to change, e.g. ``dropout=0.1``.
        """
        if name not in _PRESETS:
            raise ValueError(f"GPTConfig.preset({name!r}): choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})  # type: ignore[arg-type]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends to itself and earlier positions only.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attention = config.attention
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_size)
        q, k, v = (t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            future = torch.ones(time, time, dtype=torch.bool, device=x.device).triu(1)
            weights = F.dropout(scores.masked_fill(future, float("-inf")).softmax(-1), dropout, self.training)
            y = weights @ v
        y = y.transpose(1, 2).reshape(batch, time, width)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer: ``n_embd -> 4 n_embd -> GELU -> n_embd``.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model over ``config.vocab_size`` tokens.

    Build it on the meta device to count parameters without allocating them:
    ``with torch.device("meta"): GPT(GPTConfig.preset("gpt-1b")).num_parameters()``.

    Args:
        config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one Parameter, read by both modules
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the stream's variance does not grow with depth
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Normal(0, 0.02) weights and zero biases for Linear and Embedding layers."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits.

        Args:
            idx: token ids of shape ``(batch, time)`` with ``time <= config.block_size``.

        Returns:
            Logits of shape ``(batch, time, vocab_size)``.
        """
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"GPT: sequence length {time} exceeds block_size={self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of the next-token prediction.

        Args:
            idx: input token ids ``(batch, time)``.
            targets: the token that follows each input position, ``(batch, time)``.
        """
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())
