"""The server's strategy for the distillation rounds: a Flower strategy that also checks every
returned student, writes the round ledger, checkpoints, and signs what it sends.

:class:`RecordingMixin` adds that to any Flower Message-API strategy; the concrete classes are
the mixin over FedAvg, FedProx and FedAdam, each also under Flower's client-side fixed-clipping
differential-privacy wrapper (:func:`strategy_class`). To add a strategy, add its Flower class to
``BASES`` and a ``strategy`` choice in ``common/config.py``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common import log as flwr_log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from fedbrats.common.config import RunConfig
from fedbrats.common.networks.models import head_population, population_mean, rescale_heads
from fedbrats.common.utils.arrays import transfer_copy
from fedbrats.common.wire import ARRAYS, METRICS, WEIGHT_KEY
from fedbrats.server.ledger import RoundLedger
from fedbrats.server.protocol import (
    is_norm_statistic,
    parse_scores,
    settle_norm_statistics,
    teacher_arrays_in,
    wait_for_missing_sites,
)
from fedbrats.server.state import RunFolder
from fedbrats.server.validate import check_update, format_problems

__all__ = ["BASES", "RecordingMixin", "build_strategy", "strategy_class"]

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def _like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array cast back to the dtype it has in ``reference``."""
    out = ArrayRecord()
    for k, a in arrays.items():
        out[k] = Array(a.numpy().astype(np.dtype(reference[k].dtype), copy=False))
    return out


