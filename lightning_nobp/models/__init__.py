"""Reference models used by the recipes and benchmarks (one model per file)."""

from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.models.mlp import MLPClassifier

__all__ = ["GPT", "GPTConfig", "MLPClassifier"]
