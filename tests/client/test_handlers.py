"""The ClientApp's handlers pick the settings of what they are asked to train or score: with a
head per population for the student, one shared last block for the labels-only FedAvg baseline
(hand-built Flower messages, the site functions recorded instead of run)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedbrats.common import wire


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def seen(monkeypatch):
    """The run settings each site function was called with."""
    import fedbrats.client.distill
    import fedbrats.client.evaluate

    calls: list[tuple[str, object]] = []

    def distill_round(site, run, student, server_round, proximal_mu=0.0):
        calls.append(("train", run))
        return dict(student), {"loss": 0.1}

    def evaluate_site(site, run, student, **kwargs):
        calls.append(("evaluate", run))
        scores = {r: {"dice": 0.5} for r in ("WT", "TC", "ET")}
        return {"student": scores, "teacher": scores, "student_missing": None, "num_val": 1}

    monkeypatch.setattr(fedbrats.client.distill, "distill_round", distill_round)
    monkeypatch.setattr(fedbrats.client.evaluate, "evaluate_site", evaluate_site)
    return calls


def _context(tmp_path) -> Context:
    node_config = {"population": "PED", "data-dir": str(tmp_path / "d"),
                   "work-dir": str(tmp_path / "w")}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                   run_config={"preset": "tiny", "student-heads": "population"})


def _message(kind: str, config: dict, **extra: ArrayRecord) -> Message:
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config), **extra}),
                   dst_node_id=5, message_type=kind)


@pytest.mark.parametrize("baseline", [False, True])
def test_the_baseline_rounds_train_and_score_one_shared_last_block(tmp_path, seen, baseline):
    from fedbrats.client.app import app

    config = {"server-round": 1, **({wire.BASELINE: True} if baseline else {})}
    for kind in ("train", "evaluate"):
        reply = app(_message(kind, config), _context(tmp_path))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    expected = "shared" if baseline else "population"
    assert [(k, r.student_heads) for k, r in seen] == [("train", expected),
                                                       ("evaluate", expected)]
    assert seen[0][1].logit_weight == (0.0 if baseline else 1.0)


def test_the_final_evaluation_scores_the_student_and_the_baseline_each_with_its_own(tmp_path,
                                                                                   seen):
    from fedbrats.client.app import app

    baseline = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    reply = app(_message(wire.FINAL, {}, **{wire.BASELINE: baseline}),
                _context(tmp_path))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert [r.student_heads for _, r in seen] == ["population", "shared"]
    assert reply.content[wire.METRICS]["baseline.WT.dice"] == 0.5