def weighted_array_mean(values: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The weighted mean of arrays in float64, cast back to the first one's dtype (integer
    counters are taken from the first)."""
    first = values[0]
    if not np.issubdtype(first.dtype, np.floating):
        return first.copy()
    acc = sum(float(w) * v.astype(np.float64) for v, w in zip(values, weights))
    return (acc / float(sum(weights))).astype(first.dtype)


def for_transfer(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """The student as it is sent (:func:`~fedbrats.common.utils.arrays.transfer_copy`):
    ``arrays`` itself in float32; a site answers each array in the dtype it was sent."""
    if dtype == "float32":
        return arrays
    return ArrayRecord({k: Array(v) for k, v in transfer_copy(
        {k: a.numpy() for k, a in arrays.items()}, dtype).items()})


class RecordingMixin:
    """Put before a Flower strategy class: configure/aggregate hooks that keep the ledger.

    Set :attr:`ledger` (and :attr:`dp`) after construction (:func:`build_strategy` does).
    """

    ledger: RoundLedger
    dp: bool = False
    sent_arrays: ArrayRecord | None = None
    """The global student of the current round (float32)."""
    sent_wire: ArrayRecord | None = None
    """The student as sent this round (``transfer-dtype``): what updates are checked against."""

    @property
    def _started(self) -> dict[tuple[str, int], float]:
        """When each phase's messages of a round were handed to Flower (monotonic s)."""
        if not hasattr(self, "_started_at"):
            self._started_at: dict[tuple[str, int], float] = {}
        return self._started_at

    def _seconds(self, phase: str, server_round: int) -> float | None:
        t0 = self._started.pop((phase, server_round), None)
        return None if t0 is None else round(time.monotonic() - t0, 3)

    def _sent(self) -> dict[tuple[str, int], list[Message]]:
        if not hasattr(self, "_sent_messages"):
            self._sent_messages: dict[tuple[str, int], list[Message]] = {}
        return self._sent_messages

    def missing(self, phase: str, server_round: int, replies: list[Message]) -> dict[int, str]:
        """Sites sent a message this round without a valid reply: node id -> why."""
        out_msgs = self._sent().pop((phase, server_round), [])
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in out_msgs}
        ok = {m.metadata.src_node_id for m in replies if not m.has_error()}
        why: dict[int, str] = {}
        for m in replies:  # errors made by the SuperLink (node unavailable) come from node 0
            if m.has_error():
                node = by_id.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                why[node] = m.error.reason
        timeout = f"no reply within round-timeout ({self.ledger.run.round_timeout:g} s)"
        return {m.metadata.dst_node_id: why.get(m.metadata.dst_node_id, timeout)
                for m in out_msgs if m.metadata.dst_node_id not in ok}

    # -- train ------------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        # The last round's replies (a student each) are garbage now, but Python's cyclic
        # collector frees them only at its occasional full collections: with a 117 MB student
        # the ServerApp's peak memory climbed by about 100 MB a round, 2.2 to 3.1 GB, falling
        # back only every eight rounds or so (docs/bench/soak.md); with a full collection here
        # it stays at 2.3 GB, trend 0.0 MB a round (docs/bench/soak-gc.md). It costs
        # milliseconds.
        gc.collect()
        wait_for_missing_sites(grid, self.ledger.run,
                               f"round {self.ledger.round_number(server_round)}")
        self.sent_arrays = arrays
        self.sent_wire = wire = for_transfer(arrays, self.ledger.run.transfer_dtype)
        self.ledger.sign_into(wire, config)
        messages = list(super().configure_train(server_round, wire, config, grid))
        if wire is not arrays and getattr(self, "current_arrays", None) is not None:
            # FedAdam steps from the global student it keeps: the float32 one, not the copy sent
            self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        self._sent()[("round", server_round)] = messages  # message ids are set when sent
        self._started[("round", server_round)] = time.monotonic()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ledger, run = self.ledger, self.ledger.run
        replies = list(replies)
        rnd = ledger.round_number(server_round)
        entry = ledger.entry(rnd)
        entry["train_seconds"] = self._seconds("round", server_round)
        for node, reason in self.missing("round", server_round, replies).items():
            ledger.no_reply("round", rnd, node, reason)
        replies = [m for m in replies if not m.has_error()]
        replies = [m for m in replies if self._valid_update(rnd, m)]
        if len(replies) < run.required_sites:
            who = ", ".join(ledger.site_of(m.metadata.src_node_id) for m in replies) or "none"
            ledger.fail(rnd, f"round {rnd}: {len(replies)} of {run.num_sites} sites replied "
                             f"({who}), fewer than min-sites ({run.required_sites})")
        for msg in replies:
            site = ledger.site_of(msg.metadata.src_node_id)
            ledger.folder.audit(phase="round", round=rnd, site=site,
                                **teacher_arrays_in(msg.content))
            m = dict(msg.content[METRICS])
            entry["train"][site] = {k: v for k, v in m.items() if k != WEIGHT_KEY}
            if run.keep_site_updates:
                ledger.folder.save_site_update(rnd, site, {
                    k: v.numpy() for k, v in msg.content[ARRAYS].items()})
        if self.sent_wire is not self.sent_arrays and self.sent_arrays is not None:
            for m in replies:  # aggregate in the student's own precision
                m.content[ARRAYS] = _like(m.content[ARRAYS], self.sent_arrays)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if self.sent_arrays is not None:
            arrays = _like(arrays, self.sent_arrays)
        self._settle_norm_statistics(arrays, replies)
        self._settle_population_heads(arrays, replies)
        if self.dp:
            ledger.record_dp(rnd, len(replies))
        state = None
        if isinstance(self, FedAdam) and self.m_t is not None:
            state = {"m_t": self.m_t, "v_t": self.v_t}
        ledger.commit(rnd, {k: v.numpy() for k, v in arrays.items()}, state)
        flwr_log(INFO, "fedbrats: round %d/%d: student saved; site losses %s", rnd,
                 run.num_rounds, ledger.train_losses(rnd))
        return arrays, metrics

    def _settle_norm_statistics(self, arrays: ArrayRecord, replies: list[Message]) -> None:
        """FedAvg and FedProx already give the statistics' mean; FedAdam steps them, DP noises
        them: then they are replaced by :func:`settle_norm_statistics`."""
        norm = [k for k in arrays.keys() if is_norm_statistic(k)]
        if not norm or not (self.dp or isinstance(self, FedAdam)):
            return
        settled = settle_norm_statistics(
            {k: arrays[k].numpy() for k in norm},
            [{k: m.content[ARRAYS][k].numpy() for k in norm} for m in replies],
            [float(m.content[METRICS][WEIGHT_KEY]) for m in replies], noised=self.dp)
        for k, v in settled.items():
            arrays[k] = Array(v)

    def _settle_population_heads(self, arrays: ArrayRecord, replies: list[Message]) -> None:
        """A student with a head per population (``student-heads = "population"``): each
        head is the weighted mean over its own population's replies only (the others return it
        untouched), and stays as sent when none of them replied. Under differential privacy
        it is computed from the noised mean alone (:func:`rescale_heads`), so that the noise
        covers it; FedAdam's server step applies to the shared weights only."""
        keys = [k for k in arrays.keys() if head_population(k)]
        if not keys:
            return
        weights = [float(m.content[METRICS][WEIGHT_KEY]) for m in replies]
        pops = [self.ledger.site_of(m.metadata.src_node_id) for m in replies]
        sent = self.sent_arrays if self.sent_arrays is not None else arrays
        if self.dp:
            wire = self.sent_wire if self.sent_wire is not None else sent
            ref = _like(wire, sent) if wire is not sent else sent  # what the sites were sent
            settled = rescale_heads({k: arrays[k].numpy() for k in keys},
                                    {k: ref[k].numpy() for k in keys}, pops, weights)
        else:
            settled = population_mean(
                [{k: m.content[ARRAYS][k].numpy() for k in keys} for m in replies], weights,
                pops, weighted_array_mean, {k: sent[k].numpy() for k in keys})
        for k, v in settled.items():
            arrays[k] = Array(np.array(v, copy=True, order="C").astype(
                arrays[k].numpy().dtype, copy=False))

    def _valid_update(self, rnd: int, msg: Message) -> bool:
        """Check a site's returned student against the one sent; log and audit a reject."""
        site = self.ledger.site_of(msg.metadata.src_node_id)
        records = msg.content.array_records
        metrics = msg.content.metric_records
        if len(records) != 1 or len(metrics) != 1:
            problems = [f"expected one ArrayRecord and one MetricRecord, found "
                        f"{len(records)} and {len(metrics)}"]
        else:
            problems = check_update(self.sent_wire or self.sent_arrays or {},
                                    next(iter(records.values())))
            weight = next(iter(metrics.values())).get(WEIGHT_KEY)
            if (not isinstance(weight, int | float) or isinstance(weight, bool)
                    or not np.isfinite(weight) or weight <= 0):
                problems.append(f"{WEIGHT_KEY}: expected a weight > 0, found {weight!r}")
        if not problems:
            return True
        flwr_log(WARNING, "fedbrats: round %d: rejected the update of site %s: %s", rnd,
                 site, format_problems(problems))
        self.ledger.folder.audit(phase="round", round=rnd, site=site, rejected=problems,
                                 **teacher_arrays_in(msg.content))
        return False

    # -- evaluate ---------------------------------------------------------------------------
    def configure_evaluate(self, server_round, arrays, config, grid):
        if not self.ledger.run.evaluates_round(self.ledger.round_number(server_round)):
            return []  # not an eval-every round: no evaluation messages are sent
        wire = for_transfer(arrays, self.ledger.run.transfer_dtype)
        self.ledger.sign_into(wire, config)
        messages = list(super().configure_evaluate(server_round, wire, config, grid))
        self._sent()[("evaluate", server_round)] = messages
        self._started[("evaluate", server_round)] = time.monotonic()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        ledger = self.ledger
        replies = list(replies)
        rnd = ledger.round_number(server_round)
        if not ledger.run.evaluates_round(rnd):
            return None
        entry = ledger.entry(rnd)
        entry["evaluate_seconds"] = self._seconds("evaluate", server_round)
        for node, reason in self.missing("evaluate", server_round, replies).items():
            ledger.no_reply("evaluate", rnd, node, reason)
        replies = [m for m in replies if not m.has_error()]
        for msg in replies:
            site = ledger.site_of(msg.metadata.src_node_id)
            ledger.folder.audit(phase="evaluate", round=rnd, site=site,
                                **teacher_arrays_in(msg.content))
            entry["evaluate"][site] = parse_scores(msg.content[METRICS]).get("student", {})
        ledger.write()
        ledger.log_evaluation(rnd)
        return super().aggregate_evaluate(server_round, replies)


