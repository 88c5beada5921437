"""Low-bit storage benchmark: bytes per weight, fused-update bandwidth, fp8 vs bf16 population forward, memory.

For every format the GPT is converted by ``LowBitPrecision`` and the script measures, in one run:
- bytes per weight (``memory_report``);
- the fused update (``apply_low_bit_updates``: every low-bit weight of the model in one launch per format, with
  an EggRoll low-rank estimate of P rank-1 members), and its achieved bandwidth (bytes of the low-bit weights read
  + written per second) against a device-to-device copy of the same bytes measured in the same run;
- the population forward (EggRoll, batched members) in tokens per second with fp8 weights against bf16 weights;
- the peak memory of a whole training step (population forward + update) with fp8 weights against fp8 inference
  (CUDA only: CPU has no allocator peak).

    python benchmarks/throughput/lowbit.py --device cpu            # GPT "small", the reference kernels
    python benchmarks/throughput/lowbit.py --device cuda           # GPT "gpt-1b" (1.1B parameters), the Triton kernels
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from devices import device_name, free_memory, peak_memory, reset_peak_memory, synchronize  # noqa: E402

from lightning_nobp.algorithms import EggRoll  # noqa: E402
from lightning_nobp.fabric.precision import LowBitPrecision  # noqa: E402
from lightning_nobp.kernels.lowbit_linear import LowBitLinearMode  # noqa: E402
from lightning_nobp.kernels.lowbit_update import UpdateTerms  # noqa: E402
from lightning_nobp.lowbit.formats import Float8Tensor, Int8Tensor  # noqa: E402
from lightning_nobp.kernels.triton_support import use_triton  # noqa: E402
from lightning_nobp.lowbit import apply_low_bit_updates, is_low_bit, memory_report  # noqa: E402
from lightning_nobp.lowbit.memory import storage_bytes  # noqa: E402
from lightning_nobp.models.gpt import GPT, GPTConfig  # noqa: E402
from lightning_nobp.perturb import PopulationEstimator  # noqa: E402
from lightning_nobp.perturb.direct_step import DirectHyperparameters  # noqa: E402

FORMATS = ("fp8_e4m3", "int8", "nvfp4", "mxfp4")


def build_model(preset: str, weights: str, device: torch.device) -> GPT:
    """The GPT built in bf16 on ``device`` and converted to ``weights`` (no FP32 copy ever exists)."""
    precision = LowBitPrecision(weights, activation_quantization=None)
    torch.manual_seed(0)
    with torch.device(device), precision.module_init_context():
        model = GPT(GPTConfig.preset(preset))
    precision.convert_module(model)
    return model.eval()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def low_rank_terms(weight: Tensor, population: int, generator: torch.Generator) -> UpdateTerms:
    """An EggRoll-shaped update: ``sum_m c_m a_m b_m^T`` over ``population`` rank-1 members, lr folded in."""
    rows, cols = weight.shape
    device = weight.device
    a = torch.randn(rows, population, generator=generator, device=device) * 1e-4
    b = torch.randn(cols, population, generator=generator, device=device)
    return UpdateTerms(decay=1.0, factor_a=a, factor_b=b)


def measure_update(model: GPT, population: int, repeats: int, device: torch.device) -> dict:
    """Fused update over every low-bit weight; bandwidth against a copy of the same bytes."""
    weights = [p for p in model.parameters() if is_low_bit(p)]
    generator = torch.Generator(device=device).manual_seed(0)
    terms = [low_rank_terms(w, population, generator) for w in weights]
    moved = sum(storage_bytes(w) for w in weights)

    def update() -> None:
        apply_low_bit_updates([(weight, term, index) for index, (weight, term) in enumerate(zip(weights, terms))])

    seconds = timed(update, device, repeats)
    source = torch.empty(moved, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_seconds = timed(lambda: target.copy_(source), device, repeats)
    bandwidth = 2 * moved / seconds  # each stored byte read once and written once
    copy_bandwidth = 2 * moved / copy_seconds
    return {
        "low_bit_bytes": moved,
        "seconds": seconds,
        "bandwidth_bytes_per_s": bandwidth,
        "copy_bandwidth_bytes_per_s": copy_bandwidth,
        "fraction_of_copy_bandwidth": bandwidth / copy_bandwidth,
        "kernel": "triton" if use_triton(device) else "reference",
        "launches": "one per format (grouped, one pass)" if use_triton(device) else "reference, weight by weight",
        "low_rank_rank": population,
    }


def measure_population(
    model: GPT, population: int, batch: int, seq_len: int, repeats: int, device: torch.device
) -> dict:
    """EggRoll population forward (members batched with vmap) in tokens per second, and inference for scale."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    algorithm = EggRoll(population=population, rank=1, sigma=1e-3, population_chunk=population)
    params = [p for p in model.parameters() if p.requires_grad]
    estimator = PopulationEstimator(algorithm, [model], params)
    population_obj = algorithm.ask(0)

    def loss_fn() -> Tensor:
        return model.loss(inputs, targets)

    with torch.no_grad():
        reset_peak_memory(device)
        inference_seconds = timed(loss_fn, device, repeats)
        inference_peak = peak_memory(device)
        reset_peak_memory(device)
        forward_seconds = timed(lambda: estimator.evaluate_members(population_obj, loss_fn), device, repeats)
        forward_peak = peak_memory(device)
    batch_tokens = batch * seq_len
    return {
        "inference_tokens_per_s": batch_tokens / inference_seconds,
        "population_tokens_per_s": population * batch_tokens / forward_seconds,
        "inference_peak_bytes": inference_peak,
        "population_peak_bytes": forward_peak,
    }


