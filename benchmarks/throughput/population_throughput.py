"""Throughput of a batched EggRoll population against inference, on the same GPT and the same token batch.

One run measures (a) an inference forward (``no_grad``, next-token loss) over the batch repeated ``chunk`` times,
the tokens one chunk of members evaluates at once, and (b) for every population size ``P`` and rank ``r`` asked
for, an EggRoll population evaluation (the members' noise drawn as the strategies draw it, then
``PopulationEstimator.evaluate_batched``: ``torch.func.vmap`` over chunks of members, low-rank corrections in
every ``nn.Linear`` and ``nn.Embedding``) and the full step: that evaluation, ``EggRoll.tell`` and the in-place update
``PopulationEstimator.apply_update``. Every member evaluates the whole batch, so a population's tokens/s is
``P * batch_tokens / seconds``; the ratios compare it with the inference tokens/s measured in the same run.
With ``--compile`` both sides are compiled (``torch.compile(fullgraph=True)`` for inference,
``EstimatorOptions(compile=True)`` for the population).

Memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) of the inference forward, of the
population evaluation and of the whole step. On CPU there is no peak counter, so the report gives an estimate
of the tensors that stay alive (parameters, plus the stacked perturbations of one chunk for a population;
activations are not counted) and says so under ``"memory_basis"``.

The weights are restored after each ``(P, r)``, so every configuration starts from the same model. Prints JSON
and writes it to ``--out``.

    python benchmarks/throughput/population_throughput.py --device cpu
    python benchmarks/throughput/population_throughput.py --device cpu --preset small --compile \
        --populations 32 --ranks 1
    python benchmarks/throughput/population_throughput.py --device cuda --populations 32,256,1024 --ranks 1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_nobp.algorithms import EggRoll
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.estimator import EstimatorOptions
from lightning_nobp.perturb.direct_step import DirectHyperparameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from devices import device_name, free_memory, peak_memory, reset_peak_memory, synchronize  # noqa: E402
from reports import write_report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIGMA = 1e-2
LEARNING_RATE = 1e-3
INFERENCE_MIN_SECONDS = 0.5
INFERENCE_MAX_ITERATIONS = 1000

MEMORY_BASIS = {
    "cuda": (
        "peak_memory_bytes: torch.cuda.max_memory_allocated over the mode (weights, batch, perturbations,"
        " activations); memory_ratio compares the step's peak with the inference peak"
    ),
    "cpu": (
        "peak_memory_bytes is null on CPU (no allocator peak counter). tensor_bytes_estimate: parameter bytes for"
        " inference; parameter bytes plus the stacked perturbation tensors of one chunk (low-rank factors of the"
        " nn.Linear and nn.Embedding weights, dense noise for the other parameters) for a population."
        " Activations are not counted."
        " memory_ratio compares the two estimates."
    ),
}


@dataclass
class Setup:
    """What every measurement shares: device, model shape, the token batch and how long to time.

    Args:
        device: where the model and the batch live.
        preset: name of the GPT preset.
        config: the GPT's shape.
        dtype: weight dtype.
        inputs: token ids ``(batch, seq_len)`` on ``device``.
        targets: next-token ids, same shape.
        populations: population sizes ``P`` to measure.
        ranks: EggRoll ranks to measure.
        chunk: requested members per batched forward (capped at ``P``, reduced to a divisor of ``P``).
        repeats: timed iterations per measurement.
        warmup: untimed iterations before them.
        compile: compile both the inference forward (``torch.compile``) and the population's evaluation
            (``EstimatorOptions(compile=True)``).
    """

    device: torch.device
    preset: str
    config: GPTConfig
    dtype: torch.dtype
    inputs: Tensor
    targets: Tensor
    populations: list[int]
    ranks: list[int]
    chunk: int
    repeats: int
    warmup: int
    compile: bool = False

    @property
    def batch_tokens(self) -> int:
        return self.inputs.numel()


def build_model(setup: Setup) -> GPT:
    """A GPT initialised from seed 0 directly on the device, cast to ``setup.dtype``, in eval mode.

    Args:
        setup: the benchmark's setup.
    """
    torch.manual_seed(0)
    with setup.device:
        model = GPT(setup.config)
    return model.to(setup.dtype).eval()


def make_loss_fn(model: GPT, setup: Setup) -> Callable[[], Tensor]:
    """The loss closure every mode evaluates: the model's next-token loss over the shared batch.

    Args:
        model: the GPT.
        setup: the benchmark's setup (the batch).
    """

    def loss_fn() -> Tensor:
        return model.loss(setup.inputs, setup.targets)

    return loss_fn


def parameter_bytes(model: GPT) -> int:
    """Bytes held by the model's parameters (a tied weight counts once).

    Args:
        model: the GPT.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolve_chunk(population: int, requested: int) -> int:
    """The members per batched forward: ``requested`` capped at ``population``, lowered to a divisor of it.

    ``EggRoll`` requires ``population_chunk`` to divide the population.

    Args:
        population: the population size ``P``.
        requested: the chunk asked for on the command line.
    """
    chunk = max(1, min(requested, population))
    while population % chunk:
        chunk -= 1
    return chunk


