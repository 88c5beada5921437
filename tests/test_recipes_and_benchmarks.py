"""The README's main job and the benchmarks run (smoke modes, a few seconds each)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_digits_recipe_smoke_prints_its_test_accuracy() -> None:
    output = run_script("recipes/digits_mezo.py", "--smoke")
    match = re.search(r"test accuracy (\d\.\d+) after (\d+) steps", output)
    assert match, output
    assert int(match.group(2)) == 5 * 12
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_step_cost_benchmark_reports_ratios_against_inference(tmp_path: Path) -> None:
    out = tmp_path / "step_cost.json"
    run_script(
        "benchmarks/step_cost.py",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"inference", "backprop_adamw", "mezo"}
    assert report["modes"]["mezo"]["forwards_per_step"] == 2
    assert report["mezo_memory_ratio"] == 1.0  # direct path: the weights are the only training state
    assert 4.0 <= report["backprop_memory_ratio"] < 4.01  # weights + gradients + two AdamW moments (+ step counters)
    assert report["mezo_throughput_ratio"] > 0
