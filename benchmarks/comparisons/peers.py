"""Side-by-side against the peers: validation accuracy against training time, test accuracy at the end.

Every method trains the same MLP from the same initial weights for the same training budget, each run in its own
fresh process (clean peak memory, no state shared between methods), once per seed of ``--seeds``:

* ``backprop``: Lightning's default strategy, the user's Adam (lr 1e-2 digits, 1e-3 Fashion-MNIST) and batch.
* ``mezo-plain``, ``eggroll-plain``: the published methods through ``NoBackpropStrategy``: MeZO with one SPSA
  direction and full-space noise, EGGROLL (rank-1 antithetic, centered ranks) without the package's extras.
* ``mezo``, ``eggroll``, ``openes``: the algorithms' defaults, with the extras their labels name (MeZO averages 8
  directions; all draw the first layer's noise in its input subspace, a biased estimate; EggRoll and OpenES
  estimate the head from per-row losses).
* ``plain-es``: a hand-written rank-1 antithetic ES loop in plain PyTorch (``benchmarks/comparisons/plain_es.py``, no
  Lightning), same MLP, initial weights, batch, optimizer and budget: the framework's overhead, visible.
* ``evotorch-snes`` (``evotorch-pgpe``): EvoTorch's ``SNES`` (``PGPE``) on a ``SupervisedNE`` problem over the same
  network, centred on the same initial weights (``pip install -e ".[bench]"``; skipped with a message without it).
  ``--search-evotorch`` first picks SNES's stdev and popsize by a small search on the validation split.

A validation split (15 % of the training split, fixed seed) is carved off the training data; every curve, every
threshold and the EvoTorch search use it, and the test split is evaluated once, when a run ends. The clock counts
training only: evaluations at checkpoints (log-spaced first, then every ``budget / 60`` s) and the one step whose
FLOPs are counted are taken off it. Reported per run: validation accuracy at 10/30/60/120/180 s, the mean over the
last third of the budget, the sustained time to each threshold (the first checkpoint from which the moving mean
of the last 5 validation accuracies stays at or above it until the end), the final test accuracy, achieved
FLOP/s (``torch.utils.flop_counter.FlopCounterMode`` over one real step, or one EvoTorch generation, per training
row, times the rows trained, over the training time: matrix products only, elementwise work not counted),
sample-forwards/s (one sample through the network once: not equal work, backprop's backward pass is not counted)
and the peak resident memory above its level when training started. Every column's mean and spread over seeds
goes to ``peers_<dataset>.json`` (with every run and a description of the machine) and a plot of the mean
validation curves to ``peers_<dataset>.png`` in ``--out``; ``benchmarks/report.py`` renders the docs from it.

    python benchmarks/comparisons/peers.py --dataset digits --budget 40 --clock cpu --threads 1 --jobs 2 --seeds 0,1,2 \
        --search-evotorch 10 --out benchmarks/measured/cpu-2026-12-06/peers
    python benchmarks/comparisons/peers.py --smoke            # every default method for about a second on digits

Adding a method is one entry in ``METHODS``: a ``LightningMethod`` (any strategy and Trainer plugins, e.g. a
low-bit precision plugin), an ``EvoTorchMethod`` or a ``PlainESMethod``.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers

REPORT_TIMES = (10.0, 30.0, 60.0, 120.0, 180.0)
#: what the training clock counts: wall-clock seconds, or this process's CPU seconds (robust on shared machines)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: share of the training split held out for validation (curves, thresholds, the EvoTorch search), and its seed
VALIDATION_FRACTION = 0.15
VALIDATION_SEED = 12345
#: checkpoints in the moving mean of the sustained thresholds
SUSTAIN_WINDOW = 5


# ---------------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark task: the data, the MLP's shape, the batch and the thresholds of the time-to-accuracy columns.

    Args:
        name: the ``--dataset`` value.
        in_features: inputs of the MLP.
        hidden: width of its hidden layer.
        batch_size: the user's batch (every method, EvoTorch's minibatch too).
        lr: the learning rate of the user's Adam (every Lightning method): what a backprop user picks for this
            task (1e-2 on digits, 1e-3 on Fashion-MNIST).
        thresholds: validation accuracies whose sustained time is reported.
        evotorch_stdev: initial search standard deviation of EvoTorch's SNES and PGPE without a search.
    """

    name: str
    in_features: int
    hidden: int
    batch_size: int
    lr: float
    thresholds: tuple[float, ...]
    evotorch_stdev: float

    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        """The train, validation and test splits, as in-memory float features and int64 labels."""
        if self.name == "digits":
            from lightning_nobp.data import load_digits_split

            train, test = load_digits_split()
        else:
            from lightning_nobp.data import load_fashion_mnist

            train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        return (*split_validation(train), test)

    def available(self) -> str | None:
        """``None`` when the data can be read, else the reason it cannot (with the fix)."""
        if self.name == "fashion":
            from lightning_nobp.data import fashion_mnist_available

            if not fashion_mnist_available():
                return "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
        return None


def split_validation(
    train: TensorDataset, fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED
) -> tuple[TensorDataset, TensorDataset]:
    """Carve a validation split off ``train``: the same rows for every method, seed and run.

    Args:
        train: the training split.
        fraction: share of its rows held out.
        seed: seed of the random choice of rows.
    """
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(len(train) * fraction)))
    validation, rest = order[:held], order[held:]
    return (
        TensorDataset(*(tensor[rest] for tensor in train.tensors)),
        TensorDataset(*(tensor[validation] for tensor in train.tensors)),
    )


DATASETS = {
    "digits": DatasetSpec("digits", 64, 128, 256, 1e-2, (0.95, 0.97), evotorch_stdev=0.3),
    "fashion": DatasetSpec("fashion", 784, 256, 256, 1e-3, (0.80, 0.85), evotorch_stdev=0.03),
}


