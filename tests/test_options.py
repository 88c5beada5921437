"""The option groups: ``EstimatorExtras`` (what ES adds to the published method), ``ExecutionOptions`` and
``CpuTuning`` (the strategies' how-to-run settings), in Python, in Fabric and in a recipe."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from torch import nn

from lightning_nobp import CpuTuning, EstimatorExtras, ExecutionOptions, NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, OpenES
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algorithm_class", [EggRoll, OpenES])
def test_extras_none_is_the_published_method(algorithm_class: type) -> None:
    plain = algorithm_class(population=8, extras=None)
    assert (plain.per_row_estimates, plain.input_subspace, plain.exact_head_gradient) == (False, None, False)
    assert "extras=None" in repr(plain)
    default = algorithm_class(population=8)
    assert (default.per_row_estimates, default.input_subspace) == (True, 0.97)
    assert "extras=EstimatorExtras(per_row_estimates=True, input_subspace=0.97" in repr(default)


def test_a_group_sets_only_what_it_names() -> None:
    algorithm = EggRoll(population=8, extras=EstimatorExtras(exact_head_gradient=True, per_row_max_outputs=256))
    assert algorithm.exact_head_gradient and algorithm.per_row_estimates  # the other fields keep their defaults
    assert algorithm.per_row_max_outputs == 256 and algorithm.input_subspace == 0.97
    assert EstimatorExtras().label == "per-row head + input subspace 0.97 (biased)"
    assert EstimatorExtras(per_row_estimates=False, input_subspace=None).label == ""


@pytest.mark.parametrize("outputs", [0, -3, 2.5, True])
def test_bad_extras_name_the_fix(outputs: object) -> None:
    with pytest.raises(ValueError, match="per_row_max_outputs=.*positive integer"):
        EstimatorExtras(per_row_max_outputs=outputs)  # type: ignore[arg-type]


def test_the_flat_options_of_earlier_versions_are_refused() -> None:
    with pytest.raises(TypeError, match="per_row_estimates"):
        EggRoll(population=8, per_row_estimates=False)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="member_data"):
        NoBackpropStrategy(member_data="pair_slices")  # type: ignore[call-arg]


def test_the_trainer_strategy_reads_its_groups() -> None:
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8),
        execution=ExecutionOptions(population_batching=False, member_data="pair_slices", reuse_official_pass=True),
        cpu_tuning=CpuTuning(reuse_memory=False),
    )
    assert strategy.engine.population_batching is False and strategy.member_data == "pair_slices"
    assert strategy.reuse_official_pass is False  # pair slices never reuse the official pass
    assert strategy.reuse_cpu_memory is False and strategy.freeze_startup_objects is True
    untuned = NoBackpropStrategy()
    assert untuned.reuse_cpu_memory is False and untuned.freeze_startup_objects is False  # opt-in
    with pytest.raises(ValueError, match="member_data='halves'.*choose one of"):
        ExecutionOptions(member_data="halves")  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", ["execution", "cpu_tuning"])
def test_a_dict_instead_of_a_group_names_the_class(argument: str) -> None:
    with pytest.raises(TypeError, match=r"pass (ExecutionOptions|CpuTuning)\(\.\.\.\)"):
        NoBackpropStrategy(**{argument: {"population_batching": False}})
    with pytest.raises(TypeError, match=r"pass EstimatorExtras\(\.\.\.\)"):
        EggRoll(population=8, extras={"per_row_estimates": False})


def test_fabric_refuses_the_trainer_only_options() -> None:
    with pytest.raises(ValueError, match="Trainer options"):
        FabricNoBackpropStrategy(execution=ExecutionOptions(member_data="pair_slices"))
    assert FabricNoBackpropStrategy(execution=ExecutionOptions(fused_kernels=True)).engine.fused_kernels is True


def test_fabric_freezes_startup_objects_only_when_asked_and_releases_them() -> None:
    from lightning.fabric import Fabric

    if gc.get_freeze_count():
        pytest.skip("objects were frozen before this test (by another library)")
    for tuning, frozen in ((None, False), (CpuTuning(reuse_memory=False), True)):
        fabric = Fabric(accelerator="cpu", devices=1, strategy=FabricNoBackpropStrategy(cpu_tuning=tuning))
        module = fabric.setup_module(nn.Linear(4, 2))
        assert (gc.get_freeze_count() > 0) is frozen
        assert module(torch.ones(1, 4)).shape == (1, 2)
        fabric.strategy.teardown()
        assert gc.get_freeze_count() == 0


def test_a_recipe_spells_the_groups_as_mappings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_nobp.cli import run

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((ROOT / "recipes" / "digits-eggroll.yaml").read_text())
    strategy = recipe["trainer"]["strategy"]["init_args"]
    strategy["algorithm"]["init_args"]["extras"] = {"exact_head_gradient": True}
    strategy["execution"] = {"member_data": "pair_slices"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with mock.patch.object(sys, "argv", ["nobp"]):
        cli = run(
            ["fit", "-c", str(tmp_path / "recipe.yaml"), "--trainer.max_epochs", "0", "--test_after_fit", "false"]
        )
    built = cli.trainer.strategy
    assert isinstance(built.execution, ExecutionOptions) and built.member_data == "pair_slices"
    assert built.algorithm.exact_head_gradient and built.algorithm.input_subspace == 0.97
    assert built.cpu_tuning == CpuTuning()
