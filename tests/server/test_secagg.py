"""Secure aggregation: Flower's real SecAgg+ (legacy workflow on the server, secaggplus_mod on the
sites' train handler) driven by our phase-2 loop, over an in-process loopback Grid that hands each
message to the ClientApp of its node (a copy, as on the wire). Training is faked; the protocol,
the masking and our handlers are real."""

from __future__ import annotations

import copy
import json
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict

from fedbrats.common.config import ConfigError, load_run_config

SITES = {31: "GLI", 32: "SSA", 33: "PED"}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are made outside a Flower process here: give them a run, node and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LoopbackGrid:
    """A Grid whose nodes are ClientApps in this process; every message is copied both ways."""

    def __init__(self, app, contexts: dict[int, Context]):
        self.app, self.contexts = app, contexts
        self.run = SimpleNamespace(run_id=1)
        self.seen_by_server: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            m = copy.deepcopy(m)
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            try:
                reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as e:  # what Flower does with a handler's exception
                reply = Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=m)
            reply = copy.deepcopy(reply)
            self.seen_by_server.append(reply)
            replies.append(reply)
        return replies


def _delta(population: str, rnd: int, shape) -> np.ndarray:
    seed = 10 * rnd + list(SITES.values()).index(population)
    return (np.random.default_rng(seed).standard_normal(shape) * 0.01).astype(np.float32)


@pytest.fixture
def fake_training(monkeypatch):
    import fedbrats.client.distill
    import fedbrats.client.evaluate

    def distill_round(site, run, student, server_round, proximal_mu=0.0):
        import torch

        new = {k: v + torch.from_numpy(_delta(site.population, server_round, tuple(v.shape)))
               for k, v in student.items()}
        return new, {"loss": 0.1, "num_steps": 2}

    def evaluate_site(site, run, student, **_):
        return {"student": {"WT": {"dice": 0.5}}, "num_val": 1}

    monkeypatch.setattr(fedbrats.client.distill, "distill_round", distill_round)
    monkeypatch.setattr(fedbrats.client.evaluate, "evaluate_site", evaluate_site)


def _setup(tmp_path, public_keys: dict[int, str] | None = None, **settings):
    from fedbrats.client.app import app

    run_config = {"preset": "tiny", "output-dir": str(tmp_path / "run"), "num-sites": 3,
                  "secure-aggregation": "true", **settings}
    contexts = {}
    for node, pop in SITES.items():
        node_config = {"population": pop, "data-dir": str(tmp_path / pop),
                       "work-dir": str(tmp_path / "work" / pop)}
        if public_keys and node in public_keys:
            node_config["consortium-public-key"] = public_keys[node]
        contexts[node] = Context(run_id=1, node_id=node, node_config=node_config,
                                 state=RecordDict(), run_config=run_config)
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config)
    return load_run_config(run_config), LoopbackGrid(app, contexts), server_context


def _initial():
    g = np.random.default_rng(5)
    return {"enc.weight": g.standard_normal((8, 4, 3, 3, 3)).astype(np.float32),
            "enc.bias": g.standard_normal(8).astype(np.float32)}


def _run(run, grid, server_context, signer=None):
    from fedbrats.server.secagg import secagg_rounds
    from fedbrats.server.state import RunFolder

    folder = RunFolder(run)
    rounds: list[dict] = []
    start = ArrayRecord({k: Array(v) for k, v in _initial().items()})
    final = secagg_rounds(grid, server_context, run, folder, dict(SITES), rounds, start, 0,
                          signer)
    return final, folder, rounds


def test_secagg_rounds_give_the_mean_update_and_the_server_sees_no_single_one(
        tmp_path, fake_training):
    run, grid, server_context = _setup(tmp_path)
    final, folder, rounds = _run(run, grid, server_context)
    expected = _initial()
    for rnd in (1, 2):
        for k, v in expected.items():
            expected[k] = v + np.mean([_delta(p, rnd, v.shape) for p in SITES.values()], axis=0)
    for k, v in expected.items():
        got = final[k].numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, v, atol=2e-5)  # SecAgg+ quantisation: 16 / 2^22 steps
    # no reply that reached the server carried a site's update in clear
    for reply in grid.seen_by_server:
        if reply.has_content():
            for record in reply.content.array_records.values():
                assert len(record) == 0
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[0]["train"]) == set(SITES.values())
    assert rounds[1]["evaluate"]["SSA"] == {"WT": {"dice": 0.5}}
    audit = [json.loads(x) for x in (folder.path / "audit.jsonl").read_text().splitlines()]
    train = [e for e in audit if e["phase"] == "round"]
    assert len(train) == 6 and all(e["secure_aggregation"] and e["arrays"] == {} for e in train)
    assert sorted(p.name for p in (folder.path / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt"]


def test_secagg_with_signing_survives_a_site_that_refuses(tmp_path, fake_training):
    from fedbrats.common.security.signing import generate_keypair, load_private_key, verify_file

    private, public = generate_keypair(tmp_path / "keys")
    _, other_public = generate_keypair(tmp_path / "other")
    # PED was given another consortium's key: it refuses every student and drops out
    run, grid, server_context = _setup(
        tmp_path, {31: str(public), 32: str(public), 33: str(other_public)},
        **{"min-sites": 2, "num-rounds": 1})
    final, folder, rounds = _run(run, grid, server_context, load_private_key(private))
    expected = {k: v + np.mean([_delta(p, 1, v.shape) for p in ("GLI", "SSA")], axis=0)
                for k, v in _initial().items()}
    for k, v in expected.items():
        np.testing.assert_allclose(final[k].numpy(), v, atol=2e-5)
    assert set(rounds[0]["train"]) == {"GLI", "SSA"}
    verify_file(folder.path / "checkpoints" / "round-001.pt", public)
    audit = [json.loads(x) for x in (folder.path / "audit.jsonl").read_text().splitlines()]
    assert any(e["site"] == "PED" and "error" in e for e in audit if e["phase"] == "round")
    refused = [r for r in grid.seen_by_server if r.has_error()]
    assert any("site PED: student signature check failed" in r.error.reason for r in refused)


def test_secagg_settings():
    run = load_run_config({"secure-aggregation": "true", "dp-noise-multiplier": 1.0})
    assert run.secure_aggregation and not load_run_config({}).secure_aggregation
    with pytest.raises(ConfigError, match="keep-site-updates"):
        load_run_config({"secure-aggregation": "true", "keep-site-updates": "true"})
    with pytest.raises(ConfigError, match="strategy"):
        load_run_config({"secure-aggregation": "true", "strategy": "fedadam"})
    with pytest.raises(ConfigError, match="aggregation"):
        load_run_config({"secure-aggregation": "true", "aggregation": "cases"})
