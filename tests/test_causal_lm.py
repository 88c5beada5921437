"""``CausalLanguageModel`` (the plain Hugging Face causal LM of recipes/smollm2-shakespeare-mezo.yaml) on a tiny
random Llama saved with a byte-level tokenizer: no download, and every byte is one token, so its bits per byte can
be checked by hand. The recipe itself, on SmolLM2-135M, runs in tests/test_recipes_smoke.py."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO

from conftest import quiet_trainer_kwargs

pytest.importorskip("transformers")

TEXT = b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama of width 32 and a tokenizer with one token per byte (plus ``<s>``), saved to a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={"<s>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def byte_windows(count: int, length: int = 48) -> list[torch.Tensor]:
    data = torch.frombuffer(bytearray(TEXT), dtype=torch.uint8)
    return [data[i * 7 : i * 7 + length].clone() for i in range(count)]


def test_every_byte_of_the_text_is_predicted_and_measured_in_bits(tiny_model_folder: Path) -> None:
    from lightning_nobp.models import CausalLanguageModel

    model = CausalLanguageModel(model=str(tiny_model_folder))
    assert model.start_token_id == 0 and model.lm.training  # the tokenizer's BOS; in train mode, as for backprop
    batch = torch.stack(byte_windows(3))
    texts = model.texts(batch)
    assert texts[0].encode() == TEXT[:48]
    encoded = model.encode(["ab", "abcd"])
    assert encoded["input_ids"][:, 0].tolist() == [0, 0]  # the start token, then one token per byte
    assert encoded["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert encoded["labels"][0].tolist()[3:] == [-100, -100]
    trainer = pl.Trainer(**quiet_trainer_kwargs())
    measured = trainer.test(model, DataLoader(list(batch), batch_size=3), verbose=False)[0]["test_bpb"]
    with torch.no_grad():
        encoded = model.encode(texts)
        logits = model.lm(input_ids=encoded["input_ids"]).logits[:, :-1]
        nats = F.cross_entropy(logits.reshape(-1, 257), encoded["input_ids"][:, 1:].reshape(-1))
    assert measured == pytest.approx(float(nats) / math.log(2), rel=1e-5)  # 3 x 48 bytes, 3 x 48 tokens
    with pytest.raises(ValueError, match="not a token"):
        CausalLanguageModel(model=str(tiny_model_folder), start_token="<|endoftext|>")


def test_mezo_tunes_only_the_trainable_parameters(tiny_model_folder: Path, no_backprop: None) -> None:
    from lightning_nobp.models import CausalLanguageModel

    pl.seed_everything(0)
    trainable = ["lm.model.norm.weight", "lm.model.layers.*norm.weight"]
    model = CausalLanguageModel(model=str(tiny_model_folder), trainable=trainable, optimizer="adam", lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=1e-3, directions=2)),
        max_steps=3,
        **quiet_trainer_kwargs(),
    )
    trainer.fit(model, DataLoader(byte_windows(12), batch_size=4))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    norms = ("input_layernorm", "post_attention_layernorm")
    assert changed == {"lm.model.norm.weight", *(f"lm.model.layers.{i}.{n}.weight" for i in range(2) for n in norms)}
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
