"""One training process of the fault-injection suite: trains a tiny MLP on sklearn digits and stops where told.

Run as ``python fault_worker.py CONFIG_JSON`` (one process, or one rank of a gloo run launched the way torchrun
launches ranks: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment). At the configured
fault point the process writes a marker file (``<out_dir>/<point>.rank<r>``) and waits to be killed by the test with
SIGKILL. The tests import :func:`train` and :func:`snapshot` to run the uninterrupted and the resumed runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Iterator

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_nobp.pytorch.checkpoint_io as checkpoint_io_module  # noqa: E402
from lightning_nobp import LowBitPrecision, NoBackpropStrategy  # noqa: E402
from lightning_nobp.algorithms import EggRoll, ForwardGradient, MeZO, OpenES  # noqa: E402
from lightning_nobp.data import load_digits_split  # noqa: E402
from lightning_nobp.lowbit import is_low_bit  # noqa: E402
from lightning_nobp.lowbit.formats import inner_tensors  # noqa: E402
from lightning_nobp.pytorch.checkpoint_io import SealedCheckpointIO  # noqa: E402

#: the default run: every knob a case may override
DEFAULTS: dict[str, Any] = {
    "algorithm": "mezo",  # mezo | eggroll | openes | fgrad
    "weights": "fp32",  # fp32 | bf16 | fp8_e4m3 | nvfp4
    "optimizer": "sgd",  # sgd | momentum | adam
    "lr": 1e-2,
    "accumulate": 1,
    "batch_size": 128,
    "max_steps": 12,
    "seed": 0,
    "loader": "resumable",  # resumable (ResumableBatches) | plain (a DataLoader in a fixed order)
    "checkpoint_every": 0,  # optimizer steps between checkpoints (ModelCheckpoint last.ckpt); 0: none
    "val_every": 0,  # training batches between validations; 0: no validation
    "kill": None,  # {"point": "step" | "after_checkpoint" | "checkpoint_write" | "validation", "step": k, "ranks": [r]}
    "poison": None,  # {"ranks": [r], "batches": [i, ...], "value": "nan"}: non-finite inputs in those batches
    "ckpt_path": None,
    "out_dir": None,
    "timeout_s": 30,
    "rank_overrides": {},  # {"1": {"seed": 1}}: settings that differ on one rank (gloo runs)
}


#: this process's rank, the number of ranks and the rendezvous port (Lightning deletes WORLD_SIZE when a run ends)
PLACE = {"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
         "port": int(os.environ.get("MASTER_PORT", 0))}


def rank() -> int:
    return PLACE["rank"]


def world_size() -> int:
    return PLACE["world"]


def set_rank_environment() -> None:
    """The variables torchrun sets for a rank, so that Lightning starts no processes of its own (set for every run)."""
    if world_size() > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PLACE["port"]), WORLD_SIZE=str(world_size()),
                          NODE_RANK="0", LOCAL_RANK=str(rank()), RANK=str(rank()))


def stop_here(out_dir: str, point: str) -> None:
    """Tell the test this process reached ``point`` and wait to be killed (never returns)."""
    marker = Path(out_dir, f"{point}.rank{rank()}")
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)


class ResumableBatches:
    """Digits batches in an epoch-seeded order, one shard per rank, resumable mid-epoch.

    Lightning restores a loader mid-epoch only through its ``state_dict``/``load_state_dict`` (a plain DataLoader
    restarts the epoch from its first batch). Lightning's fetcher reads ahead only from loaders without a length;
    this one has a length, so the batches it yielded are the batches training consumed when a checkpoint is saved.

    Args:
        x: the inputs. y: the labels. batch_size: samples per batch (the last partial batch is dropped).
        poison: ``{"ranks": [...], "batches": [...], "value": "nan" | "inf"}``: batches (index since the start of
            training) whose inputs hold a non-finite value on those ranks.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, poison: dict[str, Any] | None = None) -> None:
        self.x, self.y = x[rank()::world_size()], y[rank()::world_size()]
        self.batch_size = batch_size
        self.poison = poison or {}
        self.sampler = self  # Lightning calls sampler.set_epoch(epoch) at every epoch start
        self.epoch = 0
        self.yielded = 0
        self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1000 + self.epoch))
        for index in range(start, len(self)):
            rows = order[index * self.batch_size:(index + 1) * self.batch_size]
            x = self.x[rows].clone()
            if rank() in self.poison.get("ranks", []) and self.epoch * len(self) + index in self.poison["batches"]:
                x[0, 0] = float(self.poison.get("value", "nan"))
            self.yielded += 1
            yield x, self.y[rows]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._resume_at = state["consumed"] if state["consumed"] < len(self) else 0


