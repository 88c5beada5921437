"""Population generation: every member of a population decodes its own continuations of a batch's prompts.

:func:`generate_population` is called inside ``training_step`` like any other forward of the model. The strategy
evaluates ``training_step`` once per member with that member's perturbation active in the member-aware layers
(``lightning_nobp.perturb.member_layers``), so each member's decode runs at its own perturbed weights (EggRoll's
low-rank ``x W^T + (x B) A^T``, MeZO's and OpenES's dense deltas). When the members are batched
(``torch.func.vmap`` over ``training_step``, the default), the decode loop runs once for a whole chunk of members:
each step is one forward whose every layer computes all members' rows together, and each member's KV cache is its
own slice of one batched cache. ``training_step`` sees one member's view: prompts ``[batch, prompt]`` in, tokens
``[batch, new]`` out. Outside a strategy (plain inference, validation) the same call is ordinary batched
generation.

The decode is KV-cached (a Hugging Face model's ``DynamicCache`` through ``past_key_values``, or the project's
:class:`~lightning_nobp.models.gpt.GPT`'s :meth:`~lightning_nobp.models.gpt.GPT.forward_cached`), takes
left-padded prompts, stops each row at its first stop token (the token is kept, padding follows) and picks tokens
greedily or by sampling. Sampling is Gumbel-max with noise from counter-based Philox streams keyed by
``(seed, step, prompt row, token id)``: reproducible, and the same for every member of a step (common random
numbers: members' samples differ through their perturbations only, so their rewards compare the perturbations,
not sampling luck). Every row runs ``max_new_tokens`` steps under ``vmap`` (a batched population cannot leave the
loop early); evaluated alone, the loop ends once every row has stopped.

:func:`score_completions` scores the completions with Python code (decoded text, string comparisons), which
cannot read a batched member's tokens itself: it hands each member's rows to that code outside ``vmap``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor

from lightning_nobp.algorithms.seeds import derive_seed
from lightning_nobp.kernels.philox import reference_uniform

#: separates the sampling streams from every other use of a seed
SAMPLING_STREAM = 0x5A3B1E

DecodeStep = Callable[[Tensor, Tensor, Tensor, object], tuple[Tensor, object]]
"""``step(ids, positions, attention_mask, cache) -> (last logits [batch, vocab], cache)``."""


def _gpt_step(model: nn.Module, capacity: int) -> DecodeStep:
    """The decode step of the project's GPT: its KV-cached forward (a cache of ``capacity`` positions) with left
    padding made unreadable."""
    from lightning_nobp.models.gpt import KVCache

    def step(ids: Tensor, positions: Tensor, mask: Tensor, cache: object) -> tuple[Tensor, object]:
        cache = KVCache(capacity) if cache is None else cache
        new, keys = ids.shape[1], mask.shape[1]
        query_index = torch.arange(keys - new, keys, device=ids.device)
        key_index = torch.arange(keys, device=ids.device)
        causal = key_index.view(1, -1) <= query_index.view(-1, 1)
        own = key_index.view(1, -1) == query_index.view(-1, 1)  # a padding position reads itself (no empty row)
        readable = causal & (mask[:, None, :] | own)
        logits, cache = model.forward_cached(ids, positions, readable, cache)  # type: ignore[arg-type]
        return logits[:, -1], cache

    return step


def _hugging_face_step(model: nn.Module) -> DecodeStep:
    """The decode step of a Hugging Face causal LM: ``past_key_values`` in a ``DynamicCache``, logits of the last
    position only."""
    from transformers import DynamicCache

    # transformers 5 names the cache argument ``cache`` (``past_key_values`` before, deprecated since)
    argument = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def step(ids: Tensor, positions: Tensor, mask: Tensor, cache: object) -> tuple[Tensor, object]:
        if cache is None:
            cache = DynamicCache(config=model.config)
        output = model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{argument: cache},
        )
        return output.logits[:, -1], cache  # the DynamicCache grows in place

    return step


def decode_step(model: nn.Module, capacity: int) -> DecodeStep:
    """The KV-cached decode step of ``model``: the project's GPT or a Hugging Face causal LM.

    Args:
        model: a :class:`~lightning_nobp.models.gpt.GPT` or a ``transformers`` causal LM (``PreTrainedModel``).
        capacity: the most positions the decode holds (prompt plus new tokens).

    Raises:
        TypeError: the model is neither.
    """
    from lightning_nobp.models.gpt import GPT

    if isinstance(model, GPT):
        return _gpt_step(model, capacity)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the LLM extras only
        PreTrainedModel = ()  # type: ignore[assignment,misc]
    if isinstance(model, PreTrainedModel):
        return _hugging_face_step(model)
    raise TypeError(
        f"generate_population decodes lightning_nobp.models.GPT and Hugging Face causal LMs, not"
        f" {type(model).__name__}: pass the language model itself (e.g. self.lm), not its LightningModule"
    )


def sampling_noise(seed: int, step: int, rows: int, vocab: int, device: torch.device) -> Tensor:
    """Gumbel noise ``[rows, vocab]`` of one decode step, a pure function of ``(seed, step)`` (Philox streams).

    Args:
        seed: the generation's seed.
        step: the index of the generated token.
        rows: prompts in the batch.
        vocab: the logits' width.
        device: where the noise is made.
    """
    uniform = reference_uniform(derive_seed(SAMPLING_STREAM, seed, step), rows * vocab, device).to(device)
    return -torch.log(-torch.log(uniform.clamp_min(1e-12))).view(rows, vocab)


def _check_left_padded(mask: Tensor) -> None:
    """Refuse right padding and empty prompts (the decode appends after each row's last column)."""
    if not bool(mask[:, -1].all()):
        raise ValueError(
            "generate_population takes left-padded prompts: the attention mask's last column must be 1 in every row"
            " (tokenizer.padding_side = 'left')"
        )
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError("generate_population: a prompt's attention mask has padding after its first token")


@torch.no_grad()
def generate_population(
    model: nn.Module,
    prompt_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 16,
    stop_tokens: Sequence[int] = (),
    temperature: float = 0.0,
    seed: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Continuations of the prompts at the current member's weights (see the module docstring), in one KV-cached
    batched decode; ordinary batched generation outside a strategy's evaluation.

    Args:
        model: the language model: a :class:`~lightning_nobp.models.gpt.GPT` or a Hugging Face causal LM.
        prompt_ids: token ids ``[batch, prompt]``, left-padded.
        attention_mask: ``[batch, prompt]``, 1 on tokens and 0 on padding (``None``: no padding).
        max_new_tokens: how many tokens each row generates at most (the output's width).
        stop_tokens: token ids that end a row (kept in the output; ``pad_token_id`` follows).
        temperature: 0 picks the most likely token; above 0 samples from ``softmax(logits / temperature)``.
        seed: the sampling streams' seed; ``None`` draws one from torch's global generator (reproducible under
            ``torch.manual_seed``, and the same for every member since the strategy restores the generator before
            each evaluation).
        pad_token_id: the id written after a row's stop token.

    Returns:
        The generated token ids ``[batch, max_new_tokens]`` (long).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate_population: max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"generate_population: temperature={temperature} must be 0 (greedy) or positive")
    ids = prompt_ids.long()
    rows = ids.shape[0]
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(ids.device).bool()
    compiling = torch.compiler.is_compiling()  # no data-dependent checks or early exit in a compiled graph
    if not compiling:
        _check_left_padded(mask)
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    step = decode_step(model, ids.shape[1] + max_new_tokens)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=ids.device)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits, cache = step(ids, positions, mask, None)
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    tokens: list[Tensor] = []
    for index in range(max_new_tokens):
        scores = logits.float()
        if temperature > 0:
            assert seed is not None
            scores = scores / temperature + sampling_noise(seed, index, rows, scores.shape[-1], scores.device)
        token = torch.where(finished, torch.full_like(finished, pad_token_id, dtype=torch.long), scores.argmax(-1))
        tokens.append(token)
        finished = finished | (token[:, None] == stops).any(-1)
        if index + 1 == max_new_tokens:
            break
        if not (compiling or is_functorch_wrapped_tensor(finished)) and bool(finished.all()):  # alone: stop once
            tokens += [torch.full_like(token, pad_token_id)] * (max_new_tokens - index - 1)
            break
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        logits, cache = step(token[:, None], next_position, mask, cache)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)


