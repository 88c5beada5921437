#!/usr/bin/env bash
# One prepared GPU check for a lent H200 (about 3 minutes): the step-cost and population-throughput benchmarks on
# the 1.1B-parameter GPT, then one table. Needs only torch and lightning (both on the device image).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 120 python benchmarks/step_cost.py --device cuda --preset gpt-1b --batch-size 8 --out "$out/step_cost.json" \
  || echo "step_cost failed or timed out"
timeout 150 python benchmarks/population_throughput.py --device cuda --populations 32,64,256 --ranks 1 \
  --out "$out/population_throughput.json" || echo "population_throughput failed or timed out"
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
step = out / "step_cost.json"
if step.exists():
    r = json.loads(step.read_text())
    for mode, m in r["modes"].items():
        peak = m.get("peak_memory_bytes")
        rows.append((f"step_cost {mode}", f"{m['tokens_per_s']:,.0f}", f"{peak / 2**30:.1f}" if peak else "-"))
    rows.append(("MeZO / inference (tokens/s, memory)", f"{r['mezo_throughput_ratio']:.2f}", f"{r['mezo_memory_ratio']:.2f}"))
pop = out / "population_throughput.json"
if pop.exists():
    r = json.loads(pop.read_text())
    for row in r["populations"]:
        rows.append((f"EggRoll P={row['population']} r={row['rank']} / inference",
                     f"{row['forward_throughput_ratio']:.2f} (step {row['step_throughput_ratio']:.2f})",
                     f"{row.get('memory_ratio', float('nan')):.2f}"))
print(f"| {'what':<45} | {'tokens/s or ratio':<22} | {'GiB or memory ratio':<19} |")
print(f"| {'-' * 45} | {'-' * 22} | {'-' * 19} |")
for what, speed, memory in rows:
    print(f"| {what:<45} | {speed:<22} | {memory:<19} |")
PY
