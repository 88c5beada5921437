"""Population generation: each member decodes its own continuations (KV cache, its perturbation, one batched decode)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor

from lightning_nobp import NoBackpropStrategy, generate_population, score_completions
from lightning_nobp.algorithms import Algorithm, EggRoll, MeZO, OpenES
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.perturb import PopulationEstimator, RngSnapshot

from conftest import quiet_trainer_kwargs

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3]]
#: the acceptance run: EggRoll's noise scale and optimizer steps (measured: held-out exact match 0.0 -> 0.25 with
#: seed 0; 0.11 to 0.25 with seeds 0 to 3)
SIGMA, STEPS = 0.2, 40


def tiny_gpt(**overrides: object) -> GPT:
    return GPT(GPTConfig(**{**dict(vocab_size=32, block_size=32, n_layer=2, n_head=2, n_embd=32), **overrides}))


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


MODELS = {
    "gpt": tiny_gpt,
    "gpt-alibi-math": lambda: tiny_gpt(alibi_slope=0.5, attention="math"),
    "llama": tiny_llama,
}


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def uncached_reference(model: nn.Module, prompts: list[list[int]], new: int, stops: set[int], pad: int) -> Tensor:
    """Greedy decode of each prompt on its own, unpadded, recomputing the whole sequence at every token."""
    rows = []
    for prompt in prompts:
        sequence, generated = torch.tensor([prompt]), []
        while len(generated) < new:
            output = model(sequence)
            logits = output if isinstance(output, Tensor) else output.logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            sequence = torch.cat((sequence, torch.tensor([[token]])), dim=1)
            if token in stops:
                break
        rows.append(generated + [pad] * (new - len(generated)))
    return torch.tensor(rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_equals_an_uncached_decode_with_left_padding_and_stop_tokens(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids, mask = left_padded(PROMPTS)
    free = uncached_reference(model, PROMPTS, 8, set(), pad=31)
    assert torch.equal(generate_population(model, ids, mask, max_new_tokens=8, pad_token_id=31), free)
    stop = int(free[0, 2])  # a token the first row generates third: that row stops there, padded after it
    stopped = uncached_reference(model, PROMPTS, 8, {stop}, pad=31)
    generated = generate_population(model, ids, mask, max_new_tokens=8, stop_tokens=[stop], pad_token_id=31)
    assert torch.equal(generated, stopped)
    assert torch.equal(generated[0, 3:], torch.full((5,), 31)) and not torch.equal(stopped, free)


def test_gpt_cached_forward_of_a_whole_sequence_equals_its_forward() -> None:
    torch.manual_seed(0)
    model = tiny_gpt(alibi_slope=0.5).eval()
    ids = torch.randint(0, 32, (3, 7))
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(3, 7, 7)
    logits, cache = model.forward_cached(ids, torch.arange(7).expand(3, 7), causal)
    torch.testing.assert_close(logits, model(ids), rtol=1e-5, atol=1e-5)
    assert cache.length == 7 and len(cache.layers) == 2 and cache.layers[0][0].shape == (3, 2, 7, 16)


def test_sampling_is_reproducible_from_its_seed() -> None:
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    ids, mask = left_padded(PROMPTS)
    first = generate_population(model, ids, mask, max_new_tokens=10, temperature=1.5, seed=7)
    assert torch.equal(first, generate_population(model, ids, mask, max_new_tokens=10, temperature=1.5, seed=7))
    assert not torch.equal(first, generate_population(model, ids, mask, max_new_tokens=10, temperature=1.5, seed=8))
    assert not torch.equal(first, generate_population(model, ids, mask, max_new_tokens=10))  # greedy differs
    torch.manual_seed(3)  # seed=None: drawn from torch's generator
    drawn = generate_population(model, ids, mask, max_new_tokens=10, temperature=1.5)
    torch.manual_seed(3)
    assert torch.equal(drawn, generate_population(model, ids, mask, max_new_tokens=10, temperature=1.5))


def member_outputs(
    model: nn.Module, temperature: float, seed: int | None = 5, algorithm: Algorithm | None = None
) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Each member's completions (members one at a time), the unperturbed ones, the fitness of a loss that hashes
    the completions (looped and batched), and that hash of each member's own completions."""
    ids, mask = left_padded(PROMPTS)
    algorithm = algorithm or EggRoll(population=4, rank=1, sigma=0.5)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    weights = torch.randn(len(PROMPTS), 6, generator=torch.Generator().manual_seed(1))

    def generate() -> Tensor:
        return generate_population(model, ids, mask, max_new_tokens=6, temperature=temperature, seed=seed)

    def loss() -> Tensor:  # distinct completions give distinct values
        return (generate().float() * weights).sum()

    population = algorithm.ask(3)
    estimator.probe_parameter_reads(population, loss)
    members = []
    for member in population.members:
        with estimator.perturbation(population, member):
            members.append(generate())
    rng = RngSnapshot(torch.device("cpu"))
    looped = estimator.evaluate(population, loss, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched decode must not fall back to one member at a time
        batched = estimator.evaluate_batched(population, loss, rng)
    own = torch.stack([(member.float() * weights).sum() for member in members])
    return members, generate(), looped, batched, own


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_members_generate_at_their_own_perturbation_in_one_batched_decode(name: str, temperature: float) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    members, unperturbed, looped, batched, own = member_outputs(model, temperature)
    assert len({tuple(m.flatten().tolist()) for m in members}) == len(members)  # every member its own output
    assert all(not torch.equal(m, unperturbed) for m in members)
    torch.testing.assert_close(batched, looped)  # the batched decode gives each member what it gives alone
    torch.testing.assert_close(looped, own)  # the strategy's evaluation of a member generates what it does alone


@pytest.mark.parametrize(
    "algorithm", [MeZO(eps=0.3, directions=2), OpenES(population=4, sigma=0.3)], ids=["mezo", "openes"]
)
def test_dense_noise_members_generate_at_their_own_perturbation_too(algorithm: Algorithm) -> None:
    torch.manual_seed(0)
    members, unperturbed, looped, batched, own = member_outputs(tiny_gpt(), 0.0, algorithm=algorithm)
    assert all(not torch.equal(m, unperturbed) for m in members)
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(looped, own)


def test_seedless_sampling_shares_its_noise_between_a_batched_and_a_looped_evaluation() -> None:
    torch.manual_seed(0)
    _, _, looped, batched, _ = member_outputs(tiny_gpt(), 1.0, seed=None)
    torch.testing.assert_close(batched, looped)
    assert len(set(looped.tolist())) > 1


def plain_eggroll(population: int, sigma: float) -> EggRoll:
    """EggRoll as published: no per-row estimates, no input subspaces (their extra forwards run outside vmap)."""
    algorithm = EggRoll(population=population, rank=1, sigma=sigma)
    algorithm.per_row_estimates = False
    algorithm.input_subspace = None
    return algorithm


class SuccessorTask(pl.LightningModule):
    """Continue a prompt with the next two tokens after its last one (modulo the vocabulary): an exact-match reward
    of a generated continuation, no loss anywhere."""

    vocab = 8

    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(GPTConfig(vocab_size=self.vocab, block_size=8, n_layer=1, n_head=2, n_embd=32))
        #: completions of the passes that ran outside vmap (the probe, the official pass)
        self.unbatched: list[Tensor] = []

    @classmethod
    def data(cls, samples: int, seed: int) -> tuple[Tensor, Tensor]:
        prompts = torch.randint(0, cls.vocab, (samples, 4), generator=torch.Generator().manual_seed(seed))
        last = prompts[:, -1:]
        return prompts, torch.cat(((last + 1) % cls.vocab, (last + 2) % cls.vocab), dim=1)

    def reward(self, prompts: Tensor, targets: Tensor) -> Tensor:
        completions = generate_population(self.model, prompts, max_new_tokens=2)
        if not is_functorch_wrapped_tensor(completions):
            self.unbatched.append(completions)
        return (completions == targets).all(-1).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return {"reward": self.reward(*batch)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)


def test_the_official_pass_generates_at_the_unperturbed_weights(no_backprop: None) -> None:
    pl.seed_everything(0)
    module = SuccessorTask()
    prompts, targets = SuccessorTask.data(16, 0)
    unperturbed = generate_population(module.model, prompts, max_new_tokens=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(prompts, targets), batch_size=16)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=plain_eggroll(8, 0.5)), max_steps=1,
        **quiet_trainer_kwargs(),
    )  # fmt: skip
    trainer.fit(module, loader)
    probe, official = module.unbatched  # the members' evaluation is one batched decode: it records nothing
    assert torch.equal(official, unperturbed)  # the official pass: the first step's weights, unperturbed
    assert not torch.equal(probe, unperturbed)  # the probe (first step only) runs at a member's perturbed weights


