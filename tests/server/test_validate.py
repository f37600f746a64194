"""Update validation: check_update, and the strategy dropping a broken site's update while
aggregating the others (hand-built Flower messages, no simulation engine)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbrats.common.wire import WEIGHT_KEY
from fedbrats.server.validate import check_update, format_problems


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are made outside a Flower process here: give them a run, node and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _ref():
    return {"a.weight": np.zeros((3, 2), np.float32), "a.bias": np.zeros(3, np.float32)}


def test_a_good_update_has_no_problems():
    upd = {"a.weight": np.ones((3, 2), np.float32), "a.bias": np.ones(3, np.float32)}
    assert check_update(_ref(), upd) == []
    # torch tensors and Flower Arrays are array-likes too, on either side
    ref = ArrayRecord({k: Array(v) for k, v in _ref().items()})
    assert check_update(ref, {k: torch.as_tensor(v) for k, v in upd.items()}) == []
    assert check_update(_ref(), {k: Array(v) for k, v in upd.items()}) == []


def test_missing_and_extra_arrays_are_named():
    problems = check_update(_ref(), {"a.weight": np.ones((3, 2), np.float32),
                                     "teacher.w": np.ones(5, np.float32)})
    assert len(problems) == 2
    assert problems[0].startswith("a.bias: missing; expected an array of shape (3,), dtype float32")
    assert problems[1].startswith("teacher.w: unexpected array (shape (5,), dtype float32)")


def test_wrong_shape_and_dtype_say_expected_and_found():
    problems = check_update(_ref(), {"a.weight": np.ones((2, 3), np.float32),
                                     "a.bias": np.ones(3, np.float64)})
    assert problems == ["a.weight: wrong shape: expected (3, 2), found (2, 3)",
                        "a.bias: wrong dtype: expected float32, found float64"]


def test_non_finite_values_are_counted():
    w = np.ones((3, 2), np.float32)
    w[0, 0], w[1, 1], w[2, 1] = np.nan, np.inf, -np.inf
    problems = check_update(_ref(), {"a.weight": w, "a.bias": np.ones(3, np.float32)})
    assert problems == ["a.weight: expected finite values, found 1 NaN, 2 inf among 6 values"]


def test_non_numeric_values_are_problems_not_crashes():
    problems = check_update(_ref(), {"a.weight": np.array([["x"] * 2] * 3),
                                     "a.bias": np.ones(3, np.float32)})
    assert "a.weight: wrong dtype: expected float32, found <U1" in problems
    assert format_problems([f"p{i}" for i in range(7)], limit=2) == "p0; p1; and 5 more"


# -- the strategy -------------------------------------------------------------------------------


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


NAMES = {11: "GLI", 12: "SSA", 13: "PED"}


def _strategy(tmp_path, round_offset=0, **settings):
    from fedbrats.common.config import load_run_config
    from fedbrats.server.state import RunFolder
    from fedbrats.server.strategy import build_strategy

    run = load_run_config({"preset": "tiny", "output-dir": str(tmp_path / "run"), "num-sites": 3,
                           **settings})
    rounds: list[dict] = []
    folder = RunFolder(run)
    return build_strategy(run, folder, NAMES, rounds, round_offset=round_offset), folder, rounds


def _global(seed=0):
    g = np.random.default_rng(seed)
    return {"conv.weight": g.standard_normal((4, 2, 3)).astype(np.float32),
            "conv.bias": g.standard_normal(4).astype(np.float32)}


def _reply(instruction: Message, arrays: dict, loss: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"loss": loss, WEIGHT_KEY: 1.0}),
    })
    return Message(content, reply_to=instruction)


def _round(strategy, sent: dict, updates: dict[int, dict]):
    record = ArrayRecord({k: Array(v) for k, v in sent.items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), _Grid(NAMES)))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert set(by_node) == set(NAMES)
    replies = [_reply(by_node[n], upd, 0.1 * n) for n, upd in updates.items()]
    return strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("broken", ["nan", "shape"])
def test_strategy_drops_a_broken_update_and_averages_the_rest(tmp_path, broken):
    strategy, folder, rounds = _strategy(tmp_path, **{"min-sites": 2})
    sent = _global()
    good = {n: {k: v + n for k, v in sent.items()} for n in (11, 13)}
    bad = {k: v.copy() for k, v in sent.items()}
    if broken == "nan":
        bad["conv.weight"][1, 1, 1] = np.nan
    else:
        bad["conv.bias"] = np.zeros(5, np.float32)
    arrays, _ = _round(strategy, sent, {11: good[11], 12: bad, 13: good[13]})
    for key in sent:
        np.testing.assert_allclose(arrays[key].numpy(), (good[11][key] + good[13][key]) / 2,
                                   rtol=1e-6)
    # the checkpoint holds the same mean, the rejected site is in the audit log with why
    ckpt = torch.load(folder.path / "checkpoints" / "round-001.pt", weights_only=True)
    np.testing.assert_allclose(ckpt["state_dict"]["conv.bias"].numpy(),
                               (good[11]["conv.bias"] + good[13]["conv.bias"]) / 2, rtol=1e-6)
    audit = [json.loads(line) for line in (folder.path / "audit.jsonl").read_text().splitlines()]
    rejected = [e for e in audit if e.get("rejected")]
    assert [e["site"] for e in rejected] == ["SSA"]
    assert rejected[0]["phase"] == "round" and rejected[0]["round"] == 1
    expected = ("conv.weight: expected finite values, found 1 NaN" if broken == "nan"
                else "conv.bias: wrong shape: expected (4,), found (5,)")
    assert any(p.startswith(expected) for p in rejected[0]["rejected"])
    assert set(rounds[0]["train"]) == {"GLI", "PED"}


def test_a_rejected_update_counts_as_missing_for_min_sites(tmp_path):
    from fedbrats.server.ledger import RoundFailed

    strategy, _, _ = _strategy(tmp_path)  # min-sites 0: every site's update is needed
    sent = _global()
    bad = {k: np.full_like(v, np.inf) for k, v in sent.items()}
    with pytest.raises(RoundFailed, match="2 of 3 sites"):
        _round(strategy, sent, {11: sent, 12: bad, 13: sent})


def test_fedadam_keeps_the_students_dtype(tmp_path):
    """FedAdam computes in float64; the global student stays float32, so the next round's
    float32 updates still pass the dtype check."""
    strategy, _, _ = _strategy(tmp_path, strategy="fedadam")
    sent = _global()
    arrays, _ = _round(strategy, sent, {n: {k: v + 0.01 * n for k, v in sent.items()}
                                        for n in NAMES})
    assert {arrays[k].numpy().dtype for k in sent} == {np.dtype(np.float32)}


def _with_norm_statistics(arrays: dict, mean: float, var: float, steps: int) -> dict:
    return {**arrays, "bn.running_mean": np.full(4, mean, np.float32),
            "bn.running_var": np.full(4, var, np.float32),
            "bn.num_batches_tracked": np.asarray(steps, np.int64)}


def test_fedadam_steps_the_weights_but_averages_the_norm_statistics(tmp_path):
    """Batch-norm running statistics are the mean of the sites' (FedAdam's step would move
    them by eta from the old value); the weights still take FedAdam's step."""
    strategy, _, _ = _strategy(tmp_path, strategy="fedadam")
    sent = _with_norm_statistics(_global(), 0.0, 1.0, 0)
    updates = {n: _with_norm_statistics({k: v + 0.01 * n for k, v in _global().items()},
                                        float(n - 10), 2.0 * (n - 10), 30) for n in NAMES}
    arrays, _ = _round(strategy, sent, updates)
    out = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(out["bn.running_mean"], 2.0)  # mean of 1, 2, 3
    np.testing.assert_allclose(out["bn.running_var"], 4.0)  # mean of 2, 4, 6
    assert out["bn.num_batches_tracked"] == 30 and out["bn.num_batches_tracked"].dtype == np.int64
    mean_update = np.mean([u["conv.bias"] for u in updates.values()], axis=0)
    assert not np.allclose(out["conv.bias"], mean_update)  # a server step, not the mean
    assert out["conv.bias"].dtype == np.float32


