"""Low-bit weight storage in torchao's tensor subclasses: formats, module conversion, updates, memory report."""

from lightning_nobp.lowbit.convert import ConversionResult, convert_to_low_bit
from lightning_nobp.lowbit.formats import FORMATS, is_low_bit, layout_of, quantize_weight
from lightning_nobp.lowbit.memory import MemoryReport, memory_report
from lightning_nobp.lowbit.update import apply_low_bit_update, apply_low_bit_updates, lattice_update

__all__ = [
    "FORMATS",
    "ConversionResult",
    "MemoryReport",
    "apply_low_bit_update",
    "apply_low_bit_updates",
    "convert_to_low_bit",
    "is_low_bit",
    "lattice_update",
    "layout_of",
    "memory_report",
    "quantize_weight",
]
