"""``NoBackpropStrategy`` for the Trainer: the user's LightningModule trains by forward passes only.

The official ``training_step`` runs under ``torch.no_grad()`` and is logged as usual. ``backward`` evaluates the
loss at perturbed weights and writes the algorithm's gradient estimate into ``p.grad`` (or, with
``update="direct"``, into the weights), so the user's optimizer, LR scheduler, gradient clipping, gradient
accumulation, callbacks and checkpointing keep working. With several processes each rank evaluates the same
perturbations on its own data and only the loss scalars are all-reduced.
"""

from __future__ import annotations

import time
from datetime import timedelta
from collections.abc import Sequence
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import do_nothing_closure
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten, tree_map

from lightning_nobp.algorithms import Algorithm, MeZO, Population, derive_seed
from lightning_nobp.algorithms.local import LocalLearning
from lightning_nobp.fabric.precision import LowBitPrecision
from lightning_nobp.gc_freeze import StartupObjectsFreeze
from lightning_nobp.options import CpuTuning, ExecutionOptions, check_group
from lightning_nobp.engine import (
    DirectStep,
    ForwardOnlyEngine,
    ForwardOnlyStrategyMixin,
    UpdatePath,
    register_aliases,
)
from lightning_nobp.perturb.step_limit import DEFAULT_STEP_LIMIT
from lightning_nobp.perturb import PopulationEstimator, RngSnapshot, scalar_loss
from lightning_nobp.perturb.objective import reward_of
from lightning_nobp.pytorch.logging import is_logging_step, log_step_metrics, loss_from_step_output, muted_logging
from lightning_nobp.pytorch.checkpoint_io import SealedCheckpointIO
from lightning_nobp.pytorch.run_consistency import check_ranks_agree, run_fingerprint

MANUAL_BACKWARD_MESSAGE = (
    "NoBackpropStrategy trains without backpropagation, so `manual_backward(loss)` has nothing to do on its own."
    " Put the loss computation in a closure and pass it to the optimizer, which re-evaluates it at perturbed"
    " weights:\n    def closure():\n        loss = ...\n        self.manual_backward(loss)\n        return loss\n"
    "    optimizer.step(closure)\nor use automatic optimization (the default) and return the loss from training_step."
)

PROGRESS_BAR_METRICS = frozenset({"nobp/projected_grad", "nobp/skipped_steps"})
MANUAL_STEP_STREAM = 1 << 32  # separates manual-optimization step seeds from the automatic ones
#: the checkpoint key of the estimators' own state (the input subspaces of data-fed layers)
CHECKPOINT_KEY = "lightning_nobp"


