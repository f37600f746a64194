"""Writing files so that a crash never leaves a torn one behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` via a temporary file and a rename.

    A ``str`` is written as text; anything else with ``torch.save``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        import torch

        torch.save(obj, tmp)
    tmp.replace(path)
