"""The ``nobp`` console script: short class names, docstring help, test after fit, the digits recipes' smoke modes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import yaml
from lightning.pytorch.plugins.precision import Precision

from lightning_nobp.cli import NoBackpropCLI, run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SMOKE = str(RECIPES / "smoke.yaml")


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes write logs and config.yaml under runs/ relative to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str) -> NoBackpropCLI:
    with mock.patch.object(sys, "argv", ["nobp"]):  # LightningCLI warns when pytest's own arguments are there
        return run(list(args))


def test_pyproject_declares_the_nobp_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nobp"] == "lightning_nobp.cli:main"


@pytest.mark.parametrize("recipe", ["digits-eggroll", "digits-mezo", "digits-backprop"])
def test_digits_recipe_smoke_mode_reports_test_accuracy(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = run_cli("fit", "-c", str(RECIPES / f"{recipe}.yaml"), "-c", SMOKE, f"--trainer.default_root_dir={tmp_path}")
    assert cli.trainer.global_step == 3
    match = re.search(r"nobp: held-out test_acc = (\d\.\d+)", capsys.readouterr().out)
    assert match, "the held-out metric is printed on stdout"
    assert float(match.group(1)) == pytest.approx(cli.held_out["test_acc"], abs=1e-4)
    assert 0.0 <= cli.held_out["test_acc"] <= 1.0


def test_recipes_name_package_classes_by_short_name() -> None:
    config = yaml.safe_load((RECIPES / "digits-eggroll.yaml").read_text())
    assert config["trainer"]["strategy"]["class_path"] == "NoBackpropStrategy"
    assert config["trainer"]["strategy"]["init_args"]["algorithm"]["class_path"] == "EggRoll"
    assert config["model"]["class_path"] == "MLPClassifier"
    assert config["data"]["class_path"] == "DigitsDataModule"
    cli = run_cli("fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "-c", SMOKE, "--trainer.max_steps=1")
    from lightning_nobp import NoBackpropStrategy
    from lightning_nobp.algorithms import EggRoll

    assert isinstance(cli.trainer.strategy, NoBackpropStrategy)
    assert isinstance(cli.trainer.strategy.engine.algorithm, EggRoll)
    assert cli.trainer.strategy.engine.algorithm.population == 64


def test_print_config_resolves_short_names_to_full_class_paths(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "--print_config")
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_nobp.NoBackpropStrategy"
    assert strategy["init_args"]["algorithm"]["class_path"] == "lightning_nobp.algorithms.EggRoll"
    assert strategy["init_args"]["algorithm"]["init_args"]["fitness_shaping"] == "centered_rank"
    assert strategy["init_args"]["algorithm"]["init_args"]["extras"]["input_subspace"] == 0.97  # a group's default
    assert strategy["init_args"]["cpu_tuning"] == {"reuse_memory": True, "freeze_startup_objects": True}
    assert printed["model"]["class_path"] == "lightning_nobp.models.MLPClassifier"


def test_help_shows_the_docstring_of_every_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("fit", "--trainer.strategy.help", "NoBackpropStrategy")
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "--trainer.strategy.execution" in text and "how the members are evaluated" in flat
    assert "--trainer.strategy.cpu_tuning" in text and "opt-in process-wide CPU tunings" in flat
    with pytest.raises(SystemExit):
        run_cli("fit", "--model.help", "MLPClassifier")
    assert "width of each hidden layer" in capsys.readouterr().out


def test_timeline_records_validation_metrics_against_seconds_and_forwards(tmp_path: Path) -> None:
    path = tmp_path / "timeline.json"
    run_cli(
        "fit",
        "-c",
        str(RECIPES / "digits-eggroll.yaml"),
        "-c",
        SMOKE,
        "--trainer.max_steps=6",
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
        f"--timeline={path}",
        "--test_after_fit=false",
    )
    records = json.loads(path.read_text())
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["forwards"] for r in records] == [130, 260, 390]  # EggRoll population 64 batched + the official pass
    assert all(0 <= r["val_acc"] <= 1 for r in records)
    assert records[0]["seconds"] < records[-1]["seconds"]


def test_a_misspelled_class_name_is_refused() -> None:
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "--model=MLPClassifer", "--print_config")


class MarkerPrecision(Precision):
    """A precision plugin defined outside Lightning, as LowBitPrecision is."""


def test_a_precision_plugin_resolves_by_short_name(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins.yaml"
    plugins.write_text("trainer:\n  plugins:\n    - class_path: MarkerPrecision\n")
    cli = run_cli("fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "-c", SMOKE, "-c", str(plugins))
    assert isinstance(cli.trainer.precision_plugin, MarkerPrecision)
    assert cli.trainer.global_step == 3


def test_predict_returns_one_class_per_test_image() -> None:
    cli = run_cli("predict", "-c", str(RECIPES / "digits-eggroll.yaml"), "-c", SMOKE)
    predictions = cli.trainer.predict_loop.predictions
    assert sum(len(batch) for batch in predictions) == 359  # the 20 % test split of 1,797 images
    assert all(0 <= int(p) < 10 for batch in predictions for p in batch)


def console_script() -> str:
    script = Path(sys.executable).parent / "nobp"
    if not script.exists():
        pytest.skip("the nobp console script is not installed next to this interpreter (pip install -e .)")
    return str(script)


def test_console_script_exits_0_after_a_successful_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [console_script(), "fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "-c", SMOKE,
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nobp: held-out test_acc" in done.stdout
    assert "NoBackpropCLI object" not in done.stdout + done.stderr


def test_console_script_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [console_script(), "fit", "-c", str(RECIPES / "digits-eggroll.yaml"), "-c", SMOKE,
         "--trainer.strategy.init_args.algorithm.init_args.population=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("nobp: error:")]
    assert len(errors) == 1 and "population" in errors[0]
    assert "Traceback" not in done.stderr
