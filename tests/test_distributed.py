"""Two CPU processes (gloo): ranks end bit-identical and exchange only fitness scalars."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distributed_worker import run_rank


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_end_bit_identical_and_exchange_only_scalars(tmp_path: Path) -> None:
    steps = 20
    mp.start_processes(run_rank, args=(2, free_port(), str(tmp_path), steps), nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for hidden in ("16", "256"):
        assert rank0[hidden]["digest"] == rank1[hidden]["digest"]
        assert rank0[hidden]["global_step"] == steps
    small, large = rank0["16"], rank0["256"]
    assert large["parameters"] > 10 * small["parameters"]
    # MeZO(directions=2): 4 fitness floats per step, whatever the parameter count
    assert small["communicated_bytes"] == large["communicated_bytes"] == steps * 4 * 4
    # each rank saw its own half of the data
    assert small["train_samples"] in (718, 719)
