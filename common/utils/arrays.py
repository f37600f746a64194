"""Converting arrays between torch, numpy and Flower's ``Array``.

torch is imported only when a conversion needs it, so numpy-only callers never load it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["to_numpy", "to_tensors"]


def to_numpy(value: Any) -> np.ndarray:
    """``value`` as a numpy array: a torch tensor (any device, detached), anything with a
    ``numpy()`` method (a Flower ``Array``), or anything :func:`numpy.asarray` takes."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    numpy_fn = getattr(value, "numpy", None)
    if callable(numpy_fn) and not isinstance(value, np.ndarray):  # flwr Array
        return np.asarray(numpy_fn())
    return np.asarray(value)


def to_tensors(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict of CPU tensors, each a copy, from a mapping of arrays (or tensors)."""
    import torch

    return {k: torch.as_tensor(np.asarray(v)).clone() for k, v in arrays.items()}
