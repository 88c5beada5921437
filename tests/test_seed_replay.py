"""Fine-tunes stored as seeds: SeedReplayLog records a run, lightning_nobp.replay rebuilds its weights bit for bit."""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_nobp
from lightning_nobp import LowBitPrecision, NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, ForwardGradient, MeZO, OpenES
from lightning_nobp.callbacks import BaseWeightsError, ReplayMismatchError, SeedReplayLog, read_log, weights_hash
from lightning_nobp.lowbit import is_low_bit

from conftest import quiet_trainer_kwargs

STEPS = 6


class Tiny(pl.LightningModule):
    """A two-layer MLP on random data, its optimizer and a per-step LR schedule chosen by name."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizer_name = optimizer
        self.nan_batches: set[int] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x.to(self.net[0].bias.dtype)), y)
        return loss + float("nan") if batch_idx in self.nan_batches else loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.8)  # a new lr every step
        elif self.optimizer_name == "plain-sgd":  # no state: a direct step can run on the device, ungated by the host
            optimizer = torch.optim.SGD(self.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.8)
        else:  # a new lr and a new momentum every step
            optimizer = torch.optim.SGD(self.parameters(), lr=2e-2, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=STEPS + 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8 * STEPS, 16, generator=generator)
    y = torch.randint(0, 4, (8 * STEPS,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def plain(name: str):
    """MeZO, EggRoll, OpenES or ForwardGradient as published (no per-row estimates, no input subspace), set through
    attributes."""
    if name == "mezo":
        algorithm = MeZO(eps=1e-3, directions=2)
    elif name == "fgrad":
        algorithm = ForwardGradient()
    else:
        algorithm = EggRoll(population=8, rank=1, sigma=1e-2) if name == "eggroll" else OpenES(population=8, sigma=1e-2)
        algorithm.per_row_estimates = False
    algorithm.input_subspace = None
    return algorithm


def base_model(optimizer: str, weights: str) -> Tiny:
    """The base weights: the same seed, then the run's dtype or low-bit storage."""
    torch.manual_seed(0)
    model = Tiny(optimizer)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    elif weights == "fp8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LowBitPrecision("fp8_e4m3").convert_module(model)
    return model


def fit(
    tmp_path: Path,
    algorithm: str,
    update: str,
    optimizer: str,
    weights: str,
    nan_batches: tuple[int, ...] = (),
    trainer_kwargs: dict | None = None,
    fused_kernels: bool | None = None,
    **strategy,
) -> tuple[Tiny, Path]:
    pl.seed_everything(0)
    torch.manual_seed(0)
    model = Tiny(optimizer)
    model.nan_batches = set(nan_batches)
    log = tmp_path / "run.seeds.jsonl"
    precision = {"precision": "bf16-true"} if weights == "bf16" else {}
    plugins = {"plugins": [LowBitPrecision("fp8_e4m3")]} if weights == "fp8" else {}
    no_backprop = NoBackpropStrategy(algorithm=plain(algorithm), update=update, **strategy)
    no_backprop.engine.fused_kernels = fused_kernels
    trainer = pl.Trainer(
        strategy=no_backprop,
        callbacks=[SeedReplayLog(log)],
        max_steps=STEPS,
        **precision,
        **plugins,
        **quiet_trainer_kwargs(**(trainer_kwargs or {})),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    return model, log


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor as stored (a low-bit weight's data and scales), by name."""
    tensors = {}
    for name, param in model.named_parameters():
        if is_low_bit(param):
            tensors[f"{name}.qdata"], tensors[f"{name}.scale"] = param.qdata, param.scale
        else:
            tensors[name] = param.detach()
    return tensors


def assert_same(trained: nn.Module, replayed: nn.Module) -> None:
    left, right = stored(trained), stored(replayed)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name].view(torch.uint8), right[name].view(torch.uint8)), name


CASES = [
    ("grad", "sgd", "bf16"),
    ("grad", "adam", "fp32"),
    ("direct", "sgd", "bf16"),
    ("direct", "adam", "fp32"),
]


