"""How much keeping freed CPU memory in the process (``NoBackpropStrategy(cpu_tuning=CpuTuning())``) speeds up a step.

The malloc setting is process-wide and one-way, so every measurement runs
``benchmarks/throughput/estimator_step.py`` in a fresh process, alternating the default allocator and the tuned one
for several rounds (the machines are shared: alternation spreads their noise over both). Reports the median CPU
milliseconds per step of each and their ratio, per population, as JSON.

    python benchmarks/micro/cpu_allocator.py                      # Fashion-MNIST MLP, populations 64 and 256
    python benchmarks/micro/cpu_allocator.py --populations 64 --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STEP_SCRIPT = Path(__file__).resolve().parents[1] / "throughput" / "estimator_step.py"


def step_ms(population: int, steps: int, tuned: bool) -> float:
    """CPU milliseconds per EggRoll step of one fresh process (``estimator_step.py``)."""
    command = [sys.executable, str(STEP_SCRIPT), "--population", str(population), "--steps", str(steps)]
    if tuned:
        command.append("--keep-freed-cpu-memory")
    environment = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return float(json.loads(output.strip().splitlines()[-1])["cpu_ms_per_step"])


def compare(population: int, rounds: int, steps: int) -> dict:
    """Median step time with the default and the tuned allocator, over ``rounds`` alternating pairs of processes.

    Args:
        population: EggRoll's population (the activations grow with it).
        rounds: pairs of processes.
        steps: timed steps per process.
    """
    default, tuned = [], []
    for _ in range(rounds):
        default.append(step_ms(population, steps, tuned=False))
        tuned.append(step_ms(population, steps, tuned=True))
    return {
        "population": population,
        "default_ms": default,
        "reuse_cpu_memory_ms": tuned,
        "median_default_ms": statistics.median(default),
        "median_reuse_cpu_memory_ms": statistics.median(tuned),
        "speedup": statistics.median(default) / statistics.median(tuned),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="64,256", help="comma list of EggRoll populations")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "cpu_allocator.json"
    )
    args = parser.parse_args()
    rows = [compare(int(p), args.rounds, args.steps) for p in args.populations.split(",")]
    for row in rows:
        print(
            f"population {row['population']:4d}: default {row['median_default_ms']:.1f} ms, reuse_cpu_memory"
            f" {row['median_reuse_cpu_memory_ms']:.1f} ms per step ({row['speedup']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "cpu_allocator", "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
