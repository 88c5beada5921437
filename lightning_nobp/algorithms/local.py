"""Local learning: each ``nn.Linear`` layer learns from its own objective (Forward-Forward, Mono-Forward).

The rules here are hand-derived and use no autograd. A layer's update depends only on what enters that layer (its
input, detached, from a forward pass of the user's model), its own weights and the labels: no error signal crosses
from one layer to another. Each hidden layer is assumed to be followed by a ReLU in the user's model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_nobp.algorithms.seeds import derive_seed


@dataclass
class LayerUpdate:
    """The local gradient of one layer and its local loss.

    Args:
        weight: gradient of the layer's weight ``(out, in)``.
        bias: gradient of the layer's bias (``None`` when the layer has none).
        loss: the layer's local objective, for logging.
    """

    weight: Tensor
    bias: Tensor | None
    loss: float


def _linear_gradients(grad_out: Tensor, inputs: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``z = x W^T + b`` given ``dL/dz`` (``grad_out``): ``dW = dz^T x``, ``db = sum dz``."""
    return grad_out.t() @ inputs, grad_out.sum(0) if has_bias else None


def readout_update(weight: Tensor, bias: Tensor | None, inputs: Tensor, labels: Tensor) -> LayerUpdate:
    """A softmax read-out layer: cross-entropy of ``x W^T + b`` against the labels, from its own input only.

    Args:
        weight: the layer's weight ``(classes, in)``.
        bias: the layer's bias or ``None``.
        inputs: what the layer receives in the user's forward, ``(N, in)``.
        labels: class indices ``(N,)``.
    """
    logits = F.linear(inputs, weight.float(), None if bias is None else bias.float())
    loss = F.cross_entropy(logits, labels)
    grad_logits = (logits.softmax(-1) - F.one_hot(labels, logits.shape[-1]).float()) / len(labels)
    grad_weight, grad_bias = _linear_gradients(grad_logits, inputs, bias is not None)
    return LayerUpdate(grad_weight, grad_bias, float(loss))


class LocalLearning(ABC):
    """Base class of per-layer local learning rules (framework-free).

    Batches are ``(inputs, labels)`` for classification: ``inputs`` float ``(N, ...)`` (flattened per sample by
    the rules), ``labels`` class indices ``(N,)``. The layers are the user's ``nn.Linear`` modules (by name, or all
    of them), in the order the forward calls them; the last one is the classifier (``out_features`` = classes)
    and learns by a local softmax read-out on its own input, so the user's unchanged forward keeps predicting.

    Args:
        layers: names of the ``nn.Linear`` submodules to train (as in ``named_modules()``); ``None``: every
            ``nn.Linear`` whose weight the optimizer trains.
    """

    def __init__(self, layers: Sequence[str] | None = None) -> None:
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"{type(self).__name__}(layers={layers!r}): give a list of submodule names")
        self.layers = None if layers is None else list(layers)

    @abstractmethod
    def variants(self, inputs: Tensor, labels: Tensor, classes: int, step_seed: int) -> dict[str, Tensor]:
        """The inputs to run the user's forward on this step, by name (``"data"`` is the batch itself)."""

    @abstractmethod
    def hidden_update(
        self, position: int, weight: Tensor, bias: Tensor | None, inputs: dict[str, Tensor], labels: Tensor
    ) -> LayerUpdate:
        """The local update of the hidden layer at ``position`` (forward order) from its inputs under each variant.

        Args:
            position: the layer's position in forward order (0: first).
            weight: the layer's weight ``(out, in)``.
            bias: the layer's bias or ``None``.
            inputs: the layer's input (float32, ``(N, in)``, detached) under each variant of :meth:`variants`.
            labels: class indices ``(N,)``.
        """

    def readout_update(
        self, weight: Tensor, bias: Tensor | None, inputs: dict[str, Tensor], labels: Tensor
    ) -> LayerUpdate:
        """The classifier layer learns a softmax read-out of what it receives for the plain batch."""
        return readout_update(weight, bias, inputs["data"], labels)


