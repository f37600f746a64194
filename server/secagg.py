"""Secure aggregation of the distillation rounds with Flower's SecAgg+ (``secure-aggregation``).

With ``secure-aggregation = "true"`` the server never sees a single site's update, only their
mean. Flower 1.41 has SecAgg+ only for its legacy API (``flwr.server.workflow.SecAggPlusWorkflow``
with a ``LegacyContext`` and a legacy strategy on the server, ``flwr.client.mod.secaggplus_mod``
on the client; nothing in ``flwr.serverapp``/``flwr.clientapp``). It still fits our Message-API
protocol, because the workflow is only a function of ``(grid, LegacyContext)`` that runs *one*
round of four message exchanges over the Grid:

* the server's custom ``main`` keeps phases 1 and 3 as they are; in phase 2 it calls
  :func:`secagg_rounds`, which runs the workflow once per round (instead of ``strategy.start``),
  then the per-round evaluation with the Recording strategy's ``configure_evaluate`` /
  ``aggregate_evaluate`` (signatures, audit, ``rounds.json`` as usual);
* the sites' ``@app.train()`` handler sits behind ``secaggplus_mod``
(``fedbrats.client.secagg.secagg_mod``
  applies it to SecAgg+ messages only). The mod answers the setup, share-keys and unmask stages
  itself and calls the handler once, with the *legacy* record layout: ``fitins.parameters`` (an
  ArrayRecord of unnamed arrays), ``fitins.config``; the handler answers ``fitres.parameters``,
  ``fitres.num_examples``, ``fitres.metrics``, ``fitres.status`` (``fedbrats.client.secagg``).

What goes over the wire differs from plain rounds:

* each site sends its **update** (student after minus student sent), not its student: SecAgg+
  clips every value to +/- :data:`CLIPPING_RANGE` (8) and quantises it to 2^22 levels (a step of
  3.8e-6) before masking; the server adds the mean update to the global student;
* the array names travel in the config (``fedbrats-keys``), since legacy parameters are unnamed;
* weights are equal (``num_examples`` = 1, ``max_weight`` = 1): ``aggregation`` must be
  ``equal``; FedAdam (a server optimiser on the mean) is not offered, FedProx is;
* the server cannot check single updates (``fedbrats.server.validate``), keep them
  (``keep-site-updates``) or audit their arrays: each site checks its own update (finite values)
  before masking it, and the audit log records ``secure_aggregation: true`` and no arrays;
* with ``dp-noise-multiplier`` the sites clip their update to ``dp-clipping-norm`` themselves and
  the server adds the same Gaussian noise (std ``z * C / num-sites``) to the unmasked mean.

SecAgg+ parameters: every site is a neighbour of every other (``num_shares = 1.0``), and a
site's secrets can be rebuilt from 60 % of the shares (at least 2), so up to 40 % of the sites
may drop out during a round and the mean of the others is still recovered. At least two sites
must take part (SecAgg+ refuses one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.common import log as flwr_log
from flwr.serverapp import Grid

from fedbrats.common import wire
from fedbrats.common.config import RunConfig
from fedbrats.common.networks.models import rescale_heads
from fedbrats.common.wire import KEYS_CONFIG, RANGE_CONFIG
from fedbrats.server.privacy import noise_std
from fedbrats.server.protocol import settle_norm_statistics, wait_for_missing_sites
from fedbrats.server.state import RunFolder
from fedbrats.server.strategy import build_strategy

__all__ = ["CLIPPING_RANGE", "KEYS_CONFIG", "RANGE_CONFIG", "secagg_rounds"]

CLIPPING_RANGE = 8.0
"""SecAgg+ clips every value of an update to +/- this before quantising it (Flower's default)."""
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.6


def _legacy_strategy(results_out: dict[str, Any]):
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    class Capturing(LegacyFedAvg):
        """Keeps the sites' metrics; the parameters are already the SecAgg+ mean."""

        def aggregate_fit(self, server_round, results, failures):
            results_out["results"] = list(results)
            results_out["failures"] = list(failures)
            if not results:
                return None, {}
            return results[0][1].parameters, {}

    return Capturing


def secagg_rounds(grid: Grid, context: Context, run: RunConfig, folder: RunFolder,
                  names: Mapping[int, str], rounds: list[dict], arrays: ArrayRecord, done: int,
                  signer=None) -> ArrayRecord:
    """Distillation rounds ``done + 1 .. run.num_rounds`` aggregated with SecAgg+.

    Returns the final global student; checkpoints (signed with ``signer``), ``rounds.json`` and
    the audit log are written as in plain rounds. Raises
    :class:`~fedbrats.server.ledger.RoundFailed`
    when fewer than ``min-sites`` sites finish a round.
    """
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    keys = list(arrays.keys())
    dtypes = {k: np.dtype(arrays[k].dtype) for k in keys}
    current = {k: arrays[k].numpy().astype(dtypes[k]) for k in keys}
    dp = run.dp_noise_multiplier > 0
    # per-round evaluation, signatures and bookkeeping as in plain rounds
    recording = build_strategy(run, folder, names, rounds, round_offset=done)
    ledger = recording.ledger
    ledger.signer = signer
    captured: dict[str, Any] = {}
    legacy_strategy = _legacy_strategy(captured)(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=max(2, run.required_sites),
        min_available_clients=max(2, run.required_sites),
    )
    manager = SimpleClientManager()
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=run.num_rounds - done),
                           strategy=legacy_strategy, client_manager=manager)
    workflow = SecAggPlusWorkflow(
        num_shares=NUM_SHARES, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=1.0, clipping_range=CLIPPING_RANGE, timeout=run.round_timeout,
    )
    proxies: dict[int, Any] = {}

    for server_round in range(1, run.num_rounds - done + 1):
        rnd = server_round + done
        t0 = time.monotonic()
        wait_for_missing_sites(grid, run, f"round {rnd}")
        connected = _sync_proxies(grid, manager, proxies)
        sent = ArrayRecord({k: Array(current[k]) for k in keys})
        config = _round_config(run, keys, server_round, done)
        ledger.sign_into(sent, config)
        legacy_strategy.on_fit_config_fn = lambda _r, c=config: dict(c)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([current[k] for k in keys]), keep_input=True)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round})
        captured.clear()
        workflow(grid, legacy)

        results = captured.get("results", [])
        _record_replies(ledger, folder, rnd, results, connected)
        if "results" not in captured or len(results) < run.required_sites:
            ledger.fail(rnd, f"round {rnd}: secure aggregation finished with {len(results)} of "
                             f"{run.num_sites} sites, fewer than min-sites ({run.required_sites})")

        mean_update = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
            legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
        if dp:
            std = noise_std(run.dp_noise_multiplier, run.dp_clipping_norm, run.num_sites)
            mean_update = [u + np.random.normal(0.0, std, u.shape) for u in mean_update]
            ledger.record_dp(rnd, len(results))
        before = current
        current = {k: (current[k] + u).astype(dtypes[k]) for k, u in zip(keys, mean_update,
                                                                          strict=True)}
        # a head per population: from the mean alone, each head its own sites' mean update
        pops = [ledger.site_of(proxy.node_id) for proxy, _ in results]
        current = {k: np.asarray(v).astype(dtypes[k], copy=False) for k, v in rescale_heads(
            current, before, pops, [1.0] * len(pops)).items()}
        current = settle_norm_statistics(current, [], [], noised=True)  # variances >= 0
        ledger.entry(rnd)["train_seconds"] = round(time.monotonic() - t0, 3)
        ledger.commit(rnd, current)
        flwr_log(INFO, "fedbrats: round %d/%d: SecAgg+ mean of %d sites in %.1f s; student "
                 "saved; site losses %s", rnd, run.num_rounds, len(results),
                 time.monotonic() - t0, ledger.train_losses(rnd))

        _evaluate_round(grid, recording, run, server_round, done,
                        ArrayRecord({k: Array(current[k]) for k in keys}))
    return ArrayRecord({k: Array(current[k]) for k in keys})


