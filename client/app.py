"""The fedbrats ClientApp: one instance per site. Handlers unpack messages and call the plain
functions of ``client/`` (data.py, teacher.py, distill.py, evaluate.py); the teacher's weights and
the scans never leave the site. The messages it answers are listed in ``common/wire.py``.

Privacy and integrity: with the node setting ``consortium-public-key`` a site uses a student only
if the server's Ed25519 signature of it verifies (``fedbrats.common.security.signing``), and answers
an error reply
otherwise. The ``train`` handler carries two mods: Flower's ``secaggplus_mod`` for SecAgg+
rounds (``secure-aggregation``; ``fedbrats.client.secagg``) and ``fixedclipping_mod`` when the
server runs
with differential privacy (``dp_clipping_mod``); each stays out of the way of other messages.
"""

from __future__ import annotations

import math
from logging import ERROR

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import log as flwr_log
from flwr.common.constant import ErrorCode

from fedbrats.common import wire
from fedbrats.common.config import RunConfig, SiteConfig, load_run_config, site_from_node_config
from fedbrats.common.utils.arrays import cast_floats, cast_like
from fedbrats.common.utils.code import code_location
from fedbrats.common.utils.timing import process_age
from fedbrats.common.wire import PUBLIC_KEY_SETTING, WEIGHT_KEY

app = ClientApp()

def _setup(context: Context) -> tuple[RunConfig, SiteConfig]:
    run = load_run_config(context.run_config)
    return run, site_from_node_config(context.node_config, run)


def _refuse_unsigned(msg: Message, context: Context) -> Message | None:
    """An error reply when this site requires signed students and the sent one is not; else None.

    The error reply (rather than an exception) keeps the reason readable in the server's log and
    audit.jsonl: ``site <population>: student signature check failed: ...``.
    """
    key = context.node_config.get(PUBLIC_KEY_SETTING)
    if not key:
        return None
    from fedbrats.common.security.signing import SignatureError, verify_arrays

    who = context.node_config.get("population") or f"node {msg.metadata.dst_node_id}"
    try:
        config = msg.content.config_records.get(wire.CONFIG)
        signature = config.get(wire.SIGNATURE_CONFIG_KEY) if config is not None else None
        verify_arrays(msg.content[wire.ARRAYS], signature, str(key),
                      what=f"student sent for {msg.metadata.message_type}")
    except (SignatureError, KeyError) as e:
        reason = f"site {who}: student signature check failed: {e}"
        flwr_log(ERROR, "fedbrats: %s", reason)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                       reply_to=msg)
    return None


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server runs with differential privacy.

    The server's ``DifferentialPrivacyClientSideFixedClipping`` puts the clipping norm into every
    train instruction; then the returned student is clipped to within that L2 distance of the sent
    one. Without the key (no DP) the handler runs as is (``fixedclipping_mod`` itself would refuse
    such a message). A student sent in float16 (``transfer-dtype``) is clipped in float32, and
    the clipped reply rounded to float16 again.
    """
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    sent = msg.content.array_records.get(wire.ARRAYS)
    sent_np = {k: a.numpy() for k, a in sent.items()} if sent is not None else {}
    if not any(a.dtype == np.float16 for a in sent_np.values()):
        return fixedclipping_mod(msg, context, call_next)

    # fixedclipping_mod takes the sent arrays before it calls the handler: it is shown a
    # float32 copy, the handler the student as sent (whose signature it checks)
    msg.content[wire.ARRAYS] = _as_float32(sent)

    def run_handler(m: Message, ctx: Context) -> Message:
        m.content[wire.ARRAYS] = sent
        reply = call_next(m, ctx)
        if not reply.has_error() and wire.ARRAYS in reply.content.array_records:
            reply.content[wire.ARRAYS] = _as_float32(reply.content[wire.ARRAYS])
        return reply

    reply = fixedclipping_mod(msg, context, run_handler)
    msg.content[wire.ARRAYS] = sent
    if not reply.has_error() and wire.ARRAYS in reply.content.array_records:
        reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in cast_like(
            {k: a.numpy() for k, a in reply.content[wire.ARRAYS].items()}, sent_np).items()})
    return reply


def _as_float32(record: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in cast_floats(
        {k: a.numpy() for k, a in record.items()}, np.float32).items()})


def _weight(run: RunConfig, site: SiteConfig) -> float:
    """Equal weight per population, or the number of training cases."""
    if run.aggregation == "equal":
        return 1.0
    from fedbrats.client.data import load_site_data

    return float(len(load_site_data(site, run).train_cases))


def flatten_scores(scores: dict | None, prefix: str) -> dict[str, float]:
    """{region: {metric: value}} -> {"prefix.region.metric": value}, skipping missing values."""
    out: dict[str, float] = {}
    for region, metrics in (scores or {}).items():
        for metric, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    out[f"{prefix}.{region}.{metric}"] = float(value)
    return out


@app.query(wire.action(wire.INFO))
def info(msg: Message, context: Context) -> Message:
    from fedbrats.client.data import site_info

    run, site = _setup(context)
    facts = site_info(site, run)
    config = ConfigRecord({
        "population": facts["population"],
        "problems": [str(p) for p in facts["problems"]] or [""],
        wire.CODE_KEY: code_location(),
    })
    metrics = MetricRecord({k: int(v) for k, v in facts.items()
                            if isinstance(v, int) and not isinstance(v, bool)})
    for contrast, n in facts["contrasts_present"].items():
        metrics[f"contrast.{contrast}"] = int(n)
    return Message(RecordDict({wire.INFO_RECORD: config, wire.METRICS: metrics}), reply_to=msg)


@app.train(wire.action(wire.WARM))
def warm(msg: Message, context: Context) -> Message:
    """One round of the teachers' federated warm start: the sent teacher network, trained on
    this site's labels, goes back with its weight."""
    from fedbrats.client.teacher import warm_round

    refused = _refuse_unsigned(msg, context)
    if refused is not None:
        return refused
    run, site = _setup(context)
    state = msg.content[wire.ARRAYS].to_torch_state_dict()
    server_round = int(msg.content[wire.CONFIG].get(wire.SERVER_ROUND, 1))
    new_state, metrics = warm_round(site, run, state, server_round)
    record = MetricRecord({**{k: float(v) for k, v in metrics.items()}, wire.WEIGHT_KEY: 1.0})
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(new_state), wire.METRICS: record}),
                   reply_to=msg)


