"""The site's side of secure aggregation (``secure-aggregation``; see ``server/secagg.py``).

Flower's ``secaggplus_mod`` (legacy API) wraps the ``train`` handler. It answers the SecAgg+
setup, share-keys and unmask stages itself and calls the handler once per round with the legacy
record layout (``fitins.parameters``: the global student as unnamed arrays, ``fitins.config``),
expecting the legacy reply layout (``fitres.*``). It then quantises, masks and sends the reply's
arrays in place of them. This module answers that call: it trains the student like a plain round
and replies with the *update* (student after minus student sent), checked and, under
differential privacy, clipped here, because the server will only ever see the masked sum.
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.common import log as flwr_log

from fedbrats.common import wire
from fedbrats.common.config import load_run_config, site_from_node_config
from fedbrats.common.wire import KEYS_CONFIG, RANGE_CONFIG

__all__ = ["LEGACY_PARAMS", "is_secagg_train", "secagg_mod", "secagg_train"]

LEGACY_PARAMS = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (with ``secaggplus_configs``) only.

    A plain ``train`` message (no secure aggregation) goes straight to the handler: the mod
    itself would fail on it.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secagg_train(msg: Message) -> bool:
    """The SecAgg+ stage that calls the handler: legacy layout, global student inside."""
    return msg.has_content() and LEGACY_PARAMS in msg.content.array_records


def secagg_train(msg: Message, context: Context, public_key: str | None = None) -> Message:
    """One distillation round whose reply is the site's update, for SecAgg+ to mask.

    Raises (so that the site drops out of the round, which SecAgg+ tolerates) when the student's
    signature does not verify (``public_key``) or the update is not finite.
    """
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fedbrats.client.distill import distill_round

    config = msg.content.config_records[LEGACY_CONFIG]
    keys = str(config[KEYS_CONFIG]).split("\n")
    sent = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        msg.content.array_records[LEGACY_PARAMS], keep_input=True))
    if len(keys) != len(sent):
        raise ValueError(f"secure aggregation: {len(sent)} arrays sent but {len(keys)} names")
    student = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, sent, strict=True)}
    run = load_run_config(context.run_config)
    site = site_from_node_config(context.node_config, run)
    if public_key:
        from fedbrats.common.security.signing import (
            SignatureError,
            verify_arrays,
        )

        try:
            verify_arrays(student, config.get(wire.SIGNATURE_CONFIG_KEY), public_key,
                          what="student sent for train (secure aggregation)")
        except SignatureError as e:
            raise SignatureError(f"site {site.population}: student signature check failed: "
                                 f"{e}") from None

    server_round = int(config.get(wire.SERVER_ROUND, 0)) + int(config.get(wire.ROUND_OFFSET, 0))
    state, metrics = distill_round(site, run, student, server_round,
                                   proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)))
    update = [state[k].detach().cpu().numpy().astype(a.dtype) - a
              for k, a in zip(keys, sent, strict=True)]
    # batch norm's step counter (unused: the layers average with a fixed momentum) would
    # only be clipped by SecAgg+; it is sent unchanged
    update = [np.zeros_like(u) if k.endswith("num_batches_tracked") else u
              for k, u in zip(keys, update, strict=True)]
    bad = [k for k, u in zip(keys, update, strict=True) if not np.isfinite(u).all()]
    if bad:
        raise ValueError(f"site {site.population}: the local update has NaN or infinite values "
                         f"in {', '.join(bad[:3])}; not sending it")
    if KEY_CLIPPING_NORM in config:  # differential privacy: clip here, as fixedclipping_mod does
        clip = float(config[KEY_CLIPPING_NORM])
        norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update))
        if norm > clip:
            update = [(u * (clip / norm)).astype(u.dtype) for u in update]
    limit = float(config.get(RANGE_CONFIG, math.inf))
    peak = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if peak > limit:
        flwr_log(WARNING, "fedbrats: site %s: update values up to %.3g; SecAgg+ clips them to "
                 "+/- %g", site.population, peak, limit)
    reply: dict[str, Any] = {k: float(v) for k, v in metrics.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)}
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                 num_examples=1, metrics=reply)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
