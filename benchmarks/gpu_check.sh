#!/usr/bin/env bash
# One prepared GPU check for a lent H200 (under 5 minutes): the step-cost, population-throughput and low-bit
# benchmarks on the 1.1B-parameter GPT, then one table. Needs torch and lightning (on the device image) and torchao
# (not on it): fetch the wheel here with `pip download torchao==0.18.0 --no-deps -d .wheels` and pass
# `carry=[".wheels"]`; it is installed with --no-deps into a local target.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if ! python -c "import torchao" 2>/dev/null && ls .wheels/torchao-*.whl >/dev/null 2>&1; then
  pip install --quiet --no-deps --target .wheels/site .wheels/torchao-*.whl && export PYTHONPATH="$PYTHONPATH:$PWD/.wheels/site"
fi
timeout 120 python benchmarks/step_cost.py --device cuda --preset gpt-1b --batch-size 8 --out "$out/step_cost.json" \
  || echo "step_cost failed or timed out"
timeout 150 python benchmarks/population_throughput.py --device cuda --populations 32,64,256 --ranks 1 \
  --out "$out/population_throughput.json" || echo "population_throughput failed or timed out"
timeout 120 python benchmarks/lowbit.py --device cuda --formats fp8_e4m3,nvfp4 --out "$out/lowbit.json" \
  || echo "lowbit failed or timed out"
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
low = out / "lowbit.json"
if low.exists():
    r = json.loads(low.read_text())
    for name, f in r["formats"].items():
        u = f.get("fused_update")
        if u:
            rows.append((f"fused update {name} ({u['kernel']}) / copy bandwidth", f"{u['fraction_of_copy_bandwidth']:.2f}",
                         f"{f['bytes_per_weight']['bytes_per_weight']:.3f} B/weight"))
        m = f.get("step_memory", {})
        if m.get("step_over_inference"):
            rows.append((f"{name} training step / inference peak memory", "-", f"{m['step_over_inference']:.2f}"))
    if "fp8_over_bf16_population_forward" in r:
        rows.append(("fp8 / bf16 population forward tokens/s", f"{r['fp8_over_bf16_population_forward']:.2f}", "-"))
print(f"| {'what':<45} | {'tokens/s or ratio':<22} | {'GiB or memory ratio':<19} |")
print(f"| {'-' * 45} | {'-' * 22} | {'-' * 19} |")
for what, speed, memory in rows:
    print(f"| {what:<45} | {speed:<22} | {memory:<19} |")
PY
