"""Plain pieces of the server's protocol: waiting for sites, the initial student, resuming, what
replies carry, score parsing, and the batch-norm statistics of an aggregate."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log as flwr_log

from fedbrats.common.config import RunConfig
from fedbrats.common.networks.models import new_student
from fedbrats.common.utils.arrays import is_norm_statistic
from fedbrats.server.state import RunFolder
from fedbrats.server.validate import check_update, format_problems


def wait_for_missing_sites(grid, run: RunConfig, what: str) -> int:
    """When ``min-sites`` < ``num-sites``: wait up to ``round-timeout`` seconds for all
    ``num-sites`` sites to be connected (a restarted site joins the round), then go on with
    those connected. Returns how many are connected."""
    start = time.monotonic()
    logged = False
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= run.num_sites or run.required_sites >= run.num_sites:
            return n
        if time.monotonic() - start >= run.round_timeout:
            flwr_log(WARNING, "fedbrats: %s goes on with %d of %d sites (min-sites %d)", what,
                     n, run.num_sites, run.required_sites)
            return n
        if not logged:
            flwr_log(INFO, "fedbrats: %s: %d of %d sites connected; waiting up to %.0f s for "
                     "the others", what, n, run.num_sites, run.round_timeout)
            logged = True
        time.sleep(1.0)


def initial_student_arrays(run: RunConfig) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in new_student(run).net.state_dict().items()}


def check_resumable(folder: RunFolder, done: int, saved: Mapping[str, Any],
                    student: Mapping[str, Any]) -> None:
    """Refuse to resume from a checkpoint that does not fit the run's student network (a
    checkpoint written by another version of its preset, say one without batch norm)."""
    problems = check_update(student, saved)
    if problems:
        raise RuntimeError(
            f"{folder.path / 'checkpoints'}: the round-{done} student does not fit the network "
            f"this run builds ({format_problems(problems)}); use another output-dir"
        )


def teacher_arrays_in(content: RecordDict) -> dict[str, Any]:
    """What arrays a reply carried: for the audit log (names, shapes, bytes)."""
    arrays: dict[str, list[int]] = {}
    nbytes = 0
    for record in content.array_records.values():
        for name, arr in record.items():
            arrays[name] = list(arr.shape)
            nbytes += len(arr.data)
    return {"arrays": arrays, "bytes": nbytes}


def parse_scores(metrics: Mapping[str, float]) -> dict[str, Any]:
    """Flat ``who.region.metric`` keys (``fedbrats.client.app.flatten_scores``) -> nested
    dicts."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        parts = key.split(".")
        if len(parts) < 3:
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = float(value)
    return out


def settle_norm_statistics(aggregated: Mapping[str, np.ndarray],
                           updates: Sequence[Mapping[str, np.ndarray]],
                           weights: Sequence[float], noised: bool = False
                           ) -> dict[str, np.ndarray]:
    """The aggregated student with its batch-norm statistics made right.

    A server optimiser (FedAdam) steps every array it is given, running statistics included,
    though they are averages of the sites' data and not parameters: they become the weighted
    mean of the sites' ``updates`` again (for FedAvg and FedProx that is what they already
    are). With differential privacy (``noised``) the noised mean is kept, since the plain one
    would release the sites' statistics without noise. Either way a running variance is kept
    at or above zero (noise or a server step can push it below, and the network would then
    give NaN). Other arrays, and dtypes, are unchanged.
    """
    out = {k: np.asarray(v) for k, v in aggregated.items()}
    total = float(sum(weights))
    for name, value in out.items():
        if not is_norm_statistic(name):
            continue
        if not noised and updates:
            mean = sum(float(w) / total * np.asarray(u[name], dtype=np.float64)
                       for u, w in zip(updates, weights, strict=True))
            if value.dtype.kind in "iu":
                mean = np.rint(mean)
            value = np.asarray(mean, dtype=value.dtype)
        if name.endswith("running_var"):
            value = np.maximum(value, 0).astype(value.dtype)
        out[name] = value
    return out


__all__ = ["check_resumable", "initial_student_arrays",
           "is_norm_statistic", "parse_scores", "settle_norm_statistics", "teacher_arrays_in",
           "wait_for_missing_sites"]
