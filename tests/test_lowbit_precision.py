"""LowBitPrecision: conversion into torchao subclasses, no FP32 weights, bad input, checkpoints, torchao interop."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import LowBitPrecision, NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.lowbit import FORMATS, is_low_bit, layout_of, memory_report
from lightning_nobp.lowbit.formats import inner_tensors

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders

LOW_BIT = ("fp8_e4m3", "int8", "int8_lattice", "nvfp4", "mxfp4")
BYTES_PER_WEIGHT_BAR = {"fp8_e4m3": 1.01, "int8": 1.01, "int8_lattice": 1.01, "nvfp4": 0.57, "mxfp4": 0.54}


class TextModel(nn.Module):
    """Embedding, two Linear layers with K >= 512, a norm and a buffer: what a small LM holds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 512)
        self.up = nn.Linear(512, 1024)
        self.norm = nn.LayerNorm(1024)
        self.down = nn.Linear(1024, 512)
        self.register_buffer("position", torch.arange(8, dtype=torch.float32))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(self.embed(tokens)))))


@pytest.mark.parametrize("weights", LOW_BIT)
def test_no_fp32_tensor_is_left_but_scales_and_bytes_per_weight_meet_the_bar(weights: str) -> None:
    model = TextModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16: slow, still correct
        LowBitPrecision(weights, compute_dtype=torch.bfloat16).convert_module(model)
    for name, value in model.state_dict().items():
        if is_low_bit(value):
            for inner_name, inner in inner_tensors(value).items():
                assert inner.dtype != torch.float32 or "scale" in inner_name, (name, inner_name)
        else:
            assert value.dtype == torch.bfloat16, name
    assert is_low_bit(model.up.weight) and is_low_bit(model.down.weight) and is_low_bit(model.embed.weight)
    report = memory_report(model)
    kind = layout_of(model.up.weight).kind
    assert report.formats[kind].bytes_per_element <= BYTES_PER_WEIGHT_BAR[weights]
    assert "total" in str(report) and report.as_metrics()["memory/bytes_per_weight"] < 1.1


def test_low_bit_forward_matches_the_dequantized_weights() -> None:
    torch.manual_seed(0)
    model = TextModel()
    reference = copy.deepcopy(model)
    precision = LowBitPrecision("fp8_e4m3")
    precision.convert_module(model)
    tokens = torch.randint(0, 64, (4, 8))
    expected = reference(tokens)
    relative = (model(tokens).float() - expected).norm() / expected.norm()
    assert relative < 0.08  # e4m3 weights, bf16 or float32 compute
    dequantized = F.linear(torch.randn(3, 512).to(precision.compute_dtype), model.up.weight.dequantize())
    assert dequantized.dtype == precision.compute_dtype


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_the_automatic_compute_dtype_is_float32_only_on_cpus_without_native_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_nobp.lowbit import compute_dtype as compute

    monkeypatch.setattr(compute, "has_native_bf16", lambda device: native)
    precision = LowBitPrecision("fp8_e4m3")
    expected = torch.bfloat16 if native else torch.float32
    assert precision.compute_dtype == expected and precision.precision == ("bf16-true" if native else "32-true")
    model = TextModel()
    precision.convert_module(model)
    assert is_low_bit(model.up.weight) and model.up.weight.dequantize().dtype == expected
    assert model.norm.weight.dtype == expected and model(torch.randint(0, 64, (2, 3))).dtype == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = LowBitPrecision("bf16")  # the storage format computes in its own dtype
        explicit = LowBitPrecision("fp8_e4m3", compute_dtype=torch.bfloat16)
    assert bf16.compute_dtype == explicit.compute_dtype == torch.bfloat16
    slow = [str(w.message) for w in caught if "25 times slower" in str(w.message)]
    assert len(slow) == (0 if native else 2)
    if not native:
        assert "'fp8_e4m3'" in slow[0] and "compute_dtype=None" in slow[1]


def test_bf16_is_native_on_cuda_and_decided_by_onednn_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_nobp.lowbit.compute_dtype import has_native_bf16

    assert has_native_bf16("cuda")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert not has_native_bf16("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert has_native_bf16(torch.device("cpu"))


def test_unknown_format_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="fp8_e4m3.*nvfp4"):
        LowBitPrecision("fp8")
    assert set(LOW_BIT) | {"bf16"} == set(FORMATS)