def build_model(spec: DatasetSpec, seed: int) -> Any:
    """The user's LightningModule (the package's plain ``MLPClassifier`` with Adam), seeded so every method starts
    from the same initial weights."""
    from lightning_nobp.models import MLPClassifier

    torch.manual_seed(seed)
    return MLPClassifier(in_features=spec.in_features, hidden=spec.hidden, optimizer="adam", lr=spec.lr)


# ---------------------------------------------------------------------------------------------------- the clock
class ResidentMemory:
    """Peak resident memory of this process above its level at ``start``.

    On Linux the kernel keeps the peak itself (``VmHWM`` in ``/proc/self/status``), and writing ``5`` to
    ``/proc/self/clear_refs`` resets it to the current level: the peak is then exact and costs nothing while the
    method trains. Where that is not available, a thread samples the resident size every 5 ms instead (it misses
    shorter peaks, and its wake-ups take the interpreter lock from a Python-heavy training loop).
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * PAGE_SIZE
        except OSError:
            return 0

    @property
    def sampled(self) -> bool:
        """Whether a thread samples the resident size (the kernel's peak could not be reset)."""
        return self._thread is not None

    @staticmethod
    def kernel_peak() -> int | None:
        """``VmHWM`` (the kernel's peak resident size since the last reset) in bytes, ``None`` if unavailable."""
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _reset_kernel_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            return False
        return True

    def start(self) -> None:
        self.baseline = self.peak = self.current()
        if self._reset_kernel_peak() and self.kernel_peak() is not None:
            return

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.current())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())
        if not self.sampled:
            self.peak = max(self.peak, self.kernel_peak() or 0)
        mib = 1024.0 * 1024.0
        return {"peak_rss_mib": self.peak / mib, "peak_rss_above_start_mib": (self.peak - self.baseline) / mib}


class TrainingClock:
    """Training wall-clock with evaluations taken off it, and the accuracy curve at checkpoints.

    Checkpoints are log-spaced from 0.05 s up to ``budget / 60``, then every ``budget / 60`` s, plus every time in
    ``REPORT_TIMES``. An evaluation happens at the first step that ends past a checkpoint.

    Args:
        budget: training seconds.
        evaluate: returns the current validation accuracy.
        timer: ``time.perf_counter`` (wall-clock) or ``time.process_time`` (this process's CPU seconds, robust to
            other processes sharing the cores; with one thread it is the compute time).
        memory: started with the clock, so its peak counts training and not the imports and setup before it.
    """

    def __init__(
        self,
        budget: float,
        evaluate: Callable[[], float],
        timer: Callable[[], float] = time.perf_counter,
        memory: ResidentMemory | None = None,
    ) -> None:
        self.budget = budget
        self.memory = memory
        self.evaluate = evaluate
        self.timer = timer
        step = budget / 60.0
        times = {round(0.05 * 1.3**k, 4) for k in range(60) if 0.05 * 1.3**k < step}
        times |= {round(step * k, 4) for k in range(1, 61)}
        times |= {t for t in REPORT_TIMES if t <= budget}
        self.checkpoints = sorted(times)
        self.curve: list[tuple[float, float]] = []
        self.samples = 0
        self.rows = 0
        self.steps = 0
        self.evaluation_seconds = 0.0
        #: matrix-product FLOPs per training row, counted over one step (``count_flops``); ``None`` until then
        self.flops_per_row: float | None = None
        self.flop_count_seconds = 0.0
        self._started = 0.0
        self._next = 0

    def start(self) -> None:
        self.curve = [(0.0, self.evaluate())]
        if self.memory is not None:
            self.memory.start()
        self._started = self.timer()

    def elapsed(self) -> float:
        return self.timer() - self._started - self.evaluation_seconds - self.flop_count_seconds

    def tick(self, samples: int, rows: int = 0) -> bool:
        """Count one training step; evaluate when a checkpoint has passed. Returns ``True`` once the budget is spent.

        Args:
            samples: sample-forwards of the step (one sample through the network once).
            rows: training rows the step consumed.
        """
        self.samples += samples
        self.rows += rows
        self.steps += 1
        now = self.elapsed()
        if self._next < len(self.checkpoints) and now >= self.checkpoints[self._next]:
            paused = self.timer()
            self.curve.append((now, self.evaluate()))
            while self._next < len(self.checkpoints) and self.checkpoints[self._next] <= now:
                self._next += 1
            self.evaluation_seconds += self.timer() - paused
        return now >= self.budget


