"""Side-by-side against the peers: accuracy against training wall-clock for backprop, our algorithms and EvoTorch.

Every method trains the same MLP from the same initial weights for the same training wall-clock budget, each in
its own fresh process (clean peak memory, no state shared between methods):

* ``backprop``: Lightning's default strategy, the user's Adam (lr 1e-2 digits, 1e-3 Fashion-MNIST) and batch.
* ``mezo``, ``eggroll``, ``openes``: the same unmodified ``MLPClassifier`` with the same optimizer and batch, only
  the Trainer line changed to ``NoBackpropStrategy(algorithm=MeZO())`` (resp. ``EggRoll()``, ``OpenES()``) with
  the algorithms' *default* hyperparameters.
* ``evotorch-snes``, ``evotorch-pgpe``: EvoTorch's ``SNES`` / ``PGPE`` on a ``SupervisedNE`` problem over the same
  network, centred on the same initial weights (``pip install -e ".[bench]"``; skipped with a message without it).

Every method's process runs with the malloc settings ``NoBackpropStrategy`` makes on the CPU
(``lightning_nobp.cpu_allocator``), so the table compares methods, not allocators.

The clock counts training only: a callback (Lightning) or the generation loop (EvoTorch) evaluates the test split
at checkpoints (log-spaced first, then every ``budget / 60`` s) and that time is taken off the clock. Reported per
method: accuracy at 10/30/60/120/180 s (those within the budget), time to the dataset's accuracy thresholds
(80/85% Fashion-MNIST, 95/97% digits), the mean accuracy over the last third of the budget (120-180 s for 180 s),
sample-forwards per second (one sample through the network once; backprop's backward pass is not counted) and
the process's peak resident memory above its level when training started (after imports, setup and the first
evaluation). Writes ``peers_<dataset>.json`` and
``peers_<dataset>.png`` (accuracy against log wall-clock, one line per method) to ``--out``.

    python benchmarks/peers.py --dataset digits --budget 60
    python benchmarks/peers.py --dataset fashion --budget 180
    python benchmarks/peers.py --smoke            # every method for about a second on digits

Adding a method is one entry in ``METHODS``: a ``LightningMethod`` (any strategy and Trainer plugins, e.g. a
low-bit precision plugin) or an ``EvoTorchMethod``.
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

REPORT_TIMES = (10.0, 30.0, 60.0, 120.0, 180.0)
#: what the training clock counts: wall-clock seconds, or this process's CPU seconds (robust on shared machines)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
        thresholds: accuracies whose first crossing time is reported.
        evotorch_stdev: initial search standard deviation of EvoTorch's SNES and PGPE (as tuned in earlier peer
            measurements).
    """

    name: str
    in_features: int
    hidden: int
    batch_size: int
    lr: float
    thresholds: tuple[float, ...]
    evotorch_stdev: float

    def load(self) -> tuple[TensorDataset, TensorDataset]:
        """The train and test splits, as in-memory float features and int64 labels."""
        if self.name == "digits":
            from lightning_nobp.data import load_digits_split

            return load_digits_split()
        from lightning_nobp.data import load_fashion_mnist

        return load_fashion_mnist("train"), load_fashion_mnist("test")

    def available(self) -> str | None:
        """``None`` when the data can be read, else the reason it cannot (with the fix)."""
        if self.name == "fashion":
            from lightning_nobp.data import fashion_mnist_available

            if not fashion_mnist_available():
                return "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
        return None


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
        evaluate: returns the current test accuracy.
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
        self.steps = 0
        self.evaluation_seconds = 0.0
        self._started = 0.0
        self._next = 0

    def start(self) -> None:
        self.curve = [(0.0, self.evaluate())]
        if self.memory is not None:
            self.memory.start()
        self._started = self.timer()

    def elapsed(self) -> float:
        return self.timer() - self._started - self.evaluation_seconds

    def tick(self, samples: int) -> bool:
        """Count one training step; evaluate when a checkpoint has passed. Returns ``True`` once the budget is spent."""
        self.samples += samples
        self.steps += 1
        now = self.elapsed()
        if self._next < len(self.checkpoints) and now >= self.checkpoints[self._next]:
            paused = self.timer()
            self.curve.append((now, self.evaluate()))
            while self._next < len(self.checkpoints) and self.checkpoints[self._next] <= now:
                self._next += 1
            self.evaluation_seconds += self.timer() - paused
        return now >= self.budget


