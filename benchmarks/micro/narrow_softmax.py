"""PyTorch's CPU ``log_softmax`` over a narrow last dimension against ``transposed_log_softmax``.

For each class count, times ``torch.log_softmax(logits, -1)`` and ``transposed_log_softmax(logits)`` on logits of
``rows`` rows (by default 256 members x 256 samples: one EggRoll step's logits on digits), interleaved over several
rounds, one torch thread; reports the median milliseconds and their ratio as JSON. ``NarrowSoftmaxMode`` takes the
transposed path for 2 to ``NARROW`` classes, where it wins.

    python benchmarks/micro/narrow_softmax.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lightning_nobp.perturb.narrow_softmax import NARROW, transposed_log_softmax


def median_ms(function, repeats: int) -> float:
    """Median wall milliseconds of ``function()`` over ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256 * 256)
    parser.add_argument("--classes", default="2,10,15,16,32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "narrow_softmax.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for classes in (int(c) for c in args.classes.split(",")):
        logits = torch.randn(args.rows, classes)
        native = median_ms(lambda: torch.log_softmax(logits, -1), args.repeats)
        transposed = median_ms(lambda: transposed_log_softmax(logits), args.repeats)
        rows.append(
            {
                "classes": classes,
                "native_ms": native,
                "transposed_ms": transposed,
                "speedup": native / transposed,
                "mode_uses_transposed": 1 < classes <= NARROW,
            }
        )
        print(
            f"{classes:3d} classes: native {native:6.2f} ms, transposed {transposed:6.2f} ms"
            f" ({native / transposed:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "narrow_softmax", "rows_per_call": args.rows, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