class FlopCount:
    """Counts the matrix-product FLOPs of one training step and takes the step's time off ``clock``.

    ``torch.utils.flop_counter.FlopCounterMode`` slows the step it watches, so that step's time is excluded like an
    evaluation's (its training still counts).

    Args:
        clock: the run's clock (its ``flops_per_row`` is set on ``stop``).
    """

    def __init__(self, clock: TrainingClock) -> None:
        self.clock = clock
        self.mode: Any = None
        self._started = 0.0

    def start(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._started = self.clock.timer()
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def stop(self, rows: int) -> None:
        """Stop counting after a step of ``rows`` training rows."""
        self.mode.__exit__(None, None, None)
        self.clock.flops_per_row = self.mode.get_total_flops() / max(rows, 1)
        self.clock.flop_count_seconds += self.clock.timer() - self._started


def flop_step_of(budget: float) -> int:
    """The step whose FLOPs are counted: the 21st (after the input subspaces' first 16 batches), the 3rd in runs
    of a few seconds, the first (setup included) in smoke runs.

    Args:
        budget: training seconds.
    """
    return 20 if budget >= 10 else 2 if budget >= 2 else 0


def accuracy_of(net: nn.Module, test: TensorDataset, chunk: int = 4096) -> float:
    """Accuracy of ``net`` on ``test`` (evaluated in chunks, without autograd)."""
    features, labels = test.tensors
    correct = 0
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for start in range(0, len(labels), chunk):
            logits = net(features[start : start + chunk])
            correct += int((logits.argmax(-1) == labels[start : start + chunk]).sum())
    net.train(was_training)
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class LightningMethod:
    """A method that trains the user's LightningModule through ``lightning.pytorch.Trainer``.

    Args:
        label: name in the table and the plot (it names every extra beyond the published method).
        strategy: builds the Trainer's ``strategy`` (``None``: Lightning's default, i.e. backprop).
        plugins: builds the Trainer's ``plugins`` (e.g. ``[LowBitPrecision(weights="fp8_e4m3")]``).
        precision: the Trainer's ``precision``.
        lr: the user's Adam learning rate for this method (``None``: the dataset's, shared by every method).
    """

    label: str
    strategy: Callable[[], Any] | None = None
    plugins: Callable[[], list[Any]] = field(default=list)
    precision: str = "32-true"
    lr: float | None = None

    def run(
        self,
        spec: DatasetSpec,
        data: tuple[TensorDataset, TensorDataset, TensorDataset],
        budget: float,
        seed: int,
        clock_name: str,
        memory: ResidentMemory | None = None,
    ) -> dict:
        from lightning_nobp.data.digits import batched_loader

        train, validation, test = data
        model = build_model(spec if self.lr is None else dataclasses.replace(spec, lr=self.lr), seed)
        clock = TrainingClock(budget, lambda: accuracy_of(model, validation), CLOCKS[clock_name], memory)
        callback = _ClockCallback(clock, self._forwards_per_sample, flop_step_of(budget))
        strategy = self.strategy() if self.strategy is not None else "auto"
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=strategy,
            plugins=self.plugins() or None,
            precision=self.precision,
            max_epochs=-1,
            max_steps=-1,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        pl.seed_everything(seed, verbose=False)
        trainer.fit(model, batched_loader(train, spec.batch_size, shuffle=True))
        algorithm = getattr(strategy, "algorithm", None)
        trained_by = (
            "backprop (Lightning's default strategy)" if algorithm is None else f"NoBackpropStrategy({algorithm!r})"
        )
        describe = f"{trained_by}, Adam lr {model.hparams.lr:g}, batch {spec.batch_size}"
        return {
            "clock": clock,
            "initial_checksum": callback.initial_checksum,
            "describe": describe,
            "test_accuracy": accuracy_of(model, test),
        }

    @staticmethod
    def _forwards_per_sample(trainer: Any) -> float:
        """Network passes per training sample and step: 1 for backprop, the members (+ the official pass) else."""
        strategy = trainer.strategy
        engine = getattr(strategy, "engine", None)
        if engine is None:
            return 1.0
        population = engine.algorithm.ask(0)
        members = len(engine.own_members(population))
        if getattr(strategy, "member_data", "shared") == "pair_slices":
            groups = population.groups()[-1] + 1
            return members / groups + 1.0
        return members + (0.0 if strategy.official_pass_is_a_member(members) else 1.0)


class _ClockCallback(Callback):
    """Lightning callback around a ``TrainingClock``: start at ``on_train_start``, tick after every step, count the
    FLOPs of step ``flop_step`` (counted over the whole run, not per epoch)."""

    def __init__(self, clock: TrainingClock, forwards_per_sample: Callable[[Any], float], flop_step: int) -> None:
        self.clock = clock
        self.forwards_per_sample = forwards_per_sample
        self.flop_step = flop_step
        self.flops = FlopCount(clock)
        self.initial_checksum = 0.0
        self._per_sample = 1.0
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_checksum = parameter_checksum(pl_module)
        self._per_sample = self.forwards_per_sample(trainer)
        self.clock.start()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._step == self.flop_step:
            self.flops.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rows = int(batch[0].shape[0])
        if self._step == self.flop_step:
            self.flops.stop(rows)
        self._step += 1
        if self.clock.tick(int(rows * self._per_sample), rows):
            trainer.should_stop = True


@dataclass
class EvoTorchMethod:
    """EvoTorch's ``SNES`` or ``PGPE`` on a ``SupervisedNE`` problem over the same network and initial weights.

    Args:
        label: name in the table and the plot.
        searcher: ``"SNES"`` or ``"PGPE"``.
        popsize: population size.
        options: further keyword arguments of the searcher (``stdev_init`` overrides the dataset's).
    """

    label: str
    searcher: str
    popsize: int = 200
    options: dict[str, Any] = field(default_factory=dict)

    def run(
        self,
        spec: DatasetSpec,
        data: tuple[TensorDataset, TensorDataset, TensorDataset],
        budget: float,
        seed: int,
        clock_name: str,
        memory: ResidentMemory | None = None,
    ) -> dict:
        import evotorch
        from evotorch.algorithms import PGPE, SNES
        from evotorch.neuroevolution import SupervisedNE

        train, validation, test = data
        model = build_model(spec, seed)
        net = model.net
        center = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
        initial_checksum = parameter_checksum(model)
        torch.manual_seed(seed)
        problem = SupervisedNE(
            train,
            lambda: _copy_structure(net),
            nn.CrossEntropyLoss(),
            minibatch_size=spec.batch_size,
            common_minibatch=True,
        )
        minibatch_rows = _count_minibatch_rows(problem)
        options = {"stdev_init": spec.evotorch_stdev, **self.options}
        if self.searcher == "SNES":
            searcher = SNES(problem, popsize=self.popsize, center_init=center, **options)
        elif self.searcher == "PGPE":
            searcher = PGPE(problem, popsize=self.popsize, center_init=center, **options)
        else:
            raise ValueError(f"EvoTorchMethod(searcher={self.searcher!r}): use 'SNES' or 'PGPE'")

        def evaluate_on(split: TensorDataset) -> float:
            torch.nn.utils.vector_to_parameters(searcher.status["center"].to(torch.float32), net.parameters())
            return accuracy_of(net, split)

        clock = TrainingClock(budget, lambda: evaluate_on(validation), CLOCKS[clock_name], memory)
        flops = FlopCount(clock)
        flop_step = flop_step_of(budget)
        clock.start()
        generation = 0
        while not clock.tick(0):
            minibatch_rows.clear()
            if generation == flop_step:
                flops.start()
            searcher.step()
            rows = sum(minibatch_rows)
            if generation == flop_step:
                flops.stop(rows)
            generation += 1
            # every member is evaluated on each minibatch fetched for the step; the epoch's last one is short
            clock.samples += self.popsize * rows
            clock.rows += rows
        describe = f"evotorch {evotorch.__version__} {self.searcher}(popsize={self.popsize}, {options})"
        return {
            "clock": clock,
            "initial_checksum": initial_checksum,
            "describe": describe,
            "test_accuracy": evaluate_on(test),
        }


@dataclass
class PlainESMethod:
    """The hand-written rank-1 antithetic ES loop of ``plain_es.py`` (beside this script): plain PyTorch, no Lightning.

    Args:
        label: name in the table and the plot.
        population: members per step.
        sigma: noise scale.
    """

    label: str
    population: int = 64
    sigma: float = 0.01

    def run(
        self,
        spec: DatasetSpec,
        data: tuple[TensorDataset, TensorDataset, TensorDataset],
        budget: float,
        seed: int,
        clock_name: str,
        memory: ResidentMemory | None = None,
    ) -> dict:
        from plain_es import LowRankES

        from lightning_nobp.data.digits import batched_loader

        train, validation, test = data
        model = build_model(spec, seed)
        net = model.net
        initial_checksum = parameter_checksum(model)
        optimizer = torch.optim.Adam(net.parameters(), lr=spec.lr)
        pl.seed_everything(seed, verbose=False)
        es = LowRankES(net, optimizer, self.population, self.sigma, torch.Generator().manual_seed(seed))
        loader = batched_loader(train, spec.batch_size, shuffle=True)
        clock = TrainingClock(budget, lambda: accuracy_of(net, validation), CLOCKS[clock_name], memory)
        flops = FlopCount(clock)
        flop_step = flop_step_of(budget)
        clock.start()
        step, done = 0, False
        while not done:
            for x, y in loader:
                if step == flop_step:
                    flops.start()
                es.step(x, y)
                if step == flop_step:
                    flops.stop(len(y))
                step += 1
                if clock.tick(len(y) * self.population, len(y)):
                    done = True
                    break
        describe = (
            f"benchmarks/comparisons/plain_es.py LowRankES(population={self.population}, sigma={self.sigma:g}),"
            f" Adam lr {spec.lr:g}"
        )
        return {
            "clock": clock,
            "initial_checksum": initial_checksum,
            "describe": describe,
            "test_accuracy": accuracy_of(net, test),
        }


def _count_minibatch_rows(problem: Any) -> list[int]:
    """Record the rows of every minibatch ``problem`` (an EvoTorch ``SupervisedNE``) fetches: the returned list
    grows by one entry per fetch (the caller clears it). Its loader does not drop the epoch's short last batch, so
    counting ``minibatch_size`` rows per fetch would overstate its sample-forwards."""
    fetched: list[int] = []
    fetch = problem.get_minibatch

    def counted_minibatch() -> Any:
        batch = fetch()
        fetched.append(len(batch[0]))
        return batch

    problem.get_minibatch = counted_minibatch
    return fetched


def _copy_structure(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net)


def parameter_checksum(module: nn.Module) -> float:
    """Sum of |w| over the parameters: equal for every method when they start from the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().float().abs().sum() for p in module.parameters()))


def _nobp(algorithm: Callable[[], Any], **strategy_options: Any) -> Callable[[], Any]:
    def make() -> Any:
        import dataclasses as fields_of

        from lightning_nobp import CpuTuning, ExecutionOptions, NoBackpropStrategy

        # options of the execution group (e.g. member_data) written flat, as on the --strategy line
        names = {f.name for f in fields_of.fields(ExecutionOptions)}
        options = {key: value for key, value in strategy_options.items() if key not in names}
        execution = {key: value for key, value in strategy_options.items() if key in names}
        if execution:
            options["execution"] = ExecutionOptions(**execution)
        # the CPU tunings the recipes opt into (process-wide while training runs)
        return NoBackpropStrategy(algorithm=algorithm(), cpu_tuning=CpuTuning(), **options)

    return make


def _algorithm(name: str, **options: Any) -> Callable[[], Any]:
    def make() -> Any:
        from lightning_nobp import algorithms

        return getattr(algorithms, name)(**options)

    return make


def _low_bit_plugins(weights: str) -> Callable[[], list[Any]]:
    def make() -> list[Any]:
        import lightning_nobp

        return [lightning_nobp.LowBitPrecision(weights=weights)]

    return make


def _plain_eggroll() -> Any:
    """EGGROLL as published: ``EggRoll(extras=None)``, without per-row estimates and input-subspace noise."""
    from lightning_nobp.algorithms import EggRoll

    return EggRoll(extras=None)


#: what the labels of the defaults name, and the note the table prints under them
BIASED_NOTE = "input subspace: the first layer's noise is drawn in its inputs' principal subspace, a biased estimate"

#: every method the benchmark knows; ``DATASET_METHODS`` run unless ``--methods`` says otherwise
METHODS: dict[str, LightningMethod | EvoTorchMethod | PlainESMethod] = {
    "backprop": LightningMethod("backprop + Adam"),
    "mezo-plain": LightningMethod(
        "MeZO as published (1 direction, full-space noise)",
        _nobp(_algorithm("MeZO", directions=1, input_subspace=None)),
    ),
    "mezo": LightningMethod("MeZO() default: 8 directions + input subspace 0.97 (biased)", _nobp(_algorithm("MeZO"))),
    "eggroll-plain": LightningMethod("EGGROLL as published (rank 1, population 64)", _nobp(_plain_eggroll)),
    "eggroll": LightningMethod(
        "EggRoll() default: + per-row head + input subspace 0.97 (biased)", _nobp(_algorithm("EggRoll"))
    ),
    "openes": LightningMethod(
        "OpenES() default: + per-row head + input subspace 0.97 (biased)", _nobp(_algorithm("OpenES"))
    ),
    "plain-es": PlainESMethod("hand-written rank-1 ES loop, plain PyTorch (no Lightning)"),
    # the same defaults with the learning rate an ES user would pick (see EggRoll's docstring), not backprop's
    "eggroll-lr3e-3": LightningMethod(
        "EggRoll() default (+ per-row head + input subspace 0.97, biased), Adam lr 3e-3",
        _nobp(_algorithm("EggRoll")),
        lr=3e-3,
    ),
    "evotorch-snes": EvoTorchMethod("EvoTorch SNES", "SNES"),
    "evotorch-pgpe": EvoTorchMethod(
        "EvoTorch PGPE", "PGPE", options={"center_learning_rate": 1.0, "stdev_learning_rate": 0.1}
    ),
    # low-bit weights (the LowBitPrecision Trainer plugin); selected with --methods once the plugin exists
    "eggroll-fp8": LightningMethod(
        "EggRoll() default fp8 weights", _nobp(_algorithm("EggRoll")), _low_bit_plugins("fp8_e4m3")
    ),
    "mezo-fp8": LightningMethod("MeZO() default fp8 weights", _nobp(_algorithm("MeZO")), _low_bit_plugins("fp8_e4m3")),
}
DEFAULT_METHODS = (
    "backprop", "mezo-plain", "mezo", "eggroll-plain", "eggroll", "openes", "plain-es", "evotorch-snes",
)  # fmt: skip
#: Fashion-MNIST adds EggRoll with an ES user's learning rate (the backprop user's 1e-3 there is slow for ES)
DATASET_METHODS = {"digits": DEFAULT_METHODS, "fashion": (*DEFAULT_METHODS, "eggroll-lr3e-3")}
#: the small search of EvoTorch SNES's settings on the validation split (``--search-evotorch``)
EVOTORCH_SEARCH = [
    {"popsize": popsize, "stdev_init": stdev} for popsize in (50, 200) for stdev in (0.03, 0.1, 0.3)
]


def _keyword_literals(option: str, expression: str, example: str) -> tuple[str, dict[str, Any]]:
    """``Name(key=literal, ...)`` -> ``("Name", {key: value})``; an error naming ``option`` and ``example`` else."""
    try:
        call = ast.parse(expression, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            raise ValueError
        return call.func.id, {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"{option} {expression!r}: write a call with keyword literals, e.g. {example!r}") from error


def algorithm_method(expression: str, strategy: str | None = None) -> LightningMethod:
    """A method from an algorithm written as a call with literal keyword arguments, e.g. ``EggRoll(population=32)``.

    Args:
        expression: ``Name(key=value, ...)`` where ``Name`` is one of ``lightning_nobp.algorithms``.
        strategy: optional ``NoBackpropStrategy(key=value, ...)``: the strategy's options (e.g.
            ``member_data='pair_slices'``).
    """
    from lightning_nobp import NoBackpropStrategy, algorithms

    name, options = _keyword_literals("--algorithm", expression, "EggRoll(population=32, sigma=3e-3)")
    if name not in algorithms.__all__:
        raise ValueError(f"--algorithm {expression!r}: {name} is not one of {sorted(algorithms.__all__)}")
    strategy_options: dict[str, Any] = {}
    label = expression
    if strategy is not None:
        strategy_name, strategy_options = _keyword_literals(
            "--strategy", strategy, "NoBackpropStrategy(member_data='pair_slices')"
        )
        if strategy_name != NoBackpropStrategy.__name__:
            raise ValueError(f"--strategy {strategy!r}: write NoBackpropStrategy(key=value, ...)")
        label = f"{expression}, {strategy}"
    return LightningMethod(label, _nobp(_algorithm(name, **options), **strategy_options))


def unavailable(name: str) -> str | None:
    """``None`` when method ``name`` can run here, else why not (with the fix)."""
    method = METHODS[name]
    if isinstance(method, EvoTorchMethod):
        try:
            import evotorch  # noqa: F401
        except ImportError:
            return 'EvoTorch is not installed: pip install -e ".[bench]"'
    if name.endswith("-fp8"):
        import lightning_nobp

        if not hasattr(lightning_nobp, "LowBitPrecision"):
            return "lightning_nobp.LowBitPrecision is not available in this version"
    return None


# ---------------------------------------------------------------------------------------------------- one method
def accuracy_at(curve: Sequence[tuple[float, float]], seconds: float) -> float | None:
    """The accuracy of the first evaluation at or after ``seconds`` (``None`` when training stopped before)."""
    for t, accuracy in curve:
        if t >= seconds:
            return accuracy
    return None


def time_to(curve: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """Training seconds of the first evaluation reaching ``accuracy`` (``None`` if never)."""
    for t, value in curve:
        if value >= accuracy:
            return t
    return None


def sustained_time_to(
    curve: Sequence[tuple[float, float]], accuracy: float, window: int = SUSTAIN_WINDOW
) -> float | None:
    """Training seconds of the first checkpoint from which the moving mean of the last ``window`` accuracies stays
    at or above ``accuracy`` until the run ends (``None`` if it does not end above).

    Args:
        curve: ``(seconds, accuracy)`` at every checkpoint, the first at 0 s.
        accuracy: the threshold.
        window: checkpoints in the moving mean (fewer at the start of the curve).
    """
    values = [a for _, a in curve]
    means = [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
    found = None
    for (t, _), mean in zip(reversed(curve), reversed(means)):
        if mean < accuracy:
            break
        found = t
    return found


def summarize(spec: DatasetSpec, budget: float, clock: TrainingClock) -> dict[str, Any]:
    """The table row of one run from its clock (accuracies on the validation split)."""
    curve = clock.curve
    window = [a for t, a in curve if budget * 2 / 3 <= t <= budget * 1.05]
    seconds = max(clock.elapsed(), 1e-9)
    flops = None if clock.flops_per_row is None else clock.flops_per_row * clock.rows
    return {
        "accuracy_at": {f"{t:g}": accuracy_at(curve, t) for t in REPORT_TIMES if t <= budget},
        "time_to": {f"{a:g}": sustained_time_to(curve, a) for a in spec.thresholds},
        "first_crossing": {f"{a:g}": time_to(curve, a) for a in spec.thresholds},
        "mean_last_third": sum(window) / len(window) if window else None,
        "mean_window_s": [budget * 2 / 3, budget],
        "final_accuracy": curve[-1][1],
        "peak_accuracy": max(a for _, a in curve),
        "training_seconds": seconds,
        "evaluation_seconds": clock.evaluation_seconds,
        "flop_count_seconds": clock.flop_count_seconds,
        "steps": clock.steps,
        "steps_per_s": clock.steps / seconds,
        "rows": clock.rows,
        "sample_forwards": clock.samples,
        "sample_forwards_per_s": clock.samples / seconds,
        "flops_per_row": clock.flops_per_row,
        "flops": flops,
        "flops_per_s": None if flops is None else flops / seconds,
        "curve": [[round(t, 4), a] for t, a in curve],
    }


def resolve_method(
    name: str, overrides: dict[str, Any] | None = None
) -> LightningMethod | EvoTorchMethod | PlainESMethod:
    """Method ``name`` of ``METHODS`` (or ``"custom"``) with ``overrides`` applied.

    Args:
        name: a key of ``METHODS`` or ``"custom"``.
        overrides: ``"algorithm"``/``"strategy"``: method ``"custom"``'s expressions (see ``algorithm_method``);
            ``"evotorch"``: the EvoTorch methods' ``popsize`` and searcher options (e.g. ``stdev_init``).
    """
    overrides = overrides or {}
    if name == "custom":
        return algorithm_method(overrides["algorithm"], overrides.get("strategy"))
    method = METHODS[name]
    settings = overrides.get("evotorch")
    if isinstance(method, EvoTorchMethod) and settings:
        options = {key: value for key, value in settings.items() if key != "popsize"}
        popsize = settings.get("popsize", method.popsize)
        shown = ", ".join(f"{key} {value:g}" for key, value in sorted(options.items()))
        method = dataclasses.replace(
            method,
            label=f"{method.label} (popsize {popsize}, {shown}; searched on validation)",
            popsize=popsize,
            options={**method.options, **options},
        )
    return method


def run_method(
    name: str,
    dataset: str,
    budget: float,
    seed: int,
    threads: int,
    clock: str = "wall",
    fraction: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Train one method and return its row (runs in a fresh process when the benchmark isolates methods).

    Args:
        name: a key of ``METHODS``.
        dataset: a key of ``DATASETS``.
        budget: training seconds.
        seed: seed of the initial weights, the data order and the perturbations.
        threads: torch intra-op threads.
        clock: ``"wall"`` or ``"cpu"`` (see ``CLOCKS``).
        fraction: share of the training split to use (the smoke mode uses a little).
        overrides: see ``resolve_method``; ``"lr"``: the user's Adam lr instead of the dataset's.
    """
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    torch.set_num_threads(threads)
    from lightning_nobp.cpu_allocator import keep_freed_cpu_memory

    # every method gets the allocator NoBackpropStrategy sets on the CPU: the table compares methods, not mallocs
    keep_freed_cpu_memory()
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|litlogger).*")
    for logger in ("evotorch", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    overrides = overrides or {}
    spec = DATASETS[dataset]
    if overrides.get("lr") is not None:
        spec = dataclasses.replace(spec, lr=overrides["lr"])
    method = resolve_method(name, overrides)
    train, validation, test = spec.load()
    if fraction < 1.0:
        keep = max(spec.batch_size, int(len(train) * fraction))
        train = TensorDataset(*(tensor[:keep] for tensor in train.tensors))
    load_start = os.getloadavg()[0]
    memory = ResidentMemory()
    result = method.run(spec, (train, validation, test), budget, seed, clock, memory)
    row = {"method": name, "seed": seed, "label": method.label, "describe": result["describe"]}
    row.update(summarize(spec, budget, result["clock"]))
    row["test_accuracy"] = result["test_accuracy"]
    row.update(memory.stop())
    row["initial_checksum"] = result["initial_checksum"]
    row["load_average"] = [load_start, os.getloadavg()[0]]
    row["split_rows"] = {"train": len(train), "validation": len(validation), "test": len(test)}
    return row


# ---------------------------------------------------------------------------------------------------- seeds
#: the columns whose mean and spread over seeds the report keeps (``time_to`` per threshold separately)
AGGREGATED = (
    "test_accuracy", "mean_last_third", "final_accuracy", "steps", "steps_per_s", "sample_forwards_per_s",
    "flops_per_row", "flops_per_s", "peak_rss_above_start_mib", "training_seconds",
)  # fmt: skip


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, standard deviation (n - 1), min and max of the values that are not ``None``, and how many there were.

    Args:
        values: one value per seed (``None``: the run did not produce it, e.g. a threshold never sustained).
    """
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    mean = sum(present) / n
    std = (sum((v - mean) ** 2 for v in present) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(present), "max": max(present), "n": n, "of": len(values)}


def aggregate(rows: Sequence[dict]) -> dict[str, Any]:
    """One method's runs (one per seed) as mean and spread per column, and the mean validation curve.

    Args:
        rows: the method's rows from ``run_method``, one per seed.
    """
    first = rows[0]
    summary: dict[str, Any] = {
        "method": first["method"],
        "label": first["label"],
        "describe": first["describe"],
        "seeds": [row["seed"] for row in rows],
        "initial_checksums": [row["initial_checksum"] for row in rows],
    }
    for column in AGGREGATED:
        summary[column] = spread([row.get(column) for row in rows])
    summary["time_to"] = {a: spread([row["time_to"][a] for row in rows]) for a in first["time_to"]}
    summary["accuracy_at"] = {t: spread([row["accuracy_at"][t] for row in rows]) for t in first["accuracy_at"]}
    # the mean curve over seeds at the first run's checkpoints (each run's accuracy at or after that time)
    times = [t for t, _ in first["curve"]]
    curve = []
    for t in times:
        values = [accuracy_at(row["curve"], t) for row in rows]
        if all(v is not None for v in values):
            curve.append([t, sum(values) / len(values)])
    summary["curve"] = curve
    return summary


def describe_machine() -> dict[str, Any]:
    """The CPU model, the cores visible and usable, torch's and Python's versions, the current load average."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def _run_all(
    tasks: Sequence[tuple[str, int]],
    arguments: Callable[[str, int], tuple],
    isolate: bool,
    jobs: int,
    partial: Path | None,
) -> dict[tuple[str, int], dict]:
    """Run ``run_method`` for every ``(method, seed)``: each in a fresh process when ``isolate``."""
    done: dict[tuple[str, int], dict] = {}
    if not isolate:
        return {task: run_method(*arguments(*task)) for task in tasks}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_method, *arguments(*task)): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            done[futures[future]] = row
            print(
                f"{row['label']} seed {row['seed']}: test {row['test_accuracy'] * 100:.1f}%, validation mean last"
                f" third {(row['mean_last_third'] or 0) * 100:.1f}%, {row['steps']} steps",
                flush=True,
            )
            if partial is not None:  # rows so far, in case a long run is interrupted
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(list(done.values()), indent=1))
    return done


