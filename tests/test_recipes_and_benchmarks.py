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
        "benchmarks/throughput/step_cost.py",
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


def _gpu_check_folder(tmp_path: Path) -> Path:
    """The files the last H200 check wrote, laid out as ``benchmarks/gpu/gpu_check.sh`` writes them."""
    import shutil

    measured = ROOT / "benchmarks" / "measured" / "h200-2026-11-29"
    for name in ("step_cost.json", "population_throughput.json", "lowbit.json", "gpt1b_timeline.json"):
        shutil.copy(measured / name, tmp_path / name)
    shutil.copy(measured / "gpt1b_report.txt", tmp_path / "gpt1b.log")
    (tmp_path / "gpt1b" / "version_0").mkdir(parents=True)
    shutil.copy(measured / "gpt1b_metrics.csv", tmp_path / "gpt1b" / "version_0" / "metrics.csv")
    return tmp_path


def test_gpu_table_reads_the_token_counts_from_the_recipe(tmp_path: Path) -> None:
    """The GPU check's table: the committed H200 run (pair slices, 32 sequences a step) gives back its committed
    rates; the same files read with a shared-data recipe of 2 sequences a step give the rates that recipe implies."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import gpu_table

    out = _gpu_check_folder(tmp_path)
    recipe = yaml.safe_load((ROOT / "recipes" / "gpt-1b-eggroll-fp8.yaml").read_text())
    strategy = recipe["trainer"]["strategy"]["init_args"]
    before = {**recipe, "data": {"init_args": {"batch_size": 32, "block_size": 1024}}}
    before["trainer"] = {"strategy": {"init_args": {**strategy, "execution": {"member_data": "pair_slices"}}}}
    assert gpu_table.member_tokens(before) == (32 * 1024, 32, 2 * 1024)  # each pair scores its own 2 sequences
    table = gpu_table.format_table(gpu_table.benchmark_rows(out) + gpu_table.recipe_rows(out, before))
    assert "| step_cost inference" in table and "252,077" in table
    assert re.search(r"179 steps in 194 s, training tokens/s\s*\|\s*30,250 ", table)  # the figure in docs/results.md
    assert re.search(r"population forward tokens/s \(median\)\s*\|\s*83,185 ", table)
    assert "179: 5.272" in table and re.search(r"held-out test bits/byte\s*\|\s*5.3840 ", table)

    batch, block = recipe["data"]["init_args"]["batch_size"], recipe["data"]["init_args"]["block_size"]
    population = strategy["algorithm"]["init_args"]["population"]
    assert (strategy.get("execution") or {}).get("member_data", "shared") == "shared"
    assert gpu_table.member_tokens(recipe) == (batch * block, population, batch * block)
    rows = dict((what, speed) for what, speed, _ in gpu_table.recipe_rows(out, recipe))
    assert rows["gpt-1b fp8 recipe: 179 steps in 194 s, training tokens/s"] == f"{179 * batch * block / 193.9:,.0f}"
    forwards = rows["gpt-1b population token-forwards/s (whole fit)"]
    assert forwards == f"{179 * population * batch * block / 193.9:,.0f}"
    assert gpu_table.recipe_rows(tmp_path / "absent", recipe) == []
