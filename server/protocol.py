"""Plain pieces of the server's protocol: the strategy, what replies carry, and score parsing."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common import log as flwr_log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from client.app import WEIGHT_KEY
from common.config import RunConfig
from server.privacy import effective_noise_multiplier, noise_std
from server.state import RunFolder
from server.validate import check_update, format_problems

_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


class RoundFailed(RuntimeError):
    """Fewer than ``min-sites`` sites replied to a distillation round: it does not count."""


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
    from client.site import new_student

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


def _like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of ``reference`` (FedAdam's step comes back in float64)."""
    ref = {k: v.dtype for k, v in reference.items()}
    if all(v.dtype == ref.get(k, v.dtype) for k, v in arrays.items()):
        return arrays
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=ref[k]) if k in ref else v.numpy())
                        for k, v in arrays.items()})


NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
"""Buffers of batch-norm layers: statistics of the sites' data, not parameters."""


def is_norm_statistic(name: str) -> bool:
    """Whether the state-dict entry ``name`` is a batch-norm running statistic."""
    return name.rsplit(".", 1)[-1] in NORM_STATISTICS


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


def build_strategy(run: RunConfig, folder: RunFolder, names: Mapping[int, str],
                   rounds: list[dict], round_offset: int = 0,
                   strategy_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
    """A Flower strategy that also checkpoints, records per-site metrics, and audits replies."""
    base = _STRATEGIES[run.strategy]
    # Every connected site is sampled (fraction 1.0); a round starts once `required_sites` are
    # connected. Flower aggregates whatever valid replies came back within the timeout;
    # aggregate_train below refuses a round with fewer than `required_sites` of them.
    kwargs: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=1.0,
        min_train_nodes=run.required_sites, min_evaluate_nodes=run.required_sites,
        min_available_nodes=run.required_sites, weighted_by_key=WEIGHT_KEY,
    )
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    if run.strategy == "fedadam":
        kwargs.update(eta=run.server_lr, eta_l=run.student_lr)

    sent: dict[tuple[str, int], list[Message]] = {}

    def site_of(node_id: int) -> str:
        return names.get(node_id, str(node_id))

    def missing(phase: str, server_round: int, replies: list[Message]) -> dict[int, str]:
        """Sites sent a message this round without a valid reply: site -> why."""
        out_msgs = sent.pop((phase, server_round), [])
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in out_msgs}
        ok = {m.metadata.src_node_id for m in replies if not m.has_error()}
        why: dict[int, str] = {}
        for m in replies:  # errors made by the SuperLink (node unavailable) come from node 0
            if m.has_error():
                node = by_id.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                why[node] = m.error.reason
        return {
            m.metadata.dst_node_id: why.get(
                m.metadata.dst_node_id,
                f"no reply within round-timeout ({run.round_timeout:g} s)")
            for m in out_msgs if m.metadata.dst_node_id not in ok
        }

    # Differential privacy: Flower's wrapper around the strategy; the sites clip (client.app's
    # dp_clipping_mod), the wrapper adds noise to the mean before our checkpoint sees it.
    dp = run.dp_noise_multiplier > 0
    outer = DifferentialPrivacyClientSideFixedClipping if dp else base
    signer = None
    if run.signing_key:
        from common.signing import load_private_key

        signer = load_private_key(run.signing_key)

    def sign_into(arrays: ArrayRecord, config) -> None:
        """The signature of the student sent, for sites that verify it (common.signing)."""
        if signer is not None:
            from common.signing import SIGNATURE_CONFIG_KEY, sign_arrays

            config[SIGNATURE_CONFIG_KEY] = sign_arrays(arrays, signer)

    class Recording(outer):  # type: ignore[misc, valid-type]
        sent_arrays: ArrayRecord | None = None
        """The global student of the current round: what updates are checked against."""

        def _round(self, server_round: int) -> int:
            return server_round + round_offset

        def configure_train(self, server_round, arrays, config, grid):
            wait_for_missing_sites(grid, run, f"round {self._round(server_round)}")
            self.sent_arrays = arrays
            sign_into(arrays, config)
            messages = list(super().configure_train(server_round, arrays, config, grid))
            sent[("round", server_round)] = messages  # message ids are set when sent
            return messages

        def configure_evaluate(self, server_round, arrays, config, grid):
            if not run.evaluates_round(self._round(server_round)):
                return []  # not an eval-every round: no evaluation messages are sent
            sign_into(arrays, config)
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
            sent[("evaluate", server_round)] = messages
            return messages

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
            failed = missing("round", server_round, replies)
            for node, reason in failed.items():
                flwr_log(WARNING, "fedbrats: round %d: no update from site %s: %s", rnd,
                         site_of(node), reason)
                folder.audit(phase="round", round=rnd, site=site_of(node), error=reason)
            replies = [m for m in replies if not m.has_error()]
            replies = [m for m in replies if self._valid_update(rnd, m)]
            if len(replies) < run.required_sites:
                folder.write_json("rounds.json", [r for r in rounds if r["round"] < rnd])
                msg = (f"round {rnd}: {len(replies)} of {run.num_sites} sites replied "
                       f"({', '.join(site_of(m.metadata.src_node_id) for m in replies) or 'none'})"
                       f", fewer than min-sites ({run.required_sites}); the round does not count."
                       f" Start the run again with the same output-dir to resume after round "
                       f"{rnd - 1}")
                flwr_log(ERROR, "fedbrats: %s", msg)
                raise RoundFailed(msg)
            for msg in replies:
                site = site_of(msg.metadata.src_node_id)
                folder.audit(phase="round", round=rnd, site=site, **teacher_arrays_in(msg.content))
                m = dict(msg.content["metrics"])
                entry["train"][site] = {k: v for k, v in m.items() if k != WEIGHT_KEY}
                if run.keep_site_updates:
                    folder.save_site_update(rnd, site, {
                        k: v.numpy() for k, v in msg.content["arrays"].items()})
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None and self.sent_arrays is not None:
                arrays = _like(arrays, self.sent_arrays)
            # FedAvg and FedProx already give the statistics' mean; FedAdam steps them, DP noises
            norm = [k for k in arrays.keys() if is_norm_statistic(k)] if arrays is not None else []
            if norm and (dp or run.strategy == "fedadam"):
                settled = settle_norm_statistics(
                    {k: arrays[k].numpy() for k in norm},
                    [{k: m.content["arrays"][k].numpy() for k in norm} for m in replies],
                    [float(m.content["metrics"][WEIGHT_KEY]) for m in replies], noised=dp)
                for k, v in settled.items():
                    arrays[k] = Array(v)
            if arrays is not None and dp:
                z_eff = effective_noise_multiplier(run.dp_noise_multiplier, run.num_sites,
                                                   len(replies))
                entry["dp"] = {"sites_aggregated": len(replies), "noise_multiplier": z_eff,
                               "noise_std": noise_std(run.dp_noise_multiplier,
                                                      run.dp_clipping_norm, run.num_sites)}
            if arrays is not None:
                state = None
                if isinstance(self, FedAdam) and self.m_t is not None:
                    state = {"m_t": self.m_t, "v_t": self.v_t}
                path = folder.save_checkpoint(rnd, {k: v.numpy() for k, v in arrays.items()},
                                              state)
                if signer is not None:
                    from common.signing import sign_file

                    sign_file(path, signer)
                folder.write_json("rounds.json", rounds)
                losses = ", ".join(f"{s} {v.get('loss', float('nan')):.3f}"
                                   for s, v in entry["train"].items())
                flwr_log(INFO, "fedbrats: round %d/%d: student saved; site losses %s", rnd,
                         run.num_rounds, losses)
            return arrays, metrics

        def _valid_update(self, rnd: int, msg: Message) -> bool:
            """Check a site's returned student against the one sent; log and audit a reject."""
            site = site_of(msg.metadata.src_node_id)
            records = msg.content.array_records
            metrics = msg.content.metric_records
            if len(records) != 1 or len(metrics) != 1:
                problems = [f"expected one ArrayRecord and one MetricRecord, found "
                            f"{len(records)} and {len(metrics)}"]
            else:
                problems = check_update(self.sent_arrays or {}, next(iter(records.values())))
                weight = next(iter(metrics.values())).get(WEIGHT_KEY)
                if (not isinstance(weight, int | float) or isinstance(weight, bool)
                        or not np.isfinite(weight) or weight <= 0):
                    problems.append(f"{WEIGHT_KEY}: expected a weight > 0, found {weight!r}")
            if not problems:
                return True
            flwr_log(WARNING, "fedbrats: round %d: rejected the update of site %s: %s", rnd,
                     site, format_problems(problems))
            folder.audit(phase="round", round=rnd, site=site, rejected=problems,
                         **teacher_arrays_in(msg.content))
            return False

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            rnd = self._round(server_round)
            if not run.evaluates_round(rnd):
                return None
            entry = self._entry(server_round)
            for node, reason in missing("evaluate", server_round, replies).items():
                flwr_log(WARNING, "fedbrats: round %d: no evaluation from site %s: %s", rnd,
                         site_of(node), reason)
                folder.audit(phase="evaluate", round=rnd, site=site_of(node), error=reason)
            replies = [m for m in replies if not m.has_error()]
            for msg in replies:
                site = site_of(msg.metadata.src_node_id)
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

    if dp:
        strategy = Recording(base(**kwargs), run.dp_noise_multiplier, run.dp_clipping_norm,
                             run.num_sites)
    else:
        strategy = Recording(**kwargs)
    if strategy_state and isinstance(strategy, FedAdam):
        if "m_t" in strategy_state:
            strategy.m_t = {k: v.numpy() for k, v in strategy_state["m_t"].items()}
            strategy.v_t = {k: v.numpy() for k, v in strategy_state["v_t"].items()}
    return strategy


__all__ = ["RoundFailed", "build_strategy", "check_resumable", "initial_student_arrays",
           "is_norm_statistic", "parse_scores", "settle_norm_statistics", "teacher_arrays_in",
           "wait_for_missing_sites"]
