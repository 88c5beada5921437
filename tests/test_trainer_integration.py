"""Clipping, gradient accumulation, LR schedulers, hooks, logging, checkpoints and aliases work as with backprop."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from lightning_nobp import EstimatorExtras, ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


class HookSpy(Callback):
    """Counts the backward/optimizer hooks and records lr and global_step at every optimizer step."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lrs: list[float] = []
        self.steps: list[int] = []

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[override]
        self._count("on_before_backward")

    def on_after_backward(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._count("on_after_backward")

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        self._count("on_before_zero_grad")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        self._count("on_before_optimizer_step")
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.steps.append(trainer.global_step)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm it is about to apply (after Lightning's clipping)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.applied_norms: list[float] = []

    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.applied_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class ClippedDigits(DigitsClassifier):
    def configure_optimizers(self):
        optimizer = RecordingSGD(self.parameters(), lr=1e-3)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def run(strategy, clip: float | None, **trainer_kwargs) -> tuple[HookSpy, pl.Trainer, ClippedDigits]:
    pl.seed_everything(0)
    train, _ = digits_loaders(batch_size=128)
    spy = HookSpy()
    model = ClippedDigits()
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=3,
        limit_train_batches=5,
        accumulate_grad_batches=2,
        gradient_clip_val=clip,
        callbacks=[spy],
        **quiet_trainer_kwargs(**trainer_kwargs),
    )
    trainer.fit(model, train)
    return spy, trainer, model


def test_clipping_accumulation_and_scheduler_behave_as_with_backprop() -> None:
    reference, reference_trainer, _ = run("auto", clip=0.5)
    spy, trainer, model = run(NoBackpropStrategy(algorithm=MeZO()), clip=0.5)
    assert spy.counts == reference.counts
    assert spy.counts["on_before_backward"] == 15  # every micro-batch
    assert spy.counts["on_before_optimizer_step"] == 9  # 5 batches, accumulate 2: steps after 2, 4 and 5
    assert spy.lrs == reference.lrs == [1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 3
    assert spy.steps == reference.steps
    assert trainer.global_step == reference_trainer.global_step == 9
    norms = model.optimizers().optimizer.applied_norms
    assert len(norms) == 9 and max(norms) <= 0.5 + 1e-5


def test_without_clipping_the_estimate_is_larger_than_the_clip_value() -> None:
    _, _, model = run(NoBackpropStrategy(algorithm=MeZO()), clip=None)
    assert max(model.optimizers().optimizer.applied_norms) > 0.5  # so the test above really clipped


def test_accumulation_averages_the_micro_batch_estimates(tmp_path: Path) -> None:
    """With accumulate_grad_batches=2 the grad is the mean of the two micro-batch estimates."""

    captured: list[torch.Tensor] = []

    class Capture(Callback):
        def on_after_backward(self, trainer, pl_module) -> None:  # type: ignore[override]
            captured.append(pl_module.net[0].weight.grad.clone())

    pl.seed_everything(0)
    train, _ = digits_loaders(batch_size=64, shuffle=False)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO()),
        max_steps=1,
        accumulate_grad_batches=2,
        callbacks=[Capture()],
        **quiet_trainer_kwargs(),
    )
    trainer.fit(DigitsClassifier(lr=0.0), train)
    first, both = captured
    # one micro-batch alone, with the same seeds, gives twice the first contribution
    captured.clear()
    pl.seed_everything(0)
    solo = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO()), max_steps=1, callbacks=[Capture()], **quiet_trainer_kwargs()
    )
    solo.fit(DigitsClassifier(lr=0.0), train)
    torch.testing.assert_close(first * 2, captured[0])
    assert not torch.equal(both, first)


def test_nobp_metrics_reach_the_logger_and_progress_bar(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(
            algorithm=MeZO(directions=2), execution=ExecutionOptions(reuse_official_pass=False)
        ),
        max_epochs=1,
        log_every_n_steps=5,
        **quiet_trainer_kwargs(logger=pl.loggers.CSVLogger(tmp_path)),
    )
    trainer.fit(DigitsClassifier(), train)
    logged = trainer.logged_metrics
    for name in ("nobp/projected_grad", "nobp/loss_spread", "nobp/forwards_per_step", "nobp/skipped_steps"):
        assert name in logged, name
    assert float(logged["nobp/forwards_per_step"]) == 5  # 4 perturbed + the clean official pass
    assert float(logged["nobp/projected_grad"]) > 0
    assert "nobp/projected_grad" in trainer.progress_bar_metrics
    assert "train_loss" in logged  # the user's own metric is logged once per step, as usual
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["train_loss"]]
    assert [row["step"] for row in rows] == ["4", "9"]  # every log_every_n_steps=5 steps, as the user's metrics
    assert all(row["nobp/projected_grad"] and row["nobp/skipped_steps"] for row in rows)


