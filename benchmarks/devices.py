"""Device helpers shared by the benchmark scripts: synchronising, peak memory, names, freeing memory."""

from __future__ import annotations

import gc
import platform

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """The CUDA allocator's peak since the last reset; ``None`` on devices without one."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    """A human-readable name of the device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def free_memory() -> None:
    """Release what the previous measurement left (garbage, cached CUDA blocks) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
