"""``GPT``: a small byte-level decoder-only transformer (nanoGPT/litgpt style) for recipes and benchmarks.

A plain ``torch.nn.Module``: pre-LayerNorm blocks, causal self-attention through
``scaled_dot_product_attention``, a 4x GELU MLP, learned position embeddings (optionally with ALiBi's linear
distance penalty on the attention scores) and an output head tied to the token embedding. Bytes are the tokens, so
the vocabulary is 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor

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
        alibi_slope: adds ALiBi's recency bias (Press et al., 2022) to the attention scores: head ``h`` (from 0)
            subtracts ``alibi_slope * 2 ** (-8 h / n_head) * (i - j)`` from query ``i``'s score of key ``j``, so
            every head prefers recent positions, the first most sharply. ``2 ** (-8 / n_head)`` gives ALiBi's own
            slopes; ``None`` adds no bias. A model whose attention learns slowly (trained by evolution strategies,
            where the attention's projections get the noisiest estimates) still reads the last few tokens from
            the first step on.
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
    alibi_slope: float | None = None

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"GPTConfig: attention={self.attention!r}: choose 'sdpa' or 'math'")
        if self.alibi_slope is not None and not (math.isfinite(self.alibi_slope) and self.alibi_slope > 0):
            raise ValueError(
                f"GPTConfig: alibi_slope={self.alibi_slope!r} must be a positive number (the first head's slope,"
                f" e.g. 2 ** (-8 / n_head) = {2 ** (-8 / self.n_head):g} for ALiBi's own), or None for no bias"
            )
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
        self.alibi_slope = config.alibi_slope
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        #: the last ALiBi bias built, by (time, device, dtype, inference mode): every forward of a run reuses it
        self._bias: tuple[tuple[int, torch.device, torch.dtype, bool], Tensor] | None = None

    def score_bias(self, time: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """What the attention adds to its scores: ALiBi's ``-slope_h * (i - j)`` as ``(n_head, time, time)``, or
        ``None`` without ALiBi. Future keys get 0 on the ``math`` path (its causal mask removes them) and ``-inf``
        on the ``sdpa`` path (the float mask is its causal mask too). Built once per sequence length, device and
        dtype (and again when inference mode changes: a tensor made in inference mode cannot be saved for a
        backward pass).

        Args:
            time: the sequence length.
            device: where the scores are.
            dtype: the scores' dtype.
        """
        if self.alibi_slope is None:
            return None
        key = (time, device, dtype, torch.is_inference_mode_enabled())
        if self._bias is None or self._bias[0] != key:
            bias = alibi_bias(self.alibi_slope, self.n_head, time, device, dtype)
            if self.attention == "sdpa":  # sdpa takes a float mask or is_causal, not both
                bias = bias.masked_fill(_future_keys(time, device), float("-inf"))
            self._bias = key, bias
        return self._bias[1]

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_size)
        q, k, v = (t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        bias = self.score_bias(time, x.device, q.dtype)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=bias is None)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            if bias is not None:
                scores = scores + bias
            future = _future_keys(time, x.device)
            weights = F.dropout(scores.masked_fill(future, float("-inf")).softmax(-1), dropout, self.training)
            y = weights @ v
        y = y.transpose(1, 2).reshape(batch, time, width)
        return self.resid_dropout(self.proj(y))

    def forward_cached(self, x: Tensor, cache: KVCache, layer: int, readable: Tensor) -> Tensor:
        """The attention of new positions over the cached keys and values plus their own (a decode step).

        Args:
            x: the new positions' inputs ``(batch, new, width)``.
            cache: the decode's keys and values; this layer's new ones are written into it.
            layer: this layer's index in ``cache``.
            readable: ``(batch, new, past + new)`` booleans, true where a new position may read a key.

        Returns:
            The output ``(batch, new, width)``.
        """
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        k, v = cache.extend(layer, k, v)
        keys = k.shape[2]
        dropout = self.dropout if self.training else 0.0
        mask: Tensor = readable[:, None]  # (batch, 1, new, keys): the same for every head
        if self.alibi_slope is not None:  # key j's distance from query i (absolute indices of the sequence)
            bias = alibi_bias_from(self.alibi_slope, self.n_head, keys - time, time, keys, x.device, q.dtype)
            mask = bias.masked_fill(~mask, float("-inf"))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            y = weights @ v
        y = y.transpose(1, 2).reshape(batch, time, width)
        return self.resid_dropout(self.proj(y))


KVPair = tuple[Tensor, Tensor]
"""One attention layer's cached keys and values, ``(batch, heads, positions, head_size)`` each."""


