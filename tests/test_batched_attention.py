"""A population's attention on the CPU: one fused call for all members, with the values of each member alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_nobp.perturb.batched_attention import MemberAttentionMode


@pytest.mark.parametrize(
    ("shape", "mask_shape"),
    [((2, 4, 12, 16), None), ((4, 12, 16), None), ((2, 4, 12, 16), (12, 12)), ((2, 4, 12, 16), (2, 1, 12, 12)),
     ((3, 12, 16), (3, 12, 12))],  # fmt: skip
)
def test_members_folded_into_the_batch_give_each_member_its_own_values(shape, mask_shape) -> None:
    generator = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(5, *shape, generator=generator) for _ in range(3))
    mask = None if mask_shape is None else torch.randn(*mask_shape, generator=generator)

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None)

    alone = torch.stack([attend(q, k, v) for q, k, v in zip(queries, keys, values)])
    shared_keys = torch.stack([attend(q, keys[0], values[0]) for q in queries])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop": the fused kernel has a batching rule here
        with MemberAttentionMode():
            batched = torch.func.vmap(attend)(queries, keys, values)
            batched_shared = torch.func.vmap(lambda q: attend(q, keys[0], values[0]))(queries)
    assert torch.equal(batched, alone) and torch.equal(batched_shared, shared_keys)


def test_attention_with_dropout_goes_on_unchanged() -> None:
    """Members share their dropout masks under vmap(randomness="same"); folding would not keep that, so a call
    with dropout is not routed (its output is dropout's, not the plain attention's)."""
    query = torch.randn(3, 2, 4, 8)
    with MemberAttentionMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        out = torch.func.vmap(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), randomness="same")(
            query
        )
    assert not torch.allclose(out, F.scaled_dot_product_attention(query, query, query))
