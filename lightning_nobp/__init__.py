"""lightning_nobp: train unmodified Lightning models with forward passes only (no backpropagation).

``Trainer(strategy=NoBackpropStrategy(algorithm=MeZO()))`` or ``Trainer(strategy="nobp_mezo")`` after
``import lightning_nobp``; ``plugins=[LowBitPrecision("fp8_e4m3")]`` stores the weights in FP8.
"""

from lightning_nobp.__about__ import __version__
from lightning_nobp.generation import generate_population, score_completions
from lightning_nobp.algorithms.extras import EstimatorExtras
from lightning_nobp.options import CpuTuning, ExecutionOptions
from lightning_nobp.pytorch import LowBitPrecision, NoBackpropStrategy
from lightning_nobp.callbacks import replay
from lightning_nobp.registry import register_strategies

register_strategies()

__all__ = [
    "CpuTuning",
    "EstimatorExtras",
    "ExecutionOptions",
    "LowBitPrecision",
    "NoBackpropStrategy",
    "__version__",
    "generate_population",
    "replay",
    "score_completions",
]
