"""Peak memory of a forward-only step against inference, measured at full scale without a GPU.

The GPT is built under ``torch._subclasses.fake_tensor.FakeTensorMode`` on a fake CUDA device (``--device
fake-cuda``): every tensor has its real shape, dtype and device but no storage, so a 1.11B-parameter model costs
nothing here, and the code that runs is the code a CUDA run takes (the CUDA kernels' shape rules, the library's
CUDA branches, the fused kernels' custom ops, whose fake implementations allocate what the kernels allocate).
Live-tensor bytes are measured by :class:`LiveTensorBytes`, a dispatch mode that counts every storage from its
creation until it is freed (as torch's ``MemTracker`` does, without its module hooks, which cannot read the
batched tensors of a ``vmap``-ed population), plus the model's parameters and the batch. The peak is the largest
total over:

* ``inference``: the model's next-token loss under ``no_grad`` on the token batch of one member;
* ``inference_chunk``: the same on the token batch of one chunk of EggRoll members (``chunk`` sequences);
* ``mezo``: one MeZO step as published (``MeZO(directions=1, input_subspace=None)``, ``update="direct"``): its two
  members evaluated as the strategy evaluates them,
  ``tell`` and the in-place update of every weight;
* ``eggroll``: one EggRoll step (plain EGGROLL: ``extras=None``; population
  ``--population``, one batched chunk of ``--chunk`` members), ``tell`` and the in-place update.

* ``mezo_defaults``: the same with ``MeZO()``'s defaults (8 directions, input subspaces, whose second moments
  of every layer's input are kept: large for wide layers).

``mezo_peak_over_inference`` divides MeZO's peak by ``inference``'s; ``eggroll_peak_over_inference`` divides
EggRoll's by ``inference_chunk``'s (the same tokens per batched forward). Under the fake device: a CUDA
``torch.Generator`` cannot be created without a GPU, so each generator draw is replaced by an allocation of the same
shape and dtype (the bytes of the real draw); and fake losses have no values, so ``tell`` (a few scalars per member)
receives stand-in losses. ``--device cuda`` measures the same on a real GPU with ``torch.cuda.max_memory_allocated``.

    python benchmarks/throughput/memory.py --preset gpt-1b --device fake-cuda \
        --out benchmarks/measured/memory-gpt-1b.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from lightning_nobp.algorithms import EggRoll, MeZO, counter_noise
from lightning_nobp.algorithms.base import Algorithm
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator
from lightning_nobp.perturb.estimator import EstimatorOptions
from lightning_nobp.perturb.direct_step import DirectHyperparameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from reports import write_report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LEARNING_RATE = 1e-4


@dataclass
class Setup:
    """The model and batches every measurement shares.

    Args:
        model: the GPT (fake tensors on ``fake-cuda``).
        inputs: token ids ``(batch, seq_len)``.
        targets: next-token ids, same shape.
        chunk: members per batched forward of the EggRoll step.
        population: EggRoll's population.
        device: the (fake or real) device.
        fake: whether tensors are fake.
    """

    model: GPT
    inputs: Tensor
    targets: Tensor
    chunk: int
    population: int
    device: torch.device
    fake: bool


@contextlib.contextmanager
def generator_draws_as_allocations() -> Iterator[None]:
    """Within the context, a ``torch.Generator`` draw allocates its result without a generator (fake devices only:
    a CUDA generator needs a GPU). Same shape, dtype and device, so the same bytes."""
    original = counter_noise.sample_direction

    def allocation(seed: int, shape: torch.Size, device: torch.device | str, distribution: str = "gaussian") -> Tensor:
        return torch.empty(shape, device=device, dtype=torch.float32).normal_()

    counter_noise.sample_direction = allocation  # type: ignore[assignment]
    try:
        yield
    finally:
        counter_noise.sample_direction = original  # type: ignore[assignment]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages alive, and their peak, from the tensors tracked and every op's outputs.

    A storage counts from the op that created it until Python frees it (views and in-place results share their
    input's storage and count once).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.peak = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, tensor: Tensor) -> None:
        """Count ``tensor``'s storage from now on (once)."""
        storage = tensor.untyped_storage()
        if storage in self._live:
            return
        size = storage.nbytes()
        self._live[storage] = size
        self.bytes += size
        self.peak = max(self.peak, self.bytes)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        tree_map_only(Tensor, self.track, out)
        return out


def peak_bytes(setup: Setup, run: Callable[[], object]) -> int:
    """The largest live-tensor total while ``run()`` runs, parameters and batch included.

    Args:
        setup: the shared model and batch.
        run: the work to measure.
    """
    if not setup.fake:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    tracker = LiveTensorBytes()
    for tensor in (*setup.model.parameters(), *setup.model.buffers(), setup.inputs, setup.targets):
        tracker.track(tensor)
    with tracker:
        run()
    return tracker.peak


