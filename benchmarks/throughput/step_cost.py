"""Cost of one training step against inference: tokens/s and peak memory on the same GPT and the same batch.

Three modes run one after another, each on a fresh model built from the same seed and freed before the next:
an inference forward (``no_grad``, loss computed), a backprop + AdamW step (fp32 master weights, bf16 autocast
on CUDA) and a MeZO step as published (one direction, no input subspace) through
``lightning_nobp.fabric.NoBackpropStrategy``. Prints JSON and writes it to
``--out``. On CPU the memory column is an estimate from the tensors that exist after a step (parameters,
gradients, optimizer state); on CUDA it is ``torch.cuda.max_memory_allocated``.

    python benchmarks/throughput/step_cost.py --device cpu
    python benchmarks/throughput/step_cost.py --device cuda --preset gpt-1b --batch-size 8
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nobp.algorithms import MeZO
from lightning_nobp.fabric import NoBackpropStrategy
from lightning_nobp.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from devices import device_name, free_memory, peak_memory, reset_peak_memory, synchronize  # noqa: E402
from reports import write_report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Setup:
    """Everything a mode needs: where to run, which model, which batch, how long to time.

    Args:
        device: the device every mode runs on.
        config: the GPT's shape.
        dtype: weight dtype of the inference and MeZO models (backprop keeps fp32 weights).
        inputs: token ids ``(batch, seq_len)`` on ``device``.
        targets: next-token ids, same shape.
        steps: timed iterations.
        warmup: untimed iterations before them.
        mezo_update: the MeZO mode's update path, ``"direct"`` (in place, no gradient buffer) or ``"grad"``.
    """

    device: torch.device
    config: GPTConfig
    dtype: torch.dtype
    inputs: Tensor
    targets: Tensor
    steps: int
    warmup: int
    mezo_update: str = "direct"

    @property
    def tokens_per_step(self) -> int:
        return self.inputs.numel()


def next_token_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``model(inputs)`` against ``targets``, through the model's (or wrapper's) forward.

    Args:
        model: the GPT, or Fabric's wrapper around it.
        inputs: token ids ``(batch, time)``.
        targets: next-token ids ``(batch, time)``.
    """
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_model(setup: Setup, dtype: torch.dtype) -> GPT:
    """A fresh GPT initialised from seed 0 directly on the device, then cast to ``dtype``.

    Args:
        setup: the benchmark's setup.
        dtype: the weights' dtype.
    """
    torch.manual_seed(0)
    with setup.device:
        model = GPT(setup.config)
    return model.to(dtype)