def accuracy_of(net: nn.Module, test: TensorDataset, chunk: int = 4096) -> float:
    """Test accuracy of ``net`` (evaluated in chunks, without autograd)."""
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
        label: name in the table and the plot.
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
        data: tuple[TensorDataset, TensorDataset],
        budget: float,
        seed: int,
        clock_name: str,
        memory: ResidentMemory | None = None,
    ) -> dict:
        from lightning_nobp.data.digits import batched_loader

        train, test = data
        model = build_model(spec if self.lr is None else dataclasses.replace(spec, lr=self.lr), seed)
        clock = TrainingClock(budget, lambda: accuracy_of(model, test), CLOCKS[clock_name], memory)
        callback = _ClockCallback(clock, self._forwards_per_sample)
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
        return {"clock": clock, "initial_checksum": callback.initial_checksum, "describe": describe}

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
    """Lightning callback around a ``TrainingClock``: start at ``on_train_start``, tick after every step."""

    def __init__(self, clock: TrainingClock, forwards_per_sample: Callable[[Any], float]) -> None:
        self.clock = clock
        self.forwards_per_sample = forwards_per_sample
        self.initial_checksum = 0.0
        self._per_sample = 1.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_checksum = parameter_checksum(pl_module)
        self._per_sample = self.forwards_per_sample(trainer)
        self.clock.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.clock.tick(int(batch[0].shape[0] * self._per_sample)):
            trainer.should_stop = True


@dataclass
class EvoTorchMethod:
    """EvoTorch's ``SNES`` or ``PGPE`` on a ``SupervisedNE`` problem over the same network and initial weights.

    Args:
        label: name in the table and the plot.
        searcher: ``"SNES"`` or ``"PGPE"``.
        popsize: population size.
        options: further keyword arguments of the searcher.
    """

    label: str
    searcher: str
    popsize: int = 200
    options: dict[str, Any] = field(default_factory=dict)

    def run(
        self,
        spec: DatasetSpec,
        data: tuple[TensorDataset, TensorDataset],
        budget: float,
        seed: int,
        clock_name: str,
        memory: ResidentMemory | None = None,
    ) -> dict:
        import evotorch
        from evotorch.algorithms import PGPE, SNES
        from evotorch.neuroevolution import SupervisedNE

        train, test = data
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

        def evaluate() -> float:
            torch.nn.utils.vector_to_parameters(searcher.status["center"].to(torch.float32), net.parameters())
            return accuracy_of(net, test)

        clock = TrainingClock(budget, evaluate, CLOCKS[clock_name], memory)
        clock.start()
        while not clock.tick(0):
            minibatch_rows.clear()
            searcher.step()
            # every member is evaluated on each minibatch fetched for the step; the epoch's last one is short
            clock.samples += self.popsize * sum(minibatch_rows)
        describe = f"evotorch {evotorch.__version__} {self.searcher}(popsize={self.popsize}, {options})"
        return {"clock": clock, "initial_checksum": initial_checksum, "describe": describe}


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
        from lightning_nobp import NoBackpropStrategy

        # the CPU tunings the recipes opt into (process-wide while training runs)
        options = {"reuse_cpu_memory": True, "freeze_startup_objects": True, **strategy_options}
        return NoBackpropStrategy(algorithm=algorithm(), **options)

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


#: every method the benchmark knows; ``DEFAULT_METHODS`` run unless ``--methods`` says otherwise
METHODS: dict[str, LightningMethod | EvoTorchMethod] = {
    "backprop": LightningMethod("backprop + Adam"),
    "mezo": LightningMethod("MeZO()", _nobp(_algorithm("MeZO"))),
    "eggroll": LightningMethod("EggRoll()", _nobp(_algorithm("EggRoll"))),
    "openes": LightningMethod("OpenES()", _nobp(_algorithm("OpenES"))),
    # the same defaults with the learning rate an ES user would pick (see EggRoll's docstring), not backprop's
    "eggroll-lr3e-3": LightningMethod("EggRoll(), Adam lr 3e-3", _nobp(_algorithm("EggRoll")), lr=3e-3),
    "evotorch-snes": EvoTorchMethod("EvoTorch SNES", "SNES"),
    "evotorch-pgpe": EvoTorchMethod(
        "EvoTorch PGPE", "PGPE", options={"center_learning_rate": 1.0, "stdev_learning_rate": 0.1}
    ),
    # low-bit weights (the LowBitPrecision Trainer plugin); selected with --methods once the plugin exists
    "eggroll-fp8": LightningMethod("EggRoll() fp8", _nobp(_algorithm("EggRoll")), _low_bit_plugins("fp8_e4m3")),
    "mezo-fp8": LightningMethod("MeZO() fp8", _nobp(_algorithm("MeZO")), _low_bit_plugins("fp8_e4m3")),
}
DEFAULT_METHODS = ("backprop", "mezo", "eggroll", "openes", "evotorch-snes", "evotorch-pgpe")
#: Fashion-MNIST adds EggRoll with an ES user's learning rate (the backprop user's 1e-3 there is slow for ES)
DATASET_METHODS = {"digits": DEFAULT_METHODS, "fashion": (*DEFAULT_METHODS[:4], "eggroll-lr3e-3", *DEFAULT_METHODS[4:])}


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


