"""A federation on Flower's deployment engine, on this machine: a rehearsal of a cross-institution
run, and the harness of the deployment tests.

:class:`LocalFederation` runs, on loopback with free ports, exactly the commands the README's
"Deploying across institutions" section gives the coordinator and the sites:

1. ``fedbrats certs``: the consortium CA, the SuperLink's TLS certificate, one key pair per site;
2. ``flower-superlink`` with TLS (``--ssl-*``), node authentication (``--enable-supernode-auth``),
   ``--disable-runtime-dependency-installation`` and a ``--database`` (registered sites and runs
   survive a SuperLink restart);
3. the coordinator's connection ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``, with
   ``root-certificates``;
4. ``flwr supernode register SITE.pub NAME`` for every site (``register=`` may leave some out);
5. one ``flower-supernode`` per site with ``--root-certificates``, ``--auth-supernode-private-key``,
   its own ``--port`` and ``--node-config "population='GLI' data-dir='...' work-dir='...'"``;
6. ``flwr run APP_DIR NAME -c "..." --stream``; ``flwr ls``, ``flwr stop``, ``flwr supernode list``.

Everything lives in one folder::

    pki/                     what `fedbrats certs` wrote (ca.crt, server.pem, sites/<SITE>/...)
    flwr-home/               the coordinator's FLWR_HOME: config.toml, state.db
    sites/<SITE>/flwr-home/  each SuperNode's FLWR_HOME (a site is its own machine in real life)
    sites/<SITE>/work/       the site's work folder (its teacher, preprocessing cache)
    logs/                    one log per process (restarts append), commands.log

Every process it starts gets ``FEDBRATS_PROCESS=<token>:<component>`` in its environment, which
Flower's own children (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) inherit. The
SuperLink starts its SuperExec in a new session and a SIGKILL-ed parent leaves its children to
init, so process groups alone do not find them all; the environment marker does. Stopping sends
SIGTERM to a component's processes, then SIGKILL after a grace period; leaving the ``with`` block
(also on errors, and on SIGINT, SIGTERM or SIGHUP to the process that runs it) stops every
process the federation started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.common.utils.processes import (
    StopSignals,
    alive,
    command_line,
    environ,
    marked,
    send,
)
from fedbrats.simulation.runner import config_string, free_port, poll_health, project_dir

DEFAULT_NAME = "fedbrats"
"""The connection name in config.toml (``flwr run . fedbrats``)."""

ENV_MARKER = "FEDBRATS_PROCESS"


class DeployError(RuntimeError):
    """A federation process failed to start, or a wait ran out."""


# --------------------------------------------------------------------------------------------
# Processes, found by the environment marker
# --------------------------------------------------------------------------------------------


def marked_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``FEDBRATS_PROCESS=<marker>...``."""
    return marked(ENV_MARKER, marker, prefix=True)


# --------------------------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------------------------


@dataclass
class SiteSetup:
    """One site: what its SuperNode is started with."""

    name: str
    data_dir: Path
    work_dir: Path
    private_key: Path
    public_key: Path
    ca_cert: Path
    flwr_home: Path
    port: int
    node_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunHandle:
    """A ``flwr run`` started by :meth:`LocalFederation.start_run`."""

    index: int
    process: subprocess.Popen
    log: Path
    output_dir: Path | None
    started: float

    @property
    def component(self) -> str:
        return f"run-{self.index}"


