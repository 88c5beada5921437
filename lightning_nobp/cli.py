"""The ``nobp`` console script: LightningCLI with the package's classes under their short names.

``nobp fit -c recipes/digits-eggroll.yaml`` trains, then evaluates the test set and prints the held-out metric.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI, LightningArgumentParser

# Importing these makes their classes known to jsonargparse, which then accepts `class_path: EggRoll`,
# `class_path: NoBackpropStrategy`, `class_path: MLPClassifier`, ... (unique subclasses of the argument's type).
PACKAGE_MODULES = (
    "lightning_nobp",
    "lightning_nobp.algorithms",
    "lightning_nobp.data",
    "lightning_nobp.models",
    "lightning_nobp.pytorch",
    "lightning_nobp.pytorch.timeline",
)
# Modules that exist only in some versions of the package (precision plugins); imported when present.
OPTIONAL_MODULES = ("lightning_nobp.lowbit", "lightning_nobp.pytorch.precision")


def import_package_classes() -> list[str]:
    """Import every module whose classes recipes name by short class name; return the optional ones found."""
    for name in PACKAGE_MODULES:
        importlib.import_module(name)
    found = []
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # absent in this version, or its optional dependencies (torchao, triton) are missing
            continue
        found.append(name)
    return found


def held_out_metric_name(model: LightningModule, metrics: dict[str, float]) -> str | None:
    """The metric a recipe reports: the model's ``held_out_metric`` attribute, else ``test_acc``/``test_bpb``."""
    for name in (getattr(model, "held_out_metric", None), "test_acc", "test_bpb", "test_loss"):
        if name and name in metrics:
            return name
    return None


class NoBackpropCLI(LightningCLI):
    """LightningCLI for recipes: short class names, a run-time report, and the test set evaluated after ``fit``.

    Extra arguments (besides LightningCLI's):
        ``--test_after_fit`` (default true): evaluate the test set with the final weights after ``fit`` and print
        the held-out metric.
        ``--torch_threads N``: ``torch.set_num_threads(N)`` before anything is built.
        ``--timeline PATH``: write the validation metrics against wall-clock seconds and forward passes to a
        JSON file during ``fit`` (used by ``benchmarks/comparisons/compare.py``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import_package_classes()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        self._fit_started = 0.0
        self.fit_seconds = math.nan
        self.fit_cpu_seconds = math.nan
        self._fit_cpu_started = 0.0
        self.held_out: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Evaluate the test set after fit and print its metric."
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help=(
                "CPU threads of torch's intra-op pool (torch.set_num_threads). 1 is often fastest for small models on"
                " a busy machine, where waiting for a descheduled second thread costs more than it saves."
            ),
        )
        parser.add_argument(
            "--timeline",
            type=str | None,
            default=None,
            help="JSON file for the validation metrics against wall-clock seconds and forward passes.",
        )

    def before_instantiate_classes(self) -> None:
        threads = self._subcommand_config().get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads={threads}: give a positive number of threads or leave it unset")
            import torch

            torch.set_num_threads(threads)

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_fit(self) -> None:
        from lightning_nobp.pytorch.timeline import MetricTimeline

        path = self._subcommand_config().get("timeline")
        if path:
            self.trainer.callbacks.append(MetricTimeline(path))
        self._fit_started = time.perf_counter()
        self._fit_cpu_started = time.process_time()

    def after_fit(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        self.fit_cpu_seconds = time.process_time() - self._fit_cpu_started
        steps = self.trainer.global_step
        report = (
            f"nobp: fit ran {steps} optimizer steps in {self.fit_seconds:.1f} s"
            f" ({self.fit_cpu_seconds:.1f} s of CPU time in this process)"
        )
        device = self.trainer.strategy.root_device
        if device.type == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated(device) / 2**30
            report += f", peak GPU memory {peak:.2f} GiB"
        print(report, flush=True)
        if not self._subcommand_config().get("test_after_fit", True) or self.trainer.interrupted:
            return
        if not _has_test_data(self.model, self.datamodule):
            print("nobp: no test_step/test_dataloader, so no held-out metric to report", flush=True)
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self.held_out = {k: float(v) for k, v in (results[0] if results else {}).items()}
        self.report_held_out()

    def before_test(self) -> None:
        self._fit_started = time.perf_counter()

    def after_test(self) -> None:
        """``nobp test``: report the held-out metric of the weights as given (e.g. a pretrained model's zero-shot)."""
        self.fit_seconds = 0.0
        self.held_out = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test_")}
        self.report_held_out()

    def report_held_out(self) -> None:
        """Print the held-out metric on stdout and send it to the log and the Trainer's logger."""
        name = held_out_metric_name(self.model, self.held_out)
        if name is None:
            print(f"nobp: held-out metrics {self.held_out}", flush=True)
            return
        line = f"nobp: held-out {name} = {self.held_out[name]:.4f} after {self.fit_seconds:.1f} s of fit"
        print(line, flush=True)
        for logger in self.trainer.loggers:
            logger.log_metrics(
                {f"held_out/{name}": self.held_out[name], "fit_seconds": self.fit_seconds},
                step=self.trainer.global_step,
            )
            logger.save()


def _has_test_data(model: LightningModule, datamodule: Any) -> bool:
    has_step = type(model).test_step is not LightningModule.test_step
    loader_owner = datamodule if datamodule is not None else model
    from lightning.pytorch.core.hooks import DataHooks

    has_loader = type(loader_owner).test_dataloader is not DataHooks.test_dataloader
    return has_step and has_loader


def run(args: list[str] | None = None) -> NoBackpropCLI:
    """Run a subcommand and return the CLI (its trainer, model and held-out metrics), for scripts and tests.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when omitted).
    """
    return NoBackpropCLI(args=args)


def main(args: list[str] | None = None) -> int:
    """Entry point of the ``nobp`` console script: exit status 0 on success. A ``ValueError`` or ``TypeError`` (what
    the package raises for a setting it cannot take, with the fix in its message) becomes one line on stderr and
    status 1; ``NOBP_TRACEBACK=1`` shows the traceback instead. Argument errors exit as jsonargparse decides (2).

    Args:
        args: command-line arguments (``sys.argv[1:]`` when omitted).
    """
    try:
        run(args)
    except (ValueError, TypeError) as error:
        if os.environ.get("NOBP_TRACEBACK") == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"nobp: error: {message} (NOBP_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