def inference(setup: Setup, rows: int) -> Callable[[], object]:
    """The loss forward under ``no_grad`` on the batch repeated ``rows`` times (built before measuring).

    Args:
        setup: the shared model and batch.
        rows: copies of the batch.
    """
    inputs, targets = setup.inputs.repeat(rows, 1), setup.targets.repeat(rows, 1)

    def run() -> object:
        with torch.no_grad():
            return setup.model.loss(inputs, targets)

    return run


def step(setup: Setup, algorithm: Algorithm, chunk: int | None) -> Callable[[], object]:
    """One forward-only step with the direct update, as the strategies run it.

    Args:
        setup: the shared model and batch.
        algorithm: the estimator.
        chunk: members per batched forward (``None``: the algorithm's own).
    """
    model = setup.model
    options = EstimatorOptions.of(algorithm, fused=True)  # what the engine chooses for CUDA parameters
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()), options=options)
    hyperparameters = [DirectHyperparameters(LEARNING_RATE)] * len(estimator.params)

    def loss() -> Tensor:
        return model.loss(setup.inputs, setup.targets)

    def run() -> object:
        population = algorithm.ask(1)
        with torch.no_grad():
            members = list(range(len(population.members)))
            estimator.prefetch_noise(population, members)
            fitness = estimator.evaluation.evaluate(population, loss, None, None, members, True, None, chunk)
            if setup.fake:  # fake losses have no values: tell (P scalars) gets stand-ins
                with unset_fake_temporarily():
                    fitness = torch.linspace(1.0, 2.0, len(population.members))
                    estimate = algorithm.tell(population, fitness)
            else:
                estimate = algorithm.tell(population, fitness)
            if estimate.coefficients is None:
                raise RuntimeError(f"{algorithm!r} skipped the step: fitness {fitness.tolist()}")
            estimator.apply_update([(population, estimate.coefficients)], hyperparameters, rounding_seed=0)
        return fitness

    return run


def measure(setup: Setup) -> dict:
    """Every mode's peak and the two ratios.

    Args:
        setup: the shared model and batch.
    """
    mezo = MeZO(directions=1, input_subspace=None)  # as published: one direction, isotropic noise
    eggroll = EggRoll(population=setup.population, rank=1, sigma=1e-3, population_chunk=setup.chunk, extras=None)
    peaks = {
        "inference": peak_bytes(setup, inference(setup, 1)),
        "inference_chunk": peak_bytes(setup, inference(setup, setup.chunk)),
        "mezo": peak_bytes(setup, step(setup, mezo, None)),
        "eggroll": peak_bytes(setup, step(setup, eggroll, setup.chunk)),
        "mezo_defaults": peak_bytes(setup, step(setup, MeZO(), None)),
    }
    return {
        "peak_bytes": peaks,
        "mezo_peak_over_inference": peaks["mezo"] / peaks["inference"],
        "eggroll_peak_over_inference": peaks["eggroll"] / peaks["inference_chunk"],
        "mezo_defaults_peak_over_inference": peaks["mezo_defaults"] / peaks["inference"],
        "algorithms": {"mezo": repr(mezo), "eggroll": repr(eggroll), "mezo_defaults": repr(MeZO())},
    }


def build(args: argparse.Namespace) -> tuple[Setup, contextlib.ExitStack]:
    """The model and batch on the requested device, inside the fake mode where asked (the caller closes the stack).

    Args:
        args: the parsed command line.
    """
    stack = contextlib.ExitStack()
    fake = args.device == "fake-cuda"
    device = torch.device("cuda")
    if fake:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(generator_draws_as_allocations())
    config = GPTConfig.preset(args.preset)
    seq_len = min(args.seq_len, config.block_size)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])  # built in its dtype: no float32 copy first
    try:
        with device:
            torch.manual_seed(0)
            model = GPT(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, seq_len + 1), device=device)
    setup = Setup(model, tokens[:, :-1], tokens[:, 1:], args.chunk, args.population, device, fake)
    return setup, stack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-1b", help="GPT size (see GPTConfig.preset)")
    parser.add_argument("--device", choices=("fake-cuda", "cuda"), default="fake-cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="the weights' dtype")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per member")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (capped at block_size)")
    parser.add_argument("--chunk", type=int, default=32, help="EggRoll members per batched forward")
    parser.add_argument("--population", type=int, default=32, help="EggRoll's population")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Measure and write the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    args = parse_args(argv)
    setup, stack = build(args)
    with stack:
        result = measure(setup)
        parameters = sum(p.numel() for p in setup.model.parameters())
    report = {
        "torch": torch.__version__,
        "device": args.device,
        "preset": args.preset,
        "parameters": parameters,
        "weights_dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": int(setup.inputs.shape[1]),
        "chunk": args.chunk,
        "population": args.population,
        "basis": (
            "live-tensor peaks (LiveTensorBytes over FakeTensorMode, parameters and batch included)"
            if setup.fake
            else "torch.cuda.max_memory_allocated"
        ),
        "baseline": "mezo: inference on one member's tokens; eggroll: inference on one chunk's tokens (chunk x batch)",
        **result,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