@dataclass
class RunResult:
    returncode: int
    run_id: int | None
    status: str | None
    """Flower's run status, e.g. ``finished:completed``, ``finished:failed``."""
    output_dir: Path | None
    seconds: float
    log: Path

    @property
    def report(self) -> Path | None:
        if self.output_dir is None:
            return None
        p = self.output_dir / "report.json"
        return p if p.exists() else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class LocalFederation:
    """A SuperLink and one SuperNode per site on loopback, with TLS and node authentication.

    ``sites`` maps a site name (its population: GLI, SSA, ...) to its data folder, or to a dict of
    node config (``data-dir`` required; ``population`` defaults to the name, ``work-dir`` to
    ``FOLDER/sites/<SITE>/work``; ``labels``, ``manifest`` as the README says). ``register``:
    the sites whose public keys are registered (default all); ``start_supernodes``: start every
    site's SuperNode on entry. ``env``: extra environment for every process (e.g.
    ``OMP_NUM_THREADS``).
    """

    def __init__(
        self,
        folder: str | Path,
        sites: Mapping[str, str | Path | Mapping[str, Any]],
        *,
        app_dir: str | Path | None = None,
        name: str = DEFAULT_NAME,
        register: Iterable[str] | None = None,
        start_supernodes: bool = True,
        env: Mapping[str, str] | None = None,
        grace: float = 20.0,
        startup_timeout: float = 90.0,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.name = name
        self.app_dir = Path(app_dir).resolve() if app_dir else project_dir()
        self.grace = grace
        self.startup_timeout = startup_timeout
        self.token = uuid.uuid4().hex[:12]
        self.bin_dir = Path(sys.executable).parent
        self.pki = self.folder / "pki"
        self.flwr_home = self.folder / "flwr-home"
        self.logs = self.folder / "logs"
        self.port = free_port()
        self.commands: list[list[str]] = []
        """Every command line run, in order (the README's commands, with this run's paths)."""
        self.probes: list[list[str]] = []
        """Command lines run on purpose to be refused (tests of the SuperLink's defences)."""
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_supernodes = start_supernodes
        self.extra_env = dict(env or {})
        self._runs = 0
        self._log_start: dict[str, int] = {}
        self.node_id: dict[str, int] = {}
        """Site -> node id (from ``flwr supernode register``)."""
        self.sites: dict[str, SiteSetup] = {}
        for site, spec in sites.items():
            cfg = dict(spec) if isinstance(spec, Mapping) else {"data-dir": spec}
            cfg.setdefault("population", site)
            site_dir = self.folder / "sites" / site
            cfg.setdefault("work-dir", site_dir / "work")
            cfg["data-dir"] = str(Path(cfg["data-dir"]).resolve())
            cfg["work-dir"] = str(Path(cfg["work-dir"]).resolve())
            key = self.pki / "sites" / site / f"{site.lower()}"
            self.sites[site] = SiteSetup(
                name=site, data_dir=Path(cfg["data-dir"]), work_dir=Path(cfg["work-dir"]),
                private_key=key.with_suffix(".key"), public_key=key.with_suffix(".pub"),
                ca_cert=self.pki / "sites" / site / "ca.crt", flwr_home=site_dir / "flwr-home",
                port=free_port(),
                node_config={k: cfg.pop(k) for k in ("population", "data-dir", "work-dir")} | cfg,
            )
        self.registered = list(self.sites) if register is None else list(register)

    # -- command lines (what the README gives operators) -------------------------------------
    def _exe(self, name: str) -> str:
        return shutil.which(name, path=str(self.bin_dir)) or name

    def certs_command(self) -> list[str]:
        return [self._exe("fedbrats"), "certs", "--out", str(self.pki),
                "--sites", ",".join(self.sites), "--server-host", "127.0.0.1"]

    def superlink_command(self) -> list[str]:
        return [
            self._exe("flower-superlink"),
            "--ssl-ca-certfile", str(self.pki / "ca.crt"),
            "--ssl-certfile", str(self.pki / "server.pem"),
            "--ssl-keyfile", str(self.pki / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(self.flwr_home / "state.db"),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    def register_command(self, site: str) -> list[str]:
        return [self._exe("flwr"), "supernode", "register", str(self.sites[site].public_key),
                self.name]

    def supernode_command(self, site: str, *, plaintext: bool = False,
                          max_retries: int | None = None) -> list[str]:
        """The site's SuperNode. ``plaintext`` (a probe, not for operators): no TLS and no key
        (``--insecure`` refuses a private key), as an outsider would connect."""
        s = self.sites[site]
        cmd = [self._exe("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        if plaintext:
            cmd += ["--insecure"]
        else:
            cmd += ["--root-certificates", str(s.ca_cert),
                    "--auth-supernode-private-key", str(s.private_key)]
        cmd += ["--node-config", config_string(s.node_config), "--port", str(s.port)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return cmd

    def run_command(self, run_config: Mapping[str, Any]) -> list[str]:
        cmd = [self._exe("flwr"), "run", str(self.app_dir), self.name]
        if run_config:
            cmd += ["-c", config_string(run_config)]
        return [*cmd, "--stream"]

    def list_nodes_command(self) -> list[str]:
        return [self._exe("flwr"), "supernode", "list", self.name, "--format", "json"]

    def ls_command(self) -> list[str]:
        return [self._exe("flwr"), "ls", self.name, "--format", "json"]

    def stop_command(self, run_id: int) -> list[str]:
        return [self._exe("flwr"), "stop", str(run_id), self.name]

    def connection_toml(self) -> str:
        """The coordinator's ``$FLWR_HOME/config.toml``."""
        return (
            f'[superlink]\ndefault = "{self.name}"\n\n'
            f'[superlink.{self.name}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.pki / "ca.crt"}"\n'
        )

    # -- processes ----------------------------------------------------------------------------
    def _env(self, component: str, flwr_home: Path) -> dict[str, str]:
        return {
            **os.environ,
            **self.extra_env,
            "FLWR_HOME": str(flwr_home),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            ENV_MARKER: f"{self.token}:{component}",
        }

    def _record(self, cmd: Sequence[str], probe: bool = False) -> None:
        (self.probes if probe else self.commands).append(list(cmd))
        with (self.logs / "commands.log").open("a") as fh:
            fh.write(("# probe, expected to fail: " if probe else "") + shlex.join(cmd) + "\n")

    def _spawn(self, component: str, cmd: list[str], flwr_home: Path,
               cwd: Path | None = None, probe: bool = False) -> subprocess.Popen:
        old = self.procs.get(component)
        if old is not None and old.poll() is None:
            raise DeployError(f"{component} is already running (pid {old.pid})")
        self._record(cmd, probe)
        log = self.logs / f"{component}.log"
        self._log_start[component] = log.stat().st_size if log.exists() else 0
        with log.open("ab") as fh:
            fh.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, env=self._env(component, flwr_home), stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(cwd) if cwd else None, start_new_session=True)
        self.procs[component] = proc
        return proc

    def _cli(self, cmd: list[str], timeout: float = 60.0, check: bool = True,
             record: bool = True) -> subprocess.CompletedProcess:
        """A short ``flwr``/``fedbrats`` command as the coordinator."""
        if record:
            self._record(cmd)
        done = subprocess.run(cmd, env=self._env("cli", self.flwr_home), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise DeployError(f"{shlex.join(cmd)} failed ({done.returncode}):\n"
                              f"{done.stdout}\n{done.stderr}")
        return done

    def pids(self, component: str | None = None) -> list[int]:
        """Live processes of one component (``superlink``, ``supernode-GLI``, ``run-1``), or of
        the whole federation."""
        marker = self.token + (f":{component}" if component else "")
        pids = marked_processes(marker)
        if component:  # "supernode-GLI" must not match "supernode-GLI2"
            exact = f"{ENV_MARKER}={self.token}:{component}".encode()
            pids = [p for p in pids if exact in environ(p)]
        return pids

    def log_of(self, component: str, current: bool = False) -> str:
        """The component's log; ``current``: only since its latest start."""
        p = self.logs / f"{component}.log"
        if not p.exists():
            return ""
        with p.open("rb") as fh:
            if current:
                fh.seek(self._log_start.get(component, 0))
            return fh.read().decode(errors="replace")

    def _terminate(self, component: str, sig: int = signal.SIGTERM,
                   grace: float | None = None) -> None:
        """Signal the component's process group and every process carrying its marker; SIGKILL
        whatever is left after the grace period."""
        grace = self.grace if grace is None else grace
        proc = self.procs.get(component)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        send(self.pids(component), sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            if (proc is None or proc.returncode is not None) and not self.pids(component):
                break
            time.sleep(0.2)
        left = self.pids(component)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        send(left, signal.SIGKILL)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.pids(component) and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- set-up -------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        # SIGINT, SIGTERM, SIGHUP to this process unwind the block, so that every process of
        # the federation is stopped (the default SIGTERM and SIGHUP would end Python at once)
        self._signals = StopSignals().__enter__()
        try:
            self.start()
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    def _end(self) -> None:
        self._signals.ignore()  # a second signal must not cut the teardown short
        try:
            self.close()
        finally:
            self._signals.__exit__(None, None, None)

    def start(self) -> None:
        """Certificates, SuperLink, connection, registrations, SuperNodes (all online)."""
        for d in (self.logs, self.flwr_home):
            d.mkdir(parents=True, exist_ok=True)
        for s in self.sites.values():
            s.flwr_home.mkdir(parents=True, exist_ok=True)
            s.work_dir.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "ca.crt").exists():
            self._cli(self.certs_command())
        (self.flwr_home / "config.toml").write_text(self.connection_toml())
        self.start_superlink()
        for site in self.registered:
            self.register(site)
        if self.start_supernodes:
            for site in self.registered:
                self.start_supernode(site)
            self.wait_online(self.registered)

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until it is healthy. At the first start, when another
        process took the port that ``free_port()`` found free a moment before, the SuperLink is
        started on another one (up to 3 times); a restart keeps its port (the SuperNodes know
        only that one), so there a taken port is an error."""
        first = not any(c.startswith("supernode-") for c in self.procs)
        for retries_left in (3, 2, 1, 0):
            proc = self._spawn("superlink", self.superlink_command(), self.flwr_home,
                               cwd=self.flwr_home)
            try:
                self.wait_healthy(proc)
                return
            except DeployError:
                taken = "address already in use" in self.log_of("superlink", current=True)
                if not (first and taken and retries_left and proc.poll() is not None):
                    raise
            self._terminate("superlink", signal.SIGKILL, 0.0)  # a SuperExec it had started
            self.port = free_port()
            (self.flwr_home / "config.toml").write_text(self.connection_toml())

    def wait_healthy(self, proc: subprocess.Popen | None = None) -> None:
        proc = proc or self.procs["superlink"]
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        url = f"https://127.0.0.1:{self.port}/health"
        if poll_health(url, proc, self.startup_timeout, context, request_timeout=2):
            return
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited ({proc.returncode}):\n"
                              f"{self.log_of('superlink')[-3000:]}")
        raise DeployError(f"SuperLink not healthy after {self.startup_timeout:.0f} s")

    def register(self, site: str) -> int:
        """``flwr supernode register``; returns the node id it printed (the site keeps it)."""
        done = self._cli(self.register_command(site))
        m = re.search(r"SuperNode (\d+) registered", done.stdout)
        if not m:
            raise DeployError(f"registering {site}: {done.stdout}\n{done.stderr}")
        self.node_id[site] = int(m.group(1))
        return self.node_id[site]

    # -- SuperNodes ---------------------------------------------------------------------------
    def start_supernode(self, site: str, *, plaintext: bool = False,
                        max_retries: int | None = None) -> subprocess.Popen:
        """Start the site's SuperNode (in the background; see :meth:`wait_online`).
        ``plaintext``/``max_retries`` are for probes that must fail."""
        s = self.sites[site]
        cmd = self.supernode_command(site, plaintext=plaintext, max_retries=max_retries)
        probe = plaintext or max_retries is not None
        return self._spawn(f"supernode-{site}", cmd, s.flwr_home, cwd=s.flwr_home, probe=probe)

    def stop_supernode(self, site: str, grace: float | None = None) -> None:
        """SIGTERM the SuperNode and its ClientApps. (Flower 1.41 does not tell the SuperLink:
        the node stays listed online until its heartbeat expires, as after a crash.)"""
        self._terminate(f"supernode-{site}", signal.SIGTERM, grace)

    def kill_supernode(self, site: str) -> None:
        """SIGKILL the SuperNode and its ClientApps: a crash. The SuperLink still lists it as
        online until its heartbeat expires (Flower 1.41: up to 2 x 30 s)."""
        self._terminate(f"supernode-{site}", signal.SIGKILL, 0.0)

    def restart_supernode(self, site: str, timeout: float = 120.0) -> None:
        """Stop (if running) and start the site's SuperNode again; returns once it is online.

        Until the SuperLink has marked the old SuperNode offline (its heartbeat expired: up to
        a minute) it refuses the new one ("Failed to activate SuperNode", exit code 305), so
        this waits for that first."""
        if self.procs.get(f"supernode-{site}") and self.procs[f"supernode-{site}"].poll() is None:
            self.stop_supernode(site)
        self.wait_offline(site, timeout)
        self.start_supernode(site)
        self.wait_online([site], timeout)

    def nodes(self) -> list[dict]:
        """``flwr supernode list``: one dict per registered SuperNode (node_id, status, ...)."""
        done = self._cli(self.list_nodes_command(), check=False, record=False)
        if done.returncode != 0:
            return []
        try:
            return list(json.loads(done.stdout).get("nodes", []))
        except json.JSONDecodeError:
            return []

    def status(self) -> dict[str, str]:
        """Registered site -> its status at the SuperLink (``registered``, ``online``,
        ``offline``)."""
        by_id = {int(n.get("node-id", -1)): str(n.get("status", "")) for n in self.nodes()}
        return {site: by_id[nid] for site, nid in self.node_id.items() if nid in by_id}

    def wait_online(self, sites: Iterable[str], timeout: float | None = None) -> None:
        """Wait until each site's (latest) SuperNode has activated and is listed online. The
        status alone may be stale: a stopped SuperNode stays "online" until its heartbeat
        expires."""
        sites = list(sites)
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        port_retries = {site: 3 for site in sites}
        while True:
            activated = []
            for site in sites:
                component = f"supernode-{site}"
                proc = self.procs.get(component)
                if proc is not None and proc.poll() is not None:
                    log = self.log_of(component, current=True)
                    # free_port() only finds a port that was free a moment ago: another
                    # process may take it first. Then the SuperNode gets another one.
                    if "address already in use" in log and port_retries[site] > 0:
                        port_retries[site] -= 1
                        self.sites[site].port = free_port()
                        self.start_supernode(site)
                        activated.append(False)
                        continue
                    raise DeployError(f"SuperNode {site} exited ({proc.returncode}):\n"
                                      f"{log[-3000:]}")
                activated.append("SuperNode ID:" in self.log_of(component, current=True))
            status = self.status()
            if all(activated) and all(status.get(s) == "online" for s in sites):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNodes not online: {status}")
            time.sleep(1.0)

    def wait_offline(self, site: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.status().get(site) == "online":
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNode {site} still listed online after {timeout:.0f} s")
            time.sleep(1.0)

    # -- the SuperLink ------------------------------------------------------------------------
    def stop_superlink(self, grace: float | None = None) -> None:
        """SIGTERM the SuperLink, its SuperExec and running ServerApps."""
        self._terminate("superlink", signal.SIGTERM, grace)

    def kill_superlink(self) -> None:
        self._terminate("superlink", signal.SIGKILL, 0.0)

    def restart_superlink(self) -> None:
        """Stop and start the SuperLink on the same port and database: registrations and run
        records survive; the SuperNodes reconnect by themselves."""
        self.stop_superlink()
        self.start_superlink()

    # -- runs ---------------------------------------------------------------------------------
    def start_run(self, run_config: Mapping[str, Any] | None = None) -> RunHandle:
        """``flwr run APP_DIR NAME -c ... --stream`` in the background (log in logs/)."""
        self._runs += 1
        run_config = dict(run_config or {})
        out = run_config.get("output-dir")
        if out:  # the ServerApp's working folder is not ours: pass an absolute path
            run_config["output-dir"] = str(Path(out).resolve())
        proc = self._spawn(f"run-{self._runs}", self.run_command(run_config), self.flwr_home,
                           cwd=self.app_dir)
        return RunHandle(self._runs, proc, self.logs / f"run-{self._runs}.log",
                         Path(out).resolve() if out else None, time.monotonic())

    def wait_run(self, handle: RunHandle, timeout: float | None = None) -> RunResult:
        try:
            rc = handle.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate(handle.component)
            raise DeployError(f"flwr run did not finish within {timeout:.0f} s; log "
                              f"{handle.log}") from None
        run_id = self.run_id_of(handle)
        status = self.run_status(run_id) if run_id is not None else None
        return RunResult(rc, run_id, status, handle.output_dir,
                         time.monotonic() - handle.started, handle.log)

    def run(self, run_config: Mapping[str, Any] | None = None,
            timeout: float | None = None) -> RunResult:
        """Start a run and wait for it to end."""
        return self.wait_run(self.start_run(run_config), timeout)

    def run_id_of(self, handle: RunHandle, timeout: float = 0.0) -> int | None:
        """The run id ``flwr run`` printed (waits up to ``timeout`` s for it)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r"run (\d+)", handle.log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def runs(self) -> list[dict]:
        """``flwr ls``: one dict per run (run-id, status, ...)."""
        done = self._cli(self.ls_command(), check=False, record=False)
        try:
            return list(json.loads(done.stdout).get("runs", []))
        except json.JSONDecodeError:
            return []

    def run_status(self, run_id: int, timeout: float = 30.0) -> str | None:
        """The run's status from ``flwr ls``; waits for it to leave ``running``."""
        deadline = time.monotonic() + timeout
        status = None
        while True:
            for r in self.runs():
                if int(r.get("run-id", r.get("run_id", -1))) == run_id:
                    status = str(r.get("status"))
            if status is None or not status.startswith("running") or \
                    time.monotonic() > deadline:
                return status
            time.sleep(1.0)

    def stop_run(self, run_id: int) -> None:
        """``flwr stop RUN_ID NAME``: the coordinator stops a run (resume it with another
        ``flwr run`` and the same output-dir)."""
        self._cli(self.stop_command(run_id))

    def _app_pids(self, component: str, program: str) -> list[int]:
        return [p for p in self.pids(component)
                if any(Path(a).name == program for a in command_line(p).split()[:2])]

    def serverapp_pids(self) -> list[int]:
        """The running ``flwr-serverapp`` processes (one per run)."""
        return self._app_pids("superlink", "flwr-serverapp")

    def clientapp_pids(self, site: str) -> list[int]:
        """The site's running ``flwr-clientapp`` processes (one per message being handled)."""
        return self._app_pids(f"supernode-{site}", "flwr-clientapp")

    def kill_serverapp(self, handle: RunHandle | None = None) -> list[int]:
        """A ServerApp crash: SIGKILL every ``flwr-serverapp`` process, and the ``flwr run``
        streaming its log. Returns the PIDs killed."""
        pids = self.serverapp_pids()
        send(pids, signal.SIGKILL)
        if handle is not None:
            self._terminate(handle.component, signal.SIGKILL, 0.0)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pids

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop everything: runs, SuperNodes, the SuperLink (SIGTERM, then SIGKILL)."""
        order = [c for c in self.procs if c.startswith("run-")]
        order += [c for c in self.procs if c.startswith("supernode-")]
        order += ["superlink"]
        # SIGTERM everything at once, then wait for all: teardown costs one grace period.
        for component in order:
            proc = self.procs.get(component)
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        send(self.pids(), signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            for proc in self.procs.values():
                proc.poll()
            if all(p.returncode is not None for p in self.procs.values()) and not self.pids():
                break
            time.sleep(0.2)
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        send(self.pids(), signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)


__all__ = [
    "DEFAULT_NAME",
    "DeployError",
    "LocalFederation",
    "RunHandle",
    "RunResult",
    "SiteSetup",
    "config_string",
    "marked_processes",
]