def test_layers_whose_k_is_not_divisible_by_the_block_stay_bf16_with_one_warning() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(40, 8), nn.Linear(24, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LowBitPrecision("nvfp4", compute_dtype=torch.bfloat16).convert_module(model)
    messages = [str(w.message) for w in caught if "block size" in str(w.message)]
    assert len(messages) == 1 and "1.weight" in messages[0] and "2.weight" in messages[0]
    assert is_low_bit(model[0].weight)
    assert model[1].weight.dtype == torch.bfloat16 and not is_low_bit(model[1].weight)


def test_quantizing_huge_values_and_huge_updates_never_produces_nan() -> None:
    from lightning_nobp.kernels.lowbit_update import UpdateTerms, reference_dequantize
    from lightning_nobp.lowbit import apply_low_bit_update, quantize_weight

    for weights in ("fp8_e4m3", "int8", "nvfp4", "mxfp4"):
        weight = quantize_weight(torch.tensor([[1e30, -3.0] * 16, [1e-30, 0.5] * 16]), weights)
        assert torch.isfinite(weight.dequantize().float()).all()
        huge = UpdateTerms(dense=torch.full((2, 32), 1e35))
        apply_low_bit_update(weight, huge, rounding_seed=0)
        assert torch.isfinite(reference_dequantize(layout_of(weight))).all(), weights


def test_grad_update_with_low_bit_weights_is_refused_with_the_fix() -> None:
    model = DigitsClassifier(momentum=0.0)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(), update="grad"),
        plugins=[LowBitPrecision("fp8_e4m3")],
        max_steps=1,
        **quiet_trainer_kwargs(),
    )
    train, _ = digits_loaders()
    with pytest.raises(ValueError, match="update='direct'"):
        trainer.fit(model, train)


def fit_low_bit(model: pl.LightningModule, weights: str, ckpt_path: str | None = None, **trainer_kwargs) -> pl.Trainer:
    train, _ = digits_loaders(batch_size=256, shuffle=False)  # 6 steps per epoch
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=EggRoll(population=16), direct_step="normalized", seed=3),
        plugins=[LowBitPrecision(weights)],
        **quiet_trainer_kwargs(**trainer_kwargs),
    )
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return trainer


