"""``memory_report(model)``: how many bytes each storage format of a model's weights takes, per weight and in all."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_nobp.lowbit.formats import inner_tensors, is_low_bit, layout_of


def storage_name(tensor: Tensor) -> str:
    """``"fp8_e4m3"``, ``"int8"``, ``"nvfp4"``, ``"mxfp4"`` for low-bit weights, else the dtype (``"bfloat16"``)."""
    if is_low_bit(tensor):
        return layout_of(tensor).kind
    return str(tensor.dtype).removeprefix("torch.")


def storage_bytes(tensor: Tensor) -> int:
    """Bytes a tensor stores: the sum over a low-bit weight's inner tensors (data and scales)."""
    if is_low_bit(tensor):
        return sum(inner.numel() * inner.element_size() for inner in inner_tensors(tensor).values())
    return tensor.numel() * tensor.element_size()


@dataclass
class FormatUsage:
    """Weights stored in one format.

    Args:
        tensors: how many tensors.
        elements: how many weights (logical elements).
        bytes: bytes stored, scales included.
    """

    tensors: int = 0
    elements: int = 0
    bytes: int = 0

    @property
    def bytes_per_element(self) -> float:
        return self.bytes / self.elements if self.elements else 0.0


@dataclass
class MemoryReport:
    """Bytes per weight by storage format, with totals; ``print(report)`` shows a table.

    Args:
        formats: usage of every format among parameters and buffers.
    """

    formats: dict[str, FormatUsage] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(usage.bytes for usage in self.formats.values())

    @property
    def total_elements(self) -> int:
        return sum(usage.elements for usage in self.formats.values())

    def as_metrics(self, prefix: str = "memory/") -> dict[str, float]:
        """Flat scalars for a logger: bytes per weight of each format and the totals."""
        metrics = {f"{prefix}{name}_bytes_per_weight": usage.bytes_per_element for name, usage in self.formats.items()}
        metrics[f"{prefix}total_bytes"] = float(self.total_bytes)
        metrics[f"{prefix}bytes_per_weight"] = self.total_bytes / max(self.total_elements, 1)
        return metrics

    def __str__(self) -> str:
        lines = [f"{'format':<12}{'tensors':>9}{'weights':>14}{'MiB':>11}{'bytes/weight':>14}"]
        for name, usage in sorted(self.formats.items(), key=lambda item: -item[1].bytes):
            lines.append(
                f"{name:<12}{usage.tensors:>9}{usage.elements:>14,}{usage.bytes / 2**20:>11.2f}"
                f"{usage.bytes_per_element:>14.4f}"
            )
        total = self.total_bytes / max(self.total_elements, 1)
        lines.append(f"{'total':<12}{'':>9}{self.total_elements:>14,}{self.total_bytes / 2**20:>11.2f}{total:>14.4f}")
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes of every parameter and buffer of ``model`` by storage format (tied tensors once).

    Args:
        model: any module, converted by ``LowBitPrecision`` or not.
    """
    report = MemoryReport()
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        usage = report.formats.setdefault(storage_name(tensor), FormatUsage())
        usage.tensors += 1
        usage.elements += tensor.numel()
        usage.bytes += storage_bytes(tensor)
    return report
