"""The fedbrats ClientApp: one instance per site. Handlers unpack messages and call
``client/site.py``; the teacher's weights and the scans never leave the site.

Message types answered:

==================  =========================================================================
``query.info``      the site's facts (population, case counts, contrasts, data-check summary)
``train.teacher``   phase 1: train (or reuse) the site's teacher; replies with metrics only
``train``           phase 2: one distillation round on the sent student; replies student + metrics
``evaluate``        the sent student on the validation cases (per-round curve)
``evaluate.final``  the final student beside the site's teacher, and with each contrast removed
==================  =========================================================================
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import RunConfig, SiteConfig, load_run_config, site_from_node_config

app = ClientApp()

WEIGHT_KEY = "fedbrats-weight"
"""Every train/evaluate reply carries it; the server's strategy aggregates weighted by it."""


def _setup(context: Context) -> tuple[RunConfig, SiteConfig]:
    run = load_run_config(context.run_config)
    return run, site_from_node_config(context.node_config, run)


def _weight(run: RunConfig, site: SiteConfig) -> float:
    """Equal weight per population, or the number of training cases."""
    if run.aggregation == "equal":
        return 1.0
    from client.site import load_site_data

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


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    from client.site import site_info

    run, site = _setup(context)
    facts = site_info(site, run)
    config = ConfigRecord({
        "population": facts["population"],
        "problems": [str(p) for p in facts["problems"]] or [""],
    })
    metrics = MetricRecord({k: int(v) for k, v in facts.items()
                            if isinstance(v, int) and not isinstance(v, bool)})
    for contrast, n in facts["contrasts_present"].items():
        metrics[f"contrast.{contrast}"] = int(n)
    return Message(RecordDict({"info": config, "metrics": metrics}), reply_to=msg)


@app.train("teacher")
def train_teacher(msg: Message, context: Context) -> Message:
    from client.site import train_teacher as _train_teacher

    run, site = _setup(context)
    metrics = _train_teacher(site, run)
    record = MetricRecord({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    # Metrics only: the teacher stays in site.work_dir.
    return Message(RecordDict({"metrics": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.site import distill_round

    run, site = _setup(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    student = msg.content["arrays"].to_torch_state_dict()
    mu = float(config.get("proximal-mu", 0.0))
    state, metrics = distill_round(site, run, student, server_round, proximal_mu=mu)
    record = MetricRecord({k: float(v) for k, v in metrics.items()})
    record[WEIGHT_KEY] = _weight(run, site)
    return Message(
        RecordDict({"arrays": ArrayRecord(state), "metrics": record}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client.site import evaluate_site

    run, site = _setup(context)
    student = msg.content["arrays"].to_torch_state_dict()
    result = evaluate_site(site, run, student)
    record = MetricRecord(flatten_scores(result["student"], "student"))
    record[WEIGHT_KEY] = _weight(run, site)
    record["num-val"] = int(result["num_val"])
    return Message(RecordDict({"metrics": record}), reply_to=msg)


@app.evaluate("final")
def evaluate_final(msg: Message, context: Context) -> Message:
    from client.site import evaluate_site

    run, site = _setup(context)
    student = msg.content["arrays"].to_torch_state_dict()
    result = evaluate_site(site, run, student, with_teacher=True, missing_contrasts=True)
    record = MetricRecord({
        **flatten_scores(result["student"], "student"),
        **flatten_scores(result["teacher"], "teacher"),
    })
    for contrast, scores in (result["student_missing"] or {}).items():
        record.update(flatten_scores(scores, f"student_missing.{contrast}"))
    record["num-val"] = int(result["num_val"])
    return Message(RecordDict({"metrics": record}), reply_to=msg)
