"""Convert a module's weights to low-bit storage in place; every other floating tensor to the compute dtype.

``nn.Linear`` and ``nn.Embedding`` weights (and their subclasses') become torchao low-bit tensors; weights already
quantized with torchao (``quantize_``) are adopted as they are. Vectors (biases, norms) and buffers take the
compute dtype (bf16) and are updated with stochastic rounding. Tied weights stay tied.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_nobp.lowbit.formats import (
    STORAGE_KIND,
    block_size_of,
    check_format,
    is_low_bit,
    layout_of,
    quantize_weight,
)

LATTICE_ATTRIBUTE = "nobp_lattice_threshold"
"""Set on ``int8_lattice`` weights: the standardized-update threshold past which a weight moves one grid step."""

EMBEDDING_FALLBACK = "fp8_e4m3"
"""Embeddings cannot run in fp4 through torchao (no ``aten.embedding`` for NVFP4/MX tensors); they take fp8."""


@dataclass
class ConversionResult:
    """What :func:`convert_to_low_bit` did.

    Args:
        replaced: ``id(old parameter) -> new parameter`` for every weight that changed object (an optimizer built
            before the conversion must be pointed at the new ones).
        formats: qualified weight name -> storage format, for converted and adopted weights.
        kept: qualified names of weights left in the compute dtype, with the reason.
    """

    replaced: dict[int, nn.Parameter] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def convert_to_low_bit(
    module: nn.Module,
    weights: str,
    ignore_modules: Sequence[str] = (),
    compute_dtype: torch.dtype = torch.bfloat16,
    activation_quantization: bool = False,
    lattice_threshold: float = 2.0,
) -> ConversionResult:
    """Convert ``module`` in place (see the module docstring).

    Args:
        module: the model.
        weights: the storage format (see ``lightning_nobp.lowbit.FORMATS``); ``"bf16"`` converts nothing to low bit.
        ignore_modules: qualified module names or ``fnmatch`` patterns (``"head"``, ``"blocks.*.attn"``) whose
            weights stay in the compute dtype.
        compute_dtype: dtype of the forward and of every tensor that is not low-bit.
        activation_quantization: fp8 and int8: quantize activations per row so ``F.linear`` runs ``torch._scaled_mm``
            (fp8) or ``torch._int_mm`` (int8).
        lattice_threshold: ``int8_lattice`` only: see :data:`LATTICE_ATTRIBUTE`.
    """
    check_format(weights)
    result = ConversionResult()
    new_of: dict[int, nn.Parameter] = {}
    not_divisible: list[str] = []
    for module_name, child in module.named_modules():
        if not isinstance(child, (nn.Linear, nn.Embedding)):
            continue
        weight = child._parameters.get("weight")
        qualified = f"{module_name}.weight" if module_name else "weight"
        if weight is None or _ignored(module_name, ignore_modules):
            if weight is not None:
                result.kept[qualified] = "ignored"
            continue
        if id(weight) in new_of:  # tied: already converted through another owner
            child._parameters["weight"] = new_of[id(weight)]
            continue
        if is_low_bit(weight):  # quantized by the user with torchao: adopt it as it is
            result.formats[qualified] = layout_of(weight).kind
            weight.requires_grad_(True)
            new_of[id(weight)] = weight
            continue
        if weights == "bf16":
            continue
        name = weights
        if isinstance(child, nn.Embedding) and STORAGE_KIND[name] in ("nvfp4", "mxfp4"):
            name = EMBEDDING_FALLBACK
        block = block_size_of(name)
        if weight.shape[1] % block:
            not_divisible.append(f"{qualified} (K={weight.shape[1]}, block {block})")
            result.kept[qualified] = f"K not divisible by {block}"
            continue
        stored = quantize_weight(weight, name, compute_dtype, activation_quantization)
        converted = nn.Parameter(stored, requires_grad=weight.requires_grad)
        if name == "int8_lattice":
            setattr(converted, LATTICE_ATTRIBUTE, lattice_threshold)
        new_of[id(weight)] = converted
        result.replaced[id(weight)] = converted
        result.formats[qualified] = name
        child._parameters["weight"] = converted
    for tensor in [*module.parameters(), *module.buffers()]:
        if not is_low_bit(tensor) and tensor.is_floating_point() and tensor.dtype != compute_dtype:
            tensor.data = tensor.data.to(compute_dtype)
    if not_divisible:
        warnings.warn(
            f"LowBitPrecision({weights!r}) keeps these weights in {compute_dtype} because their input size K is not"
            f" divisible by the format's block size: {', '.join(not_divisible)}. Pad K or choose a row format"
            " ('fp8_e4m3', 'int8') to store them in low bit.",
            stacklevel=2,
        )
    return result
