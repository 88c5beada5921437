"""Lightning's own demo modules at their own backprop-tuned optimizers: does forward-only training bring the loss down?

Each run is ``Trainer(strategy=NoBackpropStrategy(algorithm=...))`` with nothing else that changes training (no
clipping, no learning-rate change; only the time budget, and the progress bar and logger off), on:

- ``BoringModel`` (its own ``SGD(lr=0.1)``, ``StepLR``, its own random data); loss: the mean of its loss over its
  whole training set;
- ``LightningTransformer`` (its own ``SGD(lr=0.1)``; ``vocab_size=32``) on a synthetic next-token task (sequences
  repeating a 3-token period, fixed by a seed), whose download is skipped; loss: the mean over the whole task.

For MeZO, EggRoll and OpenES with their defaults, with the default step limit and without it (``step_limit=None``),
the loss before and after ``--seconds`` of training (or ``--steps`` steps), the steps taken, and whether any step's
loss was not finite; ``--step-limits`` adds runs at other bounds, ``"MeZO(directions=1)"`` is MeZO as published.

    python benchmarks/comparisons/demo_modules.py --seconds 60 --seeds 0 1 2 \
        --out benchmarks/measured/cpu-2026-12-06/demo_modules.json
    python benchmarks/comparisons/demo_modules.py --modules LightningTransformer --algorithms "MeZO(directions=1)" \
        --steps 480 --seeds 0 --unlimited-seeds --step-limits 0.1 0.03 0.01 --out step_limits.json
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.perturb.step_limit import DEFAULT_STEP_LIMIT, size_scaled_limit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from reports import write_report  # noqa: E402

ALGORITHMS = {
    "MeZO()": MeZO,
    "EggRoll()": EggRoll,
    "OpenES()": OpenES,
    "MeZO(directions=1)": lambda: MeZO(directions=1),  # MeZO as published (not run unless asked for)
}
DEFAULT_ALGORITHMS = ["MeZO()", "EggRoll()", "OpenES()"]


class OfflineTransformer(LightningTransformer):
    """The demo transformer, unchanged except that it does not download WikiText2."""

    def prepare_data(self) -> None:
        pass


def repeat_task(vocab_size: int = 32, length: int = 12, samples: int = 256) -> TensorDataset:
    """Sequences repeating a random 3-token period: the target is the input shifted by one."""
    generator = torch.Generator().manual_seed(0)
    period = torch.randint(0, vocab_size, (samples, 3), generator=generator)
    stream = period.repeat(1, (length + 1) // 3 + 1)[:, : length + 1]
    return TensorDataset(stream[:, :-1], stream[:, 1:])


class StepLosses(Callback):
    """Every training step's loss (the value ``training_step`` returned)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def dataset_loss(module: pl.LightningModule, name: str, data: TensorDataset | None) -> float:
    """The module's mean loss over its whole training data, in eval mode (no dropout)."""
    training = module.training
    module.eval()
    with torch.no_grad():
        if name == "BoringModel":
            samples = torch.cat(list(module.train_dataloader()))
            loss = float(module.loss(module(samples)))
        else:
            assert data is not None
            inputs, targets = data.tensors
            output = module(inputs, targets)
            loss = float(torch.nn.functional.nll_loss(output, targets.reshape(-1)))
    module.train(training)
    return loss


def run(name: str, algorithm: str, step_limit: float | str | None, seed: int, seconds: float, steps: int = -1) -> dict:
    """One training run; its loss before and after, steps, and non-finite step losses.

    Args:
        name: ``"BoringModel"`` or ``"LightningTransformer"``.
        algorithm: a key of ``ALGORITHMS``.
        step_limit: ``"default"``, a bound, or ``None`` (no limit).
        seed: the seed of the weights, the data order and the noise.
        seconds: the training time (ignored when ``steps`` is positive).
        steps: a budget in steps instead of time (``-1``: the time budget).
    """
    pl.seed_everything(seed, verbose=False)
    data = None
    if name == "BoringModel":
        module: pl.LightningModule = BoringModel()
        loaders: tuple = ()
    else:
        module = OfflineTransformer(vocab_size=32)
        data = repeat_task()
        loaders = (DataLoader(data, batch_size=32, shuffle=True),)
    kwargs = {} if step_limit == "default" else {"step_limit": step_limit}
    limit = DEFAULT_STEP_LIMIT if step_limit == "default" else step_limit
    weights = sum(p.numel() for p in module.parameters() if p.requires_grad)
    recorder = StepLosses()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=ALGORITHMS[algorithm](), **kwargs),
        max_time=None if steps > 0 else {"seconds": seconds},
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    before = dataset_loss(module, name, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, *loaders)
    after = dataset_loss(module, name, data)
    return {
        "seed": seed,
        "loss_before": before,
        "loss_after": after,
        "ratio": after / before if before else float("nan"),
        "steps": trainer.global_step,
        "trained_weights": weights,
        "relative_bound": None if limit is None else size_scaled_limit(limit, weights),
        "non_finite_step_losses": sum(not math.isfinite(loss) for loss in recorder.losses),
        "loss_after_finite": math.isfinite(after),
    }


def summary(runs: list[dict]) -> dict:
    ratios = [r["ratio"] for r in runs if math.isfinite(r["ratio"])]
    return {
        "ratio_mean": statistics.mean(ratios) if ratios else float("nan"),
        "ratio_spread": statistics.pstdev(ratios) if len(ratios) > 1 else 0.0,
        "runs_down_20_percent": sum(r["ratio"] <= 0.8 for r in runs),
        "runs_with_non_finite_losses": sum(
            bool(r["non_finite_step_losses"]) or not r["loss_after_finite"] for r in runs
        ),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per run")
    parser.add_argument("--steps", type=int, default=-1, help="a budget in steps instead of --seconds")
    parser.add_argument("--step-limits", type=float, nargs="*", default=[], help="other bounds to run as well")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--unlimited-seeds", type=int, nargs="*", default=[0], help="seeds of the step_limit=None runs")
    parser.add_argument("--modules", nargs="+", default=["BoringModel", "LightningTransformer"])
    parser.add_argument("--algorithms", nargs="+", default=DEFAULT_ALGORITHMS, choices=list(ALGORITHMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_modules.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arguments = sys.argv[1:] if argv is None else argv
    results: dict = {
        "command": shlex.join(["python", "benchmarks/comparisons/demo_modules.py", *arguments]),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": args.threads,
        "seconds_per_run": None if args.steps > 0 else args.seconds,
        "steps_per_run": args.steps if args.steps > 0 else None,
        "default_step_limit": DEFAULT_STEP_LIMIT,
        "trainer": "Trainer(strategy=NoBackpropStrategy(algorithm=...)), the modules' own optimizers",
        "results": {},
    }
    for name in args.modules:
        for algorithm in args.algorithms:
            variants = [("default step limit", "default", args.seeds)]
            variants += [(f"step_limit={limit:g}", limit, args.seeds) for limit in args.step_limits]
            variants += [("step_limit=None", None, args.unlimited_seeds)]
            for label, limit, seeds in variants:
                if not seeds:
                    continue
                runs = [run(name, algorithm, limit, seed, args.seconds, args.steps) for seed in seeds]
                results["results"][f"{name} | {algorithm} | {label}"] = summary(runs)
                print(name, algorithm, label, [round(r["ratio"], 3) for r in runs], flush=True)
    return write_report(results, args.out)


if __name__ == "__main__":
    main()
