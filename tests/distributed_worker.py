"""Entry point of one rank in the two-process tests (spawned; launched the way torchrun launches ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

from lightning_nobp import ExecutionOptions
from lightning_nobp import NoBackpropStrategy  # noqa: E402
from lightning_nobp.algorithms import EggRoll, MeZO  # noqa: E402
from lightning_nobp.data import load_digits_split  # noqa: E402
from user_models import DigitsClassifier  # noqa: E402


class CountingClassifier(DigitsClassifier):
    """Counts the evaluations of ``training_step`` on this rank."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden=hidden)
        self.evaluations = 0

    def training_step(self, batch, batch_idx):
        self.evaluations += 1
        return super().training_step(batch, batch_idx)


class RewardClassifier(CountingClassifier):
    """Trains on each sample's 0/1 accuracy as a reward (``{"reward": r}``), not on a loss."""

    def training_step(self, batch, batch_idx):
        self.evaluations += 1
        x, y = batch
        return {"reward": (self(x).argmax(-1) == y).float()}


def parameter_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def run_rank(local_rank: int, world_size: int, port: int, out_dir: str, steps: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(local_rank),
        RANK=str(local_rank),
    )
    torch.set_num_threads(1)
    results = {}
    for name, hidden in (("mezo", 16), ("mezo", 256), ("eggroll", 16), ("eggroll", 256), ("eggroll-reward", 16)):
        pl.seed_everything(local_rank)  # different initial weights per rank: the strategy must align them
        os.environ["PL_GLOBAL_SEED"] = "0"
        train, _ = load_digits_split()
        algorithm = MeZO(directions=2) if name == "mezo" else EggRoll(population=8)  # eggroll and eggroll-reward
        # one member per evaluation, so the evaluations counted below show how the population was shared
        strategy = NoBackpropStrategy(
            algorithm=algorithm, seed=0, execution=ExecutionOptions(population_batching=False)
        )
        trainer = pl.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=world_size,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = (RewardClassifier if name.endswith("reward") else CountingClassifier)(hidden=hidden)
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
        results[f"{name}-{hidden}"] = {
            "evaluations": model.evaluations,
            "digest": parameter_digest(model),
            "communicated_bytes": strategy.communicated_bytes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "global_step": trainer.global_step,
            "train_samples": len(trainer.train_dataloader.sampler)
            if hasattr(trainer.train_dataloader, "sampler")
            else -1,
        }
    Path(out_dir, f"rank{local_rank}.json").write_text(json.dumps(results))
