"""Fine-tunes stored as seeds: :class:`SeedReplayLog` records a forward-only run, :func:`replay` re-applies it.

A forward-only step's update is a function of counter-derived seeds and a few scalars: the members' noise seeds,
their coefficients from ``tell``, the learning rate and the step's seed (the stochastic-rounding stream derives
from it). The log keeps those, plus a hash of the base weights and the configuration the update depends on, so a
fine-tune is a few hundred bytes per step whatever the model's size, and :func:`replay` rebuilds the trained
weights, bit for bit on the same kind of device, from a model holding the base weights, through the engine's own
update code (``ForwardOnlyEngine.write``; the user's optimizer, rebuilt from the log, steps on the ``.grad`` path).

Format (JSON lines, no pickle; written line by line and flushed, so a killed run leaves a valid prefix):

* line 1, the header: ``{"format": "lightning_nobp.seed_replay", "version": 1, "base_hash": ..., "algorithm":
  {...}, "update": ..., "optimizer": {...}, "trainable": [names], ...}``;
* one line per optimizer step: ``{"s": global step, "seed": step seed, "t": [term, ...], "lr": [lr per group],
  "lim": tensors the step limit scaled}``, or ``{"s": step, "skip": 1}`` for a skipped step. A term is one
  micro-batch's ``{"ask": step seed, "c": coefficients}`` (the population is ``algorithm.ask(step seed)``) or,
  where the population cannot be named by a seed, ``{"m": member seeds, "sg": signs, "sigma": sigma, "c": ...}``;
  coefficients are base64 little-endian float32, member seeds base64 little-endian int64 (exact bits);
* a last line ``{"end": hash of the trained weights, "steps": n}`` when training ends (replay checks it).

Resuming from a checkpoint appends: the records of steps at or after the checkpoint's global step (written by the
interrupted run after its last checkpoint) are dropped and the run goes on after the rest.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nobp.algorithms.base import Algorithm, Member, Population
from lightning_nobp.algorithms.evolution import EvolutionStrategy
from lightning_nobp.engine import ForwardOnlyEngine, trainable_parameters
from lightning_nobp.lowbit.formats import inner_tensors, is_low_bit

FORMAT = "lightning_nobp.seed_replay"
VERSION = 1
#: algorithm options whose estimate is not a function of seeds and scalars (per-row losses, inputs, exact gradients)
UNREPLAYABLE_OPTIONS = ("per_row_estimates", "exact_head_gradient", "per_row_embeddings", "input_subspace")
#: optimizer-group settings kept apart from the per-step learning rate
_GROUP_SKIP = ("params", "lr")


class BaseWeightsError(ValueError):
    """The model given to :func:`replay` does not hold the run's base weights."""


class ReplayMismatchError(RuntimeError):
    """A replay did not reproduce what the log recorded (corrupted log, other device or library version)."""


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def weights_hash(named: Sequence[tuple[str, Tensor]]) -> str:
    """SHA-256 over the stored bytes of parameters (a low-bit weight's inner tensors: data and scales), with each
    tensor's name, dtype and shape.

    Args:
        named: ``(name, parameter)`` pairs, hashed in this order.
    """
    digest = hashlib.sha256()
    for name, param in named:
        parts = inner_tensors(param) if is_low_bit(param) else {"": param}
        for key, tensor in parts.items():
            digest.update(f"{name}:{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _decode(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def _plain(value: Any) -> Any:
    """``value`` as JSON (numbers, strings, lists, dataclasses), or ``...`` where it has no JSON form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return ... if any(item is ... for item in items) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if any(v is ... for v in fields.values()):
            return ...
        return {"__dataclass__": f"{type(value).__module__}:{type(value).__qualname__}", "fields": fields}
    return ...


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        cls = _imported(value["__dataclass__"], "lightning_nobp.")
        return cls(**{k: _unplain(v) for k, v in value["fields"].items()})
    if isinstance(value, list):
        return tuple(_unplain(v) for v in value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def _imported(qualified: str, package: str) -> Any:
    module_name, _, name = qualified.partition(":")
    if not (module_name == package.rstrip(".") or module_name.startswith(package)):
        raise ValueError(f"the log names {qualified!r}; replay only builds classes of {package.rstrip('.')}")
    target: Any = importlib.import_module(module_name)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def algorithm_config(algorithm: Algorithm) -> dict[str, Any]:
    """The algorithm's class and its plain attributes (what :func:`rebuild_algorithm` sets on a fresh instance)."""
    attributes = {}
    for key, value in vars(algorithm).items():
        plain = _plain(value)
        if plain is not ...:
            attributes[key] = plain
    cls = type(algorithm)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "attributes": attributes, "repr": repr(algorithm)}