def summarize(spec: DatasetSpec, budget: float, clock: TrainingClock) -> dict[str, Any]:
    """The table row of one method from its clock."""
    curve = clock.curve
    window = [a for t, a in curve if budget * 2 / 3 <= t <= budget * 1.05]
    seconds = max(clock.elapsed(), 1e-9)
    return {
        "accuracy_at": {f"{t:g}": accuracy_at(curve, t) for t in REPORT_TIMES if t <= budget},
        "time_to": {f"{a:g}": time_to(curve, a) for a in spec.thresholds},
        "mean_last_third": sum(window) / len(window) if window else None,
        "mean_window_s": [budget * 2 / 3, budget],
        "final_accuracy": curve[-1][1],
        "peak_accuracy": max(a for _, a in curve),
        "training_seconds": seconds,
        "evaluation_seconds": clock.evaluation_seconds,
        "steps": clock.steps,
        "sample_forwards": clock.samples,
        "sample_forwards_per_s": clock.samples / seconds,
        "curve": [[round(t, 4), a] for t, a in curve],
    }


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
        overrides: ``"algorithm"``: the expression of method ``"custom"`` (see ``algorithm_method``); ``"lr"``: the
            user's Adam lr instead of the dataset's.
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
    method = algorithm_method(overrides["algorithm"], overrides.get("strategy")) if name == "custom" else METHODS[name]
    train, test = spec.load()
    if fraction < 1.0:
        keep = max(spec.batch_size, int(len(train) * fraction))
        train = TensorDataset(*(tensor[:keep] for tensor in train.tensors))
    memory = ResidentMemory()
    result = method.run(spec, (train, test), budget, seed, clock, memory)
    row = {"method": name, "label": method.label, "describe": result["describe"]}
    row.update(summarize(spec, budget, result["clock"]))
    row.update(memory.stop())
    row["initial_checksum"] = result["initial_checksum"]
    return row


