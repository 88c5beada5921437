"""``LowBitPrecision`` for Fabric: weights stored in FP8 / int8 / FP4 torchao tensors, no FP32 copy anywhere.

Pair it with ``NoBackpropStrategy``: forward-only training never needs a gradient or a master weight, so each
weight is stored once, in low bit, and updated in place by a fused kernel with stochastic rounding.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning_utilities import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nobp.kernels.lowbit_linear import LowBitLinearMode
from lightning_nobp.lowbit.compute_dtype import resolve_compute_dtype, training_device
from lightning_nobp.lowbit.convert import ConversionResult, convert_to_low_bit
from lightning_nobp.lowbit.formats import check_format, is_low_bit

_PRECISION_NAMES = {torch.bfloat16: "bf16-true", torch.float16: "16-true", torch.float32: "32-true"}

#: formats whose linear layers can run a quantized matmul on the stored data (``kernels/lowbit_linear.py``)
QUANTIZED_MATMUL_FORMATS = ("fp8_e4m3", "int8", "int8_lattice")


class LowBitPrecision(Precision):
    """Store ``nn.Linear`` and ``nn.Embedding`` weights in low bit; everything else in ``compute_dtype``.

    Args:
        weights: storage format of the weights: ``"fp8_e4m3"`` (torchao ``Float8Tensor``, 1 byte per weight),
            ``"int8"`` (``Int8Tensor``), ``"int8_lattice"`` (int8 moved by whole grid steps, EGGROLL's
            integer-only training), ``"nvfp4"`` (``NVFP4Tensor``, 0.56 bytes), ``"mxfp4"`` (``MXTensor``, 0.53
            bytes) or ``"bf16"`` (no low-bit storage, for comparison). Embeddings take fp8 under the fp4 formats.
        ignore_modules: qualified module names or ``fnmatch`` patterns (``"lm_head"``, ``"blocks.*.mlp"``) whose
            weights stay in ``compute_dtype``.
        compute_dtype: dtype of the forward computation, of vectors (biases, norms) and of buffers. ``None``
            (default): ``torch.bfloat16`` on CUDA and on CPUs with native BF16 arithmetic, ``torch.float32`` on other
            CPUs, where BF16 matrix products take a much slower path (the low-bit weights then dequantize to
            float32 inside each layer; ``weights="bf16"`` always computes in BF16).
        activation_quantization: fp8 and int8: also quantize activations per row so ``F.linear`` runs
            ``torch._scaled_mm`` on fp8 tensor cores (``torch._int_mm`` on int8 ones). ``None``: on when converting
            on a CUDA device (fp8: compute capability 8.9 or newer).
        lattice_threshold: ``"int8_lattice"`` only: a weight moves one grid step where its standardized update
            exceeds this many standard deviations.
    """

    def __init__(
        self,
        weights: str = "fp8_e4m3",
        ignore_modules: Sequence[str] | None = None,
        compute_dtype: torch.dtype | None = None,
        activation_quantization: bool | None = None,
        lattice_threshold: float = 2.0,
    ) -> None:
        self.weights = check_format(weights)
        self.ignore_modules = list(ignore_modules or [])
        if compute_dtype is not None and compute_dtype not in _PRECISION_NAMES:
            raise ValueError(
                f"compute_dtype={compute_dtype}: choose torch.bfloat16, torch.float16, torch.float32 or None (auto)"
            )
        self.compute_dtype = resolve_compute_dtype(self.weights, compute_dtype, training_device())
        self._automatic_compute_dtype = compute_dtype is None
        self.precision = _PRECISION_NAMES[self.compute_dtype]  # type: ignore[assignment]
        self.activation_quantization = activation_quantization
        if lattice_threshold <= 0:
            raise ValueError(f"lattice_threshold must be positive, got {lattice_threshold}")
        self.lattice_threshold = lattice_threshold
        #: the last conversion (formats per weight, weights kept in the compute dtype, replaced parameters)
        self.conversion: ConversionResult | None = None

    def _quantize_activations(self, module: nn.Module) -> bool:
        quantizable = self.weights in QUANTIZED_MATMUL_FORMATS
        if self.activation_quantization is not None:
            return self.activation_quantization and quantizable
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if not quantizable or device.type != "cuda":
            return False
        return self.weights != "fp8_e4m3" or torch.cuda.get_device_capability(device) >= (8, 9)

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert ``module``'s weights in place (and return it): low-bit weights, compute-dtype vectors.

        With the automatic compute dtype, weights the user quantized with torchao before keep the dtype they
        dequantize to, and the forward computes in it.
        """
        adopted = {p.dtype for p in module.parameters() if is_low_bit(p)}
        if self._automatic_compute_dtype and len(adopted) == 1 and adopted != {self.compute_dtype}:
            (self.compute_dtype,) = adopted
            self.precision = _PRECISION_NAMES.get(self.compute_dtype, self.precision)  # type: ignore[assignment]
        self.conversion = convert_to_low_bit(
            module,
            self.weights,
            self.ignore_modules,
            self.compute_dtype,
            self._quantize_activations(module),
            self.lattice_threshold,
        )
        self._warn_without_fp4_matmul(module)
        return module

    def _warn_without_fp4_matmul(self, module: nn.Module) -> None:
        """Say once what FP4 weights do on a device without an FP4 matmul (anything but an NVIDIA Blackwell GPU)."""
        if self.weights not in ("nvfp4", "mxfp4"):
            return
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0):
            return
        rank_zero_warn(
            f"lightning_nobp: {self.weights} weights on {device.type}: this device has no FP4 matmul (an NVIDIA"
            " Blackwell GPU, compute capability 10.0, has one), so each layer dequantizes its weight to"
            f" {self.compute_dtype} in the forward. The weights take about half a byte each in memory and train as"
            " FP4, but forwards are no faster than bf16 (slower on the CPU). For speed on this device use"
            " LowBitPrecision('fp8_e4m3') (FP8 tensor cores on compute capability 8.9 and newer).",
            category=UserWarning,
        )

    def point_optimizer_at_converted(self, optimizer: Optimizer) -> None:
        """Replace, in an optimizer built before :meth:`convert_module`, the parameters the conversion replaced."""
        replaced = self.conversion.replaced if self.conversion is not None else {}
        if not replaced:
            return
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(id(param), param) for param in group["params"]]

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.compute_dtype)

    def module_init_context(self) -> AbstractContextManager:
        """Build modules in ``compute_dtype`` (never FP32); ``convert_module`` then stores the weights in low bit."""
        return self.tensor_init_context()

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """No autograd graph, tensors created in the forward in ``compute_dtype``; with fp8 weights, ``F.linear``
        on them runs the FP8 matmul of ``lightning_nobp.kernels.fp8_linear`` (outside compiled code, whose member
        layers call it directly)."""
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(_DtypeContextManager(self.compute_dtype))
            if self.weights in QUANTIZED_MATMUL_FORMATS and not torch.compiler.is_compiling():
                stack.enter_context(LowBitLinearMode())
            yield

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.compute_dtype)

    def convert_output(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype())
