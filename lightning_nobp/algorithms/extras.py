"""``EstimatorExtras``: the research options that evolution strategies add to their plain published estimate."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_nobp.algorithms.input_bases import check_input_subspace


@dataclass(frozen=True)
class EstimatorExtras:
    """What ``EggRoll`` and ``OpenES`` add to the published estimate (``extras=None``: the method as published).

    Per-row estimates learn a row-local layer (a classifier's head, a language model's output projection: an
    ``nn.Linear`` whose output row ``n`` changes loss row ``n`` only, tested once on the first batch) from the
    members' per-row losses instead of their mean losses, at the scale of the estimate it replaces. They apply
    with antithetic pairs, when every member sees the whole batch and the training step returns one
    ``cross_entropy``, ``nll_loss``, ``mse_loss`` or ``binary_cross_entropy_with_logits``; with several processes
    they are turned off with a warning. They use more information than evolution strategies' one scalar per member.

    The input subspace draws the noise of layers fed directly by the data (an MLP's first layer) inside the
    principal subspace of their inputs holding a fraction of the inputs' energy (estimated over the first 16
    batches). Components outside the subspace are dropped and the rest reweighted: a biased, preconditioned
    estimate, which helps where the data's energy is concentrated (images).

    Per-row embeddings estimate a causal sequence model's ``nn.Embedding`` weights from the per-row losses, leaving
    out the paths through attention to other positions' losses (biased). The exact head gradient gives the layer
    whose output is the logits of the step's ``F.cross_entropy`` its exact gradient ``sum_n c_n (softmax(z_n) -
    onehot(y_n)) h_n^T`` (the output layer's delta rule: no backward pass), rescaled to the norm of the estimate
    it replaces; the members then leave that layer unperturbed. How each is computed: ``docs/algorithms.md``.

    Args:
        per_row_estimates: estimate row-local layers from the members' per-row losses.
        input_subspace: kept-energy fraction of the data-fed layers' input subspace (biased); ``None``: off.
        per_row_embeddings: with per-row estimates, also estimate a causal sequence model's embeddings (biased).
        per_row_max_outputs: widest layer output estimated from per-row losses; ``None``: population / 2.
        exact_head_gradient: with per-row estimates, the cross-entropy head takes its exact gradient.
    """

    per_row_estimates: bool = True
    input_subspace: float | None = 0.97
    per_row_embeddings: bool = False
    per_row_max_outputs: int | None = None
    exact_head_gradient: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_subspace", check_input_subspace("EstimatorExtras", self.input_subspace))
        if self.per_row_embeddings and not self.per_row_estimates:
            raise ValueError(
                "EstimatorExtras(per_row_estimates=False, per_row_embeddings=True): embeddings are estimated from"
                " per-row losses like row-local layers; set per_row_estimates=True or per_row_embeddings=False"
            )
        if self.exact_head_gradient and not self.per_row_estimates:
            raise ValueError(
                "EstimatorExtras(per_row_estimates=False, exact_head_gradient=True): the output layer's exact"
                " gradient replaces its per-row estimate; set per_row_estimates=True or exact_head_gradient=False"
            )
        outputs = self.per_row_max_outputs
        if outputs is not None and not (isinstance(outputs, int) and not isinstance(outputs, bool) and outputs >= 1):
            raise ValueError(
                f"EstimatorExtras(per_row_max_outputs={outputs!r}): a positive integer (the widest layer output"
                " estimated from per-row losses), or None for population / 2"
            )

    @property
    def label(self) -> str:
        """The extras in a few words, for tables and logs (empty when none is on)."""
        parts = []
        if self.per_row_estimates:
            parts.append("per-row head")
        if self.exact_head_gradient:
            parts.append("exact head gradient")
        if self.per_row_embeddings:
            parts.append("per-row embeddings")
        if self.input_subspace is not None:
            parts.append(f"input subspace {self.input_subspace:g} (biased)")
        return " + ".join(parts)


#: the published method: no extras
PLAIN = EstimatorExtras(per_row_estimates=False, input_subspace=None)
