"""Int8 weights (torchao Int8Tensor, activations quantized per row) on the integer matmul ``torch._int_mm``: the op
against exact arithmetic, plain forwards under the precision, checkpoints. The batched population:
``tests/test_fp8_population.py``."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from test_fp8_population import OpCounts, mlp

from lightning_nobp.kernels.int8_linear import int8_linear, quantize_rows_int8, rowwise_int8_linear
from lightning_nobp.lowbit.convert import convert_to_low_bit
from lightning_nobp.lowbit.formats import Int8Tensor


def test_the_integer_product_is_exact_and_close_to_the_float_one() -> None:
    torch.manual_seed(1)
    weight = torch.randn(24, 32)
    codes, scales = quantize_rows_int8(weight)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127  # each row's largest entry hits the grid end
    x = torch.randn(5, 3, 32)
    bias = torch.randn(24)
    out = int8_linear(x, codes, scales, bias)
    x_codes, x_scales = quantize_rows_int8(x.reshape(-1, 32))
    exact = (x_codes.double() @ codes.double().t()) * x_scales.double() * scales.double().t() + bias.double()
    torch.testing.assert_close(out.reshape(-1, 24).double(), exact, rtol=1e-6, atol=1e-5)  # int32 accumulation
    reference = x @ (codes.float() * scales).t() + bias
    assert (out - reference).norm() / reference.norm() < 0.02  # int8 activations: 1/254 of each row's range
    members = torch.func.vmap(lambda xs: int8_linear(xs, codes, scales, bias))(x)
    assert torch.equal(members, out)  # each row quantized on its own: batching changes nothing
    biases = torch.randn(5, 24)
    per_member_bias = torch.func.vmap(lambda xs, b: int8_linear(xs, codes, scales, b))(x, biases)
    torch.testing.assert_close(per_member_bias, int8_linear(x, codes, scales, None) + biases[:, None, :])


def test_a_plain_forward_under_the_precision_runs_the_int8_matmul(no_backprop: None) -> None:
    from lightning_nobp.fabric import LowBitPrecision

    model, _ = mlp()
    precision = LowBitPrecision("int8", compute_dtype=torch.bfloat16, activation_quantization=True)
    precision.convert_module(model)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    int8_weights = [p for p in model.parameters() if isinstance(p, Int8Tensor)]
    assert len(int8_weights) == 2
    counts = OpCounts({tuple(p.shape) for p in int8_weights})
    with precision.forward_context(), counts:
        ours = model(x)
    assert counts.ops.get("aten._int_mm.default", 0) == 2
    assert not {"aten.mm.default", "aten.addmm.default", "aten.linear.default"} & set(counts.ops)  # no float matmul
    assert counts.weight_shaped == 0
    with torch.no_grad():
        dequantized = F.linear(
            F.relu(F.linear(x, int8_weights[0].dequantize(), model[0].bias)),
            int8_weights[1].dequantize(),
            model[2].bias,
        )
    assert (ours.float() - dequantized.float()).norm() / dequantized.float().norm() < 0.02
    assert all(isinstance(p, Int8Tensor) for p in int8_weights)


def test_weight_only_int8_keeps_torchaos_forward_and_checkpoints_keep_the_choice() -> None:
    """Without activation quantization (the CPU default) nothing is routed; with it, a checkpoint loaded with
    ``weights_only=True`` still asks for it."""
    plain, _ = mlp()
    convert_to_low_bit(plain, "int8", compute_dtype=torch.bfloat16)
    from lightning_nobp.kernels.lowbit_linear import shared_weight_linear

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert shared_weight_linear(x, plain[0].weight, plain[0].bias) is None
    quantized, _ = mlp()
    convert_to_low_bit(quantized, "int8", compute_dtype=torch.bfloat16, activation_quantization=True)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["0.weight"]
    assert isinstance(loaded, Int8Tensor) and loaded.act_quant_kwargs is not None
    assert torch.equal(rowwise_int8_linear(x, loaded.qdata, loaded.scale, None), shared_weight_linear(x, loaded, None))