def test_training_on_a_generated_exact_match_reward_improves_the_held_out_reward(no_backprop: None) -> None:
    pl.seed_everything(0)
    module = SuccessorTask()
    held_out = SuccessorTask.data(256, 1)
    before = float(module.reward(*held_out).mean())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*SuccessorTask.data(256, 0)), batch_size=32, shuffle=True
    )
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=plain_eggroll(32, SIGMA)), max_steps=STEPS,
        **quiet_trainer_kwargs(),
    )  # fmt: skip
    trainer.fit(module, loader)
    after = float(module.reward(*held_out).mean())
    print(f"held-out exact match {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1


def as_text(tokens: list[int]) -> str:
    """A toy detokenizer: token ``t`` is the letter ``chr(97 + t)``, padding (0) is dropped."""
    return "".join(chr(97 + token) for token in tokens if token != 0)


class LlamaExactMatch(pl.LightningModule):
    """A tiny Hugging Face Llama rewarded by the exact match of the text of a sampled, left-padded,
    stop-token-ended continuation with each prompt's answer (strings compared in Python)."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__()
        self.lm = tiny_llama()
        self.answers = answers
        self.batched_calls = 0

    def exact_match(self, rows: Tensor) -> list[float]:
        return [float(as_text(row) == answer) for row, answer in zip(rows.tolist(), self.answers)]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        ids, mask = batch
        completions = generate_population(
            self.lm, ids, mask, max_new_tokens=3, stop_tokens=[2], temperature=0.7, seed=11, pad_token_id=0
        )
        self.batched_calls += int(is_functorch_wrapped_tensor(completions))
        return {"reward": score_completions(completions, self.exact_match)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_a_hugging_face_model_generates_in_the_trainer_with_the_members_batched(no_backprop: None) -> None:
    pl.seed_everything(0)
    module = LlamaExactMatch([])
    ids, mask = left_padded(PROMPTS)
    # the unperturbed model's own sample: the members' perturbations change some of it, so their rewards differ
    sample = generate_population(module.lm, ids, mask, max_new_tokens=3, stop_tokens=[2], temperature=0.7, seed=11)
    module.answers = [as_text(row) for row in sample.tolist()]
    assert float(score_completions(sample, module.exact_match).mean()) == 1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask), batch_size=4)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=plain_eggroll(8, 0.1)), max_steps=2,
        **quiet_trainer_kwargs(log_every_n_steps=1),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fall back to one member at a time
        trainer.fit(module, loader)
    assert module.batched_calls == 2  # each step's members: one batched decode, their texts scored in Python
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))  # the reward moved the weights
    assert 0.0 <= float(trainer.callback_metrics["nobp/reward"]) <= 1.0


def test_python_scores_of_a_batched_population_equal_those_of_its_members_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = tiny_gpt()
    ids, mask = left_padded(PROMPTS)
    algorithm = EggRoll(population=4, rank=1, sigma=0.5)
    estimator = PopulationEstimator(algorithm, [model], list(model.parameters()))
    seen: list[tuple[int, ...]] = []

    def letters(rows: Tensor) -> list[float]:  # Python on the tokens: impossible on a batched tensor itself
        seen.append(tuple(rows.shape))
        return [float(len(set(as_text(row)))) for row in rows.tolist()]

    def loss() -> Tensor:
        return score_completions(generate_population(model, ids, mask, max_new_tokens=5), letters).mean()

    population = algorithm.ask(2)
    estimator.probe_parameter_reads(population, loss)
    looped = estimator.evaluate(population, loss)
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = estimator.evaluate_batched(population, loss)
    torch.testing.assert_close(batched, looped)
    assert seen == [(4, 5)] * 4  # one member's rows per call
    assert len(set(looped.tolist())) > 1
    with pytest.raises(ValueError, match="one value per row"):
        score_completions(torch.zeros(3, 2, dtype=torch.long), lambda rows: [1.0])


def test_malformed_calls_are_refused() -> None:
    model = tiny_gpt()
    ids = torch.tensor([[1, 2, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate_population(model, ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(TypeError, match="GPT and Hugging Face"):
        generate_population(nn.Linear(2, 2), ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_population(model, ids, max_new_tokens=0)


def test_the_benchmark_measures_a_population_against_plain_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
    benchmark = importlib.import_module("population_generation")
    args = argparse.Namespace(population=2, prompts=2, prompt_length=4, new_tokens=2, sigma=0.01, repeats=1)
    result = benchmark.measure("gpt-small", args, torch.device("cpu"))
    assert result["sequences"] == 4 and result["new_tokens"] == 2
    assert all(result[key] > 0 for key in ("plain_tokens_per_s", "population_batched_tokens_per_s"))
    sys.modules.pop("population_generation", None)