def rebuild_algorithm(config: dict[str, Any]) -> Algorithm:
    """A fresh algorithm with the logged attributes; raises when its ``repr`` differs from the logged one."""
    algorithm = _imported(config["class"], "lightning_nobp.")()
    for key, value in config["attributes"].items():
        setattr(algorithm, key, _unplain(value))
    if repr(algorithm) != config["repr"]:
        raise ReplayMismatchError(
            f"the log's algorithm {config['repr']} was rebuilt as {algorithm!r}: this version of lightning_nobp"
            " cannot rebuild it"
        )
    return algorithm


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    settings = {}
    for key, value in group.items():
        plain = _plain(value)
        if key not in _GROUP_SKIP and plain is not ...:
            settings[key] = plain
    return settings


def unreplayable_options(algorithm: Algorithm) -> list[str]:
    """The options of ``algorithm`` that make its estimate depend on more than seeds and scalars."""
    found = []
    for name in UNREPLAYABLE_OPTIONS:
        value = getattr(algorithm, name, None)
        if (name == "input_subspace" and value is not None) or (name != "input_subspace" and bool(value)):
            found.append(f"{name}={value!r}")
    return found


def check_replayable(trainer: Trainer, module: LightningModule) -> ForwardOnlyEngine:
    """The run's engine; raises ``ValueError`` naming what to turn off where the run cannot be replayed from seeds.

    Args:
        trainer: the Trainer about to fit.
        module: the LightningModule it trains.
    """
    engine = getattr(trainer.strategy, "engine", None)
    if not isinstance(engine, ForwardOnlyEngine):
        raise ValueError("SeedReplayLog records forward-only runs: train with lightning_nobp's NoBackpropStrategy")
    algorithm = engine.algorithm
    name = type(algorithm).__name__
    if engine.local:
        raise ValueError(
            f"SeedReplayLog: {name} learns each layer from its inputs, not from seeds and scalars; use MeZO, EggRoll,"
            " OpenES or ForwardGradient"
        )
    found = unreplayable_options(algorithm)
    if found:
        fix = (
            "set extras=None (or EstimatorExtras(per_row_estimates=False, input_subspace=None))"
            if isinstance(algorithm, EvolutionStrategy)
            else f"set {name}(input_subspace=None)"
        )
        raise ValueError(
            f"SeedReplayLog: {name} has {', '.join(found)}: that estimate depends on per-row losses, exact head"
            " gradients or the data's input subspace, not only on seeds and scalars, so the log could not replay it."
            f" To record a replayable run, {fix}."
        )
    if not module.automatic_optimization:
        raise ValueError("SeedReplayLog records automatic optimization only (training_step returning the loss)")
    plugin = type(trainer.precision_plugin)
    stock_clipping = (
        not is_overridden("configure_gradient_clipping", module)
        and plugin.clip_gradients is Precision.clip_gradients
        and plugin.clip_grad_by_norm is Precision.clip_grad_by_norm
        and plugin.clip_grad_by_value is Precision.clip_grad_by_value
    )
    if trainer.gradient_clip_val and not stock_clipping:
        raise ValueError(
            "SeedReplayLog records Lightning's own gradient clipping (Trainer(gradient_clip_val=...)) only; this run"
            " clips in an overridden configure_gradient_clipping or precision plugin: leave gradient_clip_val unset"
        )
    return engine