class KVCache:
    """Every attention layer's keys and values of a decode, in buffers sized for the whole decode: a decode step
    writes its token's keys and values in place instead of copying the cache (under ``torch.func.vmap`` the buffers
    are batched over the members like the keys written into them).

    Args:
        capacity: the most positions the decode holds (prompt plus generated tokens).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: positions written by the completed forwards
        self.length = 0
        #: every layer's key and value buffers ``(batch, heads, capacity, head_size)``
        self.layers: list[KVPair] = []

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> KVPair:
        """Write the new positions' ``keys`` and ``values`` after the cached ones of ``layer``; returns the keys and
        values of every position so far (views of the buffers).

        Args:
            layer: the attention layer's index.
            keys: the new positions' keys ``(batch, heads, new, head_size)``.
            values: their values, shaped alike.
        """
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity of {self.capacity}")
        if layer == len(self.layers):  # the layer's first forward: buffers for the whole decode
            free = keys.new_zeros(*keys.shape[:2], self.capacity - end, keys.shape[3])
            self.layers.append((torch.cat((keys, free), dim=2), torch.cat((values, free.to(values.dtype)), dim=2)))
        else:
            stored_keys, stored_values = self.layers[layer]
            compiling = torch.compiler.is_compiling()
            if compiling or (is_functorch_wrapped_tensor(keys) and not is_functorch_wrapped_tensor(stored_keys)):
                # a member's keys into buffers the members share (the layers before were unperturbed), or a compiled
                # graph (which cannot ask): out of place
                stored_keys = torch.cat((stored_keys[:, :, :start], keys, stored_keys[:, :, end:]), dim=2)
                stored_values = torch.cat((stored_values[:, :, :start], values, stored_values[:, :, end:]), dim=2)
                self.layers[layer] = (stored_keys, stored_values)
            else:
                stored_keys[:, :, start:end] = keys
                stored_values[:, :, start:end] = values
        stored_keys, stored_values = self.layers[layer]
        return stored_keys[:, :, :end], stored_values[:, :, :end]


def alibi_bias_from(
    slope: float, heads: int, first: int, queries: int, keys: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """ALiBi's score bias for queries at sequence indices ``first .. first + queries - 1`` over keys ``0 .. keys - 1``
    (``(heads, queries, keys)``; future keys get 0), the rectangle of :func:`alibi_bias` a cached decode needs.

    Args:
        slope: the first head's slope.
        heads: attention heads.
        first: the sequence index of the first query.
        queries: how many queries.
        keys: how many keys.
        device: where to build it.
        dtype: its dtype.
    """
    slopes = slope * torch.pow(2.0, -8.0 * torch.arange(heads, device=device, dtype=torch.float32) / heads)
    query_index = torch.arange(first, first + queries, device=device)
    distance = (query_index.view(-1, 1) - torch.arange(keys, device=device).view(1, -1)).clamp_min(0)
    return (slopes.view(heads, 1, 1) * distance.to(torch.float32)).neg_().to(dtype)


def _future_keys(time: int, device: torch.device) -> Tensor:
    """``(time, time)`` booleans, true where key ``j`` comes after query ``i`` (what causal attention hides)."""
    return torch.ones(time, time, dtype=torch.bool, device=device).triu(1)


def alibi_bias(slope: float, heads: int, time: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """ALiBi's score bias ``-slope * 2 ** (-8 h / heads) * (i - j)`` for head ``h``, query ``i``, key ``j <= i``
    (future keys get 0: the causal mask removes them), shaped ``(heads, time, time)``.

    Args:
        slope: the first head's slope.
        heads: attention heads (each next one's slope is ``2 ** (-8 / heads)`` times the previous).
        time: the sequence length.
        device: where to build it.
        dtype: its dtype.
    """
    slopes = slope * torch.pow(2.0, -8.0 * torch.arange(heads, device=device, dtype=torch.float32) / heads)
    positions = torch.arange(time, device=device)
    distance = (positions.view(-1, 1) - positions.view(1, -1)).clamp_min(0).to(torch.float32)
    return (slopes.view(heads, 1, 1) * distance).neg_().to(dtype)


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

    def forward_cached(self, x: Tensor, cache: KVCache, layer: int, readable: Tensor) -> Tensor:
        """:meth:`forward` for new positions over cached keys and values (see
        :meth:`CausalSelfAttention.forward_cached`)."""
        x = x + self.attn.forward_cached(self.ln_1(x), cache, layer, readable)
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

    def forward_cached(
        self, idx: Tensor, positions: Tensor, readable: Tensor, cache: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """Next-token logits of new tokens given the keys and values of the earlier ones (a KV-cached decode step).

        With an empty cache and every position readable causally, this computes what :meth:`forward` does; rows
        may be left-padded (their padding is unreadable in ``readable`` and their positions count real tokens only).
        ``lightning_nobp.generation.generate_population`` drives it.

        Args:
            idx: the new token ids ``(batch, new)``.
            positions: their position indices ``(batch, new)`` (into the position embedding).
            readable: ``(batch, new, past + new)`` booleans, true where a new token may read a key; every new token
                must be able to read at least one key (a padding position reads itself).
            cache: the keys and values of the earlier tokens, written into by this call (``None``: a new cache
                that holds just these tokens).

        Returns:
            Logits ``(batch, new, vocab_size)`` and the cache, now holding the new tokens too.
        """
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.config.block_size:
            raise ValueError(f"GPT: position {int(positions.max())} exceeds block_size={self.config.block_size}")
        cache = KVCache(idx.shape[1]) if cache is None else cache
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, cache, layer, readable)
        cache.length += idx.shape[1]
        return self.lm_head(self.ln_f(x)), cache

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
