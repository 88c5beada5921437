"""``LowBitPrecision`` for the Trainer: the Fabric plugin with the Trainer's precision hooks (checkpoint hooks,
step contexts). Weights are stored in FP8 / int8 / FP4 torchao tensors with no FP32 copy."""

from __future__ import annotations

from lightning.pytorch.plugins.precision import Precision

from lightning_nobp.fabric.precision import LowBitPrecision as _FabricLowBitPrecision


class LowBitPrecision(_FabricLowBitPrecision, Precision):
    """Store ``nn.Linear`` and ``nn.Embedding`` weights in low bit; everything else in ``compute_dtype``.

    ``Trainer(strategy=NoBackpropStrategy(...), plugins=[LowBitPrecision("fp8_e4m3")])``. The strategy then
    updates the low-bit weights in place (``update="direct"``) with the optimizer's lr and weight decay.

    Args:
        weights: ``"fp8_e4m3"``, ``"int8"``, ``"int8_lattice"``, ``"nvfp4"``, ``"mxfp4"`` or ``"bf16"``
            (see ``lightning_nobp.fabric.LowBitPrecision``).
        ignore_modules: qualified module names or ``fnmatch`` patterns whose weights stay in ``compute_dtype``.
        compute_dtype: dtype of the forward, of vectors (biases, norms) and of buffers; ``None``: BF16 where the
            device multiplies it natively (CUDA, CPUs with AVX-512 BF16 or AMX), float32 on other CPUs.
        activation_quantization: fp8 and int8: quantize activations per row for ``torch._scaled_mm`` (fp8) or
            ``torch._int_mm`` (int8); ``None``: on CUDA devices (fp8: compute capability 8.9 or newer).
        lattice_threshold: ``"int8_lattice"``: standardized-update threshold for a one-step move.
    """
