"""Host cost of one FP8 (and int8) linear call against a bf16 one, on shapes small enough that the host dominates.

Times, per call (median of ``--repeats`` loops of ``--calls`` calls each): ``F.linear`` on a bf16 weight, the
package's ``lightning_nobp::fp8_linear`` on a torchao ``Float8Tensor``'s stored data (activations quantized per row,
one ``torch._scaled_mm``), the same ``nn.Linear`` called under ``LowBitLinearMode`` (what a plain forward under
``LowBitPrecision("fp8_e4m3")`` runs: validation, testing, inference), and ``F.linear`` on the same ``Float8Tensor``
through torchao's own dispatch; then the same for an int8 ``Int8Tensor`` (``lightning_nobp::int8_linear``: one
``torch._int_mm`` on the stored codes). Writes JSON with the ratios against bf16 from the same run.

    python benchmarks/micro/fp8_linear.py --out benchmarks/measured/cpu-2026-12-06/fp8_linear.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.kernels.fp8_linear import fp8_linear
from lightning_nobp.kernels.int8_linear import int8_linear
from lightning_nobp.kernels.lowbit_linear import LowBitLinearMode
from lightning_nobp.lowbit.convert import convert_to_low_bit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from reports import write_report  # noqa: E402


def per_call_seconds(call: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``calls`` calls (after one warm loop)."""
    for _ in range(calls):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        timings.append((time.perf_counter() - start) / calls)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="activation rows")
    parser.add_argument("--features", type=int, default=64, help="input and output width")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_linear.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16 = nn.Linear(args.features, args.features).to(torch.bfloat16)
    fp8 = nn.Linear(args.features, args.features)
    convert_to_low_bit(fp8, "fp8_e4m3", compute_dtype=torch.bfloat16, activation_quantization=True)
    x = torch.randn(args.rows, args.features, dtype=torch.bfloat16)
    weight, bias = fp8.weight, fp8.bias
    with torch.no_grad():
        seconds = {
            "bf16_linear": per_call_seconds(lambda: F.linear(x, bf16.weight, bf16.bias), args.calls, args.repeats),
            "fp8_linear_op": per_call_seconds(
                lambda: fp8_linear(x, weight.qdata, weight.scale, bias), args.calls, args.repeats
            ),
            "torchao_fp8_linear": per_call_seconds(lambda: F.linear(x, weight, bias), args.calls, args.repeats),
        }
        with LowBitLinearMode():
            seconds["fp8_plain_forward"] = per_call_seconds(lambda: fp8(x), args.calls, args.repeats)
        int8 = nn.Linear(args.features, args.features)
        convert_to_low_bit(int8, "int8", compute_dtype=torch.bfloat16, activation_quantization=True)
        codes, scales, int8_bias = int8.weight.qdata, int8.weight.scale, int8.bias
        seconds["int8_linear_op"] = per_call_seconds(
            lambda: int8_linear(x, codes, scales, int8_bias), args.calls, args.repeats
        )
        with LowBitLinearMode():
            seconds["int8_plain_forward"] = per_call_seconds(lambda: int8(x), args.calls, args.repeats)
    report = {
        "torch": torch.__version__,
        "device": "cpu",
        "threads": args.threads,
        "shape": {"rows": args.rows, "in": args.features, "out": args.features},
        "seconds_per_call": seconds,
        "fp8_op_over_bf16": seconds["fp8_linear_op"] / seconds["bf16_linear"],
        "torchao_fp8_over_bf16": seconds["torchao_fp8_linear"] / seconds["bf16_linear"],
        "fp8_plain_forward_over_bf16": seconds["fp8_plain_forward"] / seconds["bf16_linear"],
        "int8_op_over_bf16": seconds["int8_linear_op"] / seconds["bf16_linear"],
        "int8_plain_forward_over_bf16": seconds["int8_plain_forward"] / seconds["bf16_linear"],
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