def test_settled_norm_statistics_keep_noised_means_but_no_negative_variance():
    from fedbrats.server.protocol import is_norm_statistic, settle_norm_statistics

    noised = {"w": np.array([-1.0, 2.0], np.float32),
              "bn.running_var": np.array([-0.5, 0.3], np.float32),
              "bn.running_mean": np.array([-0.5, 0.3], np.float32)}
    site = {"w": np.zeros(2, np.float32), "bn.running_var": np.ones(2, np.float32),
            "bn.running_mean": np.ones(2, np.float32)}
    out = settle_norm_statistics(noised, [site], [1.0], noised=True)
    np.testing.assert_allclose(out["bn.running_var"], [0.0, 0.3])  # clamped, not replaced
    np.testing.assert_allclose(out["bn.running_mean"], [-0.5, 0.3])
    np.testing.assert_array_equal(out["w"], [-1.0, 2.0])
    plain = settle_norm_statistics(noised, [site, {**site, "bn.running_var": np.full(2, 3.0)}],
                                   [1.0, 3.0])
    np.testing.assert_allclose(plain["bn.running_var"], 2.5)  # weighted 1:3
    assert [is_norm_statistic(k) for k in ("a.running_var", "a.weight", "running_mean.bias")] \
        == [True, False, False]


