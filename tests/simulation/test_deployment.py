"""fedbrats on Flower's deployment engine, on loopback: a real SuperLink with TLS and node
authentication, one SuperNode per site (GLI, SSA, PED; phantom data, 3 cases each, 48^3), the
tiny protocol, and faults: a site crashing mid-round, the ServerApp stopped and crashed, a
SuperNode restarted, an unregistered and a plain-text node. Everything through
``fedbrats.simulation.rehearsal.LocalFederation``, which runs the README's commands.

Timings on the 2-core CI-like machine (under other load): the defences test about 25 s and the
unit tests of the round rules a few seconds (default suite); the happy path about 3.5 min, the site
crash about 3 min, the ServerApp stop/crash chain about 4.5 min (slow: FEDBRATS_SLOW=1)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_server_mean, record_recovery

from fedbrats.common.config import ConfigError, load_run_config
from fedbrats.simulation.rehearsal import LocalFederation, marked_processes

SITES = ("GLI", "SSA", "PED")
ROOT = Path(__file__).resolve().parents[2]
THREADS = {"OMP_NUM_THREADS": "1"}  # three sites share two cores


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fedbrats.simulation.phantoms import write_dataset

    root = tmp_path_factory.mktemp("deploy-data")
    write_dataset(root, {p: 3 for p in SITES}, shape=(48, 48, 48), seed=1, progress=False)
    return root


def _federation(folder: Path, data: Path, **kwargs) -> LocalFederation:
    return LocalFederation(folder, {s: data / s for s in SITES}, env=THREADS, **kwargs)


def _tiny(out: Path, **overrides) -> dict:
    return {"preset": "tiny", "num-sites": 3, "output-dir": str(out), **overrides}


def _json(path: Path):
    return json.loads(path.read_text())


def _audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def _rounds(out: Path) -> list[dict]:
    try:
        return _json(out / "rounds.json")
    except (OSError, json.JSONDecodeError):
        return []


def _wait(predicate, timeout: float, what: str, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)
    return value


def _round_finished(out: Path, rnd: int, n_eval: int = 3) -> bool:
    return any(r["round"] == rnd and len(r["evaluate"]) >= n_eval for r in _rounds(out))


def _teacher_mtimes(fed: LocalFederation) -> dict[str, int]:
    return {s: (fed.sites[s].work_dir / "teacher.pt").stat().st_mtime_ns for s in SITES}


def _running_in_group(pgid: int) -> list[str]:
    """Processes of a process group that still run (an exited orphan waiting for init to reap
    it, a zombie, does not count)."""
    found = subprocess.run(["pgrep", "-g", str(pgid), "-r", "R,S,D,T,t,I", "-a"],
                           capture_output=True, text=True)
    return found.stdout.split("\n") if found.stdout.strip() else []


def _assert_nothing_left(fed: LocalFederation) -> None:
    """No process of the federation left: by environment marker (which Flower's SuperExec,
    ServerApp and ClientApp children inherit), by command line, and by process group."""
    assert marked_processes(fed.token) == []
    found = subprocess.run(["pgrep", "-af", str(fed.folder)], capture_output=True, text=True)
    assert found.stdout.strip() == ""
    for proc in fed.procs.values():
        assert proc.returncode is not None
        assert _running_in_group(proc.pid) == []


# --------------------------------------------------------------------------------------------
# Run settings for faults (no Flower)
# --------------------------------------------------------------------------------------------


def test_min_sites_and_round_timeout_settings():
    run = load_run_config({"preset": "tiny"})
    assert (run.min_sites, run.required_sites, run.round_timeout) == (0, 3, 3600.0)
    run = load_run_config({"preset": "tiny", "min-sites": 2, "round-timeout": 90})
    assert (run.required_sites, run.round_timeout) == (2, 90.0)
    assert load_run_config({"preset": "tiny", "min-sites": -1}).required_sites == 3  # unset
    with pytest.raises(ConfigError, match="min-sites: expected 0 .* up to num-sites \\(3\\)"):
        load_run_config({"preset": "tiny", "min-sites": 4})
    with pytest.raises(ConfigError, match="round-timeout"):
        load_run_config({"round-timeout": 0})
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table["min-sites"] == -1 and table["round-timeout"] == -1


class _Grid:
    """The part of Flower's Grid the strategy's sampling uses: the connected node ids, which
    may change from one call to the next."""

    def __init__(self, *connected: list[int]) -> None:
        self.connected = list(connected)

    def get_node_ids(self) -> list[int]:
        return self.connected.pop(0) if len(self.connected) > 1 else self.connected[0]


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are stamped with the run of the process that makes them (as in a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _round_one(tmp_path: Path, **settings):
    """Round 1 sent to GLI (11), SSA (12), PED (13); GLI and SSA reply, PED is reported
    unavailable by the SuperLink (an error reply from node 0, as Flower 1.41 makes it)."""
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    from fedbrats.common.wire import WEIGHT_KEY
    from fedbrats.server.state import RunFolder
    from fedbrats.server.strategy import build_strategy

    run = load_run_config({"preset": "tiny", "output-dir": str(tmp_path), **settings})
    folder = RunFolder(run)
    strategy = build_strategy(run, folder, {11: "GLI", 12: "SSA", 13: "PED"}, [])
    start = ArrayRecord({"w": torch.zeros(4)})
    sent = strategy.configure_train(1, start, ConfigRecord(), _Grid([11, 12, 13]))
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12, 13]
    replies = []
    for m in sent:
        m.metadata.__dict__["_message_id"] = m.object_id  # as Grid.push_messages does
        node = m.metadata.dst_node_id
        if node == 13:
            error = Message(Error(code=0, reason="Error: Node Unavailable"), reply_to=m)
            error.metadata.__dict__["_src_node_id"] = 0
            replies.append(error)
        else:
            value = 1.0 if node == 11 else 3.0
            replies.append(Message(RecordDict({
                "arrays": ArrayRecord({"w": torch.full((4,), value)}),
                "metrics": MetricRecord({WEIGHT_KEY: 1.0, "loss": value}),
            }), reply_to=m))
    return run, strategy, replies


def test_round_counts_with_min_sites_and_audits_the_missing_site(tmp_path, task_identity):
    _, strategy, replies = _round_one(tmp_path, **{"min-sites": 2})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((4,), 2.0))  # GLI, SSA mean
    ckpt = torch.load(tmp_path / "checkpoints" / "round-001.pt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((4,), 2.0))
    assert set(_rounds(tmp_path)[0]["train"]) == {"GLI", "SSA"}
    missing = [e for e in _audit(tmp_path) if "error" in e]
    assert missing == [{"phase": "round", "round": 1, "site": "PED",
                        "error": "Error: Node Unavailable"}]


def test_round_below_min_sites_does_not_count(tmp_path, task_identity):
    from fedbrats.server.ledger import RoundFailed

    _, strategy, replies = _round_one(tmp_path)  # min-sites unset: all 3 sites
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 3 sites replied .* min-sites \(3\)"):
        strategy.aggregate_train(1, replies)
    assert not (tmp_path / "checkpoints").exists()
    assert _rounds(tmp_path) == []


def test_round_waits_for_a_missing_site_up_to_round_timeout(tmp_path, task_identity):
    from fedbrats.server.protocol import wait_for_missing_sites

    run = load_run_config({"preset": "tiny", "min-sites": 2, "round-timeout": 1.5})
    t0 = time.monotonic()
    assert wait_for_missing_sites(_Grid([11, 12], [11, 12], [11, 12, 13]), run, "round 2") == 3
    assert 1.5 <= time.monotonic() - t0 < 3.5  # two polls, one second apart
    t0 = time.monotonic()
    assert wait_for_missing_sites(_Grid([11, 12]), run, "round 2") == 2  # gives up, goes on
    assert 1.5 <= time.monotonic() - t0 < 3.0
    every = load_run_config({"preset": "tiny", "round-timeout": 1.5})  # min-sites = all
    t0 = time.monotonic()
    assert wait_for_missing_sites(_Grid([11, 12]), every, "round 2") == 2  # Flower waits
    assert time.monotonic() - t0 < 0.5


# --------------------------------------------------------------------------------------------
# The README's commands are the ones the harness runs
# --------------------------------------------------------------------------------------------


def _shape(argv: list[str]) -> tuple[str, frozenset[str]]:
    """A command's program (with its subcommands) and its options; values and paths vary."""
    words = [Path(argv[0]).name]
    rest = argv[1:]
    if words[0] in ("flwr", "fedbrats"):
        words.append(rest[0])
        rest = rest[1:]
        if words[-1] == "supernode":
            words.append(rest[0])
            rest = rest[1:]
    flags = frozenset(a.split("=")[0] for a in rest if a.startswith("-") and a != "--format")
    return " ".join(words), flags