@app.train(wire.action(wire.TEACHER))
def train_teacher(msg: Message, context: Context) -> Message:
    from fedbrats.client.teacher import train_teacher as train_site_teacher

    init = None
    if wire.ARRAYS in msg.content.array_records:  # the warm start's global teacher network
        refused = _refuse_unsigned(msg, context)
        if refused is not None:
            return refused
        init = msg.content[wire.ARRAYS].to_torch_state_dict()
    run, site = _setup(context)
    metrics = train_site_teacher(site, run, init_state=init)
    record = MetricRecord({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    # Metrics only: the teacher stays in site.work_dir.
    return Message(RecordDict({wire.METRICS: record}), reply_to=msg)


def _secagg_mod(msg: Message, context: Context, call_next) -> Message:
    from fedbrats.client.secagg import secagg_mod

    return secagg_mod(msg, context, call_next)


@app.train(mods=[_secagg_mod, dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    from fedbrats.client.distill import distill_round
    from fedbrats.client.secagg import is_secagg_train, secagg_train

    if is_secagg_train(msg):  # secure aggregation: Flower's SecAgg+ masks what we return
        key = context.node_config.get(PUBLIC_KEY_SETTING)
        return secagg_train(msg, context, str(key) if key else None)
    age = process_age()  # in deployment each message has a new process: its start-up so far
    if (refused := _refuse_unsigned(msg, context)) is not None:
        return refused
    run, site = _setup(context)
    config = msg.content[wire.CONFIG]
    server_round = int(config.get(wire.SERVER_ROUND, 0)) + int(config.get(wire.ROUND_OFFSET, 0))
    student = msg.content[wire.ARRAYS].to_torch_state_dict()
    mu = float(config.get(wire.PROXIMAL_MU, 0.0))
    if config.get(wire.BASELINE):  # the labels-only FedAvg baseline: the same round, no teacher
        run = run.baseline_run()
    state, metrics = distill_round(site, run, student, server_round, proximal_mu=mu)
    record = MetricRecord({k: float(v) for k, v in metrics.items()})
    if age is not None:
        record["process_age_s"] = float(age)
    record[WEIGHT_KEY] = _weight(run, site)
    # answered in the precision it was sent (transfer-dtype); trained in the model's own
    sent = {k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
    arrays = ArrayRecord({k: Array(v) for k, v in cast_like(
        {k: v.numpy() for k, v in state.items()}, sent).items()})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: record}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedbrats.client.evaluate import evaluate_site

    if (refused := _refuse_unsigned(msg, context)) is not None:
        return refused
    run, site = _setup(context)
    if wire.CONFIG in msg.content.config_records and msg.content[wire.CONFIG].get(wire.BASELINE):
        run = run.baseline_run()  # the baseline's per-round curve
    student = msg.content[wire.ARRAYS].to_torch_state_dict()
    result = evaluate_site(site, run, student)
    record = MetricRecord(flatten_scores(result["student"], "student"))
    record[WEIGHT_KEY] = _weight(run, site)
    record["num-val"] = int(result["num_val"])
    return Message(RecordDict({wire.METRICS: record}), reply_to=msg)


PERSONAL_FILE = "personal-student.pt"
"""With run setting ``personalise``: the site's fine-tuned student, in its work folder."""


@app.evaluate(wire.action(wire.FINAL))
def evaluate_final(msg: Message, context: Context) -> Message:
    from fedbrats.client.evaluate import evaluate_site

    if (refused := _refuse_unsigned(msg, context)) is not None:
        return refused
    run, site = _setup(context)
    student = msg.content[wire.ARRAYS].to_torch_state_dict()
    grid = None
    text = msg.content[wire.CONFIG].get(wire.POSTPROCESS_GRID) \
        if wire.CONFIG in msg.content.config_records else None
    if text:
        from fedbrats.common.inference.postprocess_tuning import decode_grid

        grid = decode_grid(str(text))
    result = evaluate_site(site, run, student, with_teacher=True, missing_contrasts=True,
                           tta=run.final_tta, postprocess_grid=grid)
    record = MetricRecord({
        **flatten_scores(result["student"], "student"),
        **flatten_scores(result["teacher"], "teacher"),
    })
    if result.get("postprocess_grid") is not None:  # only the scores leave the site
        from fedbrats.common.data.contract import REGIONS

        for i, row in enumerate(result.get("postprocess_grid")):
            for region, value in zip(REGIONS, row):
                if math.isfinite(float(value)):
                    record[f"{wire.POSTPROCESS_SCORES}.{i}.{region}"] = float(value)
    for contrast, scores in (result["student_missing"] or {}).items():
        record.update(flatten_scores(scores, f"student_missing.{contrast}"))
    if run.personalise:  # the site's own model: fine-tuned here, kept here
        from fedbrats.client.finetune import FinetuneSettings, finetune_site, personal_payload
        from fedbrats.common.utils.files import save_atomic

        settings = FinetuneSettings(max_steps=run.personalise_max_steps,
                                    eval_every=max(1, run.personalise_max_steps // 12),
                                    seed=run.seed)
        tuned = finetune_site(run, site, student, settings)
        save_atomic(site.work_dir / PERSONAL_FILE,
                    personal_payload(run, tuned, {"round": run.num_rounds}, site, settings))
        record.update(flatten_scores(tuned.personal_scores, "personal"))
        record.update(flatten_scores(tuned.global_scores, "personal_base"))
        record["personal_steps"] = int(tuned.steps)
    if wire.BASELINE in msg.content.array_records:  # the FedAvg baseline of the same run
        baseline = msg.content[wire.BASELINE].to_torch_state_dict()
        scores = evaluate_site(site, run.baseline_run(), baseline, tta=run.final_tta)["student"]
        record.update(flatten_scores(scores, "baseline"))
    record["num-val"] = int(result["num_val"])
    return Message(RecordDict({wire.METRICS: record}), reply_to=msg)


__all__ = ["app", "dp_clipping_mod", "flatten_scores"]
