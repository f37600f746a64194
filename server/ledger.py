"""The round ledger: what the server writes down about every distillation round.

One :class:`RoundLedger` serves both the plain rounds (the strategy of ``server/strategy.py``)
and the SecAgg+ rounds (``server/secagg.py``): the ``rounds.json`` entries (per-site training
metrics, per-site evaluation scores, differential-privacy facts), the audit log of every reply
or missing reply, the signed checkpoint that makes a round count, and the refusal of a round with
fewer than ``min-sites`` sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common import log as flwr_log

from fedbrats.common.config import RunConfig
from fedbrats.common.wire import SIGNATURE_CONFIG_KEY
from fedbrats.server.privacy import effective_noise_multiplier, noise_std
from fedbrats.server.state import RunFolder

__all__ = ["RoundFailed", "RoundLedger"]


class RoundFailed(RuntimeError):
    """Fewer than ``min-sites`` sites replied to a distillation round: it does not count."""


class RoundLedger:
    """Bookkeeping of the rounds after ``round_offset`` (those of a resumed run come first).

    ``rounds`` is the list that ``rounds.json`` holds (entries are added and updated in place);
    ``names`` maps node ids to populations; ``signer`` (an Ed25519 private key or None) signs
    every checkpoint and every student sent.
    """

    def __init__(self, run: RunConfig, folder: RunFolder, names: Mapping[int, str],
                 rounds: list[dict], round_offset: int = 0, signer: Any = None) -> None:
        self.run, self.folder, self.names = run, folder, names
        self.rounds, self.round_offset, self.signer = rounds, round_offset, signer

    def round_number(self, server_round: int) -> int:
        """The run's round number of the strategy's ``server_round``."""
        return server_round + self.round_offset

    def site_of(self, node_id: int) -> str:
        return self.names.get(node_id, str(node_id))

    def entry(self, rnd: int) -> dict:
        """The ``rounds.json`` entry of round ``rnd`` (created when absent)."""
        for r in self.rounds:
            if r["round"] == rnd:
                return r
        self.rounds.append({"round": rnd, "train": {}, "evaluate": {}})
        return self.rounds[-1]

    def write(self) -> None:
        self.folder.write_json("rounds.json", self.rounds)

    def sign_into(self, arrays: ArrayRecord | Mapping[str, Any], config) -> None:
        """The signature of the student sent, for the sites that verify it."""
        if self.signer is not None:
            from fedbrats.common.security.signing import sign_arrays

            config[SIGNATURE_CONFIG_KEY] = sign_arrays(arrays, self.signer)

    def no_reply(self, phase: str, rnd: int, node: int, reason: str, **extra: Any) -> None:
        """A site that was sent the round's message but gave no usable reply."""
        what = "update" if phase == "round" else "evaluation"
        flwr_log(WARNING, "fedbrats: round %d: no %s from site %s: %s", rnd, what,
                 self.site_of(node), reason)
        self.folder.audit(phase=phase, round=rnd, site=self.site_of(node), error=reason, **extra)

    def fail(self, rnd: int, msg: str) -> None:
        """Refuse round ``rnd``: ``rounds.json`` keeps the rounds before it; raises."""
        self.folder.write_json("rounds.json", [r for r in self.rounds if r["round"] < rnd])
        msg = (f"{msg}; the round does not count. Start the run again with the same output-dir "
               f"to resume after round {rnd - 1}")
        flwr_log(ERROR, "fedbrats: %s", msg)
        raise RoundFailed(msg)

    def record_dp(self, rnd: int, num_aggregated: int) -> None:
        """The noise of round ``rnd`` under differential privacy, for the accountant."""
        run = self.run
        self.entry(rnd)["dp"] = {
            "sites_aggregated": num_aggregated,
            "noise_multiplier": effective_noise_multiplier(run.dp_noise_multiplier,
                                                           run.num_sites, num_aggregated),
            "noise_std": noise_std(run.dp_noise_multiplier, run.dp_clipping_norm, run.num_sites),
        }

    def commit(self, rnd: int, arrays: Mapping[str, np.ndarray],
               strategy_state: Mapping[str, Any] | None = None) -> Path:
        """Round ``rnd`` counts: its student is checkpointed (and signed), ``rounds.json``
        written. Returns the checkpoint's path."""
        path = self.folder.save_checkpoint(rnd, arrays, strategy_state)
        if self.signer is not None:
            from fedbrats.common.security.signing import sign_file

            sign_file(path, self.signer)
        self.write()
        return path

    def train_losses(self, rnd: int) -> str:
        """``GLI 0.412, SSA 0.530, ...``: the sites' mean training loss of round ``rnd``."""
        return ", ".join(f"{s} {v.get('loss', float('nan')):.3f}"
                         for s, v in self.entry(rnd)["train"].items())

    def log_evaluation(self, rnd: int) -> None:
        scores = self.entry(rnd)["evaluate"]
        if any(s.get("WT", {}).get("dice") is not None for s in scores.values()):
            flwr_log(INFO, "fedbrats: round %d: student WT Dice per site %s", rnd,
                     {s: round(v.get("WT", {}).get("dice", float("nan")), 3)
                      for s, v in scores.items()})
