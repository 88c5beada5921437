"""Reference models used by the recipes and benchmarks (one model per file)."""

from lightning_nobp.models.bits_per_byte import BitsPerByte
from lightning_nobp.models.byte_lm import ByteLanguageModel, GPTLanguageModel
from lightning_nobp.models.causal_lm import CausalLanguageModel
from lightning_nobp.models.causal_lm_classifier import CausalLMClassifier
from lightning_nobp.models.generating_lm import ExactMatchLM
from lightning_nobp.models.gpt import GPT, GPTConfig
from lightning_nobp.models.mlp import MLPClassifier
from lightning_nobp.models.ngram import ByteNGramModel

__all__ = [
    "GPT",
    "BitsPerByte",
    "ByteLanguageModel",
    "ByteNGramModel",
    "CausalLMClassifier",
    "CausalLanguageModel",
    "ExactMatchLM",
    "GPTConfig",
    "GPTLanguageModel",
    "MLPClassifier",
]
