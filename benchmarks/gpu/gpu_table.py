"""The one table ``benchmarks/gpu/gpu_check.sh`` prints: its benchmarks' JSON files and the 1B recipe's log, summarized.

Reads what the GPU check wrote into its output folder (``step_cost.json``, ``population_throughput.json``,
``memory.json``, ``sync_check.json``, ``lowbit.json``, ``gpt1b.log``, ``gpt1b_timeline.json``,
``gpt1b/version_*/metrics.csv``); a missing file leaves
its rows out. The 1B recipe's batch, block and population are read from the recipe itself, so the token rates follow
the recipe when it changes.

    python benchmarks/gpu/gpu_table.py OUT_DIR [--recipe recipes/gpt-1b-eggroll-fp8.yaml]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "gpt-1b-eggroll-fp8.yaml"
#: the corpus's unigram bits per byte (``nobp fit -c recipes/shakespeare-bigram.yaml --model.order 1``)
UNIGRAM_BPB = 4.731

Row = tuple[str, str, str]


def member_tokens(recipe: dict) -> tuple[int, int, int]:
    """``(training tokens a step, population, tokens one member scores a step)`` of a GPT recipe.

    Args:
        recipe: the recipe's YAML, loaded.
    """
    data = recipe["data"]["init_args"]
    strategy = recipe["trainer"]["strategy"]["init_args"]
    population = int(strategy["algorithm"]["init_args"]["population"])
    step_tokens = int(data["batch_size"]) * int(data["block_size"])
    if (strategy.get("execution") or {}).get(
        "member_data", "shared"
    ) == "pair_slices":  # each antithetic pair scores its own slice
        return step_tokens, population, step_tokens * 2 // population
    return step_tokens, population, step_tokens


def benchmark_rows(out: Path) -> list[Row]:
    """Rows of the step-cost, population-throughput and low-bit benchmarks (those present in ``out``)."""
    rows: list[Row] = []
    step = out / "step_cost.json"
    if step.exists():
        r = json.loads(step.read_text())
        for mode, m in r["modes"].items():
            peak = m.get("peak_memory_bytes")
            rows.append((f"step_cost {mode}", f"{m['tokens_per_s']:,.0f}", f"{peak / 2**30:.1f}" if peak else "-"))
        rows.append(
            (
                "MeZO / inference (tokens/s, memory)",
                f"{r['mezo_throughput_ratio']:.2f}",
                f"{r['mezo_memory_ratio']:.2f}",
            )
        )
    population = out / "population_throughput.json"
    if population.exists():
        for row in json.loads(population.read_text())["populations"]:
            rows.append(
                (
                    f"EggRoll P={row['population']} r={row['rank']} / inference",
                    f"{row['forward_throughput_ratio']:.2f} (step {row['step_throughput_ratio']:.2f})",
                    f"{row.get('memory_ratio', float('nan')):.2f}",
                )
            )
    memory = out / "memory.json"
    if memory.exists():
        r = json.loads(memory.read_text())
        rows.append(("MeZO step / inference peak memory", "-", f"{r['mezo_peak_over_inference']:.3f}"))
        rows.append(("EggRoll step / inference peak memory (chunk)", "-", f"{r['eggroll_peak_over_inference']:.3f}"))
    sync = out / "sync_check.json"
    if sync.exists():
        for name, c in json.loads(sync.read_text())["checks"].items():
            verdict = "no sync" if c["synchronisation_free"] else f"syncs: {c.get('error') or c.get('host_reads')}"
            rows.append((f"{name} step under sync debug mode", verdict[:22], "-"))
    low = out / "lowbit.json"
    if low.exists():
        r = json.loads(low.read_text())
        for name, f in r["formats"].items():
            update = f.get("fused_update")
            if update:
                rows.append(
                    (
                        f"fused update {name} ({update['kernel']}) / copy bandwidth",
                        f"{update['fraction_of_copy_bandwidth']:.2f}",
                        f"{f['bytes_per_weight']['bytes_per_weight']:.3f} B/weight",
                    )
                )
            memory = f.get("step_memory", {})
            if memory.get("step_over_inference"):
                rows.append(
                    (f"{name} training step / inference peak memory", "-", f"{memory['step_over_inference']:.2f}")
                )
        if "fp8_over_bf16_population_forward" in r:
            rows.append(("fp8 / bf16 population forward tokens/s", f"{r['fp8_over_bf16_population_forward']:.2f}", "-"))
        for key, label in (
            ("fp8_inference_over_bf16_inference", "fp8 inference / bf16 inference (goal >= 1.25)"),
            ("fp8_population_over_bf16_inference", "fp8 population / bf16 inference (goal >= 1.35)"),
            ("int8_inference_over_bf16_inference", "int8 inference / bf16 inference"),
            ("int8_population_over_bf16_inference", "int8 population / bf16 inference"),
        ):
            if key in r:
                rows.append((label, f"{r[key]:.2f}", r.get("baseline", "-")[:40]))
    return rows


def recipe_rows(out: Path, recipe: dict) -> list[Row]:
    """Rows of the 1B recipe's run: steps, token rates, peak memory, the validation and training curves."""
    log = out / "gpt1b.log"
    if not log.exists():
        return []
    rows: list[Row] = []
    step_tokens, population, per_member = member_tokens(recipe)
    text = log.read_text()
    fit = re.search(r"fit ran (\d+) optimizer steps in ([\d.]+) s.*?peak GPU memory ([\d.]+) GiB", text)
    if fit:
        steps, seconds, peak = int(fit.group(1)), float(fit.group(2)), float(fit.group(3))
        rows.append(
            (
                f"gpt-1b fp8 recipe: {steps} steps in {seconds:.0f} s, training tokens/s",
                f"{steps * step_tokens / seconds:,.0f}",
                f"{peak:.1f}",
            )
        )
        rows.append(
            ("gpt-1b population token-forwards/s (whole fit)", f"{steps * population * per_member / seconds:,.0f}", "-")
        )
    timeline = out / "gpt1b_timeline.json"
    if timeline.exists():
        data = json.loads(timeline.read_text())
        records = data if isinstance(data, list) else data.get("records", [])
        curve = ", ".join(f"{r['step']}: {r['val_bpb']:.3f}" for r in records if "val_bpb" in r)
        rows.append((f"gpt-1b val bits/byte by step (unigram {UNIGRAM_BPB})", curve or "-", "-"))
    held = re.search(r"held-out test_bpb = ([\d.]+)", text)
    if held:
        rows.append(("gpt-1b held-out test bits/byte", held.group(1), "-"))
    for metrics in sorted(out.glob("gpt1b/version_*/metrics.csv"))[-1:]:
        with metrics.open() as handle:
            logged = list(csv.DictReader(handle))
        rates = [float(r["nobp/members_per_second"]) for r in logged if r.get("nobp/members_per_second")]
        losses = [(int(r["step"]), float(r["train_loss"])) for r in logged if r.get("train_loss")]
        if rates:
            rows.append(
                ("gpt-1b population forward tokens/s (median)", f"{statistics.median(rates) * per_member:,.0f}", "-")
            )
        if losses:
            picked = losses[:: max(1, len(losses) // 6)] + losses[-1:]
            curve = ", ".join(f"{step}: {loss / 0.6931:.2f}" for step, loss in dict(picked).items())
            rows.append(("gpt-1b train bits/byte by step", curve, "-"))
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as one Markdown table."""
    lines = [f"| {'what':<45} | {'tokens/s or ratio':<22} | {'GiB or memory ratio':<19} |"]
    lines.append(f"| {'-' * 45} | {'-' * 22} | {'-' * 19} |")
    lines += [f"| {what:<45} | {speed:<22} | {memory:<19} |" for what, speed, memory in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the GPU check's output folder")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the 1B recipe the check ran")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(args.recipe.read_text())
    table = format_table(benchmark_rows(args.out) + recipe_rows(args.out, recipe))
    print(table)
    return table


if __name__ == "__main__":
    main()