def test_a_sites_refusal_is_logged_and_audited_with_its_reason(tmp_path):
    """A site refusing the student (say, a bad signature) answers an error reply: the server
    audits it with the site's name and reason and aggregates the others."""
    import uuid

    from flwr.app import Error

    strategy, folder, _ = _strategy(tmp_path, **{"min-sites": 2})
    sent = _global()
    record = ArrayRecord({k: Array(v) for k, v in sent.items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), _Grid(NAMES)))
    for m in messages:  # the SuperLink gives every message an id when it is sent
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    by_node = {m.metadata.dst_node_id: m for m in messages}
    reason = "site SSA: student signature check failed: student sent for train: no signature"
    replies = [_reply(by_node[11], sent, 0.1), _reply(by_node[13], sent, 0.3),
               Message(Error(code=2, reason=reason), reply_to=by_node[12])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    audit = [json.loads(line) for line in (folder.path / "audit.jsonl").read_text().splitlines()]
    assert {"phase": "round", "round": 1, "site": "SSA", "error": reason} in audit


def test_eval_every_sends_evaluations_only_on_due_rounds_and_the_last(tmp_path):
    """eval-every 3 over 7 rounds: the sites evaluate after rounds 3, 6 and 7 only; a resumed
    run (round offset 4) counts rounds from the start of the run."""
    strategy, _, rounds = _strategy(tmp_path, **{"num-rounds": 7, "eval-every": 3})
    record = ArrayRecord({k: Array(v) for k, v in _global().items()})
    sent = {r: list(strategy.configure_evaluate(r, record, ConfigRecord(), _Grid(NAMES)))
            for r in range(1, 8)}
    assert [r for r, msgs in sent.items() if msgs] == [3, 6, 7]
    assert {m.metadata.dst_node_id for m in sent[6]} == set(NAMES)
    # a round without evaluation records nothing; a due one records every site's scores
    assert strategy.aggregate_evaluate(2, []) is None
    assert rounds == []
    scores = MetricRecord({"student.WT.dice": 0.5, WEIGHT_KEY: 1.0})
    strategy.aggregate_evaluate(3, [Message(RecordDict({"metrics": scores}), reply_to=m)
                                    for m in sent[3]])
    assert [r["round"] for r in rounds] == [3]
    assert {s: v["WT"]["dice"] for s, v in rounds[0]["evaluate"].items()} == {
        "GLI": 0.5, "SSA": 0.5, "PED": 0.5}

    resumed, _, _ = _strategy(tmp_path / "resumed", round_offset=4,
                              **{"num-rounds": 7, "eval-every": 3})
    due = [r for r in range(1, 4)
           if list(resumed.configure_evaluate(r, record, ConfigRecord(), _Grid(NAMES)))]
    assert due == [2, 3]  # rounds 6 and 7 of the run


def test_a_checkpoint_of_another_network_is_not_resumed(tmp_path):
    """A run folder whose checkpoints hold a student without batch norm (an older version of
    the preset) is refused with the folder named, not loaded into the wrong network."""
    import dataclasses

    from fedbrats.common.config import load_run_config
    from fedbrats.common.networks.models import PRESETS, ModelSpec
    from fedbrats.server.protocol import check_resumable, initial_student_arrays
    from fedbrats.server.state import RunFolder

    run = load_run_config({"preset": "tiny", "output-dir": str(tmp_path / "run")})
    folder = RunFolder(run)
    student = initial_student_arrays(run)
    check_resumable(folder, 3, student, student)  # its own network: fine
    options = {k: v for k, v in PRESETS["student-tiny"].to_dict()["kwargs"].items()
               if k != "norm"}
    PRESETS["student-old"] = ModelSpec("UNet", options)  # MONAI's default: instance norm
    try:
        saved = initial_student_arrays(dataclasses.replace(run, student_model="student-old"))
    finally:
        del PRESETS["student-old"]
    with pytest.raises(RuntimeError, match=r"checkpoints: the round-3 student does not fit.*"
                                           r"running_mean: missing"):
        check_resumable(folder, 3, saved, student)


# -- transfer-dtype float16 ----------------------------------------------------------------------


def test_float16_transfer_sends_half_and_aggregates_in_float32(tmp_path):
    from fedbrats.common.security.signing import generate_keypair, verify_arrays

    key, public = generate_keypair(tmp_path / "keys")
    strategy, folder, _ = _strategy(tmp_path, **{"transfer-dtype": "float16",
                                                 "signing-key": str(key)})
    sent = _with_norm_statistics(_global(), 0.5, 1e6, 7)
    sent["big.weight"] = np.array([1.0, 7e4], np.float32)  # beyond float16's range
    record = ArrayRecord({k: Array(v) for k, v in sent.items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), _Grid(NAMES)))
    wire = messages[0].content["arrays"]
    assert wire["conv.weight"].numpy().dtype == np.float16
    assert wire["bn.num_batches_tracked"].numpy().dtype == np.int64  # integers never cast
    # batch-norm statistics (a variance can outgrow float16) and out-of-range arrays: float32
    assert {wire[k].numpy().dtype for k in ("bn.running_var", "bn.running_mean", "big.weight")} \
        == {np.dtype(np.float32)}
    # the signature is over what travels, so a site verifies the float16 copy
    verify_arrays(wire, messages[0].content["config"]["fedbrats-signature"], public)
    # three float16 updates whose float16 mean would round: the server averages in float32
    updates = {n: {k: (np.asarray(v, np.float32) + 1e-3 * n).astype(wire[k].numpy().dtype)
                   for k, v in sent.items()} for n in NAMES}
    by_node = {m.metadata.dst_node_id: m for m in messages}
    arrays, _ = strategy.aggregate_train(1, [_reply(by_node[n], updates[n], 0.1) for n in NAMES])
    assert arrays["conv.weight"].numpy().dtype == np.float32
    expected = np.mean([updates[n]["conv.weight"].astype(np.float32) for n in NAMES], axis=0)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert np.abs(arrays["conv.weight"].numpy() - sent["conv.weight"] - 12e-3).max() < 2e-3
    ckpt = torch.load(folder.path / "checkpoints" / "round-001.pt", weights_only=True)
    assert ckpt["state_dict"]["conv.weight"].dtype == torch.float32
    # a float32 reply to a float16 instruction is not what was asked for
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid(NAMES)))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [_reply(by_node[11], sent, 0.1)] + [_reply(by_node[n], updates[n], 0.1)
                                                  for n in (12, 13)]
    strategy.ledger.run = dataclasses.replace(strategy.ledger.run, min_sites=2)
    strategy.aggregate_train(2, replies)
    audit = [json.loads(line) for line in (folder.path / "audit.jsonl").read_text().splitlines()]
    rejected = [e for e in audit if e.get("rejected")]
    assert any("wrong dtype: expected float16, found float32" in p
               for p in rejected[0]["rejected"])
    # the per-round evaluation sends the float16 copy too
    evals = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), _Grid(NAMES)))
    assert all(m.content["arrays"]["conv.bias"].numpy().dtype == np.float16 for m in evals)