def gradient_clipping(trainer: Trainer) -> list[Any] | None:
    """``[clip value, "norm" or "value"]`` where the Trainer clips gradients, else ``None``."""
    value = trainer.gradient_clip_val
    if not value or float(value) <= 0:
        return None
    return [float(value), GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm").value]


def _clip(optimizer: Optimizer, clipping: list[Any] | None) -> None:
    """Lightning's gradient clipping (``Precision.clip_gradients``) over the optimizer's parameters."""
    if clipping is None:
        return
    value, algorithm = clipping
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_value=value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


class SeedReplayLog(Callback):
    """Record a forward-only run as seeds and scalars, replayable with :func:`lightning_nobp.replay`.

    Refuses, when fitting starts, algorithms whose estimate is not a function of seeds and scalars (per-row
    estimates, exact head gradient, per-row embeddings, input subspaces), local learning rules, manual optimization
    and gradient clipping other than Lightning's own (``Trainer(gradient_clip_val=...)`` is recorded). Logs on
    global rank 0 only.

    Args:
        path: the log file (JSON lines; replaced by a new run, appended to by a run resumed from a checkpoint).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._engine: ForwardOnlyEngine | None = None
        self._pending: list[dict[str, Any]] = []
        self._seed: int | None = None
        self._applies = True
        self._skipped = 0
        self._settings: list[dict[str, Any]] = []
        self._named: list[tuple[str, Tensor]] = []
        self.steps = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_replayable(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine = check_replayable(trainer, pl_module)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SeedReplayLog records one optimizer, got {len(trainer.optimizers)}")
        if trainer.global_rank != 0:
            return
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        params = trainable_parameters(optimizer)
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise ValueError("SeedReplayLog: the optimizer holds parameters that are not the LightningModule's")
        self._named = [(names[id(p)], p) for p in params]
        self._settings = [_group_settings(group) for group in optimizer.param_groups]
        self._skipped = int(engine.skipped_total())
        if trainer.global_step > 0:
            self._resume(trainer.global_step)
        else:
            self._start(engine, optimizer, names, gradient_clipping(trainer))
        self._engine = engine
        engine.write_observers.append(self._observe)

    def _start(
        self, engine: ForwardOnlyEngine, optimizer: Optimizer, names: dict[int, str], clipping: list[Any] | None
    ) -> None:
        cls = type(optimizer)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "base_hash": weights_hash(self._named),
            "trainable": [name for name, _ in self._named],
            "algorithm": algorithm_config(engine.algorithm),
            "update": engine.update,
            "direct_step": engine.direct_step,
            "step_limit": engine.step_limit,
            "fused_kernels": engine.fused_kernels,
            "gradient_clip": clipping,
            "device": self._named[0][1].device.type,
            "torch": torch.__version__,
            "optimizer": {
                "class": f"{cls.__module__}:{cls.__qualname__}",
                "groups": [
                    {"params": [names.get(id(p), "?") for p in group["params"]], "settings": settings}
                    for group, settings in zip(optimizer.param_groups, self._settings)
                ],
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self._write(header)
        self.steps = 0

    def _resume(self, global_step: int) -> None:
        if not self.path.exists():
            raise ValueError(
                f"SeedReplayLog: resuming at step {global_step} but {self.path} does not exist: the log must hold the"
                " run's steps from its start (its base weights and optimizer state)"
            )
        header, records, _ = read_log(self.path)
        kept = [record for record in records if record["s"] < global_step]
        self._settings = _settings_after(header, kept)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            for line in [header, *kept]:
                file.write(json.dumps(line, separators=(",", ":")) + "\n")
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self.steps = len(kept)

    def _write(self, line: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def _observe(
        self,
        optimizer: Optimizer,
        terms: Sequence[tuple[Population, Tensor]],
        step_seed: int,
        applies: Tensor | None,
    ) -> None:
        """``ForwardOnlyEngine.write``'s observer: keep the step's terms until the optimizer steps."""
        assert self._engine is not None
        ask = self._engine.algorithm.ask(step_seed)
        for population, coefficients in terms:
            term: dict[str, Any] = {}
            if population == ask:
                term["ask"] = step_seed
            else:
                term["m"] = _encode(np.array([m.noise_seed for m in population.members], dtype="<i8"))
                term["sg"] = "".join("+" if m.sign > 0 else "-" for m in population.members)
                term["sigma"] = population.sigma
            term["c"] = _encode(coefficients.detach().to(torch.float32).cpu().numpy().astype("<f4"))
            self._pending.append(term)
        self._seed = step_seed
        if applies is not None:
            self._applies = self._applies and bool(applies)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._file is None or self._engine is None:
            return
        skipped = int(self._engine.skipped_total())
        record: dict[str, Any] = {"s": trainer.global_step}
        if skipped != self._skipped or not self._pending or not self._applies:
            record["skip"] = 1
        else:
            record["seed"] = self._seed
            record["t"] = self._pending
            record["lr"] = [_plain(group["lr"]) for group in optimizer.param_groups]
            changed = {}
            for index, group in enumerate(optimizer.param_groups):
                settings = _group_settings(group)
                delta = {k: v for k, v in settings.items() if self._settings[index].get(k) != v}
                if delta:
                    changed[str(index)] = delta
                    self._settings[index] = settings
            if changed:
                record["hp"] = changed
            record["lim"] = int(self._engine.step_limited)
        self._skipped = skipped
        self._pending, self._seed, self._applies = [], None, True
        self._write(record)
        self.steps += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._write({"end": weights_hash(self._named), "steps": self.steps})
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._engine is not None and self._observe in self._engine.write_observers:
            self._engine.write_observers.remove(self._observe)
        self._engine = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _settings_after(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every group's settings after ``records`` (the header's, with the logged changes)."""
    settings = [dict(group["settings"]) for group in header["optimizer"]["groups"]]
    for record in records:
        for index, delta in record.get("hp", {}).items():
            settings[int(index)].update(delta)
    return settings


def read_log(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """The log's header, step records and end record (``None`` for a run that did not end); a last line cut off
    by a killed run is left out.

    Args:
        path: the log written by :class:`SeedReplayLog`.
    """
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    complete = lines[:-1]  # the text after the last newline is an unfinished line (or empty)
    if not complete:
        raise ValueError(f"{path}: empty seed log")
    header = json.loads(complete[0])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} log of version {VERSION}")
    records, end = [], None
    for line in complete[1:]:
        record = json.loads(line)
        if "end" in record:
            end = record
        else:
            records.append(record)
    return header, records, end


def _population(term: dict[str, Any], algorithm: Algorithm) -> Population:
    if "ask" in term:
        return algorithm.ask(int(term["ask"]))
    seeds = _decode(term["m"], "<i8").tolist()
    members = tuple(Member(int(seed), 1.0 if sign == "+" else -1.0) for seed, sign in zip(seeds, term["sg"]))
    return Population(members, sigma=float(term["sigma"]))


@dataclass
class ReplayResult:
    """What :func:`replay` did.

    Args:
        steps: optimizer steps applied.
        skipped: steps the run skipped (nothing applied).
        weights_hash: hash of the replayed trainable weights (:func:`weights_hash`).
        optimizer: the optimizer rebuilt from the log, with its state after the last step.
    """

    steps: int
    skipped: int
    weights_hash: str
    optimizer: Optimizer


def rebuild_optimizer(config: dict[str, Any], named: dict[str, Tensor]) -> Optimizer:
    """The run's optimizer (a ``torch.optim`` class) over ``named``'s parameters, with the logged group settings.

    Args:
        config: the log header's ``"optimizer"``.
        named: the model's parameters by name.
    """
    cls = _imported(config["class"], "torch.optim")
    groups = []
    for group in config["groups"]:
        settings = {key: _unplain(value) for key, value in group["settings"].items()}
        groups.append({"params": [named[name] for name in group["params"]], **settings})
    return cls(groups)


@torch.no_grad()
def replay(model: nn.Module, path: str | os.PathLike[str], verify: bool = True) -> ReplayResult:
    """Apply a :class:`SeedReplayLog` to ``model``, which must hold the run's base weights (the same architecture,
    dtype and low-bit storage, e.g. converted with the same ``LowBitPrecision``); its trainable weights become the
    run's trained weights, bit for bit on the same kind of device.

    Args:
        model: the model (a LightningModule or any module with the run's parameter names), changed in place.
        path: the log.
        verify: check each step's step-limit count and, for a finished run, the trained weights' hash, raising
            :class:`ReplayMismatchError` where they differ.

    Raises:
        BaseWeightsError: the model's weights are not the run's base weights.
        ReplayMismatchError: with ``verify``, the replay did not reproduce the run.
    """
    header, records, end = read_log(path)
    named = dict(model.named_parameters())
    absent = [name for name in header["trainable"] if name not in named]
    if absent:
        raise BaseWeightsError(f"the model has no parameter {absent[0]!r} of the run recorded in {path}")
    trainable = [(name, named[name]) for name in header["trainable"]]
    if weights_hash(trainable) != header["base_hash"]:
        raise BaseWeightsError(
            f"the model's weights are not the base weights of the run recorded in {path} (their hash differs): load"
            " the weights the run started from, in the same dtype and storage (LowBitPrecision conversion included)"
        )
    algorithm = rebuild_algorithm(header["algorithm"])
    optimizer = rebuild_optimizer(header["optimizer"], named)
    if [id(p) for p in trainable_parameters(optimizer)] != [id(p) for _, p in trainable]:
        raise BaseWeightsError("the model's trainable parameters (requires_grad) differ from the run's")
    engine = ForwardOnlyEngine(
        algorithm,
        update=header["update"],
        direct_step=header["direct_step"],
        fused_kernels=header["fused_kernels"],
        step_limit=header["step_limit"],
    )
    engine._warned_step_limit = True  # the run warned about its step limit already
    estimator = engine.estimator(optimizer, [model])
    on_device = engine.on_device(estimator, optimizer)
    device = estimator.params[0].device
    applied = skipped = 0
    try:
        for record in records:
            if record.get("skip"):
                skipped += 1
                continue
            for group, lr in zip(optimizer.param_groups, record["lr"]):
                group["lr"] = lr
            for index, delta in record.get("hp", {}).items():
                optimizer.param_groups[int(index)].update({k: _unplain(v) for k, v in delta.items()})
            terms = [
                (
                    _population(term, algorithm),
                    torch.from_numpy(_decode(term["c"], "<f4").copy()).to(device if on_device else "cpu"),
                )
                for term in record["t"]
            ]
            if engine.update == "grad":
                for param in estimator.params:
                    param.grad = None
                engine.write(estimator, optimizer, terms, int(record["seed"]))
                engine.limit_gradients(estimator, optimizer)
                _clip(optimizer, header.get("gradient_clip"))
                optimizer.step()
            else:
                applies = torch.ones((), dtype=torch.bool, device=device) if on_device else None
                engine.write(estimator, optimizer, terms, int(record["seed"]), applies)
            applied += 1
            if verify and int(engine.step_limited) != record["lim"]:
                raise ReplayMismatchError(
                    f"step {record['s']}: the step limit scaled {record['lim']} tensor(s) in the run and"
                    f" {int(engine.step_limited)} in the replay: the log or the model differs from the run's"
                )
    finally:
        for param in estimator.params:
            param.grad = None
        engine.reset()
    final = weights_hash(trainable)
    if verify and end is not None and end["steps"] == len(records) and final != end["end"]:
        raise ReplayMismatchError(
            f"the replayed weights differ from the run's trained weights recorded in {path} (hash {final[:12]} vs"
            f" {end['end'][:12]}): a corrupted log, another kind of device or another library version"
        )
    return ReplayResult(applied, skipped, final, optimizer)


__all__ = [
    "BaseWeightsError",
    "ReplayMismatchError",
    "ReplayResult",
    "SeedReplayLog",
    "check_replayable",
    "read_log",
    "replay",
    "weights_hash",
]