# ---------------------------------------------------------------------------------------------------- the report
def plot(report: dict, path: Path) -> None:
    """Accuracy against training wall-clock (log axis), one line per method, the thresholds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for row in report["methods"]:
        points = [(max(t, 0.01), a * 100) for t, a in row["curve"]]
        axis.plot(*zip(*points), label=row["label"], linewidth=1.6)
    for threshold in report["thresholds"]:
        axis.axhline(threshold * 100, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xscale("log")
    measure = "CPU time of the process" if report.get("clock") == "cpu" else "wall-clock"
    axis.set_xlabel(f"training {measure} (s, log scale, evaluation excluded)")
    axis.set_ylabel("test accuracy (%)")
    bottom = min(min(a for _, a in row["curve"]) for row in report["methods"]) * 100
    axis.set_ylim(max(bottom, 100 * report["thresholds"][0] - 30), 100)
    threads = f"{report['threads']} torch thread" + ("s" if report["threads"] > 1 else "")
    axis.set_title(f"{report['dataset']}: MLP {report['mlp']}, {threads}, same initial weights")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(report: dict) -> str:
    """The report as a Markdown table."""
    times = list(report["methods"][0]["accuracy_at"]) if report["methods"] else []
    thresholds = [f"{t:g}" for t in report["thresholds"]]
    head = (
        ["method"]
        + [f"acc@{t}s" for t in times]
        + [f"mean {report['mean_window'][0]:g}-{report['mean_window'][1]:g} s"]
        + [f"t({float(a) * 100:g}%)" for a in thresholds]
        + ["sample-fwd/s", "peak RSS +MiB"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value * 100:.1f}%"

    for row in report["methods"]:
        cells = [row["label"]] + [pct(row["accuracy_at"][t]) for t in times] + [pct(row["mean_last_third"])]
        cells += ["—" if row["time_to"][a] is None else f"{row['time_to'][a]:.2f} s" for a in thresholds]
        cells += [f"{row['sample_forwards_per_s'] / 1e6:.3g} M", f"{row['peak_rss_above_start_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(
    dataset: str,
    budget: float,
    methods: Sequence[str],
    out: Path,
    seed: int = 0,
    threads: int = 2,
    isolate: bool = True,
    clock: str = "wall",
    fraction: float = 1.0,
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
) -> dict | None:
    """Run the benchmark, write ``peers_<dataset>.json`` and ``.png`` to ``out`` and return the report.

    Returns ``None`` (after printing why) when the dataset is not installed. Methods that cannot run here
    (EvoTorch missing, no low-bit plugin) are listed under ``"skipped"`` with the reason.
    """
    spec = DATASETS[dataset]
    reason = spec.available()
    if reason is not None:
        print(f"skipping {dataset}: {reason}")
        return None
    skipped = {name: why for name in methods if name != "custom" and (why := unavailable(name)) is not None}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    todo = [name for name in methods if name not in skipped]
    arguments = {name: (name, dataset, budget, seed, threads, clock, fraction, overrides) for name in todo}
    if isolate:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=context, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run_method, *arguments[name]): name for name in todo}
            done: dict[str, dict] = {}
            for future in concurrent.futures.as_completed(futures):
                done[futures[future]] = future.result()
                out.mkdir(parents=True, exist_ok=True)  # rows so far, in case a long run is interrupted
                (out / f"peers_{dataset}.partial.json").write_text(json.dumps(list(done.values()), indent=1))
            rows = [done[name] for name in todo]
    else:
        rows = [run_method(*arguments[name]) for name in todo]
    for row in rows:
        print(
            f"{row['label']:>24}: final {row['final_accuracy'] * 100:.1f}%, mean last third "
            f"{(row['mean_last_third'] or 0) * 100:.1f}%, {row['sample_forwards_per_s'] / 1e6:.3g} M sample-fwd/s,"
            f" {row['steps']} steps",
            flush=True,
        )
    evotorch_rates = [r["sample_forwards_per_s"] for r in rows if r["method"].startswith("evotorch")]
    for row in rows:
        row["sample_forwards_vs_evotorch"] = (
            row["sample_forwards_per_s"] / max(evotorch_rates) if evotorch_rates else None
        )
    report = {
        "dataset": dataset,
        "mlp": f"{spec.in_features}-{spec.hidden}-10",
        "batch_size": spec.batch_size,
        "user_lr": (overrides or {}).get("lr") or spec.lr,
        "budget_s": budget,
        "seed": seed,
        "threads": threads,
        "clock": clock,
        "jobs": jobs,
        "thresholds": list(spec.thresholds),
        "mean_window": [budget * 2 / 3, budget],
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f}",
        "skipped": skipped,
        "methods": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peers_{dataset}.json").write_text(json.dumps(report, indent=1))
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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per method")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall-clock, or process CPU seconds (shared machines)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="methods trained at once, each in its own process (use with --clock cpu)"
    )
    parser.add_argument("--in-process", action="store_true", help="run methods in this process (no isolation)")
    parser.add_argument("--smoke", action="store_true", help="every method for about a second on a digits subset")
    args = parser.parse_args(argv)
    chosen = args.methods or ",".join(DATASET_METHODS["digits" if args.smoke else args.dataset])
    methods = [m.strip() for m in chosen.split(",") if m.strip()]
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
    if args.smoke:
        return run(
            "digits",
            args.budget or 1.0,
            methods,
            args.out,
            args.seed,
            args.threads,
            False,
            args.clock,
            overrides=overrides,
        )
    budget = args.budget if args.budget is not None else (60.0 if args.dataset == "digits" else 180.0)
    return run(
        args.dataset,
        budget,
        methods,
        args.out,
        args.seed,
        args.threads,
        not args.in_process,
        args.clock,
        jobs=args.jobs,
        overrides=overrides,
    )


if __name__ == "__main__":
    main()