def embed_labels(
    inputs: Tensor, labels: Tensor, classes: int, scale: float, features: Sequence[int] | None = None
) -> Tensor:
    """Hinton's label embedding: ``classes`` features of each flattened input become ``scale * one_hot(label)``.

    Args:
        inputs: float inputs ``(N, ...)``.
        labels: class indices ``(N,)``.
        classes: number of classes.
        scale: value of the hot feature.
        features: which flattened features carry the label (``classes`` of them); the first ``classes`` by default.
    """
    flat = inputs.reshape(len(inputs), -1).float().clone()
    if flat.shape[1] <= classes:
        raise ValueError(
            f"ForwardForward embeds the label in {classes} input features, but the inputs have only"
            f" {flat.shape[1]} features per sample."
        )
    columns = torch.arange(classes) if features is None else torch.as_tensor(list(features))
    if len(columns) != classes or int(columns.max()) >= flat.shape[1] or int(columns.min()) < 0:
        raise ValueError(
            f"ForwardForward(label_features=...) must name {classes} distinct features below {flat.shape[1]}"
        )
    flat[:, columns.to(flat.device)] = F.one_hot(labels, classes).float() * scale
    return flat.reshape(inputs.shape)


def quietest_features(inputs: Tensor, count: int) -> list[int]:
    """The ``count`` flattened features that vary least over ``inputs``: where an embedded label hides least data.

    For MNIST-like images these are border pixels. Compute them once from the training data and pass them as
    ``ForwardForward(label_features=...)`` (a fixed list, so resumed runs embed labels in the same place).

    Args:
        inputs: training inputs ``(N, ...)``.
        count: how many features (the number of classes).
    """
    variance = inputs.reshape(len(inputs), -1).float().var(0)
    return sorted(int(i) for i in variance.argsort(stable=True)[:count])