def low_bit_state(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stored tensor of a module or state dict as raw bytes (inner tensors of low-bit weights included)."""
    state = {}
    for name, value in (model if isinstance(model, dict) else model.state_dict()).items():
        parts = inner_tensors(value) if is_low_bit(value) else {"": value}
        for part, tensor in parts.items():
            state[f"{name}.{part}"] = tensor.detach().clone().reshape(-1).view(torch.uint8)
    return state


class AdamWDigits(DigitsClassifier):
    """The digits classifier with its own AdamW (what most LightningModules return)."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


def digits_model(momentum: float | str) -> DigitsClassifier:
    if momentum == "adamw":
        return AdamWDigits(lr=3e-3)
    return DigitsClassifier(lr=3e-3, momentum=momentum)


@pytest.mark.parametrize(
    "weights, momentum", [("fp8_e4m3", 0.0), ("nvfp4", 0.0), ("fp8_e4m3", 0.9), ("fp8_e4m3", "adamw")]
)
def test_checkpoint_round_trip_and_resume_are_bit_exact(weights: str, momentum: float | str, tmp_path) -> None:
    pl.seed_everything(0)
    straight = digits_model(momentum)
    fit_low_bit(straight, weights, max_epochs=2)

    pl.seed_everything(0)
    first = digits_model(momentum)
    trainer = fit_low_bit(first, weights, max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    saved = low_bit_state(first)
    checkpoint = torch.load(path, weights_only=True)
    reloaded = low_bit_state(checkpoint["state_dict"])
    assert reloaded.keys() == saved.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    states = checkpoint["optimizer_states"][0]["state"]
    buffers = [states.get(i, {}).get("momentum_buffer") for i in range(4)]  # weight, bias, weight, bias
    if momentum == "adamw":  # Adam's moments under torch's own keys, bf16 for low-bit weights
        moments = [states[i]["exp_avg_sq"] for i in range(4)]
        assert all(m.abs().sum() > 0 for m in moments) and int(states[0]["step"]) == 6
        assert [m.dtype for m in moments] == [torch.bfloat16, first.net[0].bias.dtype] * 2
    elif momentum:  # the direct path's momentum buffers travel in the optimizer's state, bf16 for low-bit weights
        assert all(b is not None and b.abs().sum() > 0 for b in buffers)
        assert [b.dtype for b in buffers] == [torch.bfloat16, first.net[0].bias.dtype] * 2
    else:
        assert not any(b is not None for b in buffers)

    pl.seed_everything(0)
    resumed = digits_model(momentum)
    fit_low_bit(resumed, weights, ckpt_path=str(path), max_epochs=2)
    expected, got = low_bit_state(straight), low_bit_state(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(expected[k], saved[k]) for k in expected)  # the second epoch changed weights


@pytest.mark.parametrize("config_name", ["Float8WeightOnlyConfig", "Int8WeightOnlyConfig"])
def test_a_torchao_quantized_model_trains_and_still_runs_under_torchao_alone(config_name: str, no_backprop) -> None:
    import torchao.quantization as tq

    pl.seed_everything(0)
    model = DigitsClassifier(lr=3e-3, momentum=0.0, hidden=128).to(torch.bfloat16)
    tq.quantize_(model.net, getattr(tq, config_name)())
    stored_class = type(model.net[0].weight)
    before = model.net[0].weight.dequantize().clone()
    trainer = fit_low_bit(model, "fp8_e4m3", max_steps=5)
    assert trainer.global_step == 5
    weight = model.net[0].weight
    assert type(weight) is stored_class  # adopted as it is: still the user's torchao class
    assert not torch.equal(weight.dequantize(), before)
    # afterwards a plain torchao model: no lightning_nobp code in the forward
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    plain = F.linear(torch.relu(F.linear(x, model.net[0].weight, model.net[0].bias)), model.net[2].weight)
    assert torch.isfinite(plain.float()).all()
    expected = F.linear(x, weight.dequantize(), model.net[0].bias)
    assert torch.allclose(model.net[0](x).float(), expected.float(), atol=0.1, rtol=0.05)


class PoisonedDigits(DigitsClassifier):
    """Returns a NaN loss for every member on batch 2."""

    def __init__(self) -> None:
        super().__init__(lr=3e-3, momentum=0.0)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 2 else loss


def test_a_nan_loss_skips_the_step_and_leaves_low_bit_weights_untouched() -> None:
    pl.seed_everything(0)
    model = PoisonedDigits()
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
            snapshots.append(low_bit_state(pl_module))

        def on_train_end(self, trainer, pl_module) -> None:
            snapshots.append(low_bit_state(pl_module))

    trainer = fit_low_bit(model, "fp8_e4m3", max_steps=4, callbacks=[Snapshot()])
    strategy = trainer.strategy
    assert isinstance(strategy, NoBackpropStrategy) and strategy.skipped_steps == 1
    unchanged = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert unchanged == [False, False, True, False]  # batch 2 (NaN) wrote nothing


@pytest.mark.parametrize("activation_quantization", [True, False])
def test_fp8_weights_with_quantized_activations_carry_a_scaled_mm_configuration(activation_quantization: bool) -> None:
    """torchao's fp8 x fp8 product (``torch._scaled_mm``, quantized activations on CUDA) asserts on a Float8Tensor
    without a matrix-product configuration: the H200 check failed there before the weights carried one."""
    from lightning_nobp.lowbit.formats import quantize_weight

    weight = quantize_weight(torch.randn(32, 16), "fp8_e4m3", torch.float32, activation_quantization)
    assert (weight.act_quant_kwargs is not None) is activation_quantization
    assert (weight.mm_config is not None) is activation_quantization
    if activation_quantization:
        assert weight.mm_config.use_fast_accum


@pytest.mark.parametrize("weights", ["nvfp4", "mxfp4"])
def test_fp4_weights_say_once_what_they_do_without_an_fp4_matmul(weights: str) -> None:
    from lightning_nobp.fabric import LowBitPrecision as FabricLowBitPrecision

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    with pytest.warns(UserWarning, match="no FP4 matmul.*dequantizes"):
        FabricLowBitPrecision(weights).convert_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        FabricLowBitPrecision("fp8_e4m3").convert_module(torch.nn.Linear(64, 64))  # FP8: nothing to say
