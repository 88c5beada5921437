"""What a training step asks to optimise: a loss to minimise, or a reward to maximise.

The contract, for a LightningModule's ``training_step`` and a Fabric optimizer closure:

- a loss: a one-element tensor, or a dict with a ``"loss"`` one-element tensor (Lightning's own contract);
- a reward: a dict with a ``"reward"`` tensor and no ``"loss"``: one element, or one value per sample (a 1-D
  tensor, averaged). Anything can compute it (exact match, accuracy from ``argmax``, a classifier's verdict, a
  torchmetrics metric's ``compute()``) as long as it is a tensor computed the same way on every call; it need not
  be differentiable. The strategies minimise ``-mean(reward)``: fitness shaping, antithetic pairs, several
  processes and gradient accumulation work as for a loss, and the step's reported loss is ``-mean(reward)``.

A reward carries no per-sample loss rows, so the per-row estimates of ``EggRoll``/``OpenES`` (which read the rows
of a cross-entropy or squared error computed in the step) are not used for it: every layer is estimated from the
members' scalar fitness, as evolution strategies are published.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

#: the key of a reward in a training step's output
REWARD_KEY = "reward"


def reward_of(output: object) -> Tensor | None:
    """The reward in a step's output (``None`` when it returns a loss).

    Raises:
        ValueError: the output has both a loss and a reward, or a reward that is not a 0-D or 1-D tensor.
    """
    if not isinstance(output, Mapping) or REWARD_KEY not in output:
        return None
    if output.get("loss") is not None:
        raise ValueError(
            "training_step returned both 'loss' and 'reward': return {'reward': r} to maximise a reward, or"
            " {'loss': l} to minimise a loss (log the other with self.log)"
        )
    reward = output[REWARD_KEY]
    if not isinstance(reward, Tensor) or reward.dim() > 1 or reward.numel() == 0:
        shape = tuple(reward.shape) if isinstance(reward, Tensor) else type(reward).__name__
        raise ValueError(
            f"the reward must be a tensor with one value, or one value per sample (1-D), got {shape}: compute it"
            " with tensor operations, e.g. (logits.argmax(-1) == y).float()"
        )
    return reward


def objective_of(output: object) -> Tensor | None:
    """The loss to minimise in a step's output: the tensor itself, ``output["loss"]``, or ``-mean(reward)``;
    ``None`` if it has none."""
    if isinstance(output, Tensor):
        return output
    reward = reward_of(output)
    if reward is not None:
        return -reward.float().mean()
    if isinstance(output, Mapping):
        return output.get("loss")
    return None
