"""The byte-level ``GPT`` reference model: shapes, tied weights, initial loss, causality and preset sizes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nobp.models.gpt import GPT, GPTConfig, alibi_bias


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


# ---------------------------------------------------------------------------------------------------- ALiBi
def alibi_model(attention: str, slope: float | None = 1.0, heads: int = 4) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", n_head=heads, attention=attention, alibi_slope=slope)
    return GPT(config).eval()


def test_alibi_bias_follows_the_slopes_and_distances() -> None:
    bias = alibi_bias(1.0, 4, 5, torch.device("cpu"), torch.float32)
    slopes = [1.0, 0.25, 0.0625, 0.015625]  # 2 ** (-8 h / 4)
    for head, slope in enumerate(slopes):
        for i in range(5):
            for j in range(5):
                assert bias[head, i, j].item() == pytest.approx(-slope * max(i - j, 0))


def test_alibi_attention_weights_are_the_recency_softmax_when_queries_are_zero() -> None:
    """With queries and keys at zero every score is the bias alone: each head's weights must be
    ``softmax(-slope_h * (i - j))`` over the keys ``j <= i``, so the output is that average of the values."""
    model = alibi_model("math", slope=0.5, heads=2)
    attention = model.blocks[0].attn
    width = model.config.n_embd
    with torch.no_grad():
        attention.qkv.weight[: 2 * width].zero_()  # q and k rows
    x = torch.randn(1, 6, width)
    with torch.no_grad():
        values = attention.qkv(x)[..., 2 * width :].view(1, 6, 2, width // 2).transpose(1, 2)
        captured = {}
        handle = attention.proj.register_forward_pre_hook(lambda module, args: captured.update(y=args[0]))
        attention(x)
        handle.remove()
    for head, slope in enumerate([0.5, 0.5 * 2**-4]):
        for i in range(6):
            weights = torch.softmax(torch.tensor([-slope * (i - j) for j in range(i + 1)]), dim=0)
            expected = weights @ values[0, head, : i + 1]
            got = captured["y"][0, i].view(2, width // 2)[head]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_alibi_math_and_sdpa_paths_agree() -> None:
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        math_logits = alibi_model("math")(idx)
        sdpa_logits = alibi_model("sdpa")(idx)
    torch.testing.assert_close(math_logits, sdpa_logits, rtol=1e-4, atol=1e-5)


def test_alibi_keeps_the_model_causal_and_changes_its_output() -> None:
    model = alibi_model("math")
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
        plain = alibi_model("math", slope=None)(idx)
    torch.testing.assert_close(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])
    assert not torch.allclose(before, plain)  # same weights (same seed), the bias alone differs


@pytest.mark.parametrize("slope", [0.0, -1.0, float("nan"), float("inf")])
def test_alibi_slope_must_be_positive(slope: float) -> None:
    with pytest.raises(ValueError, match="alibi_slope"):
        GPTConfig.preset("tiny", alibi_slope=slope)


def test_alibi_gpt_population_evaluates_the_same_batched_and_one_member_at_a_time() -> None:
    """The bias is one tensor shared by every member: under ``vmap`` the members' losses must equal their losses
    evaluated one at a time (``attention="math"``, the recipes' CPU path)."""
    from lightning_nobp.algorithms import EggRoll
    from lightning_nobp.perturb.estimator import PopulationEstimator

    model = alibi_model("math", slope=0.5, heads=2)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        return model.loss(tokens[:, :-1], tokens[:, 1:])

    losses, batching = [], []
    for batched in (True, False):
        algorithm = EggRoll(population=8, sigma=0.05)
        estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
        population = algorithm.ask(3)
        estimator.probe_parameter_reads(population, loss)
        losses.append(estimator.evaluate_members(population, loss, batched=batched))
        batching.append(estimator.batching)
    assert batching[0] is True and batching[1] is not True  # vmapped, then one member at a time
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    assert losses[0].std() > 1e-4  # the members differ


def test_alibi_bias_is_built_once_per_length_and_dtype() -> None:
    attention = alibi_model("math").blocks[0].attn
    first = attention.score_bias(8, torch.device("cpu"), torch.float32)
    assert attention.score_bias(8, torch.device("cpu"), torch.float32) is first
    other = attention.score_bias(5, torch.device("cpu"), torch.float32)
    assert other.shape == (4, 5, 5)
    torch.testing.assert_close(other, first[:, :5, :5])
    assert attention.score_bias(5, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16


def test_alibi_bias_built_in_inference_mode_is_not_reused_outside_it() -> None:
    """Lightning validates under ``torch.inference_mode``; a tensor made there cannot be saved for a backward pass
    (as a fused attention kernel's mask may be): training must get a bias of its own."""
    attention = alibi_model("sdpa").blocks[0].attn
    with torch.inference_mode():
        assert attention.score_bias(8, torch.device("cpu"), torch.float32).is_inference()
    assert not attention.score_bias(8, torch.device("cpu"), torch.float32).is_inference()
    model = alibi_model("sdpa").train()
    idx = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        model(idx)
    model.loss(idx, idx).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
