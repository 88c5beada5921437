"""``benchmarks/throughput/population_throughput.py`` runs on CPU and reports EggRoll population throughput against
inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULT_KEYS = {
    "population",
    "rank",
    "chunk",
    "population_forward_tokens_per_s",
    "step_tokens_per_s",
    "forward_throughput_ratio",
    "step_throughput_ratio",
    "forward_seconds",
    "step_seconds",
    "peak_memory_bytes",
    "step_peak_memory_bytes",
    "tensor_bytes_estimate",
    "memory_ratio",
}


def run_benchmark(out: Path, *args: str) -> dict:
    """Run the script as a subprocess on CPU and return its JSON report.

    Args:
        out: where the script writes its report.
        *args: further command-line arguments.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = "benchmarks/throughput/population_throughput.py"
    command = [sys.executable, script, "--device", "cpu", "--out", str(out), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout[result.stdout.index("\n{") :]) == report  # the same JSON is printed
    return report


def test_population_throughput_reports_ratios_against_inference(tmp_path: Path) -> None:
    report = run_benchmark(
        tmp_path / "nested" / "population_throughput.json",
        *("--preset", "tiny", "--batch-size", "1", "--seq-len", "16"),
        *("--populations", "8,6", "--ranks", "1,2", "--repeats", "1", "--chunk", "4"),
    )
    for key in ("torch", "device", "preset", "parameters", "batch_size", "seq_len", "chunk", "memory_basis"):
        assert key in report
    assert report["device"] == "cpu" and report["preset"] == "tiny"
    assert report["batch_tokens"] == report["batch_size"] * report["seq_len"] == 16
    assert report["inference"]["tokens_per_s"] > 0
    assert report["inference"]["peak_memory_bytes"] is None  # no allocator peak on CPU: the estimate is used
    assert "null" in report["memory_basis"]

    results = report["populations"]
    assert [(r["population"], r["rank"]) for r in results] == [(8, 1), (8, 2), (6, 1), (6, 2)]
    assert [r["chunk"] for r in results] == [4, 4, 3, 3]  # capped at P and lowered to a divisor of P
    for result in results:
        assert RESULT_KEYS <= set(result)
        assert result["forward_throughput_ratio"] > 0 and result["step_throughput_ratio"] > 0
        assert result["step_seconds"] >= result["forward_seconds"] > 0
        expected = result["population"] * report["batch_tokens"] / result["forward_seconds"]
        assert abs(result["population_forward_tokens_per_s"] - expected) < 1e-6 * expected
        assert result["peak_memory_bytes"] is None
        assert result["tensor_bytes_estimate"] > report["inference"]["tensor_bytes_estimate"]
        assert result["memory_ratio"] > 1.0
    low, high = results[0]["tensor_bytes_estimate"], results[1]["tensor_bytes_estimate"]
    assert high > low  # rank 2 stacks larger low-rank factors than rank 1