def time_inference(model: GPT, setup: Setup) -> dict:
    """Mode (a): the loss forward under ``no_grad`` over the batch repeated ``setup.chunk`` times (the tokens of
    one chunk of members); tokens/s, peak memory and the loss.

    A forward of a small model takes a millisecond, so the timed loop runs at least ``setup.repeats`` forwards
    and at least :data:`INFERENCE_MIN_SECONDS` (estimated from one extra forward).

    Args:
        model: the GPT.
        setup: the benchmark's setup.
    """
    rows = setup.chunk
    inputs, targets = setup.inputs.repeat(rows, 1), setup.targets.repeat(rows, 1)

    @torch.no_grad()
    def loss_fn() -> Tensor:
        return model.loss(inputs, targets)

    if setup.compile:
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    for _ in range(max(setup.warmup, 2 if setup.compile else 0)):
        loss_fn()
    synchronize(setup.device)
    start = time.perf_counter()
    loss_fn()
    synchronize(setup.device)
    one = max(time.perf_counter() - start, 1e-6)
    iterations = min(max(setup.repeats, math.ceil(INFERENCE_MIN_SECONDS / one)), INFERENCE_MAX_ITERATIONS)
    reset_peak_memory(setup.device)
    start = time.perf_counter()
    for _ in range(iterations):
        loss = loss_fn()
    synchronize(setup.device)
    seconds = (time.perf_counter() - start) / iterations
    result = {
        "tokens_per_s": rows * setup.batch_tokens / seconds,
        "batch_tokens": rows * setup.batch_tokens,
        "seconds": seconds,
        "iterations": iterations,
        "peak_memory_bytes": peak_memory(setup.device),
        "tensor_bytes_estimate": parameter_bytes(model),
        "loss": float(loss),
    }
    print(f"[population_throughput] inference: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def perturbation_bytes(estimator: PopulationEstimator, algorithm: EggRoll, chunk: int) -> int:
    """Bytes of the stacked perturbation tensors of one chunk, as ``evaluate_batched`` builds them.

    Uses the estimator's ``noise.chunk``, so the estimate follows
    whatever the library actually stacks: low-rank factors for ``nn.Linear`` and ``nn.Embedding`` weights,
    dense noise otherwise.

    Args:
        estimator: the population estimator.
        algorithm: its EggRoll algorithm.
        chunk: members per batched forward.
    """
    tensors, _ = estimator.noise.chunk(algorithm.ask(0), list(range(chunk))).flat()
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StepTimes:
    """Wall-clock seconds of one population step and its peak memory.

    Args:
        forward: seconds of ``prefetch_noise`` (the members' noise, drawn as the strategies do) +
            ``evaluate_batched``.
        step: seconds of the forward + ``tell`` + ``apply_update``.
        forward_peak: CUDA peak during the evaluation (``None`` on CPU).
        step_peak: CUDA peak during the whole step (``None`` on CPU).
        fitness_mean: mean loss over the members.
    """

    forward: float
    step: float
    forward_peak: int | None
    step_peak: int | None
    fitness_mean: float


def population_step(
    estimator: PopulationEstimator, algorithm: EggRoll, loss_fn: Callable[[], Tensor], seed: int, device: torch.device
) -> StepTimes:
    """One ask / evaluate_batched / tell / apply_update step, timed in two parts.

    Args:
        estimator: the population estimator over the model's parameters.
        algorithm: its EggRoll algorithm.
        loss_fn: the loss closure.
        seed: the step seed passed to ``ask``.
        device: the model's device (for synchronisation and peak memory).
    """
    population = algorithm.ask(seed)
    hyperparameters = [DirectHyperparameters(LEARNING_RATE)] * len(estimator.params)
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    # as the strategies do at the start of a step: every member's noise in one draw per parameter
    estimator.prefetch_noise(population, list(range(len(population.members))))
    fitness = estimator.evaluate_batched(population, loss_fn, chunk=algorithm.population_chunk)
    synchronize(device)
    evaluated = time.perf_counter()
    forward_peak = peak_memory(device)
    if estimator.device_resident:  # as the strategies step on CUDA: nothing read back to the host
        estimate = algorithm.tell_on_device(population, fitness)
        terms = [(population, estimate.coefficients)]
        estimator.apply_update_on_device(terms, hyperparameters, 0, False, estimate.applies)
    else:
        estimate = algorithm.tell(population, fitness)
        if estimate.coefficients is None:
            raise RuntimeError(f"EggRoll skipped the step: non-finite fitness {fitness.tolist()}")
        estimator.apply_update([(population, estimate.coefficients)], hyperparameters, rounding_seed=0)
    synchronize(device)
    done = time.perf_counter()
    return StepTimes(evaluated - start, done - start, forward_peak, peak_memory(device), float(fitness.mean()))


def max_or_none(values: list[int | None]) -> int | None:
    """The largest value, or ``None`` when there are none (CPU peaks).

    Args:
        values: peak-memory readings.
    """
    present = [v for v in values if v is not None]
    return max(present) if present else None


def time_population(model: GPT, setup: Setup, population: int, rank: int, inference: dict) -> dict:
    """Mode (b): an EggRoll population of ``population`` members at ``rank``; throughput, ratios and memory.

    Args:
        model: the GPT (its weights change during the timed steps; the caller restores them).
        setup: the benchmark's setup.
        population: the population size ``P``.
        rank: the EggRoll rank ``r``.
        inference: the result of :func:`time_inference`, the baseline of the ratios.
    """
    chunk = resolve_chunk(population, setup.chunk)
    # EGGROLL as published: no per-row estimates, no input subspaces
    algorithm = EggRoll(population=population, rank=rank, sigma=SIGMA, population_chunk=chunk, extras=None)
    # the strategies' choice for the device: fused kernels (and a step without host reads) on CUDA
    options = EstimatorOptions.of(algorithm, compile=setup.compile, fused=setup.device.type == "cuda")
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)
    loss_fn = make_loss_fn(model, setup)
    estimator.probe_parameter_reads(algorithm.ask(0), loss_fn)
    for seed in range(setup.warmup):
        population_step(estimator, algorithm, loss_fn, seed, setup.device)
    steps = [population_step(estimator, algorithm, loss_fn, 1000 + i, setup.device) for i in range(setup.repeats)]
    forward_seconds = sum(s.forward for s in steps) / len(steps)
    step_seconds = sum(s.step for s in steps) / len(steps)
    member_tokens = population * setup.batch_tokens
    tensor_bytes = parameter_bytes(model) + perturbation_bytes(estimator, algorithm, chunk)
    step_peak = max_or_none([s.step_peak for s in steps])
    if setup.device.type == "cuda":
        memory_ratio = step_peak / inference["peak_memory_bytes"]  # type: ignore[operator]
    else:
        memory_ratio = tensor_bytes / inference["tensor_bytes_estimate"]
    result = {
        "population": population,
        "rank": rank,
        "algorithm": repr(algorithm),
        "chunk": chunk,
        "population_forward_tokens_per_s": member_tokens / forward_seconds,
        "step_tokens_per_s": member_tokens / step_seconds,
        "forward_throughput_ratio": member_tokens / forward_seconds / inference["tokens_per_s"],
        "step_throughput_ratio": member_tokens / step_seconds / inference["tokens_per_s"],
        "forward_seconds": forward_seconds,
        "step_seconds": step_seconds,
        "update_seconds": step_seconds - forward_seconds,
        "peak_memory_bytes": max_or_none([s.forward_peak for s in steps]),
        "step_peak_memory_bytes": step_peak,
        "tensor_bytes_estimate": tensor_bytes,
        "memory_ratio": memory_ratio,
        "fitness_mean": steps[-1].fitness_mean,
    }
    print(
        f"[population_throughput] P={population} r={rank} chunk={chunk}:"
        f" forward {result['population_forward_tokens_per_s']:,.0f} tokens/s"
        f" ({result['forward_throughput_ratio']:.2f}x inference),"
        f" step {result['step_tokens_per_s']:,.0f} tokens/s ({result['step_throughput_ratio']:.2f}x)",
        flush=True,
    )
    return result


