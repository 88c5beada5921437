"""Checkpoints that survive a kill and never load half-way: atomic, durable writes and a content digest.

``SealedCheckpointIO`` is the default ``checkpoint_io`` of ``NoBackpropStrategy``. A local checkpoint is written to a
temporary file in the same folder, flushed to disk (``fsync``) and renamed over the target, so a process killed while
writing leaves the previous checkpoint as it was. Every checkpoint carries a SHA-256 digest of its tensors' bytes and
scalar values (``CHECKPOINT_DIGEST_KEY``): ``torch.load`` does not check the CRCs of a checkpoint's records, so a
flipped byte in a weight would otherwise load silently. Loading verifies the digest and turns a truncated, corrupted
or tampered file into a :class:`CorruptCheckpointError` that names the file. The files stay plain ``torch.save``
checkpoints: ``torch.load(path, weights_only=True)`` reads them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

#: the checkpoint key of the content digest (removed again when the checkpoint is loaded)
CHECKPOINT_DIGEST_KEY = "lightning_nobp_digest"
#: suffix of the temporary file a checkpoint is written to before it is renamed over the target
PARTIAL_SUFFIX = ".partial"
#: the process's umask (read once at import): checkpoints get the permissions a plain ``open`` would give them
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted: truncated, corrupted, or its content does not match its digest."""


def write_payload(handle: BinaryIO, payload: memoryview) -> None:
    """Write the serialized checkpoint into the open temporary file (one place, so tests can interrupt it).

    Args:
        handle: the temporary file, opened for binary writing.
        payload: the bytes ``torch.save`` produced.
    """
    handle.write(payload)


def _update_digest(digest: Any, value: Any, path: str) -> None:
    """Feed ``value`` (tensors by their bytes, containers recursively, scalars by value) into ``digest``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        flatten = getattr(type(tensor), "__tensor_flatten__", None)
        if flatten is not None and type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            names, _ = tensor.__tensor_flatten__()  # a tensor subclass (low-bit weight): its stored tensors
            digest.update(f"{path}:{type(tensor).__name__}".encode())
            for name in names:
                inner = getattr(tensor, name, None)
                if inner is not None:
                    _update_digest(digest, inner, f"{path}.{name}")
            return
        plain = tensor.cpu().contiguous().reshape(-1)
        digest.update(f"{path}:{plain.dtype}:{tuple(tensor.shape)}".encode())
        if plain.numel():
            digest.update(plain.view(torch.uint8).numpy().tobytes())
        return
    if isinstance(value, dict):
        digest.update(f"{path}:dict{len(value)}".encode())
        for key, item in value.items():
            _update_digest(digest, item, f"{path}/{key!r}")
        return
    if isinstance(value, (list, tuple)):
        digest.update(f"{path}:{type(value).__name__}{len(value)}".encode())
        for index, item in enumerate(value):
            _update_digest(digest, item, f"{path}[{index}]")
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        digest.update(f"{path}={value!r}".encode())
        return
    digest.update(f"{path}:{type(value).__name__}".encode())  # other objects: their type (a repr may hold addresses)


def checkpoint_digest(checkpoint: dict[str, Any]) -> str:
    """The SHA-256 of a checkpoint's content (every tensor's bytes, shapes and dtypes, every scalar), without the digest
    entry itself.

    Args:
        checkpoint: the dictionary Lightning saves.
    """
    digest = hashlib.sha256()
    _update_digest(digest, {k: v for k, v in checkpoint.items() if k != CHECKPOINT_DIGEST_KEY}, "")
    return digest.hexdigest()


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (where the platform allows opening a directory)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class SealedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, durable local writes and a verified content digest.

    Args:
        verify: check the digest when a checkpoint is loaded (a checkpoint without one, saved by another
            ``CheckpointIO``, loads unchecked).
    """

    def __init__(self, verify: bool = True) -> None:
        super().__init__()
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Seal ``checkpoint`` with its digest and write it atomically (remote paths: Lightning's own write).

        Args:
            checkpoint: the dictionary Lightning saves.
            path: the target file.
            storage_options: not supported (as in ``TorchCheckpointIO``).
        """
        sealed = {**checkpoint, CHECKPOINT_DIGEST_KEY: checkpoint_digest(checkpoint)}
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(sealed, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(sealed, buffer)
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
        try:
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates the file private (0600)
            with os.fdopen(descriptor, "wb") as handle:
                write_payload(handle, buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load and verify a checkpoint.

        Args:
            path: the checkpoint file.
            map_location: as in ``torch.load``.
            weights_only: as in ``torch.load``.

        Raises:
            FileNotFoundError: the file does not exist.
            CorruptCheckpointError: the file is truncated, corrupted, or its content does not match its digest.
        """
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
            if "Weights only load failed" in str(error):
                raise  # a well-formed file holding objects weights_only refuses: not corruption
            raise CorruptCheckpointError(
                f"Checkpoint {path} cannot be loaded ({_size(path)}): it is truncated or corrupted, for example by a"
                f" process killed while writing it. Resume from an earlier checkpoint. ({type(error).__name__}:"
                f" {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        if not isinstance(checkpoint, dict):
            raise CorruptCheckpointError(f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a dictionary")
        expected = checkpoint.pop(CHECKPOINT_DIGEST_KEY, None)
        if self.verify and expected is not None:
            actual = checkpoint_digest(checkpoint)
            if actual != expected:
                raise CorruptCheckpointError(
                    f"Checkpoint {path} is corrupted: its content does not match the digest it was saved with"
                    f" (sha256 {actual[:16]}... instead of {str(expected)[:16]}...); some bytes changed after it was"
                    " written. Resume from an earlier checkpoint."
                )
        return checkpoint


def _size(path: _PATH) -> str:
    try:
        return f"{os.path.getsize(path)} bytes"
    except OSError:
        return "size unknown"


__all__ = ["CHECKPOINT_DIGEST_KEY", "CorruptCheckpointError", "SealedCheckpointIO", "checkpoint_digest"]