RowScore = Callable[[Tensor], "Tensor | Sequence[float]"]
"""``score(completions [batch, new]) -> one value per row``: any Python code (``.tolist()``, a tokenizer's
``decode``, string comparisons)."""

#: the scoring functions of the calls of :func:`score_completions` under way, by key
_SCORES: dict[int, RowScore] = {}


@torch.library.custom_op("lightning_nobp::score_rows", mutates_args=())
def _score_rows(completions: Tensor, key: int) -> Tensor:
    """One value per row of ``completions`` from the scoring function registered under ``key`` (float32)."""
    scores = _SCORES[key](completions)
    values = torch.as_tensor(scores, dtype=torch.float32).to(completions.device)
    if values.shape != (completions.shape[0],):
        raise ValueError(
            f"score_completions: the scoring function returned shape {tuple(values.shape)} for"
            f" {completions.shape[0]} rows: return one value per row"
        )
    return values


@_score_rows.register_fake
def _(completions, key):  # type: ignore[no-untyped-def]
    return completions.new_empty((completions.shape[0],), dtype=torch.float32)


@_score_rows.register_vmap
def _(info, in_dims, completions, key):  # type: ignore[no-untyped-def]
    if in_dims[0] is None:  # the same completions for every member
        return _score_rows(completions, key), None
    members = completions.movedim(in_dims[0], 0)
    return torch.stack([_score_rows(member, key) for member in members]), 0


def score_completions(completions: Tensor, score: RowScore) -> Tensor:
    """Per-row rewards of generated tokens computed by any Python code, also inside a batched population.

    Under ``torch.func.vmap`` (a batched population's evaluation) Python cannot read a member's tokens
    (``.tolist()`` raises, and the strategy falls back to one member at a time). This call hands the tokens of
    every member of the batch to ``score`` outside ``vmap``, one member's ``[batch, new]`` rows at a time, and
    gives each member its values back; evaluated alone it calls ``score`` once.

    Args:
        completions: token ids ``[batch, new]`` (what :func:`generate_population` returned).
        score: returns one value per row (a tensor or a sequence of numbers), e.g. the exact match of the decoded
            text with each prompt's answer.

    Returns:
        float32 ``[batch]``.
    """
    key = id(score)
    _SCORES[key] = score
    try:
        return _score_rows(completions, key)
    finally:
        _SCORES.pop(key, None)
