"""Model families written elsewhere train under ``NoBackpropStrategy`` as they are: a torchvision CNN with BatchNorm,
``nn.TransformerEncoder`` and a Hugging Face ``transformers`` causal LM, each inside a plain LightningModule (its own
optimizer, nothing specific to forward-only training), with MeZO and with EggRoll, backprop banned.

Every test measures the loss on a fixed set of samples (in eval mode) before and after a short fit, so one noisy
batch decides nothing. Sizes are tiny and the runs short; the figures in the docstrings were measured with one
torch thread (``one_thread``: on a busy 2-core machine a second thread that is descheduled costs more than it gives).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.algorithms.base import Algorithm

from conftest import quiet_trainer_kwargs


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, then the thread count it had."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LossRecorder(Callback):
    """Keeps the training loss of every step (the value ``training_step`` returned, at the unperturbed weights)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.losses.append(float(outputs["loss"]))


def fit(
    module: pl.LightningModule,
    algorithm: Algorithm,
    loader: DataLoader,
    max_steps: int,
    val_loader: DataLoader | None = None,
    **trainer_kwargs,
) -> pl.Trainer:
    """``Trainer.fit`` under ``NoBackpropStrategy(algorithm=...)``, as a user would write it."""
    callbacks = [LossRecorder(), *trainer_kwargs.pop("callbacks", [])]
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=algorithm),
        max_steps=max_steps,
        callbacks=callbacks,
        **quiet_trainer_kwargs(**trainer_kwargs),
    )
    trainer.fit(module, loader, val_loader)
    assert trainer.global_step == max_steps
    recorded = callbacks[0].losses
    assert all(math.isfinite(loss) for loss in recorded)
    return trainer


def changed_parameters(module: nn.Module, before: dict[str, Tensor]) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(p.detach(), before[name])}


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def batched_evaluation(trainer: pl.Trainer) -> bool:
    """Whether the members were evaluated together under ``vmap`` (not one at a time after a fallback)."""
    (estimator,) = trainer.strategy.engine._estimators.values()
    return estimator.batching is True


# --------------------------------------------------------------------------- torchvision CNN with BatchNorm


class DigitsCNN(pl.LightningModule):
    """A torchvision RegNet (BatchNorm after every convolution, residual bottlenecks, grouped convolutions) shrunk
    to 7.8 k weights, on the digits upsampled to 16x16; Adam."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        from torchvision.models.regnet import BlockParams, RegNet

        self.save_hyperparameters()
        widths = BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
        self.net = RegNet(widths, num_classes=10, stem_width=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digit_images() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as 3-channel 16x16 images (bilinear upsampling), standardized; train and test."""
    from lightning_nobp.data import load_digits_split

    def images(dataset: TensorDataset) -> TensorDataset:
        x, y = dataset.tensors
        x = F.interpolate(x.view(-1, 1, 8, 8), size=(16, 16), mode="bilinear").expand(-1, 3, -1, -1)
        return TensorDataset(((x - 0.3) / 0.4).contiguous(), y)

    train, test = load_digits_split()
    return images(train), images(test)


