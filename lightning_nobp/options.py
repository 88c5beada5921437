"""The strategies' option groups: how the population is evaluated (``ExecutionOptions``) and the opt-in CPU tunings
(``CpuTuning``). What a user chooses (algorithm, update path, seed, compile) stays in the strategies' constructors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MEMBER_DATA = ("shared", "pair_slices")


@dataclass(frozen=True)
class ExecutionOptions:
    """How the members are evaluated; the defaults suit almost every run.

    ``population_batching`` evaluates the members together in one batched forward (``torch.func.vmap`` over the
    user's code; activation memory grows with the members per chunk, see ``population_chunk`` of the evolution
    strategies) and falls back to one member at a time, with one warning, when the code cannot be batched
    (``.item()``, data-dependent control flow). ``fused_kernels`` sends bf16 and float32 weights through the fused
    kernels of ``lightning_nobp.kernels.dense_update``: dense noise from Philox streams with one layer's perturbed
    copy per member (MeZO and OpenES at inference memory) and one pass per weight for the update; on the CPU their
    PyTorch twins run, slower. ``member_data="pair_slices"`` splits the batch (a tensor or a tuple/list/dict of
    tensors sharing their first dimension) into one slice per antithetic pair: more data per step for the same
    forward cost; the official pass still sees the whole batch. ``reuse_official_pass`` evaluates the official
    ``training_step`` at the first member's weights and reuses its loss (one forward less; the logged loss is then
    measured at the perturbed weights); by default only where it spares a whole forward (members evaluated one at a
    time, or a population of 2).

    Args:
        population_batching: evaluate the population's members together in one batched forward.
        fused_kernels: fused Philox-noise and update kernels for bf16/float32 weights; ``None``: on CUDA only.
        member_data: ``"shared"`` (every member sees the whole batch) or ``"pair_slices"`` (a slice per pair).
        reuse_official_pass: reuse the official pass as the first member's fitness; ``None``: where it saves a forward.
    """

    population_batching: bool = True
    fused_kernels: bool | None = None
    member_data: Literal["shared", "pair_slices"] = "shared"
    reuse_official_pass: bool | None = None

    def __post_init__(self) -> None:
        if self.member_data not in MEMBER_DATA:
            raise ValueError(f"ExecutionOptions(member_data={self.member_data!r}): choose one of {MEMBER_DATA}")


@dataclass(frozen=True)
class CpuTuning:
    """Opt-in, process-wide CPU tunings, applied while training runs and undone when it ends.

    ``reuse_memory`` makes glibc's ``malloc`` keep freed memory in the process (up to 512 MiB) instead of returning
    it to the kernel, so a population's large activations are not page-faulted in again at every step
    (``benchmarks/micro/cpu_allocator.py`` measures it); glibc's defaults come back when training ends.
    ``freeze_startup_objects`` keeps Python's full garbage collections away from the objects that existed when
    training started (``gc.freeze()``, undone when it ends; left alone when objects were frozen already): after
    importing Lightning a full collection visits some 520,000 objects, which small steps feel.

    Args:
        reuse_memory: let glibc's malloc keep freed memory in the process while training runs.
        freeze_startup_objects: keep full garbage collections away from the startup objects while training runs.
    """

    reuse_memory: bool = True
    freeze_startup_objects: bool = True


def check_group(owner: str, name: str, value: object, group: type) -> None:
    """A clear error when an option group argument is not an instance of its dataclass.

    Args:
        owner: the class whose argument it is, for the message.
        name: the argument's name.
        value: what was passed.
        group: the option group's dataclass.
    """
    if value is not None and not isinstance(value, group):
        raise TypeError(
            f"{owner}({name}={value!r}): pass {group.__name__}(...) from lightning_nobp (or leave it out for the"
            " defaults)"
        )
