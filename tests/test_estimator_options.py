"""What an algorithm's options become in the estimator, and what is said when some cannot apply."""

from __future__ import annotations

import warnings

import pytest

from lightning_nobp.algorithms import EggRoll
from lightning_nobp.perturb.estimator import EstimatorOptions

PLAIN = dict(extras=None)  # the published method


def test_several_processes_say_which_extras_they_turn_off() -> None:
    with pytest.warns(
        UserWarning,
        match=r"2 processes: per_row_estimates, input_subspace=0.97 turned off.*EggRoll\(\.\.\., extras=None\)",
    ):
        options = EstimatorOptions.of(EggRoll(population=8), processes=2)
    assert not options.rows.enabled and options.input_subspace is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for nothing that needs one process: silent
        EstimatorOptions.of(EggRoll(population=8, **PLAIN), processes=2)
        EstimatorOptions.of(EggRoll(population=8), processes=1)