class OfficialPassStatistics(Callback):
    """Checks every step's BatchNorm buffers against one training-mode forward of the batch at the step's
    unperturbed weights (what the step would do to them with backprop)."""

    def __init__(self) -> None:
        self.mismatches: list[tuple[int, str]] = []
        self._before: nn.Module | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        self._before = copy.deepcopy(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        assert self._before is not None
        with torch.no_grad():
            self._before.train()
            self._before(batch[0])
        expected = dict(self._before.named_buffers())
        for name, buffer in pl_module.net.named_buffers():
            if not torch.equal(buffer, expected[name]):
                self.mismatches.append((trainer.global_step, name))


@pytest.mark.parametrize(
    "make_algorithm, steps, lr",
    [(partial(EggRoll, population=32, sigma=1e-2), 60, 1e-2), (partial(MeZO, eps=1e-2, directions=16), 150, 5e-3)],
    ids=["eggroll", "mezo"],
)
def test_torchvision_regnet_with_batchnorm_learns_digits(
    make_algorithm: Callable[[], Algorithm], steps: int, lr: float, one_thread, no_backprop
) -> None:
    """Held-out digits cross-entropy, in eval mode (so through the running statistics): EggRoll 2.302 -> 1.586
    (0.69x; seeds 1-4: 0.63-0.65x), MeZO 2.302 -> 1.673 (0.73x; seeds 1-4: 0.65-0.72x)."""
    pytest.importorskip("torchvision")
    pl.seed_everything(0)
    algorithm = make_algorithm()
    train, test = digit_images()
    module = DigitsCNN(lr=lr)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) >= 10

    def test_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(module(test.tensors[0]), test.tensors[1]))
        module.train()
        return loss

    before, initial = test_loss(), snapshot(module)
    statistics = OfficialPassStatistics()
    trainer = fit(module, algorithm, DataLoader(train, batch_size=64, shuffle=True), steps, callbacks=[statistics])
    after = test_loss()
    print(f"torchvision RegNet, {type(algorithm).__name__}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
    assert batched_evaluation(trainer)
    assert changed_parameters(module, initial) == set(initial)  # every convolution, norm and the head learned
    # the running statistics are those of the official passes at the unperturbed weights, step after step
    assert statistics.mismatches == []
    for norm in norms:
        assert int(norm.num_batches_tracked) == steps
        assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
        assert (norm.running_var > 0).all()


# --------------------------------------------------------------------------- nn.TransformerEncoder


class EncoderClassifier(pl.LightningModule):
    """Token embedding, a 2-layer ``nn.TransformerEncoder`` (batch first, PyTorch's defaults otherwise but no
    dropout) and a linear head on the mean over positions; Adam."""

    def __init__(self, vocab_size: int = 8, d_model: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        tokens, labels = batch
        self.log("val_loss", F.cross_entropy(self(tokens), labels))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def majority_task(samples: int, seed: int, vocab_size: int = 8, length: int = 16) -> TensorDataset:
    """Sequences of random tokens; the label says whether token 0 occurs more often than token 1."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (samples, length), generator=generator)
    return TensorDataset(tokens, ((tokens == 0).sum(1) > (tokens == 1).sum(1)).long())


class FastPathCalls:
    """Counts the calls of PyTorch's fused encoder-layer kernel (``nn.TransformerEncoderLayer``'s eval fast path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        kernel = torch._transformer_encoder_layer_fwd

        def counted(*args, **kwargs):
            self.calls += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted)


@pytest.mark.parametrize(
    "make_algorithm, steps",
    [(partial(EggRoll, population=32, sigma=1e-2), 30), (partial(MeZO, eps=1e-3, directions=8), 50)],
    ids=["eggroll", "mezo"],
)
def test_transformer_encoder_learns_a_sequence_task(
    make_algorithm: Callable[[], Algorithm], steps: int, one_thread, no_backprop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out cross-entropy (eval mode, PyTorch's fused fast path): EggRoll 0.632 -> 0.367 (0.58x; seeds 1-2:
    0.51-0.61x), MeZO 0.632 -> 0.386 (0.61x; seeds 1-2: 0.63-0.64x)."""
    pl.seed_everything(0)
    algorithm = make_algorithm()
    train, held_out = majority_task(512, seed=0), majority_task(256, seed=1)
    module = EncoderClassifier()

    def held_out_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(module(held_out.tensors[0]), held_out.tensors[1]))
        module.train()
        return loss

    fast_path = FastPathCalls(monkeypatch)
    before, initial = held_out_loss(), snapshot(module)
    assert fast_path.calls == 2  # one per layer: eval mode without gradients takes the fused kernel
    trainer = fit(
        module,
        algorithm,
        DataLoader(train, batch_size=64, shuffle=True),
        steps,
        val_loader=DataLoader(held_out, batch_size=64),
        limit_val_batches=1,
    )
    during_fit = fast_path.calls - 2
    after = held_out_loss()
    print(f"nn.TransformerEncoder, {type(algorithm).__name__}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
    assert during_fit >= 2 * 3  # validation after each of the 3 or more epochs ran on the fast path
    assert batched_evaluation(trainer)
    # MultiheadAttention's packed in_proj_weight and its out_proj (read by F.multi_head_attention_forward, not by
    # out_proj's own forward) learn like every other parameter
    assert changed_parameters(module, initial) == set(initial)


# --------------------------------------------------------------------------- Hugging Face causal LM


class TinyCausalLM(pl.LightningModule):
    """A randomly initialised ``transformers`` Llama (2 layers, width 64, grouped-query attention, tied input and
    output embeddings, as SmolLM2's) trained on its own next-token loss; Adam."""

    def __init__(self, vocab_size: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaConfig

        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        self.model = AutoModelForCausalLM.from_config(config)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def permutation_walks(samples: int, seed: int, vocab_size: int = 32, length: int = 24) -> Tensor:
    """Token sequences where each next token is a fixed permutation of the previous one (same permutation for every
    seed); the first token is random."""
    permutation = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))
    tokens = [torch.randint(0, vocab_size, (samples,), generator=torch.Generator().manual_seed(seed))]
    for _ in range(length - 1):
        tokens.append(permutation[tokens[-1]])
    return torch.stack(tokens, 1)


@pytest.mark.parametrize(
    "make_algorithm, steps, lr",
    [(partial(EggRoll, population=32, sigma=1e-2), 30, 2e-2), (partial(MeZO, eps=1e-3, directions=8), 60, 1e-2)],
    ids=["eggroll", "mezo"],
)
def test_transformers_llama_learns_next_tokens(
    make_algorithm: Callable[[], Algorithm], steps: int, lr: float, one_thread, no_backprop
) -> None:
    """Held-out next-token loss (log 32 = 3.466 for a uniform guess): EggRoll 3.516 -> 2.625 (0.75x; seeds 1-2:
    0.71-0.74x), MeZO 3.516 -> 2.661 (0.76x; seeds 1-4: 0.73-0.77x)."""
    pytest.importorskip("transformers")
    pl.seed_everything(0)
    algorithm = make_algorithm()
    module = TinyCausalLM(lr=lr)
    lm = module.model
    assert lm.config._attn_implementation == "sdpa"
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    held_out = permutation_walks(256, seed=1)

    def held_out_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss = float(lm(input_ids=held_out, labels=held_out).loss)
        module.train()
        return loss

    before, initial = held_out_loss(), snapshot(module)
    loader = DataLoader(TensorDataset(permutation_walks(512, seed=0)), batch_size=32, shuffle=True)
    trainer = fit(module, algorithm, loader, steps)
    after = held_out_loss()
    print(f"transformers Llama, {type(algorithm).__name__}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
    assert batched_evaluation(trainer)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied
    assert changed_parameters(module, initial) == set(initial)
