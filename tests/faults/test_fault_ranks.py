"""Ranks that disagree or die (two gloo processes): a NaN on one rank is skipped by both together, a dead rank stops
the other with a clear error instead of a hang, and ranks started differently are stopped before the first step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fault_worker
from fault_harness import finish, kill, launch, run_to_completion, wait_for_fault_point


def outcomes(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((out_dir / f"outcomes.rank{rank}").read_text()) for rank in range(2)]


@pytest.mark.multiprocess
def test_a_nan_on_one_rank_is_handled_by_both_together_and_they_stay_identical(tmp_path: Path, faults: Any) -> None:
    """MeZO (every rank evaluates every member, fitness averaged): a NaN on one rank makes every fitness NaN, both
    skip. EggRoll (members split between the ranks): the NaN rank's members are dropped on both ranks alike and the
    step is taken from the other's; with NaN on every rank, both skip."""
    on_rank_1 = {"ranks": [1], "batches": [2, 3, 4], "value": "nan"}  # only rank 1's data, three batches in a row
    scenarios = {
        "mezo": {"algorithm": "mezo", "poison": on_rank_1},
        "eggroll": {"algorithm": "eggroll", "poison": on_rank_1},
        "eggroll on both ranks": {"algorithm": "eggroll", "poison": {**on_rank_1, "ranks": [0, 1]}},
        "clean": {"algorithm": "eggroll"},
    }
    run_to_completion({"scenarios": scenarios, "max_steps": 8, "result": str(tmp_path / "outcomes")}, tmp_path, 2)
    faults.inject("NaN data on one rank", 2 * 3)
    faults.inject("NaN data on every rank", 3)
    rank0, rank1 = outcomes(tmp_path)
    for name in scenarios:
        assert rank0[name]["error"] is None and rank1[name]["error"] is None, (rank0[name], rank1[name])
        assert rank0[name]["state"] == rank1[name]["state"], f"{name}: the ranks drifted apart"
        assert rank0[name]["step"] == rank1[name]["step"] == 8
    skipped = {"mezo": 3, "eggroll": 0, "eggroll on both ranks": 3, "clean": 0}
    for name, count in skipped.items():
        assert rank0[name]["skipped"] == rank1[name]["skipped"] == count, name  # counted alike on both ranks
    assert len({rank0[name]["state"] for name in scenarios}) == len(scenarios)  # the NaNs changed every run's course


@pytest.mark.multiprocess
def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path: Path, faults: Any) -> None:
    kill_rank_1 = {"point": "step", "step": 3, "ranks": [1]}
    settings = {"algorithm": "mezo", "max_steps": 30, "timeout_s": 20, "kill": kill_rank_1}
    workers = launch(settings, tmp_path, world=2)
    wait_for_fault_point(workers, tmp_path, "step", ranks=[1])
    kill(workers[1:])
    faults.inject("rank killed mid-run")
    codes = finish(workers[:1])  # fails if rank 0 hangs past the deadline instead of ending
    assert codes == [1]
    output = workers[0].output()
    assert "PeerLostError" in output and "another process died" in output, output[-3000:]


@pytest.mark.multiprocess
def test_ranks_started_differently_are_stopped_before_the_first_step(tmp_path: Path, faults: Any) -> None:
    # two checkpoints of one run, 1 step apart: their weights and momentum buffers differ
    for steps in (3, 4):
        fault_worker.train({"optimizer": "momentum", "max_steps": steps, "out_dir": str(tmp_path / f"after{steps}"),
                            "checkpoint_every": steps})
    different_checkpoints = {
        str(rank): {"ckpt_path": str(tmp_path / f"after{3 + rank}" / "last.ckpt")} for rank in (0, 1)
    }
    scenarios = {
        "seed": {"rank_overrides": {"1": {"seed": 1}}},
        "learning rate": {"rank_overrides": {"1": {"lr": 0.02}}},
        "accumulation": {"rank_overrides": {"1": {"accumulate": 2}}},
        "algorithm": {"rank_overrides": {"1": {"algorithm": "openes"}}, "algorithm": "eggroll"},
        # the weights are broadcast from rank 0 at setup; the optimizer state each rank restored is not
        "checkpoint": {"rank_overrides": different_checkpoints, "optimizer": "momentum", "max_steps": 6},
        "agreeing": {},  # the same run with nothing changed trains (no false alarm; the process group still works)
    }
    run_to_completion({"scenarios": scenarios, "max_steps": 4, "result": str(tmp_path / "outcomes")}, tmp_path, 2)
    faults.inject("ranks with different configurations", 4)
    faults.inject("ranks resumed from different checkpoints")
    expected_field = {
        "seed": "seed: rank 0 has 0, rank 1 has 1",
        "learning rate": "optimizer 0: rank 0 has SGD",
        "accumulation": "accumulate_grad_batches: rank 0 has 1, rank 1 has 2",
        "algorithm": "algorithm: rank 0 has EggRoll",
        "checkpoint": "optimizer 0 state: rank 0 has",
    }
    for rank_outcomes in outcomes(tmp_path):
        for name, field in expected_field.items():
            error = rank_outcomes[name]["error"]
            assert error is not None and error.startswith("RanksDisagreeError"), (name, error)
            assert field in error, (name, error)
            assert "before the first step" in error
        assert rank_outcomes["agreeing"]["error"] is None and rank_outcomes["agreeing"]["step"] == 4
