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

__all__ = ["NORM_STATISTICS", "cast_floats", "cast_like", "is_norm_statistic", "to_numpy",
           "to_tensors", "transfer_copy"]


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


NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
"""Buffers of batch-norm layers: statistics of the sites' data, not parameters."""


def is_norm_statistic(name: str) -> bool:
    """Whether the state-dict entry ``name`` is a batch-norm running statistic."""
    return name.rsplit(".", 1)[-1] in NORM_STATISTICS


FLOAT16_MAX = float(np.finfo(np.float16).max)


def transfer_copy(arrays: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """The student as it travels with run setting ``transfer-dtype``: its weights in ``dtype``.

    Batch-norm running statistics (a few values per channel, and variances that can outgrow
    float16) and any array with a value beyond float16's range stay as they are; so do integer
    arrays. ``float32`` returns the arrays unchanged.
    """
    values = {k: to_numpy(v) for k, v in arrays.items()}
    if np.dtype(dtype) == np.float32:
        return values
    half = cast_floats({k: v for k, v in values.items()
                        if not is_norm_statistic(k) and v.dtype.kind == "f"
                        and (v.size == 0 or float(np.abs(v).max()) <= FLOAT16_MAX)}, dtype)
    return {k: half.get(k, v) for k, v in values.items()}