def seconds_per_step(step: Callable[[], Any], setup: Setup) -> float:
    """Run ``step`` ``warmup`` times untimed, then ``steps`` times timed; return the mean seconds per call.

    Args:
        step: one iteration of the mode.
        setup: the benchmark's setup (device, steps, warmup).
    """
    for _ in range(setup.warmup):
        step()
    synchronize(setup.device)
    start = time.perf_counter()
    for _ in range(setup.steps):
        step()
    synchronize(setup.device)
    return (time.perf_counter() - start) / setup.steps


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held by the model's parameters, their ``.grad`` and the optimizer's state tensors.

    Args:
        model: the model (a tied weight counts once).
        optimizer: its optimizer, if any.
    """
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        if param.grad is not None:
            total += param.grad.numel() * param.grad.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
    return total


def measure(name: str, setup: Setup, step: Callable[[], Tensor], model: nn.Module, optimizer: Any = None) -> dict:
    """Time ``step`` and collect the mode's throughput, memory and final loss.

    Args:
        name: the mode's name, for the progress line.
        setup: the benchmark's setup.
        step: one iteration; returns the loss.
        model: the mode's model (for the tensor-bytes estimate).
        optimizer: the mode's optimizer, if any.
    """
    reset_peak_memory(setup.device)
    seconds = seconds_per_step(step, setup)
    result = {
        "tokens_per_s": setup.tokens_per_step / seconds,
        "seconds_per_step": seconds,
        "peak_memory_bytes": peak_memory(setup.device),
        "tensor_bytes_estimate": tensor_bytes(model, optimizer),
        "loss": float(step()),
    }
    print(f"[step_cost] {name}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def run_inference(setup: Setup) -> dict:
    """Mode (a): a forward pass with the loss, under ``no_grad``, at weight dtype ``setup.dtype``."""
    model = build_model(setup, setup.dtype).eval()

    @torch.no_grad()
    def step() -> Tensor:
        return next_token_loss(model, setup.inputs, setup.targets)

    return measure("inference", setup, step, model)


def run_backprop(setup: Setup) -> dict:
    """Mode (b): forward, backward and AdamW on fp32 weights (bf16 autocast and fused AdamW on CUDA)."""
    on_cuda = setup.device.type == "cuda"
    model = build_model(setup, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = next_token_loss(model, setup.inputs, setup.targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return measure("backprop_adamw", setup, step, model, optimizer)


def run_mezo(setup: Setup) -> dict:
    """Mode (c): one MeZO step of a plain Fabric loop (``optimizer.step(closure)``) with ``NoBackpropStrategy``."""
    precision = "bf16-true" if setup.dtype == torch.bfloat16 else "32-true"
    fabric = lightning.Fabric(
        accelerator=setup.device.type,
        devices=1,
        strategy=NoBackpropStrategy(
            algorithm=MeZO(eps=1e-3, directions=1, input_subspace=None), update=setup.mezo_update, seed=0
        ),
        precision=precision,  # type: ignore[arg-type]
    )
    fabric.launch()
    model = build_model(setup, setup.dtype).train()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1e-6))

    def closure() -> Tensor:
        loss = next_token_loss(model, setup.inputs, setup.targets)
        fabric.backward(loss)
        return loss

    def step() -> Tensor:
        return optimizer.step(closure)

    result = measure("mezo", setup, step, model, optimizer.optimizer)
    result["forwards_per_step"] = fabric.strategy.algorithm.forwards_per_step
    result["precision"] = precision
    result["update"] = setup.mezo_update
    return result


def ratios(modes: dict[str, dict], memory_key: str) -> dict[str, float]:
    """Throughput and memory of the training modes relative to inference.

    Args:
        modes: the results of ``inference``, ``backprop_adamw`` and ``mezo``.
        memory_key: which memory column to compare (``peak_memory_bytes`` or ``tensor_bytes_estimate``).
    """
    base = modes["inference"]
    out: dict[str, float] = {}
    for prefix, mode in (("mezo", "mezo"), ("backprop", "backprop_adamw")):
        out[f"{prefix}_throughput_ratio"] = modes[mode]["tokens_per_s"] / base["tokens_per_s"]
        out[f"{prefix}_memory_ratio"] = modes[mode][memory_key] / base[memory_key]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; device-dependent defaults are left ``None`` and filled in by ``make_setup``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--preset", default=None, help='GPT size; default "small" on CPU, "gpt-1b" on CUDA')
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 8 on CUDA")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's block_size")
    parser.add_argument("--steps", type=int, default=None, help="timed iterations; default 5 on CPU, 10 on CUDA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--update", choices=("direct", "grad"), default="direct", help="MeZO update path (direct: no .grad buffer)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.json"))
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    """Resolve the device-dependent defaults and draw the shared token batch (seed 0).

    Args:
        args: the parsed command line.
    """
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    on_cuda = kind == "cuda"
    if not on_cuda:
        torch.set_num_threads(2)
    config = GPTConfig.preset(args.preset or ("gpt-1b" if on_cuda else "small"))
    seq_len = args.seq_len or config.block_size
    if seq_len > config.block_size:
        raise SystemExit(f"--seq-len {seq_len} exceeds the preset's block_size {config.block_size}")
    batch_size = args.batch_size or (8 if on_cuda else 4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch_size, seq_len + 1), generator=generator)
    return Setup(
        device=device,
        config=config,
        dtype=DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")],
        inputs=tokens[:, :-1].to(device),
        targets=tokens[:, 1:].to(device),
        steps=args.steps or (10 if on_cuda else 5),
        warmup=args.warmup,
        mezo_update=args.update,
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the three modes and write the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    args = parse_args(argv)
    setup = make_setup(args)
    modes: dict[str, dict] = {}
    for name, run in (("inference", run_inference), ("backprop_adamw", run_backprop), ("mezo", run_mezo)):
        modes[name] = run(setup)
        free_memory()
    memory_key = "peak_memory_bytes" if setup.device.type == "cuda" else "tensor_bytes_estimate"
    with torch.device("meta"):
        parameters = GPT(setup.config).num_parameters()
    report = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "device": setup.device.type,
        "device_name": device_name(setup.device),
        "threads": torch.get_num_threads(),
        "preset": args.preset or ("gpt-1b" if setup.device.type == "cuda" else "small"),
        "parameters": parameters,
        "weights_dtype": str(setup.dtype).removeprefix("torch."),
        "batch_size": setup.inputs.shape[0],
        "seq_len": setup.inputs.shape[1],
        "steps": setup.steps,
        "warmup": setup.warmup,
        "memory_basis": memory_key,
        "modes": modes,
        **ratios(modes, memory_key),
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