def _readme_commands() -> list[list[str]] | None:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Deploying across institutions\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        return None
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", m.group(1), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _operator_commands(fed: LocalFederation) -> list[list[str]]:
    """Every kind of command line the harness runs for operators (README, in that order)."""
    return [fed.certs_command(), fed.superlink_command(), fed.register_command("GLI"),
            fed.supernode_command("GLI"), fed.run_command(_tiny(fed.folder / "run")),
            fed.stop_command(1), fed.list_nodes_command(), fed.ls_command()]


def _check_only_operator_commands(fed: LocalFederation) -> None:
    known = {_shape(c) for c in _operator_commands(fed)}
    for cmd in fed.commands:
        assert _shape(cmd) in known, f"the harness ran a command the README lacks: {cmd}"


@pytest.mark.slow
def test_a_supernode_whose_port_was_taken_gets_another(tmp_path, data):
    """free_port() finds a port that was free a moment ago; another process may take it before
    the SuperNode binds it (seen in CI). The SuperNode is then started on another port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fed = _federation(tmp_path / "fed", data)
        fed.sites["GLI"].port = busy
        with fed:
            assert fed.sites["GLI"].port != busy
            assert "address already in use" in fed.log_of("supernode-GLI")
            assert set(fed.status().values()) == {"online"}
    _assert_nothing_left(fed)


def test_a_superlink_whose_port_was_taken_gets_another_at_its_first_start(tmp_path, data):
    """The same race for the SuperLink's one port (Flower 1.42 serves the Fleet, Control and
    Runtime APIs on it): at the first start it is started on another port, and the
    coordinator's connection names that one."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fed = _federation(tmp_path / "fed", data, register=["GLI"], start_supernodes=False)
        fed.port = busy
        with fed:
            assert fed.port != busy
            assert "address already in use" in fed.log_of("superlink")
            assert f"127.0.0.1:{fed.port}" in (fed.flwr_home / "config.toml").read_text()
            assert fed.status() == {"GLI": "registered"}  # the CLI reaches the new port
    _assert_nothing_left(fed)