class ForwardForward(LocalLearning):
    """Forward-Forward (Hinton 2022): hidden layers separate positive from negative data by their goodness.

    Positive data is the input with its true label embedded in ``classes`` of its features (the first ones, or
    ``label_features``), negative data the same input with a wrong label (drawn from counter seeds). At test time
    the user's forward sees the plain input, so the label features should be ones that carry little data
    (MNIST's top-left pixels are always 0; see :func:`quietest_features` for other data).

    For each hidden layer with input ``x`` (length-normalised after the first layer, as in the paper) the goodness
    is ``g = mean_j relu(x W^T + b)_j^2`` and the local loss ``softplus(theta - g_pos) + softplus(g_neg - theta)``.
    Its gradient is derived by hand from the layer's own input and weights. The classifier layer learns a softmax
    read-out of what it receives for the plain batch (the "linear classifier on top" variant, so the user's
    forward predicts unchanged).

    Args:
        threshold: the goodness threshold ``theta``.
        label_scale: value written for the embedded label (1.0 for inputs scaled to [0, 1]).
        label_features: indices of the flattened input features that carry the label; ``None``: the first ones.
        layers: names of the ``nn.Linear`` submodules to train; ``None``: all trained ``nn.Linear`` layers.
    """

    def __init__(
        self,
        threshold: float = 2.0,
        label_scale: float = 1.0,
        label_features: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(layers)
        if label_features is not None and len(set(label_features)) != len(list(label_features)):
            raise ValueError(f"ForwardForward(label_features={label_features!r}): the features must be distinct")
        self.label_features = None if label_features is None else [int(i) for i in label_features]
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"ForwardForward(threshold={threshold!r}): the threshold must be positive")
        self.threshold = float(threshold)
        self.label_scale = float(label_scale)

    def __repr__(self) -> str:
        return (
            f"ForwardForward(threshold={self.threshold}, label_scale={self.label_scale},"
            f" label_features={self.label_features}, layers={self.layers})"
        )

    def variants(self, inputs: Tensor, labels: Tensor, classes: int, step_seed: int) -> dict[str, Tensor]:
        generator = torch.Generator(device=labels.device).manual_seed(derive_seed(step_seed, 0xFF))
        shift = torch.randint(1, classes, labels.shape, generator=generator, device=labels.device)
        wrong = (labels + shift) % classes
        return {
            "data": inputs,
            "positive": self.embed(inputs, labels, classes),
            "negative": self.embed(inputs, wrong, classes),
        }

    def embed(self, inputs: Tensor, labels: Tensor, classes: int) -> Tensor:
        """``inputs`` with ``labels`` embedded in the label features."""
        return embed_labels(inputs, labels, classes, self.label_scale, self.label_features).to(inputs.dtype)

    def goodness(
        self, position: int, weight: Tensor, bias: Tensor | None, inputs: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, h, g)``: the (normalised) input, ``relu(x W^T + b)`` and the goodness ``mean_j h_j^2``."""
        x = inputs if position == 0 else inputs / (inputs.norm(dim=1, keepdim=True) + 1e-8)
        h = F.linear(x, weight.float(), None if bias is None else bias.float()).relu()
        return x, h, h.square().mean(1)

    def hidden_update(
        self, position: int, weight: Tensor, bias: Tensor | None, inputs: dict[str, Tensor], labels: Tensor
    ) -> LayerUpdate:
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        loss = 0.0
        for variant, sign in (("positive", 1.0), ("negative", -1.0)):
            x, h, g = self.goodness(position, weight, bias, inputs[variant])
            margin = sign * (g - self.threshold)  # > 0 when the layer is right
            count = 2 * len(g)
            loss += float(F.softplus(-margin).sum()) / count
            grad_g = -sign * torch.sigmoid(-margin) / count  # d softplus(-margin) / d g
            grad_z = grad_g[:, None] * 2.0 * h / h.shape[1]  # d g / d z = 2 relu(z) / units
            w, b = _linear_gradients(grad_z, x, bias is not None)
            grad_weight += w
            if grad_bias is not None and b is not None:
                grad_bias += b
        return LayerUpdate(grad_weight, grad_bias, loss)

    @torch.no_grad()
    def separation(
        self, weight: Tensor, bias: Tensor | None, positive: Tensor, negative: Tensor, position: int = 0
    ) -> float:
        """Fraction of samples whose positive goodness exceeds their negative goodness (a layer's own score)."""
        _, _, g_pos = self.goodness(position, weight, bias, positive)
        _, _, g_neg = self.goodness(position, weight, bias, negative)
        return float((g_pos > g_neg).float().mean())


class MonoForward(LocalLearning):
    """Mono-Forward (Gong et al. 2025): each hidden layer learns to predict the classes through its own projection.

    A hidden layer with input ``x`` computes ``a = relu(x W^T + b)`` and the local logits ``a M^T`` with a
    projection ``M (classes, out)`` that belongs to the algorithm (created at the first step, trained with Adam
    at ``projection_lr``; not part of the user's model or checkpoint). The local cross-entropy's gradient for ``W``,
    ``b`` and ``M`` is derived by hand. The classifier layer learns the cross-entropy of its own output.

    Args:
        projection_lr: Adam learning rate of the per-layer projections.
        layers: names of the ``nn.Linear`` submodules to train; ``None``: all trained ``nn.Linear`` layers.
        seed: seed of the projections' initialisation.
    """

    def __init__(self, projection_lr: float = 1e-3, layers: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__(layers)
        if not (isinstance(projection_lr, (int, float)) and projection_lr > 0):
            raise ValueError(f"MonoForward(projection_lr={projection_lr!r}): the learning rate must be positive")
        self.projection_lr = float(projection_lr)
        self.seed = seed
        #: the per-layer projections ``M``, by forward position
        self.projections: dict[int, Tensor] = {}
        self._optimizers: dict[int, torch.optim.Optimizer] = {}

    def __repr__(self) -> str:
        return f"MonoForward(projection_lr={self.projection_lr}, layers={self.layers})"

    def variants(self, inputs: Tensor, labels: Tensor, classes: int, step_seed: int) -> dict[str, Tensor]:
        self.classes = classes
        return {"data": inputs}

    def projection(self, position: int, units: int, device: torch.device) -> Tensor:
        """The projection of the layer at ``position`` (created with Kaiming-uniform values on first use)."""
        if position not in self.projections:
            generator = torch.Generator(device=device).manual_seed(derive_seed(self.seed, position))
            bound = 1.0 / math.sqrt(units)
            values = torch.rand((self.classes, units), generator=generator, device=device) * 2 * bound - bound
            self.projections[position] = values
            self._optimizers[position] = torch.optim.Adam([values], lr=self.projection_lr)
        return self.projections[position]

    def hidden_update(
        self, position: int, weight: Tensor, bias: Tensor | None, inputs: dict[str, Tensor], labels: Tensor
    ) -> LayerUpdate:
        x = inputs["data"]
        z = F.linear(x, weight.float(), None if bias is None else bias.float())
        a = z.relu()
        projection = self.projection(position, a.shape[1], a.device)
        logits = a @ projection.t()
        loss = F.cross_entropy(logits, labels)
        grad_logits = (logits.softmax(-1) - F.one_hot(labels, logits.shape[-1]).float()) / len(labels)
        grad_z = (grad_logits @ projection) * (z > 0)
        grad_weight, grad_bias = _linear_gradients(grad_z, x, bias is not None)
        projection.grad = grad_logits.t() @ a
        self._optimizers[position].step()
        projection.grad = None
        return LayerUpdate(grad_weight, grad_bias, float(loss))
