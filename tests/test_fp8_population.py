"""An FP8 (or int8) population (weights stored as torchao Float8Tensor or Int8Tensor, activations quantized per row)
evaluated batched: every Linear's shared product is one rowwise-scaled quantized matmul on the stored data, no
weight-shaped copy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


from lightning_nobp.algorithms import EggRoll
from lightning_nobp.kernels.fp8_linear import fp8_linear, quantize_rows
from lightning_nobp.lowbit.convert import convert_to_low_bit
from lightning_nobp.lowbit.formats import Float8Tensor, Int8Tensor
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator

PLAIN = dict(extras=None)  # the published method: no per-row estimates, no input subspace


class OpCounts(TorchDispatchMode):
    """Counts ops and the floating tensors shaped like one of ``shapes`` that ops create."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes
        self.ops: dict[str, int] = {}
        self.weight_shaped = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        if isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape[-2:]) in self.shapes:
            self.weight_shaped += 1
        return out


def mlp() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    x, y = torch.randn(32, 64, dtype=torch.bfloat16), torch.randint(0, 16, (32,))
    return model, lambda: F.cross_entropy(model(x).float(), y)


def gpt() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", attention="math"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    return model, lambda: model.loss(tokens[:, :-1], tokens[:, 1:])


#: format -> (its torchao tensor, the op every Linear of a batched population runs once)
QUANTIZED_MATMULS = {
    "fp8_e4m3": (Float8Tensor, "lightning_nobp.fp8_linear.default"),
    "int8": (Int8Tensor, "lightning_nobp.int8_linear.default"),
}


@pytest.mark.parametrize("weights", sorted(QUANTIZED_MATMULS))
@pytest.mark.parametrize("build", [mlp, gpt], ids=["mlp", "gpt"])
def test_a_quantized_population_is_batched_on_quantized_matmuls(build, weights: str) -> None:
    model, loss = build()
    convert_to_low_bit(model, weights, compute_dtype=torch.bfloat16, activation_quantization=True)
    stored, op = QUANTIZED_MATMULS[weights]
    low_bit = [p for p in model.parameters() if isinstance(p, stored)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, stored)]
    assert linears
    algorithm = EggRoll(population=8, rank=1, sigma=1e-2, population_chunk=8, **PLAIN)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    population = algorithm.ask(1)
    counts = OpCounts({tuple(p.shape) for p in low_bit})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the member loop
        with counts:
            batched = estimator.evaluate_members(population, loss)
    assert estimator.batching is True
    assert counts.ops.get(op, 0) == len(linears)  # one matmul per layer
    assert counts.weight_shaped == 0  # no dense perturbed or dequantized weight
    looped = estimator.evaluate(population, loss)
    torch.testing.assert_close(batched, looped, rtol=1e-3, atol=1e-3)  # the same rows, the same rounding
    assert batched.unique().numel() == len(population)


def test_fp8_linear_is_close_to_the_dequantized_product_and_batches_members() -> None:
    torch.manual_seed(1)
    weight = torch.randn(24, 32)
    codes, scales = quantize_rows(weight)
    x = torch.randn(5, 3, 32)
    bias = torch.randn(24)
    out = fp8_linear(x, codes, scales, bias)
    reference = x @ (codes.float() * scales).t() + bias
    assert out.shape == (5, 3, 24)
    assert (out - reference).norm() / reference.norm() < 0.05  # e4m3 activations: 3 mantissa bits
    members = torch.func.vmap(lambda xs: fp8_linear(xs, codes, scales, bias))(x)
    assert torch.equal(members, out)  # each row quantized on its own: batching changes nothing
    biases = torch.randn(5, 24)
    per_member_bias = torch.func.vmap(lambda xs, b: fp8_linear(xs, codes, scales, b))(x, biases)
    torch.testing.assert_close(per_member_bias, fp8_linear(x, codes, scales, None) + biases[:, None, :])


def test_fp8_embedding_rows_equal_the_whole_table_lookup() -> None:
    torch.manual_seed(2)
    table = nn.Embedding(50, 16)
    convert_to_low_bit(table, "fp8_e4m3", compute_dtype=torch.bfloat16)
    assert isinstance(table.weight, Float8Tensor)
    from lightning_nobp.kernels.fp8_linear import fp8_rows

    indices = torch.randint(0, 50, (3, 7))
    assert torch.equal(fp8_rows(table.weight, indices), F.embedding(indices, table.weight))


def test_a_plain_forward_under_the_precision_runs_the_fp8_op(no_backprop: None) -> None:
    """Validation, testing and inference under ``LowBitPrecision("fp8_e4m3")`` take the same FP8 matmul as the
    population (``_scaled_mm`` on the stored data, no dequantized weight), close to torchao's own forward; the
    weights stay torchao tensors."""
    from lightning_nobp.fabric import LowBitPrecision

    model, _ = mlp()
    precision = LowBitPrecision("fp8_e4m3", compute_dtype=torch.bfloat16, activation_quantization=True)
    precision.convert_module(model)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    fp8_weights = [p for p in model.parameters() if isinstance(p, Float8Tensor)]
    assert len(fp8_weights) == 2
    counts = OpCounts({tuple(p.shape) for p in fp8_weights})
    with precision.forward_context(), counts:
        ours = model(x)
    assert counts.ops.get("aten._scaled_mm.default", 0) == 2  # called directly: no dispatcher round trip
    assert not {"aten.mm.default", "aten.addmm.default", "aten.linear.default"} & set(counts.ops)  # no bf16 matmul
    assert counts.weight_shaped == 0
    with torch.no_grad():
        torchao = model(x)  # outside the context: torchao's own dispatch
    assert (ours.float() - torchao.float()).norm() / torchao.float().norm() < 0.05
    assert all(isinstance(p, Float8Tensor) for p in fp8_weights)
