"""What travels between the ServerApp and the ClientApps: message types, record and config keys.

Both apps import these names from here, so neither imports the other. The protocol's messages:

==================  ============================================================================
``query.info``      the site's facts (population, case counts, contrasts, data-check summary)
``train.warm``      phase 1, with ``teacher-warm-rounds``: one round of the teachers' federated
                    warm start on the sent teacher network; network + metrics back
``train.teacher``   phase 1: train (or reuse) the site's teacher, from the warm-start network
                    when one is sent; the reply has metrics only
``train``           phase 2: one distillation round on the sent student; student + metrics back
``evaluate``        the sent student on the site's validation cases (the per-round curve)
``evaluate.final``  the final student beside the site's teacher, and with each contrast removed
==================  ============================================================================
"""

from __future__ import annotations

__all__ = [
    "ARRAYS", "BASELINE", "CODE_KEY", "CONFIG", "EVALUATE", "FINAL", "INFO", "INFO_RECORD",
    "KEYS_CONFIG", "METRICS", "PROXIMAL_MU", "PUBLIC_KEY_SETTING", "RANGE_CONFIG", "ROUND_OFFSET",
    "SERVER_ROUND", "SIGNATURE_CONFIG_KEY", "TEACHER", "TRAIN", "WARM", "WEIGHT_KEY", "action",
]

# -- message types ---------------------------------------------------------------------------
INFO = "query.info"
WARM = "train.warm"
TEACHER = "train.teacher"
TRAIN = "train"
EVALUATE = "evaluate"
FINAL = "evaluate.final"


def action(message_type: str) -> str:
    """The part after the category, as a ClientApp's decorators take it: ``query.info`` ->
    ``info``."""
    return message_type.split(".", 1)[1]

# -- records in a message's RecordDict -------------------------------------------------------
ARRAYS = "arrays"
"""ArrayRecord: the student (sent, and returned by ``train``). Never a teacher."""
METRICS = "metrics"
"""MetricRecord of every reply."""
CONFIG = "config"
"""ConfigRecord of an instruction."""
INFO_RECORD = "info"
"""ConfigRecord of the ``query.info`` reply: ``population``, ``problems``, ``code``."""

# -- keys ------------------------------------------------------------------------------------
WEIGHT_KEY = "fedbrats-weight"
"""Every train/evaluate reply carries it; the server's strategy aggregates weighted by it."""
SERVER_ROUND = "server-round"
"""Set by Flower's strategies in every train/evaluate instruction."""
ROUND_OFFSET = "round-offset"
"""Rounds done before this (resumed) run's strategy started; added to ``server-round``."""
PROXIMAL_MU = "proximal-mu"
"""FedProx's mu, in the train instruction (Flower's FedProx name)."""
SIGNATURE_CONFIG_KEY = "fedbrats-signature"
"""The server's Ed25519 signature of the sent student (``fedbrats.common.security.signing``)."""
KEYS_CONFIG = "fedbrats-keys"
"""SecAgg+ rounds: the student's array names, newline-separated, in the order of the parameters."""
RANGE_CONFIG = "fedbrats-secagg-range"
"""SecAgg+ rounds: the clipping range, so that a site can warn when its update exceeds it."""
CODE_KEY = "code"
"""``query.info``: the folder the site's fedbrats code was loaded from (the app bundle's)."""
POSTPROCESS_GRID = "fedbrats-postprocess-grid"
"""Final evaluation config (run setting ``postprocess-tuning``): the post-processing
thresholds each site scores, JSON (:func:`fedbrats.common.inference.postprocess_tuning.encode_grid`)."""
POSTPROCESS_SCORES = "postprocess_grid"
"""Final evaluation reply: ``postprocess_grid.<point>.<region>`` = the lesion-wise Dice of the
site's validation cases post-processed at that grid point."""
BASELINE = "fedbrats-baseline"
"""Train config: this round trains the labels-only FedAvg baseline, not the student (no
teacher). Final evaluation: the name of the baseline's ArrayRecord beside the student's."""

# -- node settings (``flower-supernode --node-config``) ----------------------------------------
PUBLIC_KEY_SETTING = "consortium-public-key"
"""Path of the consortium's Ed25519 public key. When set, the site uses a student only if the
server's signature of it (in the instruction's ConfigRecord) verifies."""
