"""Writing files so that a crash never leaves a torn one behind, and creating private files
(keys) with their final permissions from the start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` via a temporary file and a rename.

    A ``str`` is written as text; anything else with ``torch.save``. When the write fails (a
    full disk: ``OSError`` ENOSPC) the temporary file is removed, ``path`` keeps what it held,
    and the ``OSError`` (same errno) names ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        if isinstance(obj, str):
            tmp.write_text(obj)
        else:
            import torch

            torch.save(obj, tmp)
        tmp.replace(path)
    except OSError as e:  # a full disk, a quota, a read-only folder: the old file stays as it was
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing {path} failed ({e.strerror or e}); the file before "
                               "it, if any, is unchanged") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_exclusive(path: Path, data: bytes, mode: int = 0o600, replace: bool = False) -> None:
    """Create ``path`` holding ``data`` with permissions ``mode`` from the start (``os.open``,
    never chmod-ed afterwards), and fsync it.

    An existing ``path`` is a :class:`FileExistsError` unless ``replace``: then the data goes to a
    new temporary file (created with ``mode``) that is renamed over the old one, so a replaced
    private key never keeps an old, wider mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        if replace:
            target.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()