def _sync_proxies(grid: Grid, manager, proxies: dict[int, Any]) -> set[int]:
    """Register the connected nodes with the legacy client manager (and drop the gone ones);
    returns the connected node ids."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    connected = set(grid.get_node_ids())
    for node in list(proxies):
        if node not in connected:
            manager.unregister(proxies.pop(node))
    for node in sorted(connected - set(proxies)):
        proxies[node] = GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id)
        manager.register(proxies[node])
    return connected


def _round_config(run: RunConfig, keys: list[str], server_round: int, done: int) -> dict:
    """The config every site's SecAgg+ fit gets in one round."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config: dict[str, Any] = {
        wire.SERVER_ROUND: server_round, wire.ROUND_OFFSET: done,
        KEYS_CONFIG: "\n".join(keys), RANGE_CONFIG: CLIPPING_RANGE,
    }
    if run.strategy == "fedprox":
        config[wire.PROXIMAL_MU] = run.proximal_mu
    if run.dp_noise_multiplier > 0:
        config[KEY_CLIPPING_NORM] = run.dp_clipping_norm
    return config


def _record_replies(ledger, folder: RunFolder, rnd: int, results: list, connected: set[int]
                    ) -> None:
    """Each finished site's training metrics and audit line; a no-reply for every other one."""
    entry = ledger.entry(rnd)
    for proxy, fitres in results:
        site = ledger.site_of(proxy.node_id)
        entry["train"][site] = {k: float(v) for k, v in fitres.metrics.items()
                                if isinstance(v, int | float) and not isinstance(v, bool)}
        folder.audit(phase="round", round=rnd, site=site, arrays={}, bytes=0,
                     secure_aggregation=True)
    done_nodes = {proxy.node_id for proxy, _ in results}
    for node in sorted(connected - done_nodes):
        ledger.no_reply("round", rnd, node, "dropped out of the SecAgg+ round (see the log)",
                        secure_aggregation=True)


def _evaluate_round(grid: Grid, recording, run: RunConfig, server_round: int, done: int,
                    record: ArrayRecord) -> None:
    """Per-round evaluation: plain Message-API messages, as without secure aggregation."""
    messages = recording.configure_evaluate(server_round, record,
                                            ConfigRecord({wire.ROUND_OFFSET: done}), grid)
    replies: list[Message] = list(grid.send_and_receive(list(messages),
                                                        timeout=run.round_timeout))
    recording.aggregate_evaluate(server_round, replies)
