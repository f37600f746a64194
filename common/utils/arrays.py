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

__all__ = ["cast_floats", "cast_like", "to_numpy", "to_tensors"]


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


def cast_floats(arrays: Mapping[str, Any], dtype: str | np.dtype) -> dict[str, np.ndarray]:
    """Every floating-point array of ``arrays`` as ``dtype`` (integer arrays, such as batch
    norm's step counters, unchanged): the student as it travels with ``transfer-dtype``."""
    target = np.dtype(dtype)
    out = {}
    for k, v in arrays.items():
        a = to_numpy(v)
        out[k] = a.astype(target) if a.dtype.kind == "f" and a.dtype != target else a
    return out


def cast_like(arrays: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each floating-point array of ``arrays`` in the dtype of the same-named array of
    ``reference`` (the others unchanged): a site answers in the precision it was sent, and the
    server aggregates in the student's own (float32)."""
    out = {}
    for k, v in arrays.items():
        a = to_numpy(v)
        ref = to_numpy(reference[k]).dtype if k in reference else a.dtype
        out[k] = a.astype(ref) if a.dtype.kind == "f" and ref.kind == "f" and a.dtype != ref else a
    return out
