"""``ArithmeticDataModule``: small arithmetic problems with exactly checkable answers, generated from a seed.

Every problem of a finite space (``first`` op ``second``, e.g. ``37 + 8``) is enumerated once; a shuffle seeded by
``split_seed`` sets aside fixed test and validation problems, and training batches are drawn on the fly, from the
remaining problems only, by a generator seeded with ``seed``: held-out problems are never trained on, by
construction. A prompt is the problem behind a short few-shot prefix (``"3 + 4 = 7\\n12 + 5 = 17\\n37 + 8 ="``) that
shows the answer's format; :func:`exact_match` checks a generated continuation.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

#: the first integer of a text: an optional minus sign and a run of digits
NUMBER = re.compile(r"-?\d+")
OPERATORS = "+-*"
DEFAULT_TEMPLATE = "3 + 4 = 7\n12 + 5 = 17\n{problem} ="

Problem = tuple[str, str]
"""``(problem, answer)``, e.g. ``("37 + 8", "45")``."""


def exact_match(text: str, answer: str) -> bool:
    """Whether the first integer in ``text`` equals ``answer``.

    The first integer is the first run of digits, with the minus sign right before it if any (``" 45.\\n"`` ->
    45, ``" -3"`` -> -3, ``"x = 12 + 3"`` -> 12, ``"4.5"`` -> 4); text without digits matches nothing. Leading
    zeros do not matter (``"045"`` equals ``"45"``).

    Args:
        text: the generated continuation.
        answer: the expected integer, as a string.
    """
    found = NUMBER.search(text)
    return found is not None and Decimal(found.group(0)) == Decimal(answer)


def problem_space(first: tuple[int, int], second: tuple[int, int], operators: str) -> list[Problem]:
    """Every problem ``a op b`` for ``a`` in ``first`` and ``b`` in ``second`` (inclusive ranges), with its answer.

    Args:
        first: the range of the left operand.
        second: the range of the right operand.
        operators: the operators to use, a subset of ``"+-*"``.
    """
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators={operators!r}: choose among {OPERATORS!r}")
    if first[0] > first[1] or second[0] > second[1]:
        raise ValueError(f"first={first}, second={second}: each range is (low, high) with low <= high")
    problems = []
    for op in operators:
        for a in range(first[0], first[1] + 1):
            for b in range(second[0], second[1] + 1):
                value = a + b if op == "+" else a - b if op == "-" else a * b
                problems.append((f"{a} {op} {b}", str(value)))
    return problems


class ProblemDataset(Dataset):
    """Fixed problems as ``(prompt, answer)`` pairs.

    Args:
        problems: the ``(problem, answer)`` pairs.
        template: the prompt's format string, with ``{problem}``.
    """

    def __init__(self, problems: list[Problem], template: str) -> None:
        self.problems = problems
        self.template = template

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> tuple[str, str]:
        problem, answer = self.problems[index]
        return self.template.format(problem=problem), answer


class DrawnProblems(ProblemDataset):
    """Training problems drawn on the fly: item ``i`` is a pure function of ``(seed, i)``, picked from the pool.

    Args:
        problems: the pool to draw from.
        template: the prompt's format string, with ``{problem}``.
        seed: the draws' seed.
        length: items per epoch.
    """

    def __init__(self, problems: list[Problem], template: str, seed: int, length: int) -> None:
        super().__init__(problems, template)
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[str, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        pick = random.Random(self.seed * 1_000_003 + index).randrange(len(self.problems))
        return super().__getitem__(pick)


def collate_problems(items: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """A batch: the prompts and the answers, two lists of strings (module level, so workers can pickle it)."""
    return [prompt for prompt, _ in items], [answer for _, answer in items]


class ArithmeticDataModule(pl.LightningDataModule):
    """Arithmetic problems ``a op b`` as few-shot prompts; batches are ``(prompts, answers)``, lists of strings.

    Args:
        template: the prompt's format string, with ``{problem}``.
        first: inclusive range of the left operand.
        second: inclusive range of the right operand.
        operators: the operators, a subset of ``"+-*"``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        val_size: fixed validation problems.
        test_size: fixed held-out test problems.
        train_size: training problems drawn per epoch (with replacement, from the problems left for training).
        split_seed: seed of the shuffle that sets the validation and test problems aside.
        seed: seed of the training draws; ``None`` draws one from torch's global generator at ``setup`` (so
            ``seed_everything`` sets it).
    """

    def __init__(
        self,
        template: str = DEFAULT_TEMPLATE,
        first: tuple[int, int] = (10, 99),
        second: tuple[int, int] = (1, 9),
        operators: str = "+",
        batch_size: int = 16,
        eval_batch_size: int = 50,
        val_size: int = 100,
        test_size: int = 200,
        train_size: int = 100_000,
        split_seed: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if "{problem}" not in template:
            raise ValueError(f"template={template!r} must contain '{{problem}}'")
        self.template = template
        self.problems = problem_space(tuple(first), tuple(second), operators)  # type: ignore[arg-type]
        if val_size + test_size >= len(self.problems):
            raise ValueError(
                f"val_size={val_size} + test_size={test_size} leaves no training problem out of"
                f" {len(self.problems)}: widen first/second or hold out fewer"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.train_size = train_size
        self.split_seed = split_seed
        self.seed = seed
        self.datasets: dict[str, ProblemDataset] = {}

    def split(self) -> dict[str, list[Problem]]:
        """The problems of each split: ``test`` and ``val`` fixed by ``split_seed``, ``train`` the rest."""
        order = list(self.problems)
        random.Random(self.split_seed).shuffle(order)
        held = self.test_size + self.val_size
        return {"test": order[: self.test_size], "val": order[self.test_size : held], "train": order[held:]}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:  # once: fit, validate and test see the same problems
            return
        splits = self.split()
        seed = int(torch.randint(0, 2**31 - 1, ())) if self.seed is None else self.seed
        self.datasets = {
            "train": DrawnProblems(splits["train"], self.template, seed, self.train_size),
            "val": ProblemDataset(splits["val"], self.template),
            "test": ProblemDataset(splits["test"], self.template),
        }

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=False, collate_fn=collate_problems)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
