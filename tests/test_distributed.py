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
    for run in rank0:
        assert rank0[run]["digest"] == rank1[run]["digest"], run
        assert rank0[run]["global_step"] == steps
    # each rank saw its own half of the data
    assert rank0["mezo-16"]["train_samples"] in (718, 719)
    for algorithm, population in (("mezo", 4), ("eggroll", 8)):
        small, large = rank0[f"{algorithm}-16"], rank0[f"{algorithm}-256"]
        assert large["parameters"] > 10 * small["parameters"]
        # one all-reduce of P float32 fitness values per step, whatever the parameter count
        assert small["communicated_bytes"] == large["communicated_bytes"] == steps * population * 4
    # MeZO: every rank evaluates every member (1 probe + 2 x 2 directions per step, the first reused);
    # EggRoll: the 4 antithetic pairs are split between the ranks (4 members each, the first reused)
    assert rank0["mezo-16"]["evaluations"] == rank1["mezo-16"]["evaluations"] == 1 + steps * 4
    assert rank0["eggroll-16"]["evaluations"] == rank1["eggroll-16"]["evaluations"] == 1 + steps * 4
    # a reward ({"reward": accuracy}) is shared and split exactly as a loss is; the ranks stay identical
    reward = rank0["eggroll-reward-16"]
    assert reward["communicated_bytes"] == steps * 8 * 4 and reward["evaluations"] == 1 + steps * 4
    assert reward["digest"] != rank0["eggroll-16"]["digest"]  # it trained on the reward, not the loss
