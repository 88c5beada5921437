"""Digits at equal wall-clock: MeZO, EggRoll, ForwardGradient, Forward-Forward, Mono-Forward and backprop.

Every method trains the same MLP 64-128-10 (same initial weights) through the Trainer for the same training
time (evaluation excluded from the clock), with test accuracy sampled along the way. Writes JSON (accuracy curve,
final accuracy, steps, memory) and one PNG (accuracy against training seconds, and memory per method).

Memory: on CUDA the allocator's peak during training (``torch.cuda.max_memory_allocated``); on CPU the bytes of
the tensors that training keeps between steps (weights, gradients, optimizer state, the algorithm's own state
such as Mono-Forward's projections), since CPU has no allocator peak to read.

    python benchmarks/comparisons/local_learning.py --seconds 30 --out local_learning.json --plot local_learning.png
    python benchmarks/comparisons/local_learning.py --smoke --out /tmp/smoke.json --plot /tmp/smoke.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, ForwardForward, ForwardGradient, MeZO, MonoForward, quietest_features
from lightning_nobp.data import load_digits_split
from lightning_nobp.data.digits import batched_loader
from lightning_nobp.models import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from devices import device_name, free_memory, peak_memory, reset_peak_memory  # noqa: E402

#: method -> (algorithm factory (None: backprop), optimizer, lr, batch size); the settings measured in the tests
METHODS: dict[str, tuple[Callable[[torch.Tensor], Any] | None, str, float, int]] = {
    "backprop": (None, "adam", 1e-2, 128),
    "mezo": (lambda x: MeZO(eps=1e-3, directions=1), "sgd", 3e-4, 128),
    "eggroll": (lambda x: EggRoll(population=64, rank=1, sigma=1e-2), "adam", 1e-2, 256),
    "forward_gradient": (lambda x: ForwardGradient(directions=16), "sgd", 5e-3, 128),
    "forward_forward": (lambda x: ForwardForward(label_features=quietest_features(x, 10)), "adam", 3e-3, 128),
    "mono_forward": (lambda x: MonoForward(), "adam", 1e-2, 128),
}


class TrainingClock(pl.Callback):
    """Stops training after ``seconds`` of training time and samples test accuracy every ``every`` seconds.

    Args:
        seconds: training-time budget (evaluation excluded).
        every: training seconds between accuracy samples.
        test: test inputs and labels.
    """

    def __init__(self, seconds: float, every: float, test: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.seconds, self.every, self.test = seconds, every, test
        self.elapsed = 0.0
        self.curve: list[tuple[float, float]] = []
        self._next_sample = 0.0
        self._started = 0.0

    def accuracy(self, module: pl.LightningModule) -> float:
        x, y = (t.to(module.device) for t in self.test)
        with torch.no_grad():
            return float((module(x).argmax(-1) == y).float().mean())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.elapsed += time.perf_counter() - self._started
        if self.elapsed >= self._next_sample or self.elapsed >= self.seconds:
            self.curve.append((round(self.elapsed, 3), self.accuracy(pl_module)))
            self._next_sample += self.every
        if self.elapsed >= self.seconds:
            trainer.should_stop = True


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: Any) -> int:
    """Bytes of what training keeps between steps: weights, gradients, optimizer state, algorithm state."""
    tensors = {id(p): p for p in model.parameters()}
    tensors |= {id(p.grad): p.grad for p in model.parameters() if p.grad is not None}
    for state in optimizer.state.values():
        tensors |= {id(t): t for t in state.values() if isinstance(t, torch.Tensor)}
    for projection in getattr(algorithm, "projections", {}).values():
        tensors[id(projection)] = projection
    for inner in getattr(algorithm, "_optimizers", {}).values():
        for state in inner.state.values():
            tensors |= {id(t): t for t in state.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_method(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Train one method for the budget from the shared initial weights; its curve, accuracy and memory."""
    make_algorithm, optimizer, lr, batch_size = METHODS[name]
    train, test = load_digits_split()
    torch.manual_seed(args.seed)
    model = MLPClassifier(in_features=64, hidden=128, num_classes=10, optimizer=optimizer, lr=lr, momentum=0.9)
    algorithm = None if make_algorithm is None else make_algorithm(train.tensors[0])
    clock = TrainingClock(args.seconds, args.sample_every, test.tensors)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        strategy="auto" if algorithm is None else NoBackpropStrategy(algorithm=algorithm),
        max_epochs=-1,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    pl.seed_everything(args.seed, verbose=False)
    free_memory()
    reset_peak_memory(device)
    trainer.fit(model, batched_loader(train, batch_size, shuffle=True))
    peak = peak_memory(device)
    accuracy = clock.accuracy(model)
    return {
        "algorithm": "backprop" if algorithm is None else repr(algorithm),
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch_size,
        "test_accuracy": accuracy,
        "steps": trainer.global_step,
        "training_seconds": round(clock.elapsed, 3),
        "curve": clock.curve,
        "memory_bytes": peak if peak is not None else state_bytes(model, trainer.optimizers[0], algorithm),
    }


def plot(report: dict, path: Path) -> None:
    """Accuracy against training seconds per method, and each method's memory, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, memory) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    names = list(report["methods"])
    for name in names:
        seconds, accuracy = zip(*report["methods"][name]["curve"]) if report["methods"][name]["curve"] else ((), ())
        curves.plot(seconds, accuracy, marker=".", label=name)
    curves.set(xlabel="training seconds", ylabel="test accuracy", title=f"digits, {report['device']}", ylim=(0, 1))
    curves.grid(alpha=0.3)
    curves.legend(loc="lower right", fontsize=8)
    kib = [report["methods"][n]["memory_bytes"] / 1024 for n in names]
    memory.barh(names, kib)
    memory.set(xlabel=f"KiB ({report['memory_basis']})", title="memory")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="training-time budget of every method")
    parser.add_argument("--sample-every", type=float, default=2.0, help="training seconds between accuracy samples")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits this small model)")
    parser.add_argument("--smoke", action="store_true", help="1 s per method (checks that everything runs)")
    parser.add_argument("--out", type=Path, default=Path("local_learning.json"))
    parser.add_argument("--plot", type=Path, default=Path("local_learning.png"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.sample_every = 1.0, 0.5
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = {}
    for name in args.methods:
        methods[name] = run_method(name, args, device)
        print(
            f"{name:>17}: test accuracy {methods[name]['test_accuracy']:.3f} after {methods[name]['steps']} steps,"
            f" memory {methods[name]['memory_bytes'] / 1024:.1f} KiB",
            flush=True,
        )
    report = {
        "benchmark": "local_learning",
        "dataset": "sklearn digits (1437 train / 360 test)",
        "model": "MLP 64-128-10",
        "device": device_name(device),
        "threads": args.threads,
        "seconds": args.seconds,
        "memory_basis": "peak_allocated" if device.type == "cuda" else "state_bytes",
        "methods": methods,
    }
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