def search_evotorch(
    dataset: str,
    budget: float,
    threads: int,
    clock: str,
    fraction: float,
    isolate: bool,
    jobs: int,
    configs: Sequence[dict[str, Any]] = tuple(EVOTORCH_SEARCH),
) -> dict[str, Any]:
    """EvoTorch SNES at each of ``configs`` for ``budget`` seconds (seed 0); the best mean validation accuracy over
    the last third of the budget wins.

    Args:
        dataset: a key of ``DATASETS``.
        budget: training seconds per configuration.
        threads: torch intra-op threads.
        clock: ``"wall"`` or ``"cpu"``.
        fraction: share of the training split to use.
        isolate: each configuration in a fresh process.
        jobs: configurations trained at once.
        configs: ``popsize`` and searcher options (``stdev_init``, ``center_learning_rate``, ...) to try.
    """
    tasks = [(f"config{i}", 0) for i in range(len(configs))]

    def arguments(task: str, seed: int) -> tuple:
        config = configs[int(task[len("config") :])]
        return ("evotorch-snes", dataset, budget, seed, threads, clock, fraction, {"evotorch": dict(config)})

    done = _run_all(tasks, arguments, isolate, jobs, None)
    tried = []
    for task, config in zip(tasks, configs):
        row = done[task]
        tried.append({"config": dict(config), "validation_mean_last_third": row["mean_last_third"],
                      "final_validation_accuracy": row["final_accuracy"], "steps": row["steps"]})  # fmt: skip
    best = max(tried, key=lambda entry: entry["validation_mean_last_third"] or 0.0)
    print(f"EvoTorch SNES search: chose {best['config']} of {len(tried)} configurations", flush=True)
    return {"method": "evotorch-snes", "budget_s": budget, "seed": 0, "score": "validation mean over the last third",
            "tried": tried, "chosen": best["config"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the report
def plot(report: dict, path: Path) -> None:
    """Mean validation accuracy over seeds against training time (log axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for row in report["methods"]:
        points = [(max(t, 0.01), a * 100) for t, a in row["curve"]]
        if points:
            axis.plot(*zip(*points), label=row["label"], linewidth=1.6)
    for threshold in report["thresholds"]:
        axis.axhline(threshold * 100, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xscale("log")
    measure = "CPU time of the process" if report.get("clock") == "cpu" else "wall-clock"
    axis.set_xlabel(f"training {measure} (s, log scale, evaluation excluded)")
    seeds = len(report["seeds"])
    axis.set_ylabel(f"validation accuracy (%), mean of {seeds} seed" + ("s" if seeds > 1 else ""))
    bottom = min((a for row in report["methods"] for _, a in row["curve"]), default=0.0) * 100
    axis.set_ylim(max(bottom, 100 * report["thresholds"][0] - 30), 100)
    threads = f"{report['threads']} torch thread" + ("s" if report["threads"] > 1 else "")
    axis.set_title(f"{report['dataset']}: MLP {report['mlp']}, {threads}, same initial weights")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(report: dict) -> str:
    """The report as a Markdown table (``benchmarks/report.py`` renders the same table into the docs)."""
    from report import peers_table

    return peers_table(report)


def run(
    dataset: str,
    budget: float,
    methods: Sequence[str],
    out: Path,
    seeds: Sequence[int] = (0,),
    threads: int = 2,
    isolate: bool = True,
    clock: str = "wall",
    fraction: float = 1.0,
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
    search_budget: float | None = None,
    command: str | None = None,
) -> dict | None:
    """Run the benchmark, write ``peers_<dataset>.json`` and ``.png`` to ``out`` and return the report.

    Returns ``None`` (after printing why) when the dataset is not installed. Methods that cannot run here
    (EvoTorch missing, no low-bit plugin) are listed under ``"skipped"`` with the reason.

    Args:
        dataset: a key of ``DATASETS``.
        budget: training seconds per run.
        methods: keys of ``METHODS`` (or ``"custom"``).
        out: folder of the JSON and the plot.
        seeds: every method runs once per seed.
        threads: torch intra-op threads per run.
        isolate: each run in a fresh process.
        clock: ``"wall"`` or ``"cpu"``.
        fraction: share of the training split to use.
        jobs: runs at once (each in its own process).
        overrides: see ``run_method``.
        search_budget: seconds per configuration of the EvoTorch search first (``None``: no search).
        command: the command line, stored in the JSON.
    """
    spec = DATASETS[dataset]
    reason = spec.available()
    if reason is not None:
        print(f"skipping {dataset}: {reason}")
        return None
    machine = describe_machine()
    skipped = {name: why for name in methods if name != "custom" and (why := unavailable(name)) is not None}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    todo = [name for name in methods if name not in skipped]
    overrides = dict(overrides or {})
    search = None
    if search_budget is not None and "evotorch-snes" in todo:
        search = search_evotorch(dataset, search_budget, threads, clock, fraction, isolate, jobs)
        overrides["evotorch"] = search["chosen"]
    tasks = [(name, seed) for seed in seeds for name in todo]

    def arguments(name: str, seed: int) -> tuple:
        return (name, dataset, budget, seed, threads, clock, fraction, overrides)

    done = _run_all(tasks, arguments, isolate, jobs, out / f"peers_{dataset}.partial.json")
    runs = [done[task] for task in tasks]
    summaries = [aggregate([done[(name, seed)] for seed in seeds]) for name in todo]
    loads = [value for row in runs for value in row["load_average"]]
    machine["load_average_during"] = {"min": min(loads, default=None), "max": max(loads, default=None)}
    machine["load_average_at_end"] = list(os.getloadavg())
    report = {
        "dataset": dataset,
        "command": command,
        "mlp": f"{spec.in_features}-{spec.hidden}-10",
        "batch_size": spec.batch_size,
        "user_lr": overrides.get("lr") or spec.lr,
        "budget_s": budget,
        "seeds": list(seeds),
        "threads": threads,
        "clock": clock,
        "jobs": jobs,
        "fraction": fraction,
        "validation": {
            "fraction": VALIDATION_FRACTION,
            "seed": VALIDATION_SEED,
            "rows": runs[0]["split_rows"]["validation"] if runs else None,
        },
        "thresholds": list(spec.thresholds),
        "sustain_window": SUSTAIN_WINDOW,
        "mean_window": [budget * 2 / 3, budget],
        "torch": torch.__version__,
        "machine": machine,
        "evotorch_search": search,
        "skipped": skipped,
        "methods": summaries,
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peers_{dataset}.json").write_text(json.dumps(report, indent=1) + "\n")
    partial = out / f"peers_{dataset}.partial.json"
    if partial.exists():
        partial.unlink()
    plot(report, out / f"peers_{dataset}.png")
    print(table(report))
    return report


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per method (60 / 180)")
    parser.add_argument("--methods", default=None, help=f"comma list of {sorted(METHODS)} (default: per dataset)")
    parser.add_argument(
        "--algorithm", default=None, help="adds method 'custom': NoBackpropStrategy with e.g. 'EggRoll(population=32)'"
    )
    parser.add_argument(
        "--strategy",
        default=None,
        help="options of method 'custom''s strategy, e.g. \"NoBackpropStrategy(member_data='pair_slices')\"",
    )
    parser.add_argument("--lr", type=float, default=None, help="the user's Adam lr for every Lightning method")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--seeds", default="0", help="comma list of seeds: every method runs once per seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per method")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall-clock, or process CPU seconds (shared machines)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each in its own process (use with --clock cpu)"
    )
    parser.add_argument(
        "--search-evotorch",
        nargs="?",
        type=float,
        const=10.0,
        default=None,
        metavar="SECONDS",
        help="first search EvoTorch SNES's popsize and stdev on the validation split (SECONDS per config, 10)",
    )
    parser.add_argument("--in-process", action="store_true", help="run methods in this process (no isolation)")
    parser.add_argument("--smoke", action="store_true", help="every method for about a second on a digits subset")
    args = parser.parse_args(argv)
    chosen = args.methods or ",".join(DATASET_METHODS["digits" if args.smoke else args.dataset])
    methods = [m.strip() for m in chosen.split(",") if m.strip()]
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: write a comma list of integers, e.g. 0,1,2")
    if args.algorithm is not None:
        algorithm_method(args.algorithm, args.strategy)  # fails here, with the fix, on a bad expression
        methods += [] if "custom" in methods else ["custom"]
    elif "custom" in methods:
        parser.error("method 'custom' needs --algorithm, e.g. --algorithm 'EggRoll(population=32)'")
    elif args.strategy is not None:
        parser.error("--strategy sets the options of method 'custom': give --algorithm too")
    overrides = {"algorithm": args.algorithm, "strategy": args.strategy, "lr": args.lr}
    for name in methods:
        if name not in METHODS:
            if name != "custom":
                parser.error(f"unknown method {name!r}: choose from {sorted(METHODS)} or custom (--algorithm)")
    command = " ".join(["python benchmarks/comparisons/peers.py", *(argv if argv is not None else sys.argv[1:])])
    command = command.replace(f"{Path(__file__).resolve().parents[2]}/", "")  # --out inside the repository: relative
    if args.smoke:
        return run(
            "digits", args.budget or 1.0, methods, args.out, seeds, args.threads, False, args.clock,
            overrides=overrides, search_budget=args.search_evotorch, command=command,
        )  # fmt: skip
    budget = args.budget if args.budget is not None else (60.0 if args.dataset == "digits" else 180.0)
    return run(
        args.dataset, budget, methods, args.out, seeds, args.threads, not args.in_process, args.clock,
        jobs=args.jobs, overrides=overrides, search_budget=args.search_evotorch, command=command,
    )  # fmt: skip


if __name__ == "__main__":
    main()