def snapshot(model: GPT) -> dict[str, Tensor]:
    """A CPU copy of the model's weights, to undo the updates of the timed steps.

    Args:
        model: the GPT.
    """
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


@torch.no_grad()
def restore(model: GPT, saved: dict[str, Tensor]) -> None:
    """Write the snapshot back into the model's tensors in place.

    Args:
        model: the GPT.
        saved: what :func:`snapshot` returned.
    """
    for name, tensor in model.state_dict().items():
        tensor.copy_(saved[name])


def parse_int_list(text: str) -> list[int]:
    """``"32,64,128"`` -> ``[32, 64, 128]``.

    Args:
        text: comma-separated integers.
    """
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; device-dependent defaults are left ``None`` and filled in by ``make_setup``.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--preset", default=None, help='GPT size; default "tiny" on CPU, "gpt-1b" on CUDA')
    parser.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 1 on CUDA")
    parser.add_argument("--seq-len", type=int, default=None, help="default 64 on CPU, 1024 on CUDA (<= block_size)")
    parser.add_argument(
        "--populations", default=None, help='comma-separated P; default "32,64,128" on CPU, up to 1024 on CUDA'
    )
    parser.add_argument("--ranks", default="1,4", help='comma-separated EggRoll ranks; default "1,4"')
    parser.add_argument("--chunk", type=int, default=None, help="members per batched forward; default 8 CPU, 32 CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations; default 2 on CPU, 5 on CUDA")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (torch.set_num_threads), CPU only; default 1: with 2 threads on a 2-core machine that other"
        " processes share, every parallel op waits for a descheduled thread and the ratios mean nothing",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the inference baseline and the population's evaluation (torch.compile, fullgraph)",
    )
    parser.add_argument(
        "--attention",
        choices=("sdpa", "math"),
        default=None,
        help='the GPT\'s attention; default "math" with --compile on CPU (sdpa has no vmap rule there), else "sdpa"',
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/population_throughput.json"))
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    """Resolve the device-dependent defaults and draw the shared token batch (seed 0).

    Args:
        args: the parsed command line.
    """
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = kind == "cuda"
    if not on_cuda:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("gpt-1b" if on_cuda else "tiny")
    attention = args.attention or ("math" if args.compile and not on_cuda else "sdpa")
    config = GPTConfig.preset(preset, attention=attention)
    seq_len = min(args.seq_len or (1024 if on_cuda else 64), config.block_size)
    if args.seq_len and args.seq_len > config.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the preset's block_size {config.block_size}")
    batch_size = args.batch_size or (1 if on_cuda else 2)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    device = torch.device(kind)
    return Setup(
        device=device,
        preset=preset,
        config=config,
        dtype=DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")],
        inputs=tokens[:, :-1].to(device),
        targets=tokens[:, 1:].to(device),
        populations=parse_int_list(args.populations or ("32,64,128,256,512,1024" if on_cuda else "32,64,128")),
        ranks=parse_int_list(args.ranks),
        chunk=args.chunk or (32 if on_cuda else 8),
        repeats=args.repeats or (5 if on_cuda else 2),
        warmup=args.warmup,
        compile=args.compile,
    )


def main(argv: list[str] | None = None) -> dict:
    """Measure inference, then every ``(P, rank)``, and write the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    args = parse_args(argv)
    setup = make_setup(args)
    model = build_model(setup)
    saved = snapshot(model)
    inference = time_inference(model, setup)
    results = []
    for population in setup.populations:
        for rank in setup.ranks:
            results.append(time_population(model, setup, population, rank, inference))
            restore(model, saved)
            free_memory()
    report = {
        "torch": torch.__version__,
        "device": setup.device.type,
        "device_name": device_name(setup.device),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the CPUs distort CPU timings
        "preset": setup.preset,
        "parameters": model.num_parameters(),
        "weights_dtype": str(setup.dtype).removeprefix("torch."),
        "batch_size": setup.inputs.shape[0],
        "seq_len": setup.inputs.shape[1],
        "batch_tokens": setup.batch_tokens,
        "chunk": setup.chunk,
        "sigma": SIGMA,
        "learning_rate": LEARNING_RATE,
        "repeats": setup.repeats,
        "warmup": setup.warmup,
        "compile": setup.compile,
        "attention": setup.config.attention,
        "baseline": (
            "inference: the model's next-token loss under no_grad over the batch repeated `chunk` times (the tokens"
            " one chunk of members evaluates at once)"
            + (", compiled with torch.compile(fullgraph=True)" if setup.compile else ", eager")
            + "; every ratio divides a population's tokens/s by this inference tokens/s from the same run"
        ),
        "tokens_per_s_definition": "population * batch_tokens / seconds (every member evaluates the whole batch)",
        "memory_basis": MEMORY_BASIS[setup.device.type],
        "inference": inference,
        "populations": results,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
