"""Start training processes, wait until they reach a fault point, kill them with SIGKILL, compare end states.

Worker processes are forked from a ``multiprocessing`` fork server (a fresh ``sys.executable`` process) that imported
torch, Lightning and lightning_nobp once: each worker is a real, separate process that a SIGKILL ends
at once, but it starts in a fraction of a second instead of re-importing everything.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fault_worker

#: how long a process may take to reach its fault point or to finish (a safety net, not a measured bound)
DEADLINE_S = 180.0
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "lightning.pytorch", "lightning_nobp", "sklearn.datasets"])


def free_port() -> int:
    """A TCP port nobody listens on now (for the gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Worker:
    """One worker process and the file holding its output."""

    process: multiprocessing.process.BaseProcess
    rank: int
    log: Path

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def launch(config: dict[str, Any], out_dir: Path, world: int = 1, tag: str = "run") -> list[Worker]:
    """Start ``world`` worker processes (gloo ranks when ``world > 1``) training with ``config``.

    Args:
        config: the worker's settings (see ``fault_worker.DEFAULTS``); ``out_dir`` is added.
        out_dir: where checkpoints, markers, results and logs go.
        world: the number of ranks.
        tag: names the log files (``<tag>.rank<r>.log``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"out_dir": str(out_dir), **config}
    port = free_port()
    workers = []
    for rank in range(world):
        log = out_dir / f"{tag}.rank{rank}.log"
        process = _CONTEXT.Process(target=fault_worker.start_rank, args=(config, rank, world, port, str(log)))
        process.start()
        workers.append(Worker(process, rank, log))
    return workers


def wait_for_fault_point(workers: list[Worker], out_dir: Path, point: str, ranks: list[int] | None = None) -> None:
    """Wait until every rank in ``ranks`` (all, by default) wrote its marker for ``point``.

    Raises:
        AssertionError: a process ended before reaching the point, or none reached it before the deadline.
    """
    ranks = [w.rank for w in workers] if ranks is None else ranks
    deadline = time.monotonic() + DEADLINE_S
    while not all((out_dir / f"{point}.rank{rank}").exists() for rank in ranks):
        for worker in workers:
            if worker.rank in ranks and not worker.process.is_alive():
                raise AssertionError(f"rank {worker.rank} ended before {point!r}:\n{worker.output()[-3000:]}")
        if time.monotonic() > deadline:
            kill(workers)
            raise AssertionError(f"no process reached {point!r} in time")
        time.sleep(0.05)


def kill(workers: list[Worker]) -> None:
    """SIGKILL every worker still running and reap it."""
    for worker in workers:
        if worker.process.is_alive():
            os.kill(worker.process.pid, signal.SIGKILL)
    for worker in workers:
        worker.process.join()


def finish(workers: list[Worker]) -> list[int | None]:
    """Wait for every worker to end (killing all of them after the deadline) and return their exit codes."""
    deadline = time.monotonic() + DEADLINE_S
    for worker in workers:
        worker.process.join(max(deadline - time.monotonic(), 0.0))
    if any(worker.process.is_alive() for worker in workers):
        kill(workers)
        raise AssertionError("a worker hung: " + " | ".join(w.output()[-2000:] for w in workers))
    return [worker.returncode for worker in workers]


def run_to_completion(config: dict[str, Any], out_dir: Path, world: int = 1, tag: str = "run") -> None:
    """Start the workers, and fail with their output unless every one exits cleanly."""
    workers = launch(config, out_dir, world, tag)
    codes = finish(workers)
    for worker, code in zip(workers, codes):
        assert code == 0, f"rank {worker.rank} exited with {code}:\n{worker.output()[-4000:]}"


def assert_same_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """Every entry of two :func:`fault_worker.snapshot` results equal to the bit."""
    assert expected.keys() == got.keys(), f"{what}: different entries {sorted(expected.keys() ^ got.keys())}"
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{what}: not bit-identical in {different}"
