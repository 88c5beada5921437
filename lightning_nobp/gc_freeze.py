"""Keep Python's full garbage collections away from the objects that exist when training starts.

A forward-only step is many small operations, so it creates and drops many Python objects; every few hundred
steps CPython then runs a full collection, which visits every object of the process. After importing Lightning,
torch and scikit-learn that is about 520,000 objects, so each full collection stalls a step noticeably (figures
in ``docs/results.md``). The
objects that exist when training starts (modules, functions, the model) live as long as the run: ``gc.freeze``
moves them out of the collector's sight, and the collections during training visit only what training creates.
``gc.unfreeze`` hands them back when training ends.
"""

from __future__ import annotations

import gc


class StartupObjectsFreeze:
    """``gc.freeze()`` at the start of training, ``gc.unfreeze()`` at its end, unless objects were frozen already
    (by the user or another library: theirs are left alone)."""

    def __init__(self) -> None:
        self.frozen = False

    def freeze(self) -> None:
        """Collect once, then freeze every object tracked now (a no-op if already frozen, here or elsewhere)."""
        if self.frozen or gc.get_freeze_count():
            return
        gc.collect()  # what is garbage now must not be frozen with the rest
        gc.freeze()
        self.frozen = True

    def release(self) -> None:
        """Unfreeze what :meth:`freeze` froze (safe to call more than once)."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
