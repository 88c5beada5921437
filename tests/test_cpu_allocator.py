"""``CpuTuning(reuse_memory=True)``: the strategies tune glibc's malloc on the CPU (process-wide) only when asked,
and undo it when training ends.

The setting cannot be undone in a process, so every check runs in a fresh interpreter and reads glibc's own
``mallinfo2`` / ``malloc_info`` back instead of trusting the return value.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only"
)

# A 64 MiB block freed and allocated again: with the default settings glibc serves it with mmap and unmaps it on
# free (the process's mapped bytes drop back); tuned, it comes from the heap and stays mapped for reuse.
PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch
    {setup}
    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    block = torch.ones(16 * 1024 * 1024)  # 64 MiB
    mmapped_while_alive = libc.mallinfo2().hblkhd
    del block
    info = libc.mallinfo2()
    print(json.dumps({{"mmapped_while_alive": mmapped_while_alive, "heap_free_after": info.fordblks}}))
    """
)


def _probe(setup: str) -> dict:
    import json

    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    output = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=textwrap.dedent(setup))],
        check=True,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_default_malloc_returns_large_blocks_to_the_kernel() -> None:
    default = _probe("")
    assert default["mmapped_while_alive"] >= 64 * 1024 * 1024
    assert default["heap_free_after"] < 64 * 1024 * 1024


def test_keep_freed_cpu_memory_keeps_large_blocks_for_reuse() -> None:
    tuned = _probe("from lightning_nobp.cpu_allocator import keep_freed_cpu_memory; assert keep_freed_cpu_memory()")
    assert tuned["mmapped_while_alive"] < 64 * 1024 * 1024  # served from the heap
    assert tuned["heap_free_after"] >= 64 * 1024 * 1024  # and kept there after the free


@pytest.mark.parametrize("reuse", [True, False])
def test_trainer_strategy_tunes_malloc_on_cpu_only_when_asked_and_only_while_training(reuse: bool) -> None:
    setup = f"""
    import lightning as L
    from lightning_nobp import CpuTuning, NoBackpropStrategy, cpu_allocator
    from lightning_nobp.algorithms import EggRoll
    from lightning_nobp.models import MLPClassifier
    from torch.utils.data import DataLoader, TensorDataset

    class Seen(L.Callback):
        tuned = []
        def on_train_batch_end(self, *args):
            self.tuned.append(cpu_allocator._applied)

    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Seen()],
        strategy=NoBackpropStrategy(
            algorithm=EggRoll(population=4), cpu_tuning=CpuTuning(reuse_memory={reuse}, freeze_startup_objects=False)
        ),
    )
    trainer.fit(MLPClassifier(in_features=8, hidden=8, num_classes=3), data)
    assert Seen.tuned == [{True if reuse else None}], Seen.tuned
    assert cpu_allocator._applied is None  # nothing left tuned after training
    """
    assert _probe(setup)["mmapped_while_alive"] >= 64 * 1024 * 1024  # glibc's own behaviour afterwards


def test_fabric_strategy_tunes_malloc_on_cpu_only_when_asked() -> None:
    setup = """
    from lightning.fabric import Fabric
    from lightning_nobp import CpuTuning
    from lightning_nobp.fabric import NoBackpropStrategy
    Fabric(accelerator="cpu", devices=1, strategy=NoBackpropStrategy({reuse})).launch()
    """
    assert _probe(setup.format(reuse="cpu_tuning=CpuTuning(reuse_memory=True)"))["heap_free_after"] >= 64 * 1024 * 1024
    assert _probe(setup.format(reuse=""))["mmapped_while_alive"] >= 64 * 1024 * 1024  # the default leaves malloc


def test_the_tuning_is_undone_when_training_ends() -> None:
    setup = """
    import lightning as L
    from lightning_nobp import CpuTuning, NoBackpropStrategy
    from lightning_nobp.algorithms import EggRoll
    from lightning_nobp.models import MLPClassifier
    from torch.utils.data import DataLoader, TensorDataset
    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        strategy=NoBackpropStrategy(algorithm=EggRoll(population=4), cpu_tuning=CpuTuning()),
    )
    trainer.fit(MLPClassifier(in_features=8, hidden=8, num_classes=3), data)
    from lightning_nobp import cpu_allocator
    assert cpu_allocator._applied is None  # restored at teardown
    """
    result = _probe(setup)
    assert result["mmapped_while_alive"] >= 64 * 1024 * 1024  # large blocks are mmapped again
    assert result["heap_free_after"] < 64 * 1024 * 1024