@pytest.mark.parametrize("algorithm", ["mezo", "eggroll"])
@pytest.mark.parametrize(("update", "optimizer", "weights"), CASES)
def test_replay_rebuilds_the_trained_weights_bit_for_bit(
    tmp_path: Path, algorithm: str, update: str, optimizer: str, weights: str
) -> None:
    trained, log = fit(tmp_path, algorithm, update, optimizer, weights)
    header, records, end = read_log(log)
    assert header["update"] == update and len(records) == STEPS and end is not None
    assert len({record["lr"][0] for record in records}) == STEPS  # the schedule's lr, logged per step
    model = base_model(optimizer, weights)
    base = weights_hash(list(model.named_parameters()))
    result = lightning_nobp.replay(model, log)
    assert result.steps == STEPS and result.weights_hash != base  # training moved the weights
    assert_same(trained, model)
    if optimizer == "adam" and update == "grad":  # the rebuilt Adam's moments evolved as the run's did
        assert int(result.optimizer.state[model.net[0].weight]["step"]) == STEPS


@pytest.mark.parametrize("algorithm", ["mezo", "eggroll"])
def test_replay_rebuilds_fp8_weights_updated_directly(tmp_path: Path, algorithm: str) -> None:
    trained, log = fit(tmp_path, algorithm, "direct", "sgd", "fp8", direct_step="normalized")
    assert is_low_bit(trained.net[0].weight)
    model = base_model("sgd", "fp8")
    before = model.net[0].weight.qdata.clone()
    lightning_nobp.replay(model, log)
    assert not torch.equal(before.view(torch.uint8), model.net[0].weight.qdata.view(torch.uint8))
    assert_same(trained, model)


@pytest.mark.parametrize("algorithm", ["openes", "fgrad"])
def test_openes_and_forward_gradients_replay_bit_for_bit(tmp_path: Path, algorithm: str) -> None:
    trained, log = fit(tmp_path, algorithm, "direct", "sgd", "bf16")
    model = base_model("sgd", "bf16")
    lightning_nobp.replay(model, log)
    assert_same(trained, model)


@pytest.mark.parametrize(("update", "optimizer"), [("direct", "sgd"), ("grad", "adam")])
def test_gradient_accumulation_and_skipped_steps_replay(tmp_path: Path, update: str, optimizer: str) -> None:
    """Two micro-batches a step (the direct path logs the first one's members explicitly) and a step skipped for a
    non-finite loss (logged as skipped, nothing applied)."""
    trained, log = fit(
        tmp_path, "eggroll", update, optimizer, "fp32", nan_batches=(4,), trainer_kwargs={"accumulate_grad_batches": 2}
    )
    _, records, _ = read_log(log)
    assert [bool(record.get("skip")) for record in records] == [False, False, True] * 2  # 3 steps an epoch
    assert all(len(record["t"]) == 2 for record in records if not record.get("skip"))
    if update == "direct":
        assert "m" in records[0]["t"][0] and "ask" in records[0]["t"][1]
    model = base_model(optimizer, "fp32")
    result = lightning_nobp.replay(model, log)
    assert (result.steps, result.skipped) == (4, 2)
    assert_same(trained, model)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_recorded_and_replayed(tmp_path: Path, algorithm: str) -> None:
    clip = {"gradient_clip_val": 1e-3 if algorithm == "norm" else 1e-5, "gradient_clip_algorithm": algorithm}
    trained, log = fit(tmp_path, "mezo", "grad", "sgd", "fp32", trainer_kwargs=clip, step_limit=None)
    assert read_log(log)[0]["gradient_clip"] == [clip["gradient_clip_val"], algorithm]
    model = base_model("sgd", "fp32")
    lightning_nobp.replay(model, log)
    assert_same(trained, model)
    lines = log.read_text().splitlines()  # the same log without its clipping replays to other weights
    header = json.loads(lines[0])
    header["gradient_clip"] = None
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ReplayMismatchError):
        lightning_nobp.replay(base_model("sgd", "fp32"), log)


@pytest.mark.parametrize("algorithm", ["mezo", "eggroll"])
def test_fused_steps_without_host_synchronisation_replay(tmp_path: Path, algorithm: str) -> None:
    """The fused kernels (their PyTorch twins on the CPU) with a stateless direct step: the update is gated on the
    device (``applies``), and the replay takes the same path."""
    trained, log = fit(tmp_path, algorithm, "direct", "plain-sgd", "bf16", fused_kernels=True)
    assert read_log(log)[0]["fused_kernels"] is True
    model = base_model("plain-sgd", "bf16")
    lightning_nobp.replay(model, log)
    assert_same(trained, model)


def test_replay_refuses_other_base_weights(tmp_path: Path) -> None:
    _, log = fit(tmp_path, "mezo", "grad", "sgd", "fp32")
    other = base_model("sgd", "fp32")
    with torch.no_grad():
        other.net[2].bias[0] += 1e-3
    with pytest.raises(BaseWeightsError, match="not the base weights"):
        lightning_nobp.replay(other, log)
    with pytest.raises(BaseWeightsError, match="not the base weights"):  # the right values in another dtype
        lightning_nobp.replay(base_model("sgd", "bf16"), log)