def test_reused_official_pass_costs_two_forwards_per_mezo_step() -> None:
    calls = {"n": 0}

    class Counting(DigitsClassifier):
        def forward(self, x):
            calls["n"] += 1
            return super().forward(x)

    pl.seed_everything(0)
    train, _ = digits_loaders()
    for algorithm, once in ((MeZO(directions=1, input_subspace=None), 1), (MeZO(directions=1), 1 + 5)):
        calls["n"] = 0
        trainer = pl.Trainer(strategy=NoBackpropStrategy(algorithm=algorithm), max_steps=10, **quiet_trainer_kwargs())
        trainer.fit(Counting(), train)
        # plus one probe forward on the first step; with input subspaces, the search for data-fed layers (2
        # forwards on step 1) and one observation on steps 2, 4 and 8
        assert calls["n"] == 2 * 10 + once


def final_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    class Model(DigitsClassifier):
        def configure_optimizers(self):
            if optimizer == "adamw":
                opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=3e-4, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}

    def trainer(max_epochs: int, **kwargs) -> pl.Trainer:
        return pl.Trainer(
            strategy=NoBackpropStrategy(algorithm=MeZO()),
            max_epochs=max_epochs,
            limit_train_batches=6,
            **quiet_trainer_kwargs(**kwargs),
        )

    pl.seed_everything(0)
    train, _ = digits_loaders(shuffle=False)
    uninterrupted = Model()
    trainer(4).fit(uninterrupted, train)

    pl.seed_everything(0)
    first_half = Model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(2, enable_checkpointing=True, callbacks=[checkpoint]).fit(first_half, train)
    resumed = Model()
    pl.seed_everything(0)  # the same seed as the first run, as a user resumes; the global RNG *state* differs:
    torch.rand(1000)  # perturbations come from counters, not from the global generator
    trainer(4).fit(resumed, train, ckpt_path=tmp_path / "last.ckpt")

    expected, got = final_parameters(uninterrupted), final_parameters(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not torch.equal(expected["net.0.weight"], final_parameters(first_half)["net.0.weight"])


def test_string_alias_resolves_to_the_strategy_with_mezo() -> None:
    assert "nobp_mezo" in StrategyRegistry
    trainer = pl.Trainer(strategy="nobp_mezo", **quiet_trainer_kwargs(max_steps=3))
    assert isinstance(trainer.strategy, NoBackpropStrategy)
    assert isinstance(trainer.strategy.algorithm, MeZO)
    train, _ = digits_loaders()
    trainer.fit(DigitsClassifier(), train)
    assert trainer.global_step == 3


class FirstStepLoss(Callback):
    """Records the training loss the user's step logged on the first batch and the batch itself."""

    def __init__(self) -> None:
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.logged: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if self.batch is None:
            self.batch = batch
            self.logged = float(trainer.callback_metrics["train_loss"])


@pytest.mark.parametrize(
    ("algorithm", "batching", "reused"),
    [
        ("eggroll-8", True, False),  # batched: one more member is cheaper than a perturbed official pass
        ("eggroll-8", False, True),  # one member at a time: the official pass spares a whole forward
        ("mezo-1", True, True),  # a population of 2: reusing the official pass leaves nothing to batch
    ],
)
def test_the_official_pass_is_a_member_only_where_it_spares_a_forward(
    algorithm: str, batching: bool, reused: bool
) -> None:
    from lightning_nobp.algorithms import EggRoll

    pl.seed_everything(0)
    train, _ = digits_loaders()
    chosen = (
        EggRoll(population=8, extras=EstimatorExtras(input_subspace=None))
        if algorithm == "eggroll-8"
        else MeZO(directions=1)
    )
    strategy = NoBackpropStrategy(algorithm=chosen, execution=ExecutionOptions(population_batching=batching))
    model = DigitsClassifier(lr=0.0)  # the weights stay where they started
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    first = FirstStepLoss()
    trainer = pl.Trainer(
        strategy=strategy, max_steps=2, log_every_n_steps=1, callbacks=[first], **quiet_trainer_kwargs()
    )
    trainer.fit(model, train)
    members = len(chosen.ask(0))
    assert strategy.official_pass_is_a_member(members) is reused
    assert float(trainer.logged_metrics["nobp/forwards_per_step"]) == members + (0 if reused else 1)
    clean = DigitsClassifier()
    clean.load_state_dict(initial)
    with torch.no_grad():
        unperturbed = float(torch.nn.functional.cross_entropy(clean(first.batch[0]), first.batch[1]))
    # the logged loss is the model's own where the official pass is not a member, a perturbed member's elsewhere
    assert (abs(first.logged - unperturbed) < 1e-6) is not reused


def test_reuse_official_pass_set_by_the_user_is_obeyed() -> None:
    from lightning_nobp.algorithms import EggRoll

    assert NoBackpropStrategy(
        algorithm=EggRoll(population=64), execution=ExecutionOptions(reuse_official_pass=True)
    ).official_pass_is_a_member(64)
    assert not NoBackpropStrategy(
        algorithm=MeZO(directions=1), execution=ExecutionOptions(reuse_official_pass=False)
    ).official_pass_is_a_member(2)
    assert not NoBackpropStrategy(
        algorithm=EggRoll(population=8), execution=ExecutionOptions(member_data="pair_slices", reuse_official_pass=True)
    ).official_pass_is_a_member(8)
