"""Fine-tunes stored as seeds: log bytes per step against checkpoint bytes, replay time against training time.

For two MLP sizes and three algorithm set-ups, trains ``--steps`` steps with ``SeedReplayLog`` and measures the log's
bytes per step (the same for both sizes: only seeds and scalars are stored), the checkpoint's bytes (the trainable
weights' ``state_dict``, and Lightning's whole checkpoint with the optimizer's state), the training time per step
(between ``on_train_batch_start`` and ``on_train_batch_end``) and ``lightning_nobp.replay``'s time per step, and
checks the replay is bit-identical. SmolLM2-135M's checkpoint is estimated from its structure, its log from the
measured bytes per step of the same algorithm set-up.

    python benchmarks/throughput/seed_replay.py            # writes benchmarks/measured/cpu-2026-12-06/seed_replay.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from reports import write_report  # noqa: E402

import lightning_nobp  # noqa: E402
from lightning_nobp import NoBackpropStrategy  # noqa: E402
from lightning_nobp.algorithms import EggRoll, MeZO  # noqa: E402
from lightning_nobp.callbacks import SeedReplayLog, read_log, weights_hash  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "measured" / "cpu-2026-12-06" / "seed_replay.json"
SIZES = {"small": (16, 32, 4), "large": (256, 1024, 10)}  # input, hidden, classes
BATCH = 32


class MLP(pl.LightningModule):
    def __init__(self, size: str, optimizer: str) -> None:
        super().__init__()
        inputs, hidden, classes = SIZES[size]
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def setups() -> dict[str, tuple]:
    """name -> (algorithm, update, direct_step, optimizer); the algorithms as published (no research extras)."""
    mezo_one, mezo_eight = MeZO(eps=1e-3, directions=1), MeZO(eps=1e-3, directions=8)
    eggroll = EggRoll(population=64, rank=1, sigma=1e-2)
    for algorithm in (mezo_one, mezo_eight, eggroll):
        algorithm.input_subspace = None
    eggroll.per_row_estimates = False
    return {
        "mezo-1-direct-sgd": (mezo_one, "direct", "normalized", "sgd"),
        "mezo-8-grad-adam": (mezo_eight, "grad", "sgd", "adam"),
        "eggroll-64-direct-sgd": (eggroll, "direct", "normalized", "sgd"),
    }


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def loader(size: str, steps: int) -> DataLoader:
    inputs, _, classes = SIZES[size]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * steps, inputs, generator=generator)
    y = torch.randint(0, classes, (BATCH * steps,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def measure(name: str, size: str, steps: int, folder: Path) -> dict:
    algorithm, update, direct_step, optimizer = setups()[name]
    log = folder / f"{name}-{size}.jsonl"
    timer = StepTimer()
    pl.seed_everything(0)
    torch.manual_seed(0)
    model = MLP(size, optimizer)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=algorithm, update=update, direct_step=direct_step),
        callbacks=[SeedReplayLog(log), timer],
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(size, steps))
        checkpoint = folder / f"{name}-{size}.ckpt"
        trainer.save_checkpoint(checkpoint)
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    lines = log.read_bytes().split(b"\n")
    step_bytes = [len(line) + 1 for line in lines[1:-2]]  # the records between the header and the end line
    torch.manual_seed(0)
    base = MLP(size, optimizer)
    started = time.perf_counter()
    result = lightning_nobp.replay(base, log)
    replay_seconds = time.perf_counter() - started
    identical = result.weights_hash == weights_hash(list(model.named_parameters()))
    _, records, _ = read_log(log)
    train_per_step = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2]  # median, first step left out
    return {
        "setup": name,
        "model": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": len(records),
        "log_header_bytes": len(lines[0]) + 1,
        "log_bytes_per_step": sum(step_bytes) / len(step_bytes),
        "log_total_bytes": log.stat().st_size,
        "weights_state_dict_bytes": weights.getbuffer().nbytes,
        "lightning_checkpoint_bytes": checkpoint.stat().st_size,
        "train_seconds_per_step_median": train_per_step,
        "replay_seconds_per_step": replay_seconds / max(result.steps, 1),
        "replay_bit_identical": identical,
    }


def smollm2_135m_parameters() -> int:
    """SmolLM2-135M's parameter count from its structure (Llama: hidden 576, 30 layers, MLP 1536, 9 query and 3
    key/value heads of 64, vocabulary 49152, tied embeddings)."""
    hidden, layers, mlp, kv, vocab = 576, 30, 1536, 3 * 64, 49152
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with TemporaryDirectory() as folder:
        for name in setups():
            for size in SIZES:
                rows.append(measure(name, size, args.steps, Path(folder)))
                print(rows[-1], flush=True)
    params = smollm2_135m_parameters()
    per_step = {row["setup"]: row["log_bytes_per_step"] for row in rows if row["model"] == "large"}
    smollm2 = {
        "parameters": params,
        "bf16_weights_bytes": 2 * params,
        "fp8_weights_bytes_about": params,
        "log_bytes_per_step_by_setup": per_step,
        "log_bytes_for_1000_steps_by_setup": {name: 1000 * b for name, b in per_step.items()},
    }
    report = {
        "benchmark": "seed_replay",
        "command": "python benchmarks/throughput/seed_replay.py --steps " + str(args.steps),
        "device": "cpu (1 thread)",
        "torch": torch.__version__,
        "rows": rows,
        "smollm2_135m_estimate": smollm2,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