def test_a_corrupted_seed_changes_the_replay(tmp_path: Path) -> None:
    trained, log = fit(tmp_path, "eggroll", "direct", "sgd", "fp32")
    lines = log.read_text().splitlines()
    record = json.loads(lines[3])
    record["t"][0]["ask"] += 1  # another population for one step
    lines[3] = json.dumps(record)
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReplayMismatchError, match="differ"):
        lightning_nobp.replay(base_model("sgd", "fp32"), log)
    model = base_model("sgd", "fp32")
    lightning_nobp.replay(model, log, verify=False)
    with pytest.raises(AssertionError):
        assert_same(trained, model)


def test_a_corrupted_coefficient_changes_the_replay(tmp_path: Path) -> None:
    _, log = fit(tmp_path, "mezo", "grad", "adam", "fp32")
    lines = log.read_text().splitlines()
    record = json.loads(lines[2])
    coefficients = np.frombuffer(base64.b64decode(record["t"][0]["c"]), dtype="<f4").copy()
    coefficients[0] *= -1
    record["t"][0]["c"] = base64.b64encode(coefficients.tobytes()).decode()
    lines[2] = json.dumps(record)
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReplayMismatchError):
        lightning_nobp.replay(base_model("adam", "fp32"), log)


def test_a_resumed_run_appends_to_its_log(tmp_path: Path) -> None:
    """Resuming from a checkpoint drops the steps logged after it (an interrupted run's) and appends the rest: the
    whole log replays to the resumed run's weights (SGD's momentum carried through the checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    log = tmp_path / "run.seeds.jsonl"

    def trainer(max_steps: int, *callbacks) -> pl.Trainer:
        return pl.Trainer(
            strategy=NoBackpropStrategy(algorithm=plain("mezo"), update="direct"),
            callbacks=[SeedReplayLog(log), *callbacks],
            max_steps=max_steps,
            **quiet_trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path),  # not the working dir
        )

    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    pl.seed_everything(0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(4, checkpoints).fit(Tiny(), loader())  # "interrupted" after step 4, checkpointed at step 2
        assert len(read_log(log)[1]) == 4
        resumed = Tiny()
        trainer(STEPS).fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    header, records, end = read_log(log)
    assert [record["s"] for record in records] == list(range(STEPS)) and end is not None
    model = base_model("sgd", "fp32")
    lightning_nobp.replay(model, log)
    assert_same(resumed, model)


def test_a_killed_runs_prefix_replays(tmp_path: Path) -> None:
    """A log cut in the middle of a line (the process killed while writing) replays its complete steps."""
    _, log = fit(tmp_path, "mezo", "direct", "sgd", "fp32")
    text = log.read_text()
    lines = text.splitlines()
    log.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # header, 3 steps, a partial step
    result = lightning_nobp.replay(base_model("sgd", "fp32"), log)
    assert result.steps == 3


@pytest.mark.parametrize(
    ("option", "value", "fix"),
    [
        ("per_row_estimates", True, "extras=None"),
        ("input_subspace", 0.97, "EstimatorExtras(per_row_estimates=False, input_subspace=None)"),
        ("exact_head_gradient", True, "extras=None"),
    ],
)
def test_estimates_beyond_seeds_are_refused_naming_the_option(tmp_path: Path, option: str, value, fix: str) -> None:
    algorithm = plain("eggroll")
    setattr(algorithm, option, value)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=algorithm),
        callbacks=[SeedReplayLog(tmp_path / "log.jsonl")],
        max_steps=1,
        **quiet_trainer_kwargs(),
    )
    with pytest.raises(ValueError, match=option) as error:
        trainer.fit(Tiny(), loader())
    assert fix in str(error.value)
    assert not (tmp_path / "log.jsonl").exists()


def test_mezo_input_subspace_is_refused_naming_the_option(tmp_path: Path) -> None:
    algorithm = plain("mezo")
    algorithm.input_subspace = 0.97
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=algorithm),
        callbacks=[SeedReplayLog(tmp_path / "log.jsonl")],
        max_steps=1,
        **quiet_trainer_kwargs(),
    )
    with pytest.raises(ValueError, match=r"input_subspace=None"):
        trainer.fit(Tiny(), loader())
