"""A checkpoint cut short: a process killed while writing leaves the previous checkpoint whole and loadable, and a
truncated or corrupted file is refused with an error that names it (raised while the file is read, so nothing from it
is restored)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import fault_worker
from fault_harness import assert_same_state, kill, launch, wait_for_fault_point
from lightning_nobp.pytorch.checkpoint_io import (
    CHECKPOINT_DIGEST_KEY,
    PARTIAL_SUFFIX,
    CorruptCheckpointError,
    SealedCheckpointIO,
)

SETTINGS: dict[str, Any] = {"algorithm": "mezo", "optimizer": "momentum", "checkpoint_every": 3, "max_steps": 9}


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint written at step 9 of a finished run, and the run's end state."""
    out_dir = tmp_path_factory.mktemp("finished")
    trainer, model, _ = fault_worker.train({**SETTINGS, "out_dir": str(out_dir)})
    return out_dir / "last.ckpt", fault_worker.snapshot(trainer, model)


@pytest.mark.multiprocess
def test_a_kill_while_writing_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, finished_checkpoint: tuple[Path, dict[str, torch.Tensor]], faults: Any
) -> None:
    workers = launch({**SETTINGS, "kill": {"point": "checkpoint_write", "step": 6}}, tmp_path)
    wait_for_fault_point(workers, tmp_path, "checkpoint_write")  # half of step 6's checkpoint is on disk
    kill(workers)
    faults.inject("SIGKILL while writing a checkpoint")
    assert workers[0].returncode == -9

    last = tmp_path / "last.ckpt"
    previous = torch.load(last, weights_only=True)
    assert previous["global_step"] == 3  # step 3's checkpoint, untouched
    assert CHECKPOINT_DIGEST_KEY in previous
    SealedCheckpointIO().load_checkpoint(last, weights_only=True)  # and its content matches its digest

    partial = list(tmp_path.glob(f".last.ckpt.*{PARTIAL_SUFFIX}"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the interrupted write, left where it was

    with pytest.raises(CorruptCheckpointError, match=re.escape(partial[0].name)):
        SealedCheckpointIO().load_checkpoint(partial[0], weights_only=True)

    # resuming from the surviving checkpoint loses nothing but the time since it was written
    trainer, model, _ = fault_worker.train({**SETTINGS, "out_dir": str(tmp_path / "resumed"), "ckpt_path": str(last)})
    assert_same_state(finished_checkpoint[1], fault_worker.snapshot(trainer, model), "resumed after a torn write")


def resume_from(path: Path, out_dir: Path) -> None:
    fault_worker.train({**SETTINGS, "out_dir": str(out_dir), "ckpt_path": str(path), "max_steps": 12})


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_a_truncated_checkpoint_is_refused_naming_the_file(
    keep: float, tmp_path: Path, finished_checkpoint: tuple[Path, dict[str, torch.Tensor]], faults: Any
) -> None:
    data = finished_checkpoint[0].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: int(len(data) * keep)])
    faults.inject("truncated checkpoint")
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(truncated))}.*truncated or corrupted"):
        resume_from(truncated, tmp_path / "resumed")


def tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    """Where a tensor's bytes lie in a saved checkpoint."""
    offset = data.find(tensor.numpy().tobytes())
    assert offset > 0
    return offset


@pytest.mark.parametrize("where", ["weight", "momentum buffer", "learning rate"])
def test_a_flipped_byte_is_refused_although_torch_load_reads_it(
    where: str, tmp_path: Path, finished_checkpoint: tuple[Path, dict[str, torch.Tensor]], faults: Any
) -> None:
    path = finished_checkpoint[0]
    data = bytearray(path.read_bytes())
    checkpoint = torch.load(path, weights_only=True)
    if where == "weight":
        offset = tensor_offset(bytes(data), checkpoint["state_dict"]["net.0.weight"]) + 100
    elif where == "momentum buffer":
        offset = tensor_offset(bytes(data), checkpoint["optimizer_states"][0]["state"][2]["momentum_buffer"]) + 8
    else:  # a float in the pickled optimizer settings: the 8 bytes of the learning rate, big-endian
        import struct

        offset = bytes(data).find(struct.pack(">d", checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])) + 7
        assert offset > 7
    data[offset] ^= 0x01  # one bit, as a failing disk or a bad copy would flip it
    corrupted = tmp_path / "corrupted.ckpt"
    corrupted.write_bytes(bytes(data))
    faults.inject("corrupted checkpoint byte")

    torch.load(corrupted, weights_only=True)  # torch does not check: it would load the wrong value silently
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(corrupted))} is corrupted.*digest"):
        resume_from(corrupted, tmp_path / "resumed")


def test_fabric_checkpoints_are_sealed_and_a_corrupted_one_is_refused(tmp_path: Path, faults: Any) -> None:
    """Fabric's ``save``/``load`` go through the same checkpoint IO: the state round-trips exactly, the file reads
    with ``weights_only=True``, and a flipped bit is refused naming the file."""
    import lightning as L

    from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy

    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=FabricNoBackpropStrategy())
    model = torch.nn.Linear(64, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    optimizer.state[next(iter(model.parameters()))]["momentum_buffer"] = torch.randn(16, 64)
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 7})
    assert torch.load(path, weights_only=True)["step"] == 7

    restored_model = torch.nn.Linear(64, 16)
    restored_optimizer = torch.optim.SGD(restored_model.parameters(), lr=0.1, momentum=0.9)
    restored_model, restored_optimizer = fabric.setup(restored_model, restored_optimizer)
    state = {"model": restored_model, "optimizer": restored_optimizer}
    remainder = fabric.load(path, state)
    assert remainder == {"step": 7}  # the digest is verified and removed, not handed back
    assert torch.equal(restored_model.weight, model.weight)
    saved_buffer = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(restored_optimizer.state_dict()["state"][0]["momentum_buffer"], saved_buffer)

    data = bytearray(path.read_bytes())
    data[tensor_offset(bytes(data), model.weight.detach()) + 3] ^= 0x10
    corrupted = tmp_path / "corrupted.ckpt"
    corrupted.write_bytes(bytes(data))
    faults.inject("corrupted checkpoint byte")
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(corrupted))} is corrupted"):
        fabric.load(corrupted, state)
