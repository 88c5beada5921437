"""``NoBackpropStrategy`` for Fabric: a Fabric loop trains by forward passes after one change.

The change is ``optimizer.step()`` → ``optimizer.step(closure)``: the strategy calls the closure once per member
of the algorithm's population at perturbed weights (``fabric.backward`` inside it does nothing), writes the
gradient estimate into ``p.grad`` and lets the user's optimizer step. ``fabric.backward(loss)`` outside such a
closure raises an error that shows the change.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nobp.algorithms import Algorithm, MeZO, derive_seed
from lightning_nobp.fabric.precision import LowBitPrecision
from lightning_nobp.gc_freeze import StartupObjectsFreeze
from lightning_nobp.options import CpuTuning, ExecutionOptions, check_group
from lightning_nobp.pytorch.checkpoint_io import SealedCheckpointIO
from lightning_nobp.lowbit.formats import inner_tensors, is_low_bit
from lightning_nobp.engine import (
    DirectStep,
    ForwardOnlyEngine,
    ForwardOnlyStrategyMixin,
    UpdatePath,
    register_aliases,
)
from lightning_nobp.perturb.step_limit import DEFAULT_STEP_LIMIT

FABRIC_CLOSURE_MESSAGE = (
    "NoBackpropStrategy trains without backpropagation: `fabric.backward(loss)` cannot compute gradients on its own."
    " Wrap the loss computation in a closure and pass it to the optimizer (the one-line change):\n"
    "    def closure():\n        loss = loss_fn(model(x), y)\n        fabric.backward(loss)\n        return loss\n"
    "    optimizer.step(closure)   # instead of: fabric.backward(loss); optimizer.step()"
)


class NoBackpropStrategy(ForwardOnlyStrategyMixin, DDPStrategy):
    """Fabric strategy that replaces backpropagation by a forward-only estimate, on one device or many processes.

    On one device a Fabric script runs with or without ``fabric.launch()``, as with Fabric's single-device
    strategies; several devices need ``fabric.launch()`` (or ``fabric run``), as for any DDP-family strategy.

    Args:
        algorithm: the forward-only estimator; ``MeZO()`` when omitted.
        update: ``"grad"`` (the estimate goes into ``p.grad`` and the user's optimizer steps) or ``"direct"``
            (applied in place as the optimizer's ``torch.optim.SGD``, ``Adam`` or ``AdamW`` step, whose state stays
            in the optimizer; no gradient buffers).
            ``None`` (default): ``"direct"`` when ``LowBitPrecision`` stores weights in low bit, else ``"grad"``.
        direct_step: ``"sgd"`` or ``"normalized"`` (each tensor's estimate divided by its root-mean-square, so
            ``lr`` is the typical change of one weight per step, with no optimizer state).
        compile: evaluate the batched population under ``torch.compile`` (the closure traced through the member
            layers). ``None`` (default): on when the parameters are on a CUDA device. Falls back to eager
            evaluation, with one warning that names the reason, when the closure cannot be compiled.
        step_limit: bound on each step's change of each tensor, relative to the tensor's norm (a trust ratio,
            scaled down as 1/sqrt(weights) beyond 10,000 perturbation-estimated weights): a learning rate tuned for
            backpropagation does not diverge on the forward-only estimate; steps within the bound are untouched,
            Adam's and the normalized direct step are left alone
            (``lightning_nobp.perturb.step_limit``). Logged as
            ``nobp/step_limited`` (tensors scaled down in the step); ``None`` turns it off.
        seed: base seed of every perturbation. ``None`` takes ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0.
        execution: how the members are evaluated (:class:`~lightning_nobp.ExecutionOptions`: batching, fused
            kernels); ``None``: the defaults. A Fabric closure is evaluated on the whole batch, without reuse.
        cpu_tuning: opt-in process-wide CPU tunings from module setup to teardown (:class:`~lightning_nobp.CpuTuning`);
            ``None``: none.
        accelerator: see ``lightning.fabric.strategies.DDPStrategy``.
        parallel_devices: see ``DDPStrategy``.
        cluster_environment: see ``DDPStrategy``.
        checkpoint_io: see ``DDPStrategy``.
        precision: see ``DDPStrategy``.
        process_group_backend: ``"gloo"`` or ``"nccl"``; chosen from the device when omitted.
        timeout: timeout of collective operations.
        start_method: how extra processes start: ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``.
    """

    def __init__(
        self,
        algorithm: Algorithm | None = None,
        update: UpdatePath | None = None,
        direct_step: DirectStep = "sgd",
        compile: bool | None = None,
        step_limit: float | None = DEFAULT_STEP_LIMIT,
        seed: int | None = None,
        execution: ExecutionOptions | None = None,
        cpu_tuning: CpuTuning | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            # fault tolerance: atomic, durable checkpoint writes with a verified content digest
            checkpoint_io=checkpoint_io if checkpoint_io is not None else SealedCheckpointIO(),
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        check_group("NoBackpropStrategy", "execution", execution, ExecutionOptions)
        check_group("NoBackpropStrategy", "cpu_tuning", cpu_tuning, CpuTuning)
        execution = execution if execution is not None else ExecutionOptions()
        if execution.member_data != "shared" or execution.reuse_official_pass:
            raise ValueError(
                f"{execution!r}: Fabric's NoBackpropStrategy evaluates the closure on the whole batch and never"
                " reuses it; member_data='pair_slices' and reuse_official_pass=True are Trainer options. Leave"
                " them at their defaults."
            )
        self.execution = execution
        self.cpu_tuning = cpu_tuning
        self.engine = ForwardOnlyEngine(
            algorithm if algorithm is not None else MeZO(), update, execution.population_batching, direct_step,
            compile, execution.fused_kernels, step_limit,
        )
        if self.engine.local:
            raise ValueError(
                f"{self.engine.algorithm!r} drives the model's layers on data it builds from each batch, which a"
                " Fabric closure cannot provide: use the Trainer's NoBackpropStrategy for local learning."
            )
        self._seed = seed
        self.reuse_cpu_memory = cpu_tuning is not None and cpu_tuning.reuse_memory
        self._startup_objects = StartupObjectsFreeze()
        #: optimizer steps taken so far; part of every perturbation's seed (save it to resume bit-exactly)
        self.steps = 0
        #: the estimate's statistics of the last step (``projected_grad``, ``loss_spread``, ...), for logging
        self.last_metrics: dict[str, float] = {}
        self._modules: list[nn.Module] = []

    def setup_environment(self) -> None:
        self._prepare_cpu_memory(self.root_device)
        if self._single_process:
            self.accelerator.setup_device(self.root_device)
            self._set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            return
        super().setup_environment()

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        """Point optimizers built before ``LowBitPrecision`` converted the module at the converted weights."""
        if isinstance(self.precision, LowBitPrecision):
            for optimizer in optimizers:
                self.precision.point_optimizer_at_converted(optimizer)
        return super().setup_module_and_optimizers(module, optimizers, scheduler)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if isinstance(self.precision, LowBitPrecision):
            self.precision.point_optimizer_at_converted(optimizer)
        return super().setup_optimizer(optimizer)

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Keep the module as it is (no DDP wrapper: no gradients are exchanged); align ranks' initial weights."""
        if dist.is_available() and dist.is_initialized():
            for tensor in list(module.parameters()) + list(module.buffers()):
                for part in inner_tensors(tensor).values() if is_low_bit(tensor) else [tensor.data]:
                    dist.broadcast(part, src=0)
        self._modules.append(module)
        self.engine.resolve_update(self._modules)
        self.engine.reset()
        if self.cpu_tuning is not None and self.cpu_tuning.freeze_startup_objects:
            self._startup_objects.freeze()
        return module

    def teardown(self) -> None:
        self._startup_objects.release()
        self._restore_cpu_memory()
        self.engine.release()  # the user's modules get their own forwards back
        super().teardown()

    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        if self.engine.evaluating:
            return None
        raise RuntimeError(FABRIC_CLOSURE_MESSAGE)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Evaluate ``closure`` at every member's perturbed weights, write the estimate, step; returns the loss."""
        if closure is None:
            raise RuntimeError(FABRIC_CLOSURE_MESSAGE)
        loss, estimate = self.engine.closure_step(
            optimizer, self._modules, closure, derive_seed(self.seed, self.steps), self.root_device
        )
        self.steps += 1
        self.last_metrics = dict(
            estimate.stats, forwards_per_step=self.algorithm.forwards_per_step, skipped_steps=self.skipped_steps
        )
        if not estimate.skipped and self.engine.update == "grad":
            self.precision.optimizer_step(optimizer, **kwargs)
        return loss

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._single_process and type(self) is NoBackpropStrategy:
            # one process: Fabric accepts it without launch(), as its single-device strategies
            self.__class__ = OneProcessNoBackpropStrategy

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_aliases(strategy_registry, cls)


class OneProcessNoBackpropStrategy(NoBackpropStrategy):
    """:class:`NoBackpropStrategy` once Fabric has configured it for one process on one device: a virtual
    ``SingleDeviceStrategy``, so Fabric neither requires ``launch()`` nor asks for gradient synchronisation."""


SingleDeviceStrategy.register(OneProcessNoBackpropStrategy)
