"""Differential privacy: the RDP accountant against known values, the run settings, Flower's
client-side clipping on the train handler, and the DP strategy's noise and report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedbrats.common.config import ConfigError, load_run_config
from fedbrats.common.wire import WEIGHT_KEY
from fedbrats.server.privacy import (
    DEFAULT_ORDERS,
    GaussianRdpAccountant,
    effective_noise_multiplier,
    epsilon_from_rdp,
    gaussian_rdp,
    noise_std,
    privacy_summary,
)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are made outside a Flower process here: give them a run, node and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# -- the accountant ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, rounds, delta, expected", [
    # eps = T/(2 s^2) + 2 sqrt(T/(2 s^2) * ln(1/delta)), worked by hand
    (1.0, 1, 1e-5, 0.5 + 2 * math.sqrt(0.5 * math.log(1e5))),        # 5.298526
    (1.0, 10, 1e-5, 5.0 + 2 * math.sqrt(5.0 * math.log(1e5))),       # 20.174271
    (4.0, 50, 1e-5, 1.5625 + 2 * math.sqrt(1.5625 * math.log(1e5))),  # 10.045176
    (2.0, 8, 1e-6, 1.0 + 2 * math.sqrt(math.log(1e6))),              # 8.433638
])
def test_epsilon_known_values(sigma, rounds, delta, expected):
    acc = GaussianRdpAccountant()
    acc.compose(sigma, rounds)
    eps, order = acc.epsilon_and_order(delta)
    assert eps == pytest.approx(expected, rel=1e-12)
    # the closed form is the minimum over alpha: a dense grid finds the same value
    alphas = np.linspace(1.0005, 400, 400_000)
    grid = rounds * alphas / (2 * sigma**2) + math.log(1 / delta) / (alphas - 1)
    assert grid.min() == pytest.approx(eps, rel=1e-6)
    assert order == pytest.approx(alphas[grid.argmin()], rel=1e-2)


def test_spot_values():
    acc = GaussianRdpAccountant()
    acc.compose(1.0)
    assert acc.epsilon(1e-5) == pytest.approx(5.298526, abs=1e-6)
    acc.compose(1.0, 9)
    assert acc.epsilon(1e-5) == pytest.approx(20.174271, abs=1e-6)


def test_order_grid_is_an_upper_bound_close_to_the_optimum():
    for sigma, rounds in ((0.8, 5), (1.0, 10), (3.0, 100)):
        acc = GaussianRdpAccountant()
        acc.compose(sigma, rounds)
        grid_eps, alpha = epsilon_from_rdp(DEFAULT_ORDERS, gaussian_rdp(sigma, rounds=rounds), 1e-5)
        assert acc.epsilon(1e-5) <= grid_eps <= acc.epsilon(1e-5) * 1.01
        assert alpha in DEFAULT_ORDERS


def test_composition_and_monotonicity():
    one, two = GaussianRdpAccountant(), GaussianRdpAccountant()
    one.compose(1.5, 4)
    for _ in range(4):
        two.compose(1.5)
    assert one.epsilon(1e-5) == pytest.approx(two.epsilon(1e-5))
    more_noise = GaussianRdpAccountant()
    more_noise.compose(3.0, 4)
    assert more_noise.epsilon(1e-5) < one.epsilon(1e-5)
    assert one.epsilon(1e-3) < one.epsilon(1e-5)
    assert GaussianRdpAccountant().epsilon_and_order(1e-5) == (0.0, None)
    with pytest.raises(ValueError, match="delta"):
        one.epsilon(1.5)
    with pytest.raises(ValueError, match="noise multiplier"):
        one.compose(0.0)


def test_noise_matches_flower():
    from flwr.supercore.differential_privacy import compute_stdv

    assert noise_std(1.2, 5.0, 3) == compute_stdv(1.2, 5.0, 3) == pytest.approx(2.0)
    assert effective_noise_multiplier(1.2, 5, 4) == pytest.approx(0.96)


def test_privacy_summary_from_rounds():
    run = load_run_config({"preset": "tiny", "num-sites": 3, "dp-noise-multiplier": 1.0,
                           "dp-clipping-norm": 2.0})
    assert privacy_summary(load_run_config({"preset": "tiny"}), []) is None
    rounds = [{"round": r, "dp": {"sites_aggregated": 3, "noise_multiplier": 1.0}}
              for r in (1, 2)]
    s = privacy_summary(run, rounds)
    assert s["rounds"] == 2 and s["delta"] == 1e-5 and s["clipping_norm"] == 2.0
    assert s["epsilon"] == pytest.approx(1.0 + 2 * math.sqrt(math.log(1e5)))
    assert s["noise_std"] == pytest.approx(2.0 / 3)
    rounds.append({"round": 3, "dp": {"sites_aggregated": 2, "noise_multiplier": 2 / 3}})
    s3 = privacy_summary(run, rounds)
    assert s3["rounds_with_fewer_sites"] == [3] and s3["epsilon"] > s["epsilon"]
    s4 = privacy_summary(run, [{"round": 1, "train": {}}] + rounds)
    assert s4["epsilon"] == math.inf and s4["rounds_without_noise"] == [1]


# -- settings ------------------------------------------------------------------------------------


def test_dp_settings():
    run = load_run_config({"preset": "tiny"})
    assert (run.dp_noise_multiplier, run.dp_clipping_norm, run.dp_delta) == (0.0, 10.0, 1e-5)
    assert load_run_config({"dp-noise-multiplier": -1, "dp-delta": "1e-6"}).dp_delta == 1e-6
    with pytest.raises(ConfigError, match="dp-clipping-norm"):
        load_run_config({"dp-clipping-norm": 0})
    with pytest.raises(ConfigError, match="dp-delta"):
        load_run_config({"dp-delta": 1.0})
    with pytest.raises(ConfigError, match="strategy: expected fedavg or fedprox"):
        load_run_config({"dp-noise-multiplier": 1.0, "strategy": "fedadam"})
    with pytest.raises(ConfigError, match='aggregation: expected "equal"'):
        load_run_config({"dp-noise-multiplier": 1.0, "aggregation": "cases"})


# -- client-side clipping on the train handler ---------------------------------------------------


def _site_context(tmp_path) -> Context:
    node_config = {"population": "PED", "data-dir": str(tmp_path / "d"),
                   "work-dir": str(tmp_path / "w")}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                   run_config={"preset": "tiny"})


def _sent():
    g = np.random.default_rng(3)
    return {"w": g.standard_normal((8, 8)).astype(np.float32),
            "b": g.standard_normal(8).astype(np.float32)}


def _train_message(arrays, config) -> Message:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "config": ConfigRecord(config)}),
                   dst_node_id=5, message_type="train")


@pytest.fixture
def big_step(monkeypatch):
    """A fake local round: every weight moves by +1 (update norm sqrt(72) ~ 8.49)."""
    import fedbrats.client.distill

    def fake(site, run, student, server_round, proximal_mu=0.0):
        return {k: v + 1 for k, v in student.items()}, {"loss": 0.2}

    monkeypatch.setattr(fedbrats.client.distill, "distill_round", fake)


def test_train_handler_clips_when_the_server_asks(tmp_path, big_step):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fedbrats.client.app import app

    sent = _sent()
    reply = app(_train_message(sent, {"server-round": 1, KEY_CLIPPING_NORM: 2.0}),
                _site_context(tmp_path))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    out = reply.content["arrays"]
    delta = np.concatenate([(out[k].numpy() - sent[k]).ravel() for k in sent])
    assert np.linalg.norm(delta) == pytest.approx(2.0, rel=1e-5)
    assert np.allclose(delta, delta[0])  # scaled, not changed in direction
    assert reply.content["metrics"][WEIGHT_KEY] == 1.0


def test_train_handler_does_not_clip_without_dp(tmp_path, big_step):
    from fedbrats.client.app import app

    sent = _sent()
    reply = app(_train_message(sent, {"server-round": 1}), _site_context(tmp_path))
    np.testing.assert_allclose(reply.content["arrays"]["w"].numpy(), sent["w"] + 1)


# -- the DP strategy -----------------------------------------------------------------------------


class _Grid:
    def get_node_ids(self):
        return [21, 22, 23]


def test_dp_strategy_adds_flowers_noise_before_the_checkpoint(tmp_path):
    import torch
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fedbrats.server.state import RunFolder
    from fedbrats.server.strategy import build_strategy

    z, clip, n = 0.5, 2.0, 3
    run = load_run_config({"preset": "tiny", "output-dir": str(tmp_path / "run"), "num-sites": n,
                           "dp-noise-multiplier": z, "dp-clipping-norm": clip})
    rounds: list[dict] = []
    folder = RunFolder(run)
    strategy = build_strategy(run, folder, {21: "GLI", 22: "SSA", 23: "PED"}, rounds)
    sent = {"w": np.zeros(40_000, np.float32)}
    messages = list(strategy.configure_train(
        1, ArrayRecord({"w": Array(sent["w"])}), ConfigRecord(), _Grid()))
    assert all(m.content["config"][KEY_CLIPPING_NORM] == clip for m in messages)
    replies = []
    for i, m in enumerate(messages):  # updates already within the clipping norm
        update = {"w": np.full(40_000, 0.001 * (i + 1), np.float32)}
        replies.append(Message(RecordDict({
            "arrays": ArrayRecord({"w": Array(update["w"])}),
            "metrics": MetricRecord({"loss": 0.1, WEIGHT_KEY: 1.0})}), reply_to=m))
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = arrays["w"].numpy() - 0.002
    assert arrays["w"].numpy().dtype == np.float32
    assert noise.mean() == pytest.approx(0.0, abs=0.02)
    assert noise.std() == pytest.approx(z * clip / n, rel=0.03)
    ckpt = torch.load(folder.path / "checkpoints" / "round-001.pt", weights_only=True)
    np.testing.assert_array_equal(ckpt["state_dict"]["w"].numpy(), arrays["w"].numpy())
    assert rounds[0]["dp"] == {"sites_aggregated": 3, "noise_multiplier": z,
                               "noise_std": pytest.approx(z * clip / n)}
    # the report states the epsilon of that one round
    from fedbrats.server.report import write_report

    summary = privacy_summary(run, rounds)
    paths = write_report(folder.path, {"config": run.to_dict(), "privacy": summary}, {}, rounds)
    report = json.loads(paths["json"].read_text())
    expected = 2.0 + 2 * math.sqrt(2.0 * math.log(1e5))  # one round, sigma 0.5: K = 2
    assert report["privacy"]["epsilon"] == pytest.approx(expected)
    md = paths["markdown"].read_text()
    assert "## Differential privacy" in md and f"({expected:.3g}, 1e-05)-DP" in md


def test_a_float16_student_comes_back_in_float16_and_is_clipped_in_float32(tmp_path, big_step):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fedbrats.client.app import app

    sent = {k: v.astype(np.float16) for k, v in _sent().items()}
    plain = app(_train_message(sent, {"server-round": 1}), _site_context(tmp_path))
    assert plain.content["arrays"]["w"].numpy().dtype == np.float16
    np.testing.assert_allclose(plain.content["arrays"]["w"].numpy(),
                               (sent["w"].astype(np.float32) + 1).astype(np.float16))
    reply = app(_train_message(sent, {"server-round": 1, KEY_CLIPPING_NORM: 2.0}),
                _site_context(tmp_path))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    out = reply.content["arrays"]
    assert {out[k].numpy().dtype for k in sent} == {np.dtype(np.float16)}
    delta = np.concatenate([(out[k].numpy().astype(np.float32) - sent[k].astype(np.float32))
                            .ravel() for k in sent])
    # clipped to the norm (up to float16's rounding of the result), not to zero or inf
    assert np.linalg.norm(delta) == pytest.approx(2.0, rel=2e-3)
