"""The state and steps that the Fabric and Trainer strategies share: one ``ForwardOnlyEngine`` per strategy.

It owns a :class:`~lightning_nobp.perturb.PopulationEstimator` per optimizer, all-reduces fitness scalars
between processes (counting the bytes), writes the estimate through the ``.grad`` path or applies it directly,
and runs a whole step from a user's optimizer closure (Fabric, and the Trainer's manual optimization).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nobp.cpu_allocator import keep_freed_cpu_memory, restore_cpu_memory_defaults
from lightning_nobp.lowbit.formats import is_low_bit
from lightning_nobp.algorithms import (
    Algorithm,
    EggRoll,
    Estimate,
    ForwardGradient,
    MeZO,
    OpenES,
    Population,
    derive_seed,
)
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator, RngSnapshot, scalar_loss
from lightning_nobp.perturb.estimator import LossFn, MemberInputs
from lightning_nobp.perturb.direct_step import DirectHyperparameters
from lightning_nobp.perturb.objective import objective_of
from lightning_nobp.perturb.step_limit import DEFAULT_STEP_LIMIT, check_step_limit, size_scaled_limit, step_factor
from lightning_nobp.algorithms.local import ForwardForward, LocalLearning
from lightning_nobp.perturb.jvp import directional_derivatives
from lightning_nobp.perturb.local import LocalLearner

UpdatePath = Literal["grad", "direct"]
UPDATE_PATHS = ("grad", "direct")
DirectStep = Literal["sgd", "normalized"]
DIRECT_STEPS = ("sgd", "normalized")
ROUNDING_STREAM = 0x5EED  # separates the stochastic-rounding seeds from the noise seeds
#: what :meth:`ForwardOnlyEngine.write` tells its observers: optimizer, ``(population, coefficients)`` terms, step
#: seed and the on-device gate (``None`` off the device)
WriteObserver = Callable[[Optimizer, Sequence[tuple[Population, Tensor]], int, "Tensor | None"], None]


#: the string aliases registered in the Trainer's and Fabric's strategy registries: name -> (algorithm, description)
STRATEGY_ALIASES: dict[str, tuple[Callable[[], Algorithm | LocalLearning], str]] = {
    "nobp_mezo": (MeZO, "Forward-only training with MeZO (two-sided SPSA), lightning_nobp"),
    "nobp_eggroll": (EggRoll, "Forward-only training with EggRoll (low-rank evolution strategies), lightning_nobp"),
    "nobp_openes": (OpenES, "Forward-only training with OpenES (full-rank evolution strategies), lightning_nobp"),
    "nobp_fgrad": (ForwardGradient, "Training with forward gradients (forward-mode JVP, no backward), lightning_nobp"),
    "nobp_ff": (ForwardForward, "Local learning with Forward-Forward (per-layer goodness), lightning_nobp"),
}


def register_aliases(strategy_registry: Any, strategy_class: type) -> None:
    """Register every ``STRATEGY_ALIASES`` entry for ``strategy_class`` (idempotent).

    Args:
        strategy_registry: Lightning's ``StrategyRegistry`` or Fabric's ``STRATEGY_REGISTRY``.
        strategy_class: the Trainer or Fabric ``NoBackpropStrategy``.
    """
    for name, (make_algorithm, description) in STRATEGY_ALIASES.items():
        strategy_registry.register(
            name, strategy_class, description=description, override=True, algorithm=make_algorithm()
        )


def trainable_parameters(optimizer: Optimizer) -> list[Tensor]:
    """The optimizer's parameters that require grad, each once, in param-group order."""
    params: list[Tensor] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


#: the optimizers whose step the direct path applies itself (their state in the optimizer's own keys)
DIRECT_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_direct_update_optimizer(optimizer: Optimizer) -> None:
    """The direct path applies ``torch.optim.SGD``'s, ``Adam``'s or ``AdamW``'s step itself (with their settings and
    their state's keys): refuse optimizers and settings it would betray."""
    groups = optimizer.param_groups
    unsupported = [key for key in ("maximize", "amsgrad") if any(group.get(key, False) for group in groups)]
    if type(optimizer) not in DIRECT_OPTIMIZERS or unsupported:
        what = type(optimizer).__name__ + (f" with {', '.join(unsupported)}=True" if unsupported else "")
        raise ValueError(
            f"update='direct' applies the step of torch.optim.SGD (lr, weight decay, momentum), Adam or AdamW (lr,"
            f" betas, eps, weight decay; moments in the optimizer's state, bf16 for low-bit weights) in place;"
            f" {what} cannot be honoured. Use one of those (without maximize or amsgrad) or update='grad' (costs"
            " one gradient buffer)."
        )


