"""Kill and resume: a run SIGKILLed at a chosen point and resumed from its last checkpoint with ``ckpt_path`` ends
bit-identical (weights, optimizer state, learning rate, scheduler, step, skipped steps) to a run never interrupted.

Lightning resumes mid-epoch exactly only with a resumable loader (``state_dict``/``load_state_dict``): a plain
``DataLoader`` restarts the interrupted epoch from its first batch while the step counters go on (Lightning warns
"resuming from a checkpoint that ended before the epoch ended"), so the batches after a mid-epoch resume differ from an
uninterrupted run's. The worker's ``ResumableBatches`` is resumable; every run with it crosses an epoch boundary (11
batches per epoch) and resumes mid-epoch. A plain ``DataLoader`` is tested at the boundary Lightning supports: a
checkpoint taken at the end of an epoch (in a fixed order: a shuffling sampler draws from the global RNG, which
Lightning does not checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fault_worker
from fault_harness import assert_same_state, finish, kill, launch, run_to_completion, wait_for_fault_point

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (run settings, where the process is killed); checkpoints every `checkpoint_every` optimizer steps
    "mezo-momentum-mid-epoch": (
        {"algorithm": "mezo", "optimizer": "momentum", "checkpoint_every": 4},
        {"point": "step", "step": 7},
    ),
    "mezo-accumulation-right-after-checkpoint": (
        {"algorithm": "mezo", "optimizer": "momentum", "accumulate": 2, "max_steps": 8, "checkpoint_every": 3},
        {"point": "after_checkpoint", "step": 3},
    ),
    "eggroll-adam-during-validation": (
        {"algorithm": "eggroll", "optimizer": "adam", "lr": 3e-3, "checkpoint_every": 4, "val_every": 3},
        {"point": "validation", "step": 6},
    ),
    "plain-dataloader-at-the-epoch-boundary": (  # 11 batches per epoch: the checkpoint of step 11 ends epoch 0
        {"algorithm": "mezo", "optimizer": "momentum", "loader": "plain", "checkpoint_every": 11, "max_steps": 16},
        {"point": "step", "step": 14},
    ),
    "openes-mid-epoch": ({"algorithm": "openes", "checkpoint_every": 3}, {"point": "step", "step": 5}),
    "forward-gradient-momentum-mid-epoch": (
        {"algorithm": "fgrad", "optimizer": "momentum", "lr": 3e-3, "checkpoint_every": 4},
        {"point": "step", "step": 6},
    ),
    "eggroll-bf16-weights-mid-epoch": (
        {"algorithm": "eggroll", "weights": "bf16", "checkpoint_every": 4},
        {"point": "step", "step": 6},
    ),
    "mezo-fp8-weights-momentum-mid-epoch": (
        {"algorithm": "mezo", "weights": "fp8_e4m3", "optimizer": "momentum", "checkpoint_every": 4},
        {"point": "step", "step": 7},
    ),
    "eggroll-nvfp4-weights-adam-right-after-checkpoint": (
        {"algorithm": "eggroll", "weights": "nvfp4", "optimizer": "adam", "lr": 3e-3, "checkpoint_every": 5},
        {"point": "after_checkpoint", "step": 5},
    ),
}

KIND_OF_POINT = {
    "step": "SIGKILL mid-epoch",
    "after_checkpoint": "SIGKILL right after a checkpoint",
    "validation": "SIGKILL during validation",
}


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was taken at, read the way an untrusting user reads it."""
    return int(torch.load(path, weights_only=True)["global_step"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_run_resumes_bit_identical_to_an_uninterrupted_one(case: str, tmp_path: Path, faults: Any) -> None:
    settings, fault = CASES[case]
    workers = launch({**settings, "kill": fault}, tmp_path / "killed")
    wait_for_fault_point(workers, tmp_path / "killed", fault["point"])
    kill(workers)
    faults.inject(KIND_OF_POINT[fault["point"]])
    assert workers[0].returncode == -9  # really killed, nothing cleaned up

    last = tmp_path / "killed" / "last.ckpt"
    saved_at = checkpoint_step(last)  # loads with weights_only=True
    assert 0 < saved_at <= fault["step"]
    if fault["point"] == "after_checkpoint":
        assert saved_at == fault["step"]
    else:
        assert saved_at < fault["step"]  # the steps since the checkpoint were lost and are redone

    trainer, model, _ = fault_worker.train({**settings, "out_dir": str(tmp_path / "resumed"), "ckpt_path": str(last)})
    resumed = fault_worker.snapshot(trainer, model)
    trainer, model, _ = fault_worker.train({**settings, "out_dir": str(tmp_path / "straight")})
    uninterrupted = fault_worker.snapshot(trainer, model)
    assert int(uninterrupted["global_step"]) == settings.get("max_steps", fault_worker.DEFAULTS["max_steps"])
    assert_same_state(uninterrupted, resumed, case)


@pytest.mark.multiprocess
def test_two_gloo_ranks_both_killed_resume_bit_identical(tmp_path: Path, faults: Any) -> None:
    settings = {"algorithm": "eggroll", "optimizer": "momentum", "checkpoint_every": 3, "max_steps": 8}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = launch({**settings, "result": str(straight / "state")}, straight, world=2, tag="straight")
    workers = launch({**settings, "kill": {"point": "step", "step": 5}}, killed, world=2, tag="killed")
    wait_for_fault_point(workers, killed, "step")
    kill(workers)
    faults.inject("SIGKILL of every gloo rank", 2)
    assert [w.returncode for w in workers] == [-9, -9]
    assert checkpoint_step(killed / "last.ckpt") == 3

    assert finish(reference) == [0, 0]
    run_to_completion(
        {**settings, "ckpt_path": str(killed / "last.ckpt"), "result": str(killed / "state")}, killed, 2, "resumed"
    )
    expected = [torch.load(straight / f"state.rank{r}", weights_only=True) for r in range(2)]
    got = [torch.load(killed / f"state.rank{r}", weights_only=True) for r in range(2)]
    assert_same_state(expected[0], expected[1], "uninterrupted ranks")
    assert_same_state(expected[0], got[0], "resumed rank 0")
    assert_same_state(expected[0], got[1], "resumed rank 1")