def test_readme_gives_exactly_the_commands_the_harness_runs(tmp_path):
    readme = _readme_commands()
    assert readme, "README has no 'Deploying across institutions' section with commands"
    documented = {_shape(c) for c in readme}
    fed = LocalFederation(tmp_path / "fed", {s: tmp_path / s for s in SITES})
    for cmd in _operator_commands(fed):
        assert _shape(cmd) in documented, f"not in the README: {shlex.join(cmd)}"


# --------------------------------------------------------------------------------------------
# e. The SuperLink's defences (default suite: about 20-30 s)
# --------------------------------------------------------------------------------------------


def test_tls_node_auth_rejects_unregistered_and_plaintext_nodes(tmp_path, data):
    """PED's key is not registered: its SuperNode is refused. SSA's is registered, but a
    plain-text SuperNode (no TLS, so no node key either) is refused too and SSA never comes
    online. The plain-text HTTP probe of the endpoint itself is in test_certs.py
    (test_superlink_serves_tls_and_authenticates_registered_sites)."""
    fed = _federation(tmp_path / "fed", data, register=["GLI", "SSA"], start_supernodes=False)
    with fed:
        assert set(fed.node_id) == {"GLI", "SSA"}
        fed.start_supernode("GLI")
        unregistered = fed.start_supernode("PED", max_retries=1)
        plaintext = fed.start_supernode("SSA", plaintext=True, max_retries=1)
        assert unregistered.wait(timeout=120) != 0
        assert plaintext.wait(timeout=120) != 0
        fed.wait_online(["GLI"])

        assert "Failed to activate SuperNode" in fed.log_of("supernode-PED")
        assert "No SuperNode found with the given public key" in fed.log_of("superlink")
        assert "Failed to initialize the connection" in fed.log_of("supernode-SSA")
        nodes = fed.nodes()
        assert len(nodes) == 2  # only registered keys are known to the SuperLink
        assert fed.status() == {"GLI": "online", "SSA": "registered"}
        assert [Path(c[0]).name for c in fed.probes] == ["flower-supernode"] * 2
        cmds = [shlex.join(c) for c in fed.commands]
        assert any("--enable-supernode-auth" in c and "--ssl-certfile" in c for c in cmds)
    _assert_nothing_left(fed)
    _check_only_operator_commands(fed)