def test_float16_transfer_is_refused_with_secure_aggregation():
    from fedbrats.common.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="transfer-dtype: expected float32 with secure-agg"):
        load_run_config({"preset": "tiny", "transfer-dtype": "float16",
                         "secure-aggregation": "true"})
    with pytest.raises(ConfigError, match="transfer-dtype: expected float32 or float16"):
        load_run_config({"preset": "tiny", "transfer-dtype": "bfloat8"})


def test_float16_transfer_with_fedadam_steps_from_the_float32_student(tmp_path):
    strategy, _, _ = _strategy(tmp_path, strategy="fedadam", **{"transfer-dtype": "float16"})
    sent = _global()
    record = ArrayRecord({k: Array(v) for k, v in sent.items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord(), _Grid(NAMES)))
    assert messages[0].content["arrays"]["conv.weight"].numpy().dtype == np.float16
    np.testing.assert_array_equal(strategy.current_arrays["conv.weight"], sent["conv.weight"])
    by_node = {m.metadata.dst_node_id: m for m in messages}
    same = {k: v.astype(np.float16) for k, v in sent.items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(by_node[n], same, 0.1) for n in NAMES])
    assert arrays["conv.weight"].numpy().dtype == np.float32
    # the sites sent back what they got: the step is the float16 rounding, nothing more
    assert np.abs(arrays["conv.weight"].numpy() - sent["conv.weight"]).max() < 0.05


# -- a head per population ----------------------------------------------------------------------


