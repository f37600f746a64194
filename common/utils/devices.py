"""Where a network runs: the one place that turns a device setting into a ``torch.device``."""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "DeviceError", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The device asked for is not known, or not present on this machine."""


def resolve_device(name: str = "auto", *, error: type[Exception] = DeviceError,
                   hint: str = "") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error.

    ``error`` is the exception type raised (a caller's own, e.g. the site's or prediction's);
    ``hint`` is appended to the no-CUDA message (what to do instead).
    """
    if name not in DEVICES:
        raise error(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise error(f"device 'cuda' asked for, but torch sees no CUDA device "
                    f"(torch {torch.__version__}){hint}")
    return torch.device(name)
