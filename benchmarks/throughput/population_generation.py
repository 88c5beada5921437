"""Decode throughput of a population generating its own continuations against plain batched generation.

Both sides decode the same number of sequences with the same model, greedily, with a KV cache
(``lightning_nobp.generate_population``): ``P * B`` continuations of ``N`` tokens after ``B`` prompts of ``L``
tokens. Plain generation decodes the ``B`` prompts repeated ``P`` times at the model's own weights. The population
(EggRoll, rank 1) decodes them as ``P`` members each at its own low-rank perturbation, the way a ``training_step``
that calls ``generate_population`` is evaluated by the strategy: batched (``PopulationEstimator.evaluate_batched``,
one ``torch.func.vmap``-ed decode for every member) and, for reference, one member at a time
(``PopulationEstimator.evaluate``). Tokens/s counts generated tokens (``P * B * N``) over the whole call, prompt
prefill included; each figure is the best of ``--repeats`` timed calls after one warm-up call, the three modes
taking turns. Prints JSON and writes it to ``--out``.

    python benchmarks/throughput/population_generation.py --device cpu
    python benchmarks/throughput/population_generation.py --device cpu --models gpt-small --population 8
    python benchmarks/throughput/population_generation.py --device cuda --population 64 --prompts 16 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_nobp import generate_population
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from devices import device_name, synchronize  # noqa: E402
from reports import write_report  # noqa: E402

MODELS = ("gpt-small", "smollm2-135m")


def build(name: str, device: torch.device) -> tuple[nn.Module, int]:
    """The model (float32, eval mode) and its vocabulary size."""
    if name == "gpt-small":
        torch.manual_seed(0)
        model: nn.Module = GPT(GPTConfig.preset("small"))
        vocab = 256
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        from lightning_nobp.models.causal_lm_classifier import smollm2_folder

        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
        vocab = int(model.config.vocab_size)
    return model.to(device).eval(), vocab


def best_times(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """The shortest of ``repeats`` timed calls of every run, after one warm-up call each; the runs take turns, so
    a slow spell of a shared machine touches all of them alike."""
    for run in runs.values():
        run()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: min(spent) for name, spent in times.items()}


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Plain, batched-population and member-by-member decode throughput of one model."""
    model, vocab = build(name, device)
    population, prompts, length, new = args.population, args.prompts, args.prompt_length, args.new_tokens
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, vocab, (prompts, length), generator=generator).to(device)
    algorithm = EggRoll(population=population, rank=1, sigma=args.sigma)
    estimator = PopulationEstimator(algorithm, [model], [p for p in model.parameters() if p.requires_grad])
    members = algorithm.ask(0)

    def member_decode() -> Tensor:
        return generate_population(model, prompt_ids, max_new_tokens=new).float().mean()

    estimator.probe_parameter_reads(members, member_decode)
    repeated = prompt_ids.repeat(population, 1)
    tokens = population * prompts * new
    runs = {
        "plain": lambda: generate_population(model, repeated, max_new_tokens=new),
        "batched": lambda: estimator.evaluate_batched(members, member_decode),
        "looped": lambda: estimator.evaluate(members, member_decode),
    }
    seconds = best_times(runs, args.repeats, device)
    plain, batched, looped = seconds["plain"], seconds["batched"], seconds["looped"]
    estimator.close()
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "population": population,
        "prompts": prompts,
        "prompt_tokens": length,
        "new_tokens": new,
        "sequences": population * prompts,
        "plain_tokens_per_s": tokens / plain,
        "population_batched_tokens_per_s": tokens / batched,
        "population_member_by_member_tokens_per_s": tokens / looped,
        "batched_over_plain": plain / batched,
        "member_by_member_over_plain": plain / looped,
        "seconds": {"plain": plain, "population_batched": batched, "population_member_by_member": looped},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--population", type=int, default=16, help="members (P)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch (B)")
    parser.add_argument("--prompt-length", type=int, default=16, help="tokens per prompt (L)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sequence (N)")
    parser.add_argument("--smollm2-new-tokens", type=int, default=4, help="N for SmolLM2-135M (slow on CPU)")
    parser.add_argument("--smollm2-population", type=int, default=4, help="P for SmolLM2-135M")
    parser.add_argument("--sigma", type=float, default=1e-2, help="EggRoll's noise scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/measured/cpu-2026-12-06/population_generation.json")
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: {name!r} is not one of {MODELS}")
        run_args = args
        if name == "smollm2-135m":
            run_args = argparse.Namespace(
                **{**vars(args), "new_tokens": args.smollm2_new_tokens, "population": args.smollm2_population}
            )
        results.append(measure(name, run_args, device))
    report = {
        "benchmark": "population_generation",
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "decoding": "greedy, KV cache, no stop tokens (every row generates N tokens)",
        "command": "python benchmarks/throughput/population_generation.py " + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key != "out"
        ),
        "results": results,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