def measure_inference(model: GPT, batch: int, seq_len: int, repeats: int, device: torch.device, compile: bool) -> dict:
    """Plain inference (the loss of one batch) in tokens per second, eager and, with ``compile``, compiled; fp8 and
    int8 weights under ``LowBitLinearMode`` (what ``LowBitPrecision``'s forward context runs)."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    quantized = any(isinstance(p, (Float8Tensor, Int8Tensor)) for p in model.parameters())
    routing = LowBitLinearMode if quantized else contextlib.nullcontext

    def loss_fn() -> Tensor:
        return model.loss(inputs, targets)

    result: dict = {}
    with torch.no_grad(), routing():
        result["eager_tokens_per_s"] = batch * seq_len / timed(loss_fn, device, repeats)
        if compile:
            try:
                compiled = torch.compile(loss_fn)
                result["compiled_tokens_per_s"] = batch * seq_len / timed(compiled, device, repeats, warmup=2)
            except Exception as error:  # noqa: BLE001 - recorded in the report instead
                result["compiled_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return result


def measure_step_memory(model: GPT, population: int, batch: int, seq_len: int, device: torch.device) -> dict:
    """Peak memory of one whole step (population forward, tell, fused update) against plain inference."""
    if device.type != "cuda":
        return {"note": "peak memory is measured on CUDA only"}
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    algorithm = EggRoll(population=population, rank=1, sigma=1e-3, population_chunk=min(population, 8))
    params = [p for p in model.parameters() if p.requires_grad]
    estimator = PopulationEstimator(algorithm, [model], params)
    free_memory()
    with torch.no_grad():
        reset_peak_memory(device)
        model.loss(inputs, targets)
        synchronize(device)
        inference_peak = peak_memory(device)
        reset_peak_memory(device)
        members = algorithm.ask(1)
        fitness = estimator.evaluate_members(members, lambda: model.loss(inputs, targets))
        estimate = algorithm.tell(members, fitness)
        assert estimate.coefficients is not None
        settings = [DirectHyperparameters(1e-3)] * len(params)
        estimator.apply_update([(members, estimate.coefficients)], settings, 7, normalize=True)
        synchronize(device)
        step_peak = peak_memory(device)
    return {
        "inference_peak_bytes": inference_peak,
        "step_peak_bytes": step_peak,
        "step_over_inference": step_peak / inference_peak if inference_peak else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--preset", default=None, help='GPT size; default "small" on CPU, "gpt-1b" on CUDA')
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated low-bit formats")
    parser.add_argument("--population", type=int, default=None, help="members; default 8 CPU, 32 CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default 2 CPU, 4 CUDA")
    parser.add_argument("--seq-len", type=int, default=None, help="default 64 CPU, 1024 CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compiled inference (the GPU baseline)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowbit.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("gpt-1b" if cuda else "small")
    population = args.population or (32 if cuda else 8)
    batch = args.batch_size or (4 if cuda else 2)
    seq_len = args.seq_len or (1024 if cuda else 64)
    result: dict = {"device": device_name(device), "preset": preset, "population": population, "formats": {}}
    for weights in ["bf16", *args.formats.split(",")]:
        free_memory()
        model = build_model(preset, weights, device)
        report = memory_report(model)
        entry: dict = {"bytes_per_weight": report.as_metrics(prefix="")}
        if weights != "bf16":
            entry["fused_update"] = measure_update(model, population, args.repeats, device)
        if weights in ("bf16", "fp8_e4m3", "int8"):
            entry["population_forward"] = measure_population(model, population, batch, seq_len, args.repeats, device)
            entry["inference"] = measure_inference(model, batch, seq_len, args.repeats, device, args.compile)
        if weights == "fp8_e4m3":
            entry["step_memory"] = measure_step_memory(model, population, batch, seq_len, device)
        result["formats"][weights] = entry
        print(weights, json.dumps(entry, default=float)[:400], flush=True)
        del model
    bf16 = result["formats"]["bf16"]["population_forward"]["population_tokens_per_s"]
    if "fp8_e4m3" in result["formats"]:
        fp8 = result["formats"]["fp8_e4m3"]["population_forward"]["population_tokens_per_s"]
        result["fp8_over_bf16_population_forward"] = fp8 / bf16
        inference = {w: result["formats"][w]["inference"] for w in ("bf16", "fp8_e4m3")}
        key = "compiled_tokens_per_s" if "compiled_tokens_per_s" in inference["bf16"] else "eager_tokens_per_s"
        baseline = inference["bf16"][key]
        result["baseline"] = f"bf16 inference ({key}), same token batch, same run"
        if key in inference["fp8_e4m3"]:
            result["fp8_inference_over_bf16_inference"] = inference["fp8_e4m3"][key] / baseline
        result["fp8_population_over_bf16_inference"] = fp8 / baseline
    if "int8" in result["formats"] and "population_forward" in result["formats"]["int8"]:
        int8 = result["formats"]["int8"]
        result["int8_over_bf16_population_forward"] = int8["population_forward"]["population_tokens_per_s"] / bf16
        inference = result["formats"]["bf16"]["inference"]
        key = "compiled_tokens_per_s" if "compiled_tokens_per_s" in inference else "eager_tokens_per_s"
        if key in int8["inference"]:
            result["int8_inference_over_bf16_inference"] = int8["inference"][key] / inference[key]
        result["int8_population_over_bf16_inference"] = int8["population_forward"]["population_tokens_per_s"] / (
            inference[key]
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
