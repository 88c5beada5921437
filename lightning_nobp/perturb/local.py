"""Drive an unmodified module's ``nn.Linear`` layers for local learning: find them, tap their inputs, write grads.

The user's forward runs on each data variant of the rule (for Forward-Forward: positive and negative data) with
forward pre-hooks that record each layer's input (detached: nothing flows between layers). Each layer's local
update then goes into ``p.grad`` and the user's optimizer steps as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nobp.algorithms.local import ForwardForward, LocalLearning

UNSUPPORTED_BATCH = (
    "{name} needs classification batches of the form (inputs, labels, ...): a tuple or list whose first element is"
    " a float tensor (N, ...) and whose second is a tensor of class indices (N,). Got {got}."
)


def find_layers(algorithm: LocalLearning, root: nn.Module, params: Sequence[Tensor]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to train: the named ones, or every one whose weight is among ``params``.

    Raises a clear error for models the rules cannot handle (no ``nn.Linear``, other layer types named, trained
    parameters that no chosen layer owns).
    """
    name = type(algorithm).__name__
    modules = dict(root.named_modules())
    trained = {id(p) for p in params}
    if algorithm.layers is not None:
        missing = [n for n in algorithm.layers if n not in modules]
        if missing:
            raise ValueError(f"{name}(layers=...): no submodule named {missing}; the model has {list(modules)[1:]}")
        wrong = [n for n in algorithm.layers if not isinstance(modules[n], nn.Linear)]
        if wrong:
            raise ValueError(f"{name} trains nn.Linear layers only; {wrong} are not nn.Linear")
        layers = {n: modules[n] for n in algorithm.layers}
    else:
        layers = {n: m for n, m in modules.items() if isinstance(m, nn.Linear) and id(m.weight) in trained}
    if not layers:
        raise ValueError(
            f"{name} trains nn.Linear layers with local objectives and found none trained by the optimizer; models"
            " built from other layers (convolutions, attention) need MeZO, EggRoll or ForwardGradient."
        )
    owned = {id(p) for layer in layers.values() for p in layer.parameters()}
    orphans = [n for n, p in root.named_parameters() if id(p) in trained and id(p) not in owned]
    if orphans:
        raise ValueError(
            f"{name} trains only the nn.Linear layers {list(layers)}; the optimizer also holds {orphans}, which no"
            " local objective would train. Leave them out of the optimizer or set requires_grad=False."
        )
    return layers  # type: ignore[return-value]


class LayerInputTaps:
    """Context manager recording the input of each tapped layer (detached, float32) and the order of the calls.

    Args:
        layers: the layers to tap, by name.
    """

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = layers
        self.inputs: dict[str, Tensor] = {}
        self.order: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LayerInputTaps:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def record(module: nn.Module, args: Any) -> None:
            if name in self.inputs:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one forward; local learning needs each layer called once per forward"
                )
            self.inputs[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.order.append(name)

        return record


class LocalLearner:
    """Runs one local-learning step of an unmodified model: the variants' forwards, then every layer's update.

    Args:
        algorithm: the local rule (``ForwardForward``, ``MonoForward``).
        root: the user's module.
        params: the parameters the optimizer trains.
    """

    def __init__(self, algorithm: LocalLearning, root: nn.Module, params: Sequence[Tensor]) -> None:
        self.algorithm = algorithm
        self.layers = find_layers(algorithm, root, params)
        self.order: list[str] | None = None

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        name = type(self.algorithm).__name__
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(UNSUPPORTED_BATCH.format(name=name, got=type(batch).__name__))
        inputs, labels = batch[0], batch[1]
        if not (isinstance(inputs, Tensor) and inputs.is_floating_point() and isinstance(labels, Tensor)):
            raise TypeError(
                UNSUPPORTED_BATCH.format(name=name, got=f"({type(inputs).__name__}, {type(labels).__name__})")
            )
        if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(inputs):
            raise TypeError(UNSUPPORTED_BATCH.format(name=name, got=f"labels of shape {tuple(labels.shape)}"))
        return inputs, labels

    @torch.no_grad()
    def step(self, batch: Any, run: Callable[[Any], object], step_seed: int, scale: float = 1.0) -> dict[str, float]:
        """Add every layer's local gradient (times ``scale``) to its ``.grad``; returns the local losses.

        Args:
            batch: the training batch ``(inputs, labels, ...)``.
            run: runs the user's forward (its training step) on a batch of the same structure.
            step_seed: counter-derived seed of this micro-batch (negative labels).
            scale: factor of the gradients (``1 / accumulate_grad_batches``).
        """
        inputs, labels = self.split_batch(batch)
        classes = None
        if self.order is not None:
            classes = self.layers[self.order[-1]].out_features
        taps: dict[str, LayerInputTaps] = {}
        variants = None
        if classes is None:  # first step: learn the layers' order from a plain forward
            with LayerInputTaps(self.layers) as first:
                run(batch)
            missing = [n for n in self.layers if n not in first.inputs]
            if missing:
                raise RuntimeError(f"layers {missing} did not run in the forward of training_step")
            self.order = first.order
            classes = self.layers[self.order[-1]].out_features
            taps["data"] = first
        if classes < 2:
            raise ValueError(
                f"the last layer {self.order[-1]!r} has {classes} outputs; local learning expects the classifier last"
            )
        variants = self.algorithm.variants(inputs, labels, classes, step_seed)
        for variant, data in variants.items():
            if variant in taps:
                continue
            with LayerInputTaps(self.layers) as tap:
                run(type(batch)((data, *batch[1:])))
            taps[variant] = tap
        assert self.order is not None
        losses: dict[str, float] = {}
        for position, name in enumerate(self.order):
            layer = self.layers[name]
            layer_inputs = {variant: tap.inputs[name] for variant, tap in taps.items()}
            if position == len(self.order) - 1:
                update = self.algorithm.readout_update(layer.weight, layer.bias, layer_inputs, labels)
            else:
                update = self.algorithm.hidden_update(position, layer.weight, layer.bias, layer_inputs, labels)
            for param, grad in ((layer.weight, update.weight), (layer.bias, update.bias)):
                if param is None or grad is None or not param.requires_grad:
                    continue
                grad = (grad * scale).to(param.dtype)
                param.grad = grad if param.grad is None else param.grad.add_(grad)
            losses[f"local_loss/{name}"] = update.loss
        return losses

    @torch.no_grad()
    def goodness_predictions(self, inputs: Tensor, run: Callable[[Any], object]) -> Tensor:
        """Forward-Forward's own classifier: the label whose embedding gives the most goodness, summed over layers.

        Args:
            inputs: float inputs ``(N, ...)``.
            run: runs the user's forward on a batch ``(inputs, labels)`` (e.g. ``lambda b: model(b[0])``).
        """
        algorithm = self.algorithm
        if not isinstance(algorithm, ForwardForward) or self.order is None:
            raise RuntimeError("goodness predictions need a ForwardForward learner that has taken a step")
        classes = self.layers[self.order[-1]].out_features
        scores = torch.zeros(len(inputs), classes)
        for label in range(classes):
            labels = torch.full((len(inputs),), label, dtype=torch.long, device=inputs.device)
            with LayerInputTaps(self.layers) as tap:
                run((algorithm.embed(inputs, labels, classes), labels))
            for position, name in enumerate(self.order[:-1]):
                layer = self.layers[name]
                _, _, goodness = algorithm.goodness(position, layer.weight, layer.bias, tap.inputs[name])
                scores[:, label] += goodness.float().cpu()
        return scores.argmax(1)