def _make(base: type, dp: bool) -> type:
    outer = DifferentialPrivacyClientSideFixedClipping if dp else base
    name = f"Recording{'DP' if dp else ''}{base.__name__}"
    return type(name, (RecordingMixin, outer), {"__module__": __name__, "dp": dp})


_CLASSES = {(name, dp): _make(base, dp) for name, base in BASES.items() for dp in (False, True)}


def strategy_class(run: RunConfig) -> type:
    """The recording strategy class of the run's ``strategy`` (and differential privacy)."""
    return _CLASSES[(run.strategy, run.dp_noise_multiplier > 0)]


def build_strategy(run: RunConfig, folder: RunFolder, names: Mapping[int, str],
                   rounds: list[dict], round_offset: int = 0,
                   strategy_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
    """The run's strategy, with its ledger (signing with ``signing-key`` when set).

    Every connected site is sampled (fraction 1.0); a round starts once ``required_sites`` are
    connected. Flower aggregates whatever valid replies came back within the timeout;
    ``aggregate_train`` refuses a round with fewer than ``required_sites`` of them. Under
    differential privacy the sites clip (``fedbrats.client.app.dp_clipping_mod``) and Flower's
    wrapper adds noise to the mean before the checkpoint sees it.
    """
    kwargs: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=1.0,
        min_train_nodes=run.required_sites, min_evaluate_nodes=run.required_sites,
        min_available_nodes=run.required_sites, weighted_by_key=WEIGHT_KEY,
    )
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    if run.strategy == "fedadam":
        kwargs.update(eta=run.server_lr, eta_l=run.student_lr)
    cls = strategy_class(run)
    if run.dp_noise_multiplier > 0:
        strategy = cls(BASES[run.strategy](**kwargs), run.dp_noise_multiplier,
                       run.dp_clipping_norm, run.num_sites)
    else:
        strategy = cls(**kwargs)
    signer = None
    if run.signing_key:
        from fedbrats.common.security.signing import load_private_key

        signer = load_private_key(run.signing_key)
    strategy.ledger = RoundLedger(run, folder, names, rounds, round_offset, signer)
    if strategy_state and isinstance(strategy, FedAdam) and "m_t" in strategy_state:
        strategy.m_t = {k: v.numpy() for k, v in strategy_state["m_t"].items()}
        strategy.v_t = {k: v.numpy() for k, v in strategy_state["v_t"].items()}
    return strategy