class TinyMLP(pl.LightningModule):
    """A 64-16-10 MLP with cross-entropy, a StepLR schedule and the optimizer named in the config."""

    def __init__(self, optimizer: str = "sgd", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).float(), y))

    def configure_optimizers(self) -> Any:
        lr = self.hparams.lr
        if self.hparams.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        else:
            momentum = 0.9 if self.hparams.optimizer == "momentum" else 0.0
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_algorithm(name: str) -> Any:
    if name == "mezo":
        return MeZO(eps=1e-3, directions=2)
    if name == "eggroll":
        return EggRoll(population=8, sigma=1e-2)
    if name == "openes":
        return OpenES(population=8, sigma=1e-2)
    if name == "fgrad":
        return ForwardGradient(directions=2)
    raise ValueError(name)


class KillPoint(Callback):
    """Stops the process (marker, then wait for SIGKILL) at a training step or during validation."""

    def __init__(self, point: str, step: int, out_dir: str) -> None:
        self.point, self.step, self.out_dir = point, step, out_dir

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.point == "step" and trainer.global_step == self.step:
            stop_here(self.out_dir, self.point)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.point == "validation" and trainer.global_step >= self.step and not trainer.sanity_checking:
            stop_here(self.out_dir, self.point)


class FaultCheckpointIO(SealedCheckpointIO):
    """The strategy's checkpoint IO, stopping right after, or half-way through, writing the checkpoint of a step."""

    def __init__(self, point: str | None, step: int, out_dir: str | None) -> None:
        super().__init__()
        self.point, self.step, self.out_dir = point, step, out_dir
        self.saving_step = -1
        self.saved_steps: list[int] = []
        if point == "checkpoint_write":
            original = checkpoint_io_module.write_payload

            def half_then_stop(handle: BinaryIO, payload: memoryview) -> None:
                if self.saving_step != self.step:
                    return original(handle, payload)
                handle.write(payload[: len(payload) // 2])  # half the bytes reach the disk, then the process dies
                handle.flush()
                os.fsync(handle.fileno())
                stop_here(str(self.out_dir), "checkpoint_write")

            checkpoint_io_module.write_payload = half_then_stop

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saving_step = checkpoint["global_step"]
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saved_steps.append(self.saving_step)
        if self.point == "after_checkpoint" and self.saving_step == self.step:
            stop_here(str(self.out_dir), "after_checkpoint")


def train(overrides: dict[str, Any]) -> tuple[pl.Trainer, TinyMLP, NoBackpropStrategy]:
    """Train as configured (``DEFAULTS`` updated by ``overrides``, then by this rank's ``rank_overrides``)."""
    config = {**DEFAULTS, **overrides}
    config.update(config["rank_overrides"].get(str(rank()), {}))
    torch.set_num_threads(1)  # the same reductions in the test process as in the killed one
    set_rank_environment()
    pl.seed_everything(config["seed"], verbose=False)
    kill = config["kill"] or {}
    if kill and rank() not in kill.get("ranks", [rank()]):
        kill = {}
    train_set, test_set = load_digits_split()
    loader: Any = ResumableBatches(*train_set.tensors, batch_size=config["batch_size"], poison=config["poison"])
    if config["loader"] == "plain":  # what Lightning resumes exactly only at an epoch boundary
        x, y = (tensor[rank()::world_size()] for tensor in train_set.tensors)
        loader = DataLoader(TensorDataset(x, y), batch_size=config["batch_size"], drop_last=True)
    callbacks: list[Callback] = []
    if kill.get("point") in ("step", "validation"):
        callbacks.append(KillPoint(kill["point"], kill["step"], config["out_dir"]))
    checkpointing = config["checkpoint_every"] > 0
    if checkpointing:
        callbacks.append(
            ModelCheckpoint(
                dirpath=config["out_dir"], save_top_k=0, save_last=True, every_n_train_steps=config["checkpoint_every"]
            )
        )
    io = FaultCheckpointIO(kill.get("point"), kill.get("step", -1), config["out_dir"])
    strategy = NoBackpropStrategy(
        algorithm=make_algorithm(config["algorithm"]),
        seed=None,  # PL_GLOBAL_SEED, set by seed_everything: ranks seeded differently really differ
        checkpoint_io=io,
        process_group_backend="gloo",
        timeout=timedelta(seconds=config["timeout_s"]),
    )
    plugins = [] if config["weights"] == "fp32" else [LowBitPrecision(config["weights"])]
    validating = config["val_every"] > 0
    trainer = pl.Trainer(
        strategy=strategy,
        plugins=plugins,
        accelerator="cpu",
        devices=world_size(),
        max_steps=config["max_steps"],
        accumulate_grad_batches=config["accumulate"],
        val_check_interval=config["val_every"] if validating else None,
        check_val_every_n_epoch=None if validating else 1,
        limit_val_batches=2 if validating else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config["out_dir"],
    )
    model = TinyMLP(config["optimizer"], config["lr"])
    validation = DataLoader(test_set, batch_size=64) if validating else None
    trainer.fit(model, loader, validation, ckpt_path=config["ckpt_path"])
    return trainer, model, strategy


def _as_bytes(value: Tensor) -> Tensor:
    return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(trainer: pl.Trainer, model: nn.Module) -> dict[str, Tensor]:
    """Everything a run ends with, as raw bytes: weights (low-bit weights' stored tensors), optimizer state, the
    learning rates, the scheduler's position, the step and the skipped steps."""
    state: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        parts = inner_tensors(value) if is_low_bit(value) else {"": value}
        for part, tensor in parts.items():
            state[f"weight {name}{'.' + part if part else ''}"] = _as_bytes(tensor)
    optimizer = trainer.optimizers[0]
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            tensor = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
            state[f"optimizer {index}.{key}"] = _as_bytes(tensor)
    lrs = [group["lr"] for group in optimizer.param_groups]
    state["lr"] = _as_bytes(torch.tensor(lrs, dtype=torch.float64))
    state["scheduler"] = torch.tensor([trainer.lr_scheduler_configs[0].scheduler.last_epoch])
    state["global_step"] = torch.tensor([trainer.global_step])
    state["skipped_steps"] = torch.tensor([int(trainer.strategy.skipped_steps)])
    return state


def run(config: dict[str, Any]) -> None:
    """Train as configured; write the end state (``result``) or, with ``scenarios``, the outcome of several runs."""
    torch.set_num_threads(1)
    config = dict(config)
    result_path = config.pop("result", None)
    scenarios = config.pop("scenarios", None)
    if scenarios is None:
        trainer, model, strategy = train(config)
        if result_path:
            torch.save(snapshot(trainer, model), f"{result_path}.rank{rank()}")
        return
    # several runs in one process pair: the error (or the outcome) of each, for the checks on disagreeing ranks
    outcomes = {}
    for name, scenario in scenarios.items():
        try:
            trainer, model, strategy = train({**config, **scenario})
            outcomes[name] = {"error": None, "skipped": int(strategy.skipped_steps), "state": _digest(model),
                              "step": trainer.global_step}
        except Exception as error:  # noqa: BLE001 - the test reads the error's type and message
            outcomes[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    Path(f"{result_path}.rank{rank()}").write_text(json.dumps(outcomes))


def start_rank(config: dict[str, Any], rank_index: int, world: int, port: int, log_path: str) -> None:
    """Entry point of a worker process forked by the test (its output goes to ``log_path``).

    Args:
        config: the run's settings. rank_index: this process's rank. world: the number of ranks.
        port: the gloo rendezvous port. log_path: the file that receives stdout and stderr.
    """
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    for name in ("PL_GLOBAL_SEED", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    PLACE.update(rank=rank_index, world=world, port=port)
    run(config)


def main() -> None:
    run(json.loads(sys.argv[1]))


def _digest(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        parts = inner_tensors(value) if is_low_bit(value) else {"": value}
        for tensor in parts.values():
            digest.update(_as_bytes(tensor).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