# --------------------------------------------------------------------------------------------
# a. The happy path
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def happy(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("deploy-happy")
    fed = _federation(root / "fed", data)
    t0 = time.monotonic()
    with fed:
        up = time.monotonic() - t0
        result = fed.run(_tiny(root / "run", **{"keep-site-updates": True}), timeout=900)
    return fed, result, up, time.monotonic() - t0


@pytest.mark.slow
def test_happy_path_report_covers_every_site(happy):
    fed, result, up, total = happy
    print(f"federation up in {up:.0f} s, run {result.seconds:.0f} s, total {total:.0f} s")
    assert result.returncode == 0, result.log_text()[-3000:]
    assert result.status == "finished:completed"
    report = _json(result.output_dir / "report.json")
    assert list(report["sites"]) == list(SITES)
    for site in SITES:
        for who in ("student", "teacher"):
            assert 0.0 <= report["sites"][site][who]["WT"]["dice"] <= 1.0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    sites = _json(result.output_dir / "sites.json")
    assert all(sites[s]["teacher_training"].get("reused", 0) == 0 for s in SITES)
    for site in SITES:  # the teachers live in each site's work folder (node config work-dir)
        assert (fed.sites[site].work_dir / "teacher.pt").exists()


@pytest.mark.slow
def test_happy_path_ran_the_app_bundles_code_everywhere(happy):
    _, result, _, _ = happy
    code = _json(result.output_dir / "report.json")["run"]["code"]
    assert set(code["sites"]) == set(SITES)  # each site says where its code came from
    where = Path(code["server"])  # the unpacked bundle in Flower's apps/, not this checkout
    assert where.parent.name == "apps" and where != ROOT, where
    for site, at in code["sites"].items():  # each site's ClientApp ran its own unpacked bundle
        assert Path(at).parent.name == "apps" and Path(at) != ROOT, (site, at)


@pytest.mark.slow
def test_happy_path_only_the_student_travelled(happy):
    _, result, _, _ = happy
    out = result.output_dir
    student_keys = set(torch.load(out / "student.pt", weights_only=True)["state_dict"])
    entries = _audit(out)
    for e in entries:
        assert "error" not in e, e
        if e["phase"] == "round":
            assert set(e["arrays"]) == student_keys
        else:
            assert e["bytes"] == 0
    per_round = {(e["round"], e["site"]) for e in entries if e["phase"] == "round"}
    assert per_round == {(r, s) for r in (1, 2) for s in SITES}


@pytest.mark.slow
def test_happy_path_stops_every_process_and_uses_the_readme_commands(happy):
    fed, _, _, _ = happy
    _assert_nothing_left(fed)
    names = [Path(c[0]).name for c in fed.commands]
    assert names[:2] == ["fedbrats", "flower-superlink"]
    assert names.count("flower-supernode") == 3 and names.count("flwr") == 4  # 3 x register, run
    _check_only_operator_commands(fed)


# --------------------------------------------------------------------------------------------
# b. A site crashes in the middle of a round
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_crash(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("deploy-crash")
    out = root / "run"
    fed = _federation(root / "fed", data)
    with fed:
        handle = fed.start_run(_tiny(out, **{"min-sites": 2, "round-timeout": 240,
                                             "keep-site-updates": True}))
        # SSA has taken round 1's train message and its ClientApp is working on it
        _wait(lambda: "Receiving: train message" in fed.log_of("supernode-SSA"), 600,
              "round 1 at SSA")
        teacher_before = _teacher_mtimes(fed)
        killed_at = time.monotonic()
        fed.kill_supernode("SSA")
        assert not fed.clientapp_pids("SSA")
        assert not (out / "checkpoints" / "round-001.pt").exists()  # mid-round indeed
        fed.restart_supernode("SSA", timeout=240)
        restarted_after = time.monotonic() - killed_at
        result = fed.wait_run(handle, timeout=900)
        teacher_after = _teacher_mtimes(fed)
    return fed, result, teacher_before, teacher_after, restarted_after


@pytest.mark.slow
def test_round_completes_without_the_crashed_site(site_crash):
    fed, result, _, _, restarted_after = site_crash
    print(f"run {result.seconds:.0f} s; SSA back {restarted_after:.0f} s after the crash")
    record_recovery("a site's SuperNode killed mid-round, started again", restarted_after,
                    "kill to the restarted SuperNode online (Flower must first see the old "
                    "one offline)")
    out = result.output_dir
    assert result.status == "finished:completed", result.log_text()[-3000:]
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[0]["train"]) == {"GLI", "PED"}
    # the audit records SSA's missing update, with Flower's reason
    crash = [e for e in _audit(out) if e["phase"] == "round" and e["round"] == 1
             and e["site"] == "SSA"]
    assert len(crash) == 1 and ("Node Unavailable" in crash[0]["error"]
                                or "round-timeout" in crash[0]["error"]), crash
    # round 1's checkpoint is the equal-weight mean of GLI's and PED's updates only
    assert sorted(p.stem for p in (out / "updates" / "round-001").iterdir()) == ["GLI", "PED"]
    updates = {s: torch.load(out / "updates" / "round-001" / f"{s}.pt", weights_only=True)
               for s in ("GLI", "PED")}
    ckpt = torch.load(out / "checkpoints" / "round-001.pt", weights_only=True)["state_dict"]
    assert_server_mean(ckpt, updates)  # SSA's head: no update this round


@pytest.mark.slow
def test_crashed_site_rejoins_the_next_round_with_its_teacher(site_crash):
    fed, result, teacher_before, teacher_after, _ = site_crash
    out = result.output_dir
    rounds = _rounds(out)
    assert set(rounds[1]["train"]) == set(SITES)
    assert sorted(p.stem for p in (out / "updates" / "round-002").iterdir()) == sorted(SITES)
    report = _json(out / "report.json")
    assert list(report["sites"]) == list(SITES)  # SSA took part in the final evaluation too
    assert teacher_after == teacher_before  # SSA's restarted SuperNode loaded it from disk
    assert fed.log_of("supernode-SSA").count("Starting Flower SuperNode") == 2
    _assert_nothing_left(fed)


# --------------------------------------------------------------------------------------------
# c, d. The ServerApp stopped, then crashed; a SuperNode restarted in between
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_faults(tmp_path_factory, data):
    """Run 1 is stopped by the coordinator (`flwr stop`) after round 1; PED's SuperNode is
    restarted; run 2 resumes and its ServerApp is killed (SIGKILL) after round 2; run 3
    resumes and finishes round 3."""
    root = tmp_path_factory.mktemp("deploy-server")
    out = root / "run"
    cfg = _tiny(out, **{"num-rounds": 3})
    fed = _federation(root / "fed", data)
    snap: dict = {}
    with fed:
        first = fed.start_run(cfg)
        _wait(lambda: _round_finished(out, 1), 900, "round 1")
        snap["teachers"] = _teacher_mtimes(fed)
        snap["ckpt1"] = (out / "checkpoints" / "round-001.pt").read_bytes()
        run_id = fed.run_id_of(first, timeout=10)
        fed.stop_run(run_id)
        snap["run1"] = fed.wait_run(first, timeout=300)

        restart_at = time.monotonic()
        fed.restart_supernode("PED", timeout=240)
        snap["restart_s"] = time.monotonic() - restart_at

        second = fed.start_run(cfg)
        _wait(lambda: _round_finished(out, 2), 900, "round 2")
        snap["ckpt2"] = (out / "checkpoints" / "round-002.pt").read_bytes()
        killed_at = time.monotonic()
        snap["killed"] = fed.kill_serverapp(second)
        snap["run2_status"] = fed.run_status(fed.run_id_of(second), timeout=150)
        snap["failed_after"] = time.monotonic() - killed_at
        snap["run2_log"] = second.log.read_text(errors="replace")

        third = fed.start_run(cfg)
        _wait(lambda: _round_finished(out, 3), 900, "round 3")
        snap["round3_after"] = time.monotonic() - killed_at
        snap["run3"] = fed.wait_run(third, timeout=900)
        snap["teachers_after"] = _teacher_mtimes(fed)
    return fed, out, snap


@pytest.mark.slow
def test_serverapp_stopped_or_killed_resumes_without_repeating_a_round(server_faults):
    fed, out, snap = server_faults
    run1, run3 = snap["run1"], snap["run3"]
    print(f"run 1 {run1.seconds:.0f} s (stopped), run 3 {run3.seconds:.0f} s")
    record_recovery("ServerApp stopped (flwr stop)", run1.seconds,
                    "flwr run to its end as finished:stopped, round 1 saved")
    record_recovery("ServerApp killed", snap["failed_after"],
                    "kill to the run listed finished:failed")
    record_recovery("ServerApp killed (to the next saved round)", snap["round3_after"],
                    "kill to round 3 saved by the resumed run, one round's training included")
    assert run1.status == "finished:stopped"
    assert len(snap["killed"]) == 1  # the ServerApp process of run 2
    assert snap["run2_status"] == "finished:failed"
    assert "resuming after round 1 of 3" in snap["run2_log"]
    assert run3.status == "finished:completed", run3.log_text()[-3000:]
    assert "resuming after round 2 of 3" in run3.log_text()

    # every round exactly once: rounds.json, the checkpoints, one audit line per site and round
    assert [r["round"] for r in _rounds(out)] == [1, 2, 3]
    assert all(set(r["train"]) == set(SITES) for r in _rounds(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt", "round-003.pt"]
    assert (out / "checkpoints" / "round-001.pt").read_bytes() == snap["ckpt1"]
    assert (out / "checkpoints" / "round-002.pt").read_bytes() == snap["ckpt2"]
    trained = [(e["round"], e["site"]) for e in _audit(out) if e["phase"] == "round"]
    assert sorted(trained) == sorted((r, s) for r in (1, 2, 3) for s in SITES)
    report = _json(out / "report.json")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert list(report["sites"]) == list(SITES)
    _assert_nothing_left(fed)


@pytest.mark.slow
def test_restarted_supernode_reuses_its_teacher(server_faults):
    fed, out, snap = server_faults
    record_recovery("a SuperNode stopped and started again", snap["restart_s"],
                    "SIGTERM to the restarted SuperNode online")
    assert fed.log_of("supernode-PED").count("Starting Flower SuperNode") == 2
    assert snap["teachers_after"] == snap["teachers"]  # no teacher.pt was written again
    sites = _json(out / "sites.json")
    assert all(sites[s]["teacher_training"]["reused"] == 1 for s in SITES)
    assert "PED teacher: WT Dice" in snap["run2_log"]
    assert re.search(r"PED teacher: WT Dice [0-9.]+ \(reused\)", snap["run2_log"])


# --------------------------------------------------------------------------------------------
# f. The SuperLink killed and started again on its database
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def superlink_restart(tmp_path_factory, data):
    """Round 1 of 3 is saved; the SuperLink is killed (SIGKILL, its SuperExec and ServerApp
    with it) inside round 2 and started again with the same ``--database`` on the same port;
    the SuperNodes, left running, reconnect by themselves; the coordinator runs ``flwr run``
    again, which resumes after round 1."""
    root = tmp_path_factory.mktemp("deploy-superlink")
    out = root / "run"
    cfg = _tiny(out, **{"num-rounds": 3})
    fed = _federation(root / "fed", data)
    snap: dict = {}
    with fed:
        first = fed.start_run(cfg)
        _wait(lambda: _round_finished(out, 1), 900, "round 1")
        _wait(lambda: "Receiving: train message" in fed.log_of("supernode-GLI").split(
            "Receiving: evaluate message")[-1], 300, "round 2 at GLI")
        snap["ckpt1"] = (out / "checkpoints" / "round-001.pt").read_bytes()
        snap["teachers"] = _teacher_mtimes(fed)
        snap["node_ids"] = dict(fed.node_id)
        snap["supernodes"] = {s: fed.procs[f"supernode-{s}"].pid for s in SITES}
        killed_at = time.monotonic()
        fed.kill_superlink()
        snap["serverapps_left"] = fed.serverapp_pids()
        try:  # `flwr run --stream` loses its SuperLink
            snap["flwr_run_rc"] = first.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            snap["flwr_run_rc"] = None
            fed.kill_serverapp(first)
        fed.start_superlink()
        snap["healthy_after"] = time.monotonic() - killed_at
        fed.wait_online(SITES, timeout=300)
        snap["online_after"] = time.monotonic() - killed_at
        second = fed.start_run(cfg)
        _wait(lambda: _round_finished(out, 2), 900, "round 2 after the restart")
        snap["round2_after"] = time.monotonic() - killed_at
        snap["run2"] = fed.wait_run(second, timeout=900)
        snap["run1_status"] = fed.run_status(fed.run_id_of(first), timeout=150)
        snap["supernodes_after"] = {s: fed.procs[f"supernode-{s}"].pid for s in SITES}
        snap["teachers_after"] = _teacher_mtimes(fed)
        snap["status"] = fed.status()
    return fed, out, snap


@pytest.mark.slow
def test_superlink_killed_and_restarted_on_its_database_loses_only_the_round_under_way(
        superlink_restart):
    fed, out, snap = superlink_restart
    run2 = snap["run2"]
    record_recovery("SuperLink killed, started again", snap["online_after"],
                    "kill to every SuperNode online again")
    record_recovery("SuperLink killed, started again (to the next saved round)",
                    snap["round2_after"], "kill to round 2 saved by the resumed run")
    assert snap["serverapps_left"] == []  # the ServerApp went with its SuperLink
    assert snap["flwr_run_rc"] not in (None, 0)  # the coordinator's stream said so
    # the registrations lived in the database: the same node ids, no second `register`
    assert set(snap["status"].values()) == {"online"}
    assert fed.node_id == snap["node_ids"]
    assert sum(Path(c[0]).name == "flwr" and c[1:3] == ["supernode", "register"]
               for c in fed.commands) == len(SITES)
    # the SuperNodes were not restarted: they reconnected by themselves
    assert snap["supernodes_after"] == snap["supernodes"]
    assert all(fed.log_of(f"supernode-{s}").count("Starting Flower SuperNode") == 1
               for s in SITES)
    # the resumed run: round 1 kept, round 2 trained once (the killed attempt left nothing)
    assert run2.status == "finished:completed", run2.log_text()[-3000:]
    assert "resuming after round 1 of 3" in run2.log_text()
    assert [r["round"] for r in _rounds(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "round-001.pt").read_bytes() == snap["ckpt1"]
    trained = [(e["round"], e["site"]) for e in _audit(out) if e["phase"] == "round"]
    assert sorted(trained) == sorted((r, s) for r in (1, 2, 3) for s in SITES)
    assert snap["teachers_after"] == snap["teachers"]  # no teacher trained again
    assert snap["run1_status"] != "running"
    _assert_nothing_left(fed)