class PeerLostError(RuntimeError):
    """A collective of the forward-only step failed: another process died or timed out."""


class ForwardOnlyEngine:
    """Estimators, collectives and update paths shared by the Trainer and Fabric strategies.

    Args:
        algorithm: the forward-only estimator.
        update: ``"grad"`` writes the estimate into ``p.grad`` for the user's optimizer; ``"direct"`` applies it
            in place (the optimizer's SGD step: lr, weight decay, momentum; stochastic rounding below fp32) and
            keeps no gradient buffers, so training memory equals inference memory.
        direct_step: the direct path's step: ``"sgd"`` (``w -= lr * estimate``) or ``"normalized"`` (each
            tensor's estimate divided by its root-mean-square first, so ``lr`` is the typical change of a weight,
            as with Adam, with no optimizer state).
        population_batching: evaluate several members in one batched forward (``torch.func.vmap``) where the
            user's code allows it; falls back to one member at a time with a warning.
        compile: evaluate the population under ``torch.compile`` (``None``: where the parameters are on a CUDA
            device); falls back to eager evaluation with a warning where the user's code cannot be compiled.
        fused_kernels: bf16 and float32 weights take the fused kernels (``lightning_nobp.kernels.dense_update``):
            dense noise from Philox streams with one layer's perturbed copy per member (MeZO and OpenES at
            inference memory), one pass per weight for the update, and, for a direct update without momentum,
            per-row estimates or input subspaces, a step with no host synchronisation. ``None`` (default): on when
            the parameters are on a CUDA device (on the CPU the kernels' PyTorch twins run, slower).
        step_limit: bound on each SGD step's change of each tensor, relative to the tensor's norm (a trust ratio,
            scaled down beyond 10,000 perturbation-estimated weights: ``lightning_nobp.perturb.step_limit``): a
            backprop-tuned learning rate does not diverge, steps within the bound are untouched; Adam's and the
            normalized direct step are left alone. ``None`` turns it off.
    """

    def __init__(
        self,
        algorithm: Algorithm | LocalLearning,
        update: UpdatePath | None = None,
        population_batching: bool = True,
        direct_step: DirectStep = "sgd",
        compile: bool | None = None,
        fused_kernels: bool | None = None,
        step_limit: float | None = DEFAULT_STEP_LIMIT,
    ) -> None:
        if direct_step not in DIRECT_STEPS:
            raise ValueError(f"direct_step={direct_step!r}: choose one of {DIRECT_STEPS}")
        self.direct_step = direct_step
        if update is not None and update not in UPDATE_PATHS:
            raise ValueError(f"update={update!r}: choose one of {UPDATE_PATHS}")
        if isinstance(algorithm, LocalLearning) and update not in (None, "grad"):
            raise ValueError(
                f"{type(algorithm).__name__} writes each layer's local gradient into .grad: use update='grad'"
            )
        self.algorithm = algorithm
        #: what the user asked for (``None``: decided by :meth:`resolve_update`)
        self.requested_update = update
        self.update: UpdatePath = update or "grad"
        self.population_batching = population_batching
        self.compile = compile
        self.fused_kernels = fused_kernels
        self.step_limit = check_step_limit(step_limit)
        #: how many tensors the step limit scaled down in the last step (a tensor after an on-device step)
        self.step_limited: int | Tensor = 0
        self._warned_step_limit = False
        self._relative_bound = self.step_limit  # the last size-scaled bound applied (named in the warning)
        self.skipped_steps = 0
        #: steps skipped by on-device steps (a tensor counted on the device, read when logged)
        self.skipped_on_device: Tensor | None = None
        #: bytes this process sent through collectives for its estimates (fitness scalars only)
        self.communicated_bytes = 0
        #: True while a user closure is re-evaluated (its backward call must then do nothing)
        self.evaluating = False
        self._estimators: dict[int, PopulationEstimator] = {}
        self._learners: dict[int, LocalLearner] = {}
        #: called with ``(optimizer, terms, step_seed, applies)`` by :meth:`write` before it writes (a seed log)
        self.write_observers: list[WriteObserver] = []

    @property
    def local(self) -> bool:
        """Whether the algorithm is a per-layer local rule (``ForwardForward``, ``MonoForward``)."""
        return isinstance(self.algorithm, LocalLearning)

    def learner(self, optimizer: Optimizer, root: nn.Module) -> LocalLearner:
        """The local learner of ``optimizer``'s layers (built once per optimizer)."""
        learner = self._learners.get(id(optimizer))
        if learner is None:
            assert isinstance(self.algorithm, LocalLearning)
            if self.update != "grad":
                raise ValueError(
                    f"{type(self.algorithm).__name__} writes each layer's local gradient into .grad, which low-bit"
                    " weights (LowBitPrecision) do not have: train them with MeZO, EggRoll or ForwardGradient."
                )
            learner = LocalLearner(self.algorithm, root, trainable_parameters(optimizer))
            self._learners[id(optimizer)] = learner
        return learner

    def resolve_update(self, modules: Iterable[nn.Module]) -> UpdatePath:
        """Pick the update path once the model is converted: ``"direct"`` when any weight is stored in low bit
        (it has no gradient buffer), else what the user asked for (``"grad"`` by default).

        Raises:
            ValueError: ``update="grad"`` was asked for with low-bit weights.
        """
        low_bit = any(is_low_bit(p) for module in modules for p in module.parameters())
        if low_bit and self.requested_update == "grad":
            raise ValueError(
                "update='grad' cannot train low-bit weights (LowBitPrecision): they have no gradient buffer and are"
                " updated in place. Use NoBackpropStrategy(update='direct'), or leave `update` unset."
            )
        self.update = "direct" if low_bit else (self.requested_update or "grad")
        return self.update

    def release(self) -> None:
        """Give the modules their own forwards back (training ended); the estimators stay for inspection and
        reinstall their member layers if used again."""
        for estimator in self._estimators.values():
            estimator.close()

    def reset(self) -> None:
        """Forget the estimators (the modules or optimizers changed) and give the modules their own forwards back."""
        self.release()
        self._estimators.clear()
        self._learners.clear()

    def estimator(self, optimizer: Optimizer, roots: Iterable[nn.Module]) -> PopulationEstimator:
        """The estimator of ``optimizer``'s trainable parameters (built once per optimizer)."""
        estimator = self._estimators.get(id(optimizer))
        if estimator is None:
            roots = list(roots)
            if self.update == "direct":
                check_direct_update_optimizer(optimizer)
            names = {id(p): n for m in roots for n, p in m.named_parameters(remove_duplicate=False)}
            params = trainable_parameters(optimizer)
            on_cuda = all(p.device.type == "cuda" for p in params)
            compile = self.compile if self.compile is not None else on_cuda
            fused = self.fused_kernels if self.fused_kernels is not None else on_cuda
            options = EstimatorOptions.of(self.algorithm, self._world()[1], compile=compile, fused=fused)
            estimator = PopulationEstimator(
                self.algorithm, roots, params, [names.get(id(p), "?") for p in params], options
            )
            self._estimators[id(optimizer)] = estimator
        return estimator

    def estimator_state(self, optimizer: Optimizer) -> dict[str, Any] | None:
        """The checkpointable state of ``optimizer``'s estimator (its input subspaces), ``None`` if it has none."""
        estimator = self._estimators.get(id(optimizer))
        return None if estimator is None else estimator.input_subspace_state()

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def own_members(self, population: Population) -> list[int]:
        """The members this process evaluates.

        Unsharded algorithms (MeZO): every member, on every process. Sharded ones (ES): members sharing a noise
        seed (antithetic pairs) stay together and the groups are dealt to the processes in turn.
        """
        rank, world = self._world()
        if world == 1 or not self.algorithm.shards_population:
            return list(range(len(population)))
        own = [index for index, group in enumerate(population.groups()) if group % world == rank]
        return own

    def share_fitness(self, fitness: Tensor, device: torch.device) -> Tensor:
        """Every process's fitness vector, combined: one all-reduce of ``P`` floats, whatever the model size.

        Unsharded: the mean over processes (each evaluated every member on its own data). Sharded: each entry
        comes from the one process that evaluated it (the others hold 0).
        """
        rank, world = self._world()
        if world == 1:
            return fitness
        on_device = fitness.to(device)
        self.communicated_bytes += on_device.numel() * on_device.element_size()
        # --- fault tolerance: a rank that died or hangs stops the others with an error that says so ---
        try:
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        except RuntimeError as error:  # torch.distributed.DistBackendError included
            raise PeerLostError(
                f"lightning_nobp: the fitness all-reduce failed on rank {rank} of {world}: another process died or did"
                " not reach this step within the process-group timeout (NoBackpropStrategy(timeout=...)). Restart"
                f" every rank from the last checkpoint. ({str(error).splitlines()[0] if str(error) else error!r})"
            ) from error
        # --- end of fault tolerance ---
        if not self.algorithm.shards_population:
            on_device.div_(world)
        return on_device.to(fitness.device)

    def evaluate(
        self,
        estimator: PopulationEstimator,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """The fitness ``tell`` expects: losses at perturbed weights, or directional derivatives (``uses_jvp``).

        Args:
            estimator: the optimizer's estimator.
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current weights.
            rng: restored before each evaluation.
            known: losses already evaluated, by member index (ignored by JVP algorithms).
            members: this process's members.
            member_inputs: per-member inputs of ``loss_fn``.
        """
        if self.algorithm.uses_jvp:
            derivatives, _ = directional_derivatives(
                estimator, population, loss_fn, rng, members, self.population_batching, member_inputs
            )
            return derivatives
        return estimator.evaluate_members(
            population, loss_fn, rng, known, members, self.population_batching, member_inputs
        )

    def on_device(self, estimator: PopulationEstimator, optimizer: Optimizer) -> bool:
        """Whether this optimizer's steps run without host synchronisation: the estimator allows it (fused
        kernels, fitness on the device, see ``PopulationEstimator.device_resident``), the update is direct and no
        parameter group has momentum."""
        return (
            estimator.device_resident
            and self.update == "direct"
            and not self.algorithm.uses_jvp
            and not any(DirectHyperparameters.from_group(group).stateful for group in optimizer.param_groups)
        )

    def tell(
        self, estimator: PopulationEstimator, optimizer: Optimizer, population: Population, fitness: Tensor
    ) -> Estimate:
        """``algorithm.tell`` on the fitness, or its on-device form where :meth:`on_device` holds."""
        if self.on_device(estimator, optimizer):
            estimate = self.algorithm.tell_on_device(population, fitness)
            if estimate is not None:
                return estimate
        return self.algorithm.tell(population, fitness)

    def count_skipped(self, applies: Tensor) -> None:
        """Count an on-device step that was not taken, on the device."""
        skipped = (~applies).to(torch.int64)
        self.skipped_on_device = skipped if self.skipped_on_device is None else self.skipped_on_device + skipped

    def skipped_total(self) -> int | Tensor:
        """Every skipped step: host-known ones plus the on-device count (a tensor then; read it to log it)."""
        if self.skipped_on_device is None:
            return self.skipped_steps
        return self.skipped_on_device + self.skipped_steps

    def write(
        self,
        estimator: PopulationEstimator,
        optimizer: Optimizer,
        terms: Sequence[tuple[Population, Tensor]],
        step_seed: int,
        applies: Tensor | None = None,
    ) -> float | Tensor:
        """Write the step's estimate: into ``.grad`` (summing ``terms``) or straight into the weights.

        Args:
            estimator: the optimizer's estimator.
            optimizer: the user's optimizer (its groups' settings).
            terms: ``(population, coefficients)`` of every micro-batch of the step.
            step_seed: the step's seed (the rounding stream derives from it).
            applies: an on-device step's gate (see :meth:`on_device`); the update is then written without host
                synchronisation.

        Returns:
            The norm of the estimate written (with ``.grad``: of each term, combined as if orthogonal).
        """
        for observe in self.write_observers:
            observe(optimizer, terms, step_seed, applies)
        if self.update == "grad":
            norms = [estimator.accumulate_gradient(population, coefficients) for population, coefficients in terms]
            return sum(n * n for n in norms) ** 0.5
        rounding_seed = derive_seed(step_seed, ROUNDING_STREAM)
        normalize = self.direct_step == "normalized"
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        bounds = self.relative_bounds(estimator)
        settings = [
            replace(DirectHyperparameters.from_group(group_of[id(p)]), step_limit=None if normalize else bound)
            for p, bound in zip(estimator.params, bounds)
        ]  # normalized: lr is each weight's step
        if applies is not None:  # on-device steps are direct (see on_device)
            norm = estimator.apply_update_on_device(terms, settings, rounding_seed, normalize, applies)
            self.count_skipped(applies)
            self.step_limited = estimator.writer.limited  # read when logged: no host synchronisation here
            return norm
        states = [optimizer.state[p] for p in estimator.params]  # where the optimizer keeps momentum or moments
        norm = estimator.apply_update(terms, settings, rounding_seed, normalize, states)
        self.note_step_limited(estimator.writer.limited)
        return norm

    @torch.no_grad()
    def limit_gradients(self, estimator: PopulationEstimator, optimizer: Optimizer) -> int:
        """``.grad`` path, before the user's optimizer steps: scale each estimate in a ``torch.optim.SGD`` group so
        that ``lr * ||grad||`` stays within the step limit (other optimizers are left alone).

        Returns:
            How many tensors were scaled down.
        """
        if self.step_limit is None or not isinstance(optimizer, torch.optim.SGD):
            return self.note_step_limited(0)
        bounds = self.relative_bounds(estimator)
        lr_of = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        count = 0
        for param, bound in zip(estimator.params, bounds):
            if param.grad is None:
                continue
            factor = step_factor(param, lr_of[id(param)] * param.grad.norm(dtype=torch.float64), bound)
            if bool(factor < 1):
                param.grad.mul_(factor.to(param.grad.dtype))
                count += 1
        return self.note_step_limited(count)

    def relative_bounds(self, estimator: PopulationEstimator) -> list[float | None]:
        """The step limit's bound on each parameter's change relative to its norm (``None``s without a limit).

        Parameters estimated from per-row losses or by their exact gradient get ``step_limit`` itself: their
        estimate is mostly signal. The others share a perturbation estimate, mostly noise, and get the bound scaled
        to their count (``lightning_nobp.perturb.step_limit.size_scaled_limit``).
        """
        params = estimator.params
        if self.step_limit is None:
            return [None] * len(params)
        rows = estimator.rows.kept_indices() | estimator.rows.unperturbed_indices()
        perturbed = sum(p.numel() for i, p in enumerate(params) if i not in rows)
        self._relative_bound = size_scaled_limit(self.step_limit, perturbed)
        return [self.step_limit if i in rows else self._relative_bound for i in range(len(params))]

    def note_step_limited(self, count: int | Tensor) -> int:
        """Keep the step's count of limited tensors and warn the first time the limit acts; returns the count."""
        count = int(count)
        self.step_limited = count
        if count and not self._warned_step_limit:
            self._warned_step_limit = True
            warnings.warn(
                f"lightning_nobp: the step limit scaled down the step of {count} tensor(s): the learning rate moves"
                f" them by more than {self._relative_bound:.3g} of their norm per step (step_limit={self.step_limit:g},"
                " scaled to the number of perturbation-estimated weights), as backprop-tuned SGD learning rates do"
                " with a forward-only estimate (about sqrt(parameters) times the gradient's norm). Training goes on"
                " with bounded steps (logged as nobp/step_limited); for faster progress lower the learning rate"
                " (Tuner(trainer).lr_find(model) suggests one), use direct_step='normalized' or Adam, or set"
                " NoBackpropStrategy(step_limit=None) to turn the limit off.",
                stacklevel=2,
            )
        return count

    def closure_step(
        self,
        optimizer: Optimizer,
        roots: Iterable[nn.Module],
        closure: Callable[[], object],
        step_seed: int,
        device: torch.device,
    ) -> tuple[Tensor, Estimate]:
        """One whole step driven by a user's closure: evaluate every member, estimate, write.

        The closure's own backward call is a no-op while it is evaluated (``evaluating`` is set). Gradients of the
        optimizer's parameters are reset, then hold the estimate (``.grad`` path) or stay empty (direct path).

        Returns:
            The first member's loss (the step's reported loss, after sharing between processes) and the estimate.
        """
        estimator = self.estimator(optimizer, roots)
        population = self.algorithm.ask(step_seed)
        rng = RngSnapshot(device)

        def closure_loss() -> Tensor:
            return scalar_loss(objective_of(closure()), "the optimizer closure")

        self.evaluating = True
        try:
            own = self.own_members(population)
            if own and not self.algorithm.uses_jvp:
                estimator.prefetch_noise(population, own)  # one draw per parameter, before the probe reads member 0
            if not estimator.probed:
                estimator.probe_parameter_reads(population, closure)
                rng.restore()
            started = time.perf_counter()
            fitness = self.evaluate(estimator, population, closure_loss, rng, members=own)
            elapsed = time.perf_counter() - started
        finally:
            self.evaluating = False
        fitness = self.share_fitness(fitness, device)
        estimate = self.tell(estimator, optimizer, population, fitness)
        for param in estimator.params:
            param.grad = None
        if estimate.skipped:
            self.skipped_steps += 1
        else:
            assert estimate.coefficients is not None
            estimate.stats["update_norm"] = self.write(
                estimator, optimizer, [(population, estimate.coefficients)], step_seed, estimate.applies
            )
            if self.update == "grad":
                self.limit_gradients(estimator, optimizer)
            estimate.stats["step_limited"] = self.step_limited
        estimator.install_input_bases()
        estimate.stats["members_per_second"] = len(own) / max(elapsed, 1e-9)
        return fitness[0], estimate


class ForwardOnlyStrategyMixin:
    """What the Trainer and Fabric ``NoBackpropStrategy`` share on top of their ``DDPStrategy`` parents.

    The host class sets ``self.engine`` (a :class:`ForwardOnlyEngine`) and ``self._seed``. With one process the
    strategy starts no launcher and no process group: it runs like a single-device strategy.
    """

    engine: ForwardOnlyEngine
    _seed: int | None
    reuse_cpu_memory: bool = False
    _tuned_cpu_memory: bool = False

    @property
    def algorithm(self) -> Algorithm:
        """The forward-only estimator."""
        return self.engine.algorithm

    @property
    def skipped_steps(self) -> int | Tensor:
        """Optimizer steps skipped because a perturbed loss was not finite (a tensor where on-device steps count
        theirs on the device)."""
        return self.engine.skipped_total()

    @property
    def communicated_bytes(self) -> int:
        """Bytes this process sent through collectives for its estimates (fitness scalars only)."""
        return self.engine.communicated_bytes

    @property
    def seed(self) -> int:
        """The base seed of all perturbations: the one given, else ``PL_GLOBAL_SEED`` (``seed_everything``), else 0."""
        return self._seed if self._seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _prepare_cpu_memory(self, device: torch.device) -> None:
        """On the CPU and when asked, keep freed memory in the process (see :mod:`lightning_nobp.cpu_allocator`)."""
        if self.reuse_cpu_memory and device.type == "cpu":
            self._tuned_cpu_memory = keep_freed_cpu_memory()

    def _restore_cpu_memory(self) -> None:
        """Give the process glibc's own ``malloc`` settings back (training ended)."""
        if self._tuned_cpu_memory:
            restore_cpu_memory_defaults()
            self._tuned_cpu_memory = False

    @property
    def _single_process(self) -> bool:
        return self.num_nodes * self.num_processes <= 1  # type: ignore[attr-defined]

    def _configure_launcher(self) -> None:
        if self._single_process:
            self._launcher = None
        else:
            super()._configure_launcher()  # type: ignore[misc]
