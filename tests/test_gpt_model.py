"""The byte-level ``GPT`` reference model: shapes, tied weights, initial loss, causality and preset sizes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nobp.models.gpt import GPT, GPTConfig


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny")).eval()


def test_forward_gives_logits_per_position() -> None:
    model = tiny_model()
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)


def test_output_head_is_the_token_embedding() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_untied_head_has_its_own_weight() -> None:
    model = GPT(GPTConfig.preset("tiny", tie_weights=False))
    assert model.lm_head.weight is not model.wte.weight
    assert model.num_parameters() == tiny_model().num_parameters() + 256 * 64


def test_initial_loss_is_near_uniform() -> None:
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (4, 64), generator=generator)
    targets = torch.randint(0, 256, (4, 64), generator=generator)
    with torch.no_grad():
        loss = model.loss(idx, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_sequence_longer_than_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="gpt-1b"):
        GPTConfig.preset("huge")


def test_gpt_1b_preset_has_about_1_1_billion_parameters() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt-1b"))
    assert 1.05e9 < model.num_parameters() < 1.15e9
