"""Plain pieces of the server's protocol: the strategy, what replies carry, and score parsing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.common import log as flwr_log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from client.app import WEIGHT_KEY
from common.config import RunConfig
from server.state import RunFolder

_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def initial_student_arrays(run: RunConfig) -> dict[str, torch.Tensor]:
    from client.site import new_student

    return {k: v.detach().clone() for k, v in new_student(run).net.state_dict().items()}


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
    """Flat ``who.region.metric`` keys (see ``client.app.flatten_scores``) -> nested dicts."""
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


def build_strategy(run: RunConfig, folder: RunFolder, names: Mapping[int, str],
                   rounds: list[dict], round_offset: int = 0,
                   strategy_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
    """A Flower strategy that also checkpoints, records per-site metrics, and audits replies."""
    base = _STRATEGIES[run.strategy]
    kwargs: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=1.0,
        min_train_nodes=run.num_sites, min_evaluate_nodes=run.num_sites,
        min_available_nodes=run.num_sites, weighted_by_key=WEIGHT_KEY,
    )
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    if run.strategy == "fedadam":
        kwargs.update(eta=run.server_lr, eta_l=run.student_lr)

    class Recording(base):  # type: ignore[misc, valid-type]
        def _round(self, server_round: int) -> int:
            return server_round + round_offset

        def _entry(self, server_round: int) -> dict:
            rnd = self._round(server_round)
            for r in rounds:
                if r["round"] == rnd:
                    return r
            rounds.append({"round": rnd, "train": {}, "evaluate": {}})
            return rounds[-1]

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            rnd = self._round(server_round)
            entry = self._entry(server_round)
            for msg in replies:
                site = names.get(msg.metadata.src_node_id, str(msg.metadata.src_node_id))
                if msg.has_error():
                    folder.audit(phase="round", round=rnd, site=site, error=msg.error.reason)
                    continue
                folder.audit(phase="round", round=rnd, site=site, **teacher_arrays_in(msg.content))
                m = dict(msg.content["metrics"])
                entry["train"][site] = {k: v for k, v in m.items() if k != WEIGHT_KEY}
                if run.keep_site_updates:
                    folder.save_site_update(rnd, site, {
                        k: v.numpy() for k, v in msg.content["arrays"].items()})
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                state = None
                if isinstance(self, FedAdam) and self.m_t is not None:
                    state = {"m_t": self.m_t, "v_t": self.v_t}
                folder.save_checkpoint(rnd, {k: v.numpy() for k, v in arrays.items()}, state)
                folder.write_json("rounds.json", rounds)
                losses = ", ".join(f"{s} {v.get('loss', float('nan')):.3f}"
                                   for s, v in entry["train"].items())
                flwr_log(INFO, "fedbrats: round %d/%d: student saved; site losses %s", rnd,
                         run.num_rounds, losses)
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            entry = self._entry(server_round)
            for msg in replies:
                site = names.get(msg.metadata.src_node_id, str(msg.metadata.src_node_id))
                rnd = self._round(server_round)
                if msg.has_error():
                    folder.audit(phase="evaluate", round=rnd, site=site, error=msg.error.reason)
                    continue
                folder.audit(phase="evaluate", round=rnd, site=site,
                             **teacher_arrays_in(msg.content))
                scores = parse_scores(msg.content["metrics"]).get("student", {})
                entry["evaluate"][site] = scores
            folder.write_json("rounds.json", rounds)
            wt = [s.get("WT", {}).get("dice") for s in entry["evaluate"].values()]
            wt = [w for w in wt if w is not None]
            if wt:
                flwr_log(INFO, "fedbrats: round %d: student WT Dice per site %s",
                         self._round(server_round),
                         {s: round(v.get("WT", {}).get("dice", float("nan")), 3)
                          for s, v in entry["evaluate"].items()})
            return super().aggregate_evaluate(server_round, replies)

    strategy = Recording(**kwargs)
    if strategy_state and isinstance(strategy, FedAdam):
        if "m_t" in strategy_state:
            strategy.m_t = {k: v.numpy() for k, v in strategy_state["m_t"].items()}
            strategy.v_t = {k: v.numpy() for k, v in strategy_state["v_t"].items()}
    return strategy


__all__ = ["build_strategy", "initial_student_arrays", "parse_scores", "teacher_arrays_in"]