def test_each_population_head_is_the_mean_of_its_own_sites_only(tmp_path):
    strategy, folder, _ = _strategy(tmp_path, **{"student-heads": "population",
                                                 "min-sites": 2})
    sent = _global()
    for pop in ("GLI", "SSA", "PED"):
        sent[f"out.population_heads.{pop}.weight"] = np.full(2, 10.0, np.float32)
        sent[f"out.population_heads.{pop}.num_batches_tracked"] = np.array(5, np.int64)
    # every site moves the shared weights and its own head; the other heads come back as sent
    updates = {}
    for n, pop in NAMES.items():
        upd = {k: v.copy() for k, v in sent.items()}
        upd["conv.bias"] = sent["conv.bias"] + n
        upd[f"out.population_heads.{pop}.weight"] = np.array([n, -n], np.float32)
        upd[f"out.population_heads.{pop}.num_batches_tracked"] = np.array(5 + n, np.int64)
        updates[n] = upd
    arrays, _ = _round(strategy, sent, updates)
    np.testing.assert_allclose(arrays["conv.bias"].numpy(), sent["conv.bias"] + 12, rtol=1e-6)
    for n, pop in NAMES.items():  # not (n + 10 + 10) / 3: the head is its own site's alone
        np.testing.assert_array_equal(arrays[f"out.population_heads.{pop}.weight"].numpy(),
                                      [n, -n])
        assert int(arrays[f"out.population_heads.{pop}.num_batches_tracked"].numpy()) == 5 + n
    ckpt = torch.load(folder.path / "checkpoints" / "round-001.pt", weights_only=True)
    assert ckpt["state_dict"]["out.population_heads.PED.weight"].tolist() == [13.0, -13.0]
    # PED does not reply in round 2: its head stays as it was, the others move on
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid(NAMES)))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    now = {k: a.numpy() for k, a in arrays.items()}
    replies = []
    for n in (11, 12):
        upd = {k: v.copy() for k, v in now.items()}
        upd[f"out.population_heads.{NAMES[n]}.weight"] = np.zeros(2, np.float32)
        replies.append(_reply(by_node[n], upd, 0.1))
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays["out.population_heads.PED.weight"].numpy().tolist() == [13.0, -13.0]
    assert arrays["out.population_heads.GLI.weight"].numpy().tolist() == [0.0, 0.0]


def _heads_round(strategy, sent, pops_of_nodes=NAMES):
    """Every site moves the shared bias by its node id and its own head to (n, -n)."""
    updates = {}
    for n, pop in pops_of_nodes.items():
        upd = {k: v.copy() for k, v in sent.items()}
        upd["conv.bias"] = sent["conv.bias"] + n
        upd[f"out.population_heads.{pop}.weight"] = np.array([n, -n], np.float32)
        updates[n] = upd
    return _round(strategy, sent, updates)


def _sent_with_heads():
    sent = _global()
    for pop in ("GLI", "SSA", "PED", "MEN"):
        sent[f"out.population_heads.{pop}.weight"] = np.full(2, 10.0, np.float32)
    return sent


@pytest.mark.parametrize("settings", [
    {"strategy": "fedadam"},  # the server's step for the shared weights only
    {"dp-noise-multiplier": "1e-9", "dp-clipping-norm": "1e3"},  # from the noised mean alone
])
def test_population_heads_with_fedadam_and_differential_privacy(tmp_path, settings):
    strategy, _, _ = _strategy(tmp_path, **{"student-heads": "population", **settings})
    sent = _sent_with_heads()
    arrays, _ = _heads_round(strategy, sent)
    for n, pop in NAMES.items():
        np.testing.assert_allclose(arrays[f"out.population_heads.{pop}.weight"].numpy(),
                                   [n, -n], rtol=1e-5)
    np.testing.assert_array_equal(arrays["out.population_heads.MEN.weight"].numpy(), [10, 10])
    if "strategy" in settings:  # Adam stepped the bias, it did not average it
        assert not np.allclose(arrays["conv.bias"].numpy(), sent["conv.bias"] + 12)
    else:
        np.testing.assert_allclose(arrays["conv.bias"].numpy(), sent["conv.bias"] + 12,
                                   rtol=1e-4)


def test_population_heads_compose_with_every_setting_but_an_unknown_one():
    from fedbrats.common.config import ConfigError, load_run_config

    for settings in ({"strategy": "fedadam"}, {"dp-noise-multiplier": "0.5"},
                     {"secure-aggregation": "true"},
                     {"student-init": "warm", "teacher-warm-rounds": "1",
                      "teacher-model": "student-tiny"}):
        load_run_config({"preset": "tiny", "student-heads": "population", **settings})
    with pytest.raises(ConfigError, match="student-heads: expected shared or population"):
        load_run_config({"preset": "tiny", "student-heads": "per-site"})
