"""Where the running fedbrats code comes from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["code_location"]


def code_location() -> str:
    """The folder that holds this process's ``common/``, ``client/``, ``server/`` folders: the
    source checkout for an installed project, the unpacked app bundle inside Flower's apps."""
    return str(Path(__file__).resolve().parents[2])