class NoBackpropStrategy(ForwardOnlyStrategyMixin, DDPStrategy):
    """Train an unmodified LightningModule without backpropagation, on one device or many processes.

    Args:
        algorithm: the forward-only estimator (``MeZO``, ``EggRoll``, ``OpenES``, ``ForwardGradient``) or a local
            learning rule (``ForwardForward``, ``MonoForward``); ``MeZO()`` when omitted.
        update: ``"grad"`` writes the estimate into ``p.grad`` and lets the user's optimizer step (any optimizer;
            costs one gradient-sized buffer). ``"direct"`` applies it in place as the user's ``torch.optim.SGD``,
            ``Adam`` or ``AdamW`` would (their lr, weight decay, momentum, betas and eps; the LR scheduler still
            drives the lr), with stochastic rounding for bf16/fp16 and low-bit weights and no gradient buffers:
            memory equals inference memory, plus the momentum buffers or Adam's moments when the optimizer has
            them (in its state, bf16 for low-bit weights; ``lightning_nobp.perturb.direct_step``).
            ``None`` (default): ``"direct"`` when ``LowBitPrecision`` stores weights in low bit, else ``"grad"``.
        direct_step: the direct path's step: ``"sgd"`` (``w -= lr * estimate``) or ``"normalized"`` (each
            tensor's estimate divided by its root-mean-square, so ``lr`` is the typical change of one weight per
            step, as with Adam, with no optimizer state: the usual choice for evolution strategies).
        compile: evaluate the batched population under ``torch.compile`` (one graph per chunk size: the user's
            ``training_step`` traced through the member layers, each layer's shared product fused with its members'
            low-rank corrections). ``None`` (default): on when the parameters are on a CUDA device. Falls back to
            eager evaluation, with one warning that names the reason, when ``training_step`` cannot be compiled.
        step_limit: bound on each step's change of each tensor, relative to the tensor's norm (a trust ratio,
            scaled down as 1/sqrt(weights) beyond 10,000 perturbation-estimated weights): a learning rate tuned for
            backpropagation does not diverge on the forward-only estimate; steps within the bound are untouched,
            Adam's and the normalized direct step are left alone
            (``lightning_nobp.perturb.step_limit``). Logged as
            ``nobp/step_limited`` (tensors scaled down in the step); ``None`` turns it off.
        seed: base seed of every perturbation (counter-derived per step, member and parameter). ``None`` takes the
            seed of ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0.
        execution: how the members are evaluated (:class:`~lightning_nobp.ExecutionOptions`: batching, fused
            kernels, member data, official-pass reuse); ``None``: the defaults.
        cpu_tuning: opt-in process-wide CPU tunings while training runs (:class:`~lightning_nobp.CpuTuning`);
            ``None``: none.
        accelerator: see ``lightning.pytorch.strategies.DDPStrategy``.
        parallel_devices: see ``DDPStrategy``.
        cluster_environment: see ``DDPStrategy``.
        checkpoint_io: see ``DDPStrategy``.
        precision_plugin: see ``DDPStrategy``.
        process_group_backend: ``"gloo"`` or ``"nccl"``; chosen from the device when omitted.
        timeout: timeout of collective operations.
        start_method: how extra processes start with several devices: ``"popen"`` (re-run the script), ``"spawn"``,
            ``"fork"`` or ``"forkserver"``.
    """

    strategy_name = "nobp"

    def __init__(
        self,
        algorithm: Algorithm | LocalLearning | None = None,
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
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            # fault tolerance: atomic, durable checkpoint writes with a verified content digest (checkpoint_io.py)
            checkpoint_io=checkpoint_io if checkpoint_io is not None else SealedCheckpointIO(),
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        check_group("NoBackpropStrategy", "execution", execution, ExecutionOptions)
        check_group("NoBackpropStrategy", "cpu_tuning", cpu_tuning, CpuTuning)
        execution = execution if execution is not None else ExecutionOptions()
        self.execution = execution
        self.cpu_tuning = cpu_tuning
        self.engine = ForwardOnlyEngine(
            algorithm if algorithm is not None else MeZO(), update, execution.population_batching, direct_step,
            compile, execution.fused_kernels, step_limit,
        )
        #: True while the members are evaluated with the module's logging muted
        self._logging_muted = False
        self.member_data = execution.member_data
        self._seed = seed
        self.reuse_cpu_memory = cpu_tuning is not None and cpu_tuning.reuse_memory
        self.reuse_official_pass = execution.reuse_official_pass if execution.member_data == "shared" else False
        self.freeze_startup_objects = cpu_tuning is not None and cpu_tuning.freeze_startup_objects
        self._startup_objects = StartupObjectsFreeze()
        self._window: list[tuple[Population, Tensor]] = []  # direct path: the accumulation window's estimates
        self._window_poisoned = False
        #: on-device steps: whether every micro-batch of the window may be applied (a boolean tensor)
        self._window_applies: Tensor | None = None
        self._step: dict[str, Any] = {}
        self._warned_short_batch = False
        #: the estimators' state from the checkpoint being resumed (applied in ``on_train_start``)
        self._restored_state: dict[str, Any] | None = None

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """With low-bit weights, restore a checkpoint into the converted model, so its stored bytes (low-bit data
        and scales) load as they were saved instead of being re-quantized."""
        return isinstance(self.precision_plugin, LowBitPrecision)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load onto the CPU first: torch cannot rebuild tensor subclasses (the low-bit weights) through the
        callable ``map_location`` Lightning passes by default; ``load_state_dict`` then copies onto the device.
        The estimators' own state (input subspaces) is restored when training starts."""
        checkpoint = self.checkpoint_io.load_checkpoint(checkpoint_path, map_location="cpu", weights_only=weights_only)
        self._restored_state = checkpoint.get(CHECKPOINT_KEY)
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Lightning's checkpoint plus the estimators' state (input subspaces), so a resumed run draws the same
        noise as an uninterrupted one."""
        subspaces = [self.engine.estimator_state(optimizer) for optimizer in self.optimizers if not self.engine.local]
        if any(state is not None for state in subspaces):
            checkpoint = {**checkpoint, CHECKPOINT_KEY: {"input_subspaces": subspaces}}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def setup_distributed(self) -> None:
        if self._single_process:
            self.set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            return
        super().setup_distributed()

    def setup(self, trainer: Trainer) -> None:
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "NoBackpropStrategy cannot train with `precision='16-mixed'`: its gradient scaler would unscale the"
                " forward-only estimate and skip steps on its own inf checks. Use `precision='bf16-mixed'`,"
                " `'bf16-true'` or `'32-true'`."
            )
        assert self.accelerator is not None and self.model is not None
        if self._single_process:
            # one process: keep the user's own samplers (Lightning would insert a DistributedSampler because this
            # class derives from DDPStrategy, changing the data order and breaking exact resume)
            trainer._accelerator_connector.use_distributed_sampler = False
        self.accelerator.setup(trainer)
        self._prepare_cpu_memory(self.root_device)
        self.precision_plugin.convert_module(self.model)
        if self.engine.resolve_update([self.model]) == "direct" and trainer.gradient_clip_val:
            raise ValueError(
                "update='direct' (the path of low-bit weights) keeps no gradient to clip: remove"
                " `gradient_clip_val`, or use update='grad' with weights that are not low-bit."
            )
        self.model_to_device()
        # every rank applies the identical update from seeds and scalars: no DDP wrapper, no gradient all-reduce;
        # the ranks only need the same initial weights
        if dist.is_available() and dist.is_initialized():
            _sync_module_states(self.model)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.engine.reset()
        self._window, self._window_poisoned, self._window_applies = [], False, None
        if not self.optimizers:
            raise ValueError(
                "NoBackpropStrategy found no optimizer: return one over the parameters to train from"
                " `configure_optimizers`; its lr, weight decay and scheduler drive the update."
            )
        if self.freeze_startup_objects:
            self._startup_objects.freeze()
        if self.engine.local:
            if not self.lightning_module.automatic_optimization or len(self.optimizers) != 1:
                raise ValueError(f"{self.algorithm!r} needs automatic optimization with one optimizer")
            self.engine.learner(self.optimizers[0], self.lightning_module)  # raises for models it cannot train
            return
        for optimizer in self.optimizers:
            self.engine.estimator(optimizer, [self.lightning_module])  # raises on bad optimizers or no parameters
        restored, self._restored_state = self._restored_state, None
        for optimizer, state in zip(self.optimizers, (restored or {}).get("input_subspaces", [])):
            if state is not None:
                self.engine.estimator(optimizer, [self.lightning_module]).load_input_subspace_state(state)
        self._check_ranks_agree()

    # --- fault tolerance: ranks started differently are stopped before the first step (run_consistency.py) ---
    def _check_ranks_agree(self) -> None:
        """Raise on every rank if the processes differ in seed, settings, optimizers, weights or optimizer state."""
        if self._single_process or not (dist.is_available() and dist.is_initialized()):
            return
        trainer = self.lightning_module.trainer
        settings = {
            "algorithm": self.algorithm,
            "seed": self.seed,
            "update": (self.engine.update, self.engine.direct_step, getattr(self.engine, "step_limit", None)),
            "member_data": self.member_data,
            "precision": self.precision_plugin,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient clipping": (trainer.gradient_clip_val, str(trainer.gradient_clip_algorithm)),
            "max_steps, max_epochs": (trainer.max_steps, trainer.max_epochs),
            "world_size": self.world_size,
        }
        check_ranks_agree(run_fingerprint(settings, self.lightning_module, self.optimizers))

    # --- end of fault tolerance ---

    def on_train_end(self) -> None:
        super().on_train_end()
        self._startup_objects.release()

    def teardown(self) -> None:
        self._startup_objects.release()  # also after an exception, which skips on_train_end
        self._restore_cpu_memory()
        self.engine.release()  # the user's modules get their own forwards back
        super().teardown()

    def official_pass_is_a_member(self, members: int, estimator: PopulationEstimator | None = None) -> bool:
        """Whether the official training pass is evaluated at the first member's perturbed weights and its loss
        reused as that member's fitness (see ``reuse_official_pass``).

        Args:
            members: the population members this process evaluates in a step.
            estimator: the optimizer's estimator, whose first batched evaluation tells whether the user's code can
                be batched (``None``, or not tried yet: assumed batchable when ``population_batching`` is on).
        """
        if members < 1 or self.algorithm.uses_jvp or self.reuse_official_pass is False:
            return False
        if self.reuse_official_pass:
            return True
        if estimator is not None and estimator.evaluation.tracks_side_effects():
            return False  # running statistics and metric states must come from the unperturbed weights
        batched = self.engine.population_batching and (estimator is None or estimator.batching is not False)
        return not batched or members <= 2

    def _step_seed(self, steps_ahead: int = 0) -> int:
        """The seed of this micro-batch's step, or of the step ``steps_ahead`` optimizer steps away (negative:
        earlier) as it will be without gradient accumulation and skipped steps."""
        trainer = self.lightning_module.trainer
        micro_batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        return derive_seed(self.seed, trainer.global_step + steps_ahead, micro_batches + steps_ahead)

    def _noise_window(self, steps: int) -> list[Population]:
        """The populations of the ``steps`` optimizer steps of the window (aligned on multiples of ``steps``) that
        holds this one, as their step seeds will be if no step is skipped; empty with gradient accumulation."""
        trainer = self.lightning_module.trainer
        if trainer.accumulate_grad_batches != 1:
            return []
        offset = trainer.global_step % steps  # this step's place in its window
        return [self.algorithm.ask(self._step_seed(later - offset)) for later in range(steps)]

    # ------------------------------------------------------------------ automatic optimization
    def _muted_training_step(self, batch: Any = None) -> Any:
        """The user's ``training_step`` on this step's arguments (or on ``batch`` instead), with logging muted."""
        args, kwargs = self._step["args"]
        if batch is not None:
            args = (batch, *args[1:])
        module = self.lightning_module
        if self._logging_muted:  # muted once around the whole evaluation, outside compiled code
            with self.precision_plugin.train_step_context():
                return module.training_step(*args, **kwargs)
        with self.precision_plugin.train_step_context(), muted_logging(module):
            return module.training_step(*args, **kwargs)

    def _perturbed_training_loss(self, batch: Any = None) -> Tensor:
        return scalar_loss(loss_from_step_output(self._muted_training_step(batch)), "training_step")

    def _pair_slices(self, members: Sequence[int]) -> Any:
        """The batch slices of ``members`` (one slice per noise group), stacked along a leading member dimension."""
        population: Population = self._step["population"]
        groups = population.groups()
        count = groups[-1] + 1
        batch = self._step["args"][0][0]
        leaves, _ = tree_flatten(batch)
        if not leaves or not all(isinstance(leaf, Tensor) and leaf.dim() >= 1 for leaf in leaves):
            raise TypeError(
                "member_data='pair_slices' splits the batch along its first dimension: the batch must be a tensor"
                " or a tuple/list/dict of tensors. Use ExecutionOptions(member_data='shared') for other batches."
            )
        samples = leaves[0].shape[0]
        size = samples // count
        picked = torch.tensor([groups[i] for i in members])
        short = size == 0
        if short:
            # a short batch (the loader's last one): the groups share its samples round-robin, one each
            if not self._warned_short_batch:
                self._warned_short_batch = True
                rank_zero_warn(
                    f"member_data='pair_slices': a batch of {samples} samples for {count} noise groups; the groups"
                    " share its samples, one each (round-robin). Use a batch of at least one sample per antithetic"
                    " pair, or `drop_last=True` in the DataLoader."
                )
            picked = picked % samples

        def slices(leaf: Tensor) -> Tensor:
            if short:
                return leaf[picked.to(leaf.device)].unsqueeze(1)
            return leaf[: count * size].reshape(count, size, *leaf.shape[1:])[picked.to(leaf.device)]

        return tree_map(slices, batch)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        if not module.automatic_optimization:
            with torch.no_grad():
                return super().training_step(*args, **kwargs)
        if self.engine.local:  # local learning: the official pass only; the layers learn in `backward`
            self._step = {"args": (args, kwargs), "seed": self._step_seed()}
            with torch.no_grad():
                return super().training_step(*args, **kwargs)
        estimator = self.engine.estimator(self.optimizers[0], [module])
        step_seed = self._step_seed()
        population = self.algorithm.ask(step_seed)
        rng = RngSnapshot(self.root_device)
        own = self.engine.own_members(population)
        self._step = {
            "args": (args, kwargs),
            "seed": step_seed,
            "population": population,
            "rng": rng,
            "known": {},
            "own": own,
        }
        with torch.no_grad():
            if own and not self.algorithm.uses_jvp:
                # the whole population's noise in one draw per parameter, before any single member reads its own
                # (the official pass, the probe): a resumed run then draws exactly what an uninterrupted one does
                estimator.prefetch_noise(population, own, self._noise_window)
            if not estimator.probed:
                estimator.probe_parameter_reads(population, self._muted_training_step)
                rng.restore()
            # the official pass also keeps the input rows of per-row-estimated layers (saves the estimate a forward)
            if self.official_pass_is_a_member(len(own), estimator):
                with estimator.perturbation(population, population.members[own[0]]), estimator.row_input_tap():
                    output = super().training_step(*args, **kwargs)
                loss = loss_from_step_output(output)
                if isinstance(loss, Tensor) and loss.numel() == 1:
                    self._step["known"] = {own[0]: loss.detach().reshape(())}
            else:
                with estimator.row_input_tap():
                    output = super().training_step(*args, **kwargs)
        self._step["rng_after"] = RngSnapshot(self.root_device)
        reward = reward_of(output)
        if reward is not None:  # Lightning steps on a loss: the reward's, -mean(reward) (perturb/objective.py)
            self._step["reward"] = reward.detach().float().mean()
            output = {**output, "loss": -self._step["reward"]}
        return output

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if self.engine.evaluating:
            # manual optimization: the user's closure calls manual_backward while the strategy evaluates it
            return closure_loss
        if optimizer is None:
            raise RuntimeError(MANUAL_BACKWARD_MESSAGE)
        scalar_loss(closure_loss, "training_step")
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        trainer = module.trainer
        if self.engine.local:
            self._local_step(optimizer)
            return self.precision_plugin.post_backward(closure_loss, module)
        estimator = self.engine.estimator(optimizer, [module])
        population: Population = self._step["population"]
        started = time.perf_counter()
        own = self._step["own"]
        with muted_logging(module):
            self._logging_muted = True
            try:
                fitness = self.engine.evaluate(
                    estimator,
                    population,
                    self._perturbed_training_loss,
                    self._step["rng"],
                    self._step["known"],
                    members=own,
                    member_inputs=self._pair_slices if self.member_data == "pair_slices" else None,
                )
            finally:
                self._logging_muted = False
        evaluated = len(own) - len(self._step["known"])
        members_per_second = evaluated / max(time.perf_counter() - started, 1e-9)
        self._step["rng_after"].restore()
        fitness = self.engine.share_fitness(fitness, self.root_device)
        estimate = self.engine.tell(estimator, optimizer, population, fitness)
        window_ends = not trainer.fit_loop._should_accumulate()
        if estimate.applies is not None:  # on the device: every micro-batch's gate joins the window's
            self._window_applies = estimate.applies if self._window_applies is None else (
                self._window_applies & estimate.applies
            )
        if estimate.skipped or self._window_poisoned:
            self._window_poisoned = not window_ends
            if window_ends:  # skip the whole optimizer step
                for param in estimator.params:
                    param.grad = None
                self._window = []
                self._window_applies = None
                self.engine.skipped_steps += 1
        else:
            assert estimate.coefficients is not None
            self._window.append((population, estimate.coefficients / trainer.accumulate_grad_batches))
            if self.engine.update == "grad" or window_ends:
                applies, self._window_applies = self._window_applies, None
                estimate.stats["update_norm"] = self.engine.write(
                    estimator, optimizer, self._window, self._step["seed"], applies
                )
                if self.engine.update == "grad" and window_ends:  # the window's whole estimate is in .grad
                    self.engine.limit_gradients(estimator, optimizer)
                estimate.stats["step_limited"] = self.engine.step_limited
                self._window = []
        if window_ends:
            estimator.install_input_bases()
        if is_logging_step(trainer):
            metrics = dict(estimate.stats, members_per_second=members_per_second)
            metrics["forwards_per_step"] = len(own) + (0 if self._step["known"] else 1)
            metrics["skipped_steps"] = self.skipped_steps
            if "reward" in self._step:
                metrics["reward"] = self._step["reward"]
            if isinstance(metrics.get("step_limited"), Tensor):  # an on-device step's count, read now
                self.engine.note_step_limited(metrics["step_limited"])
            log_step_metrics(module, {f"nobp/{k}": v for k, v in metrics.items()}, PROGRESS_BAR_METRICS)
        return self.precision_plugin.post_backward(closure_loss, module)

    def _local_step(self, optimizer: Optimizer) -> None:
        """Local learning: every layer's local gradient goes into ``.grad`` (layer inputs tapped in forwards)."""
        module = self.lightning_module
        trainer = module.trainer
        learner = self.engine.learner(optimizer, module)
        batch = self._step["args"][0][0]
        scale = 1.0 / trainer.accumulate_grad_batches
        losses = learner.step(batch, self._muted_training_step, self._step["seed"], scale)
        if is_logging_step(trainer):
            log_step_metrics(module, {f"nobp/{k}": v for k, v in losses.items()}, PROGRESS_BAR_METRICS)

    # ------------------------------------------------------------------ manual optimization
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        module = self.lightning_module
        if module.automatic_optimization:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        if closure is do_nothing_closure:
            raise RuntimeError(MANUAL_BACKWARD_MESSAGE)
        step_seed = derive_seed(self.seed, module.trainer.global_step, MANUAL_STEP_STREAM)
        loss, estimate = self.engine.closure_step(optimizer, [module], closure, step_seed, self.root_device)
        if estimate.skipped or self.engine.update == "direct":
            return loss
        return super().optimizer_step(optimizer, lambda: loss, model, **kwargs)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        register_aliases(strategy_registry, cls)
