"""``fedbrats simulate``: the whole protocol on Flower's simulation engine (Ray), one virtual site
per population, on this machine.

It owns every process it starts: a ``flower-superlink --simulation`` on free loopback ports, with
its own FLWR_HOME inside the run folder, then ``flwr run``. However the run ends (done, an error,
SIGINT, SIGTERM or SIGHUP to this process alone), :func:`end_run` ends every process of it: the
simulation process first (its own exit shuts Ray down through Ray's API), then the SuperLink's
process group, then whatever is still alive of the processes it started and of those marked with
the run folder (:mod:`fedbrats.common.utils.processes`), by process id. A later start on the same
folder ends what a run killed outright left behind, and refuses a folder whose run is still going.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbrats.common.utils.processes import (
    RUN_MARKER,
    RunStopped,
    StopSignals,
    alive,
    command_line,
    descendants,
    end_processes,
    run_processes,
)
from fedbrats.simulation.progress import ProgressDisplay
from fedbrats.simulation.sites import SITE_ARG

MIN_DEMO_CASES = 6
"""Cases per population at least, when phantoms are generated: 4 to train, 2 to validate."""
DEFAULT_DATA = "data/phantoms"


class SimulationError(RuntimeError):
    pass


def project_dir() -> Path:
    """The folder with fedbrats' pyproject.toml (the Flower app that ``flwr run`` ships)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(
            f"{root}: no pyproject.toml; fedbrats simulate runs from a source checkout "
            "(pip install -e .)"
        )
    return root


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    """A value for ``flwr run -c`` and ``--node-config`` (TOML; strings single-quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    text = str(v)
    if "'" in text or "\n" in text:
        raise ValueError(f"{text!r}: a value may not contain a single quote or a newline")
    return f"'{text}'"


def config_string(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs for ``flwr run -c`` / ``--node-config``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


@dataclass
class SimulationResult:
    returncode: int
    output_dir: Path
    report: Path | None
    seconds: float


def poll_health(url: str, proc: subprocess.Popen, timeout: float,
                context: ssl.SSLContext | None = None, request_timeout: float = 0.5) -> bool:
    """Poll a SuperLink's ``url`` (``.../health``) until it answers 200: True; False as soon as
    ``proc`` has exited or when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=request_timeout, context=context) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _wait_healthy(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0):
    if poll_health(f"http://127.0.0.1:{port}/health", proc, timeout):
        return
    if proc.poll() is not None:
        raise SimulationError(
            f"flower-superlink exited with code {proc.returncode}; see {log_file}"
        )
    raise SimulationError(f"flower-superlink not healthy after {timeout:.0f} s; see {log_file}")


def _stop(proc: subprocess.Popen | None, grace: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


OWNER_FILE = "run.pid"
"""In the run folder while a run uses it: the owning process's id."""


def claim_run_folder(out: Path) -> None:
    """Take ``out`` for this run: refuse it when another run still uses it; end what a run
    killed outright (SIGKILL, a lost machine) left running there, saying so."""
    owner_file = out / OWNER_FILE
    with contextlib.suppress(OSError, ValueError):
        owner = int(owner_file.read_text().split()[0])
        if owner != os.getpid() and alive(owner) and "simulate" in command_line(owner):
            raise SimulationError(
                f"{out} is in use by a running simulation (process {owner}: "
                f"{command_line(owner)}); stop it first, or give another --out"
            )
    stale = run_processes(out)
    if stale:
        names = "; ".join(f"{p} {command_line(p)[:80]}" for p in stale[:6])
        print(f"ending {len(stale)} process(es) left running by an earlier run of {out}: "
              f"{names}", file=sys.stderr)
        end_processes(stale, grace=10.0)
    owner_file.write_text(f"{os.getpid()}\n")


def end_run(out: Path, superlink: subprocess.Popen | None, grace: float = 10.0) -> list[int]:
    """End every process of the run in ``out``; returns those that had to be killed.

    1. ``flwr-simulation`` (the Ray driver) gets SIGTERM: Flower's handler ends the run and its
       backend's ``ray.shutdown()`` stops Ray's processes; up to ``grace`` seconds.
    2. The SuperLink's process group: SIGTERM, SIGKILL after ``grace``.
    3. What is still alive of the processes marked with ``out`` and of the SuperLink's
       descendants (taken before step 1): SIGTERM, SIGKILL after 5 s.
    """
    started = set(descendants(superlink.pid)) if superlink is not None else set()
    mine = started | set(run_processes(out))
    drivers = [p for p in mine if "flwr-simulation" in command_line(p)]
    if drivers:
        end_processes(drivers, grace=grace)
    _stop(superlink, grace=grace)
    rest = {p for p in started | set(run_processes(out)) if alive(p)}
    return end_processes(rest, grace=5.0) if rest else []


def _write_connection(home: Path, http_port: int) -> None:
    """The ``flwr`` CLI's connection to the local SuperLink (``FLWR_HOME/config.toml``)."""
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedbrats-sim"\n\n'
        f'[superlink.fedbrats-sim]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )


def _simulation_env(home: Path, bin_dir: Path, cpus_per_site: float) -> dict[str, str]:
    """The environment of the SuperLink and of ``flwr run``."""
    return {
        **os.environ,
        RUN_MARKER: str(home.parent),  # inherited by every process of the run (end_run)
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # each virtual site gets cpus_per_site cores from Ray; keep torch inside that share
        "OMP_NUM_THREADS": str(max(1, int(cpus_per_site))),
        "RAY_DEDUP_LOGS": "0",
    }


def _federation_config(num_sites: int, cpus_per_site: float, gpus_per_site: float) -> str:
    """``flwr run --federation-config``: the number of virtual sites and each one's share."""

    def num(x: float) -> int | float:
        return int(x) if float(x).is_integer() else float(x)

    return (
        f"num-supernodes={num_sites} client-resources-num-cpus={num(cpus_per_site)} "
        f"client-resources-num-gpus={num(gpus_per_site)}"
    )


def _start_superlink(
    exe: str, http_port: int, home: Path, log_file: Path, env: Mapping[str, str]
) -> subprocess.Popen:
    """A simulation SuperLink on ``127.0.0.1:http_port``, in its own process group."""
    return subprocess.Popen(
        [exe, "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(http_port),
         "--database", str(home / "state.db"), "--log-file", str(log_file),
         "--disable-runtime-dependency-installation"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def run_simulation(
    output_dir: str | Path,
    data_root: str | Path,
    num_sites: int = 5,
    preset: str = "cpu-demo",
    overrides: Mapping[str, Any] | None = None,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
    stream: bool = True,
    app_dir: Path | None = None,
    progress: bool = False,
) -> SimulationResult:
    """Run the protocol in simulation; returns when the run (and every process) has ended.

    ``stream``: Flower's and Ray's output to this process's terminal; otherwise (and always in
    ``output_dir/flwr-run.log``) to the log file. ``progress``: print
    :class:`~fedbrats.simulation.progress.ProgressDisplay` while the run goes on.
    """
    out = Path(output_dir).resolve()
    data = Path(data_root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    app = app_dir or project_dir()
    bin_dir = Path(sys.executable).parent
    superlink_exe = shutil.which("flower-superlink", path=str(bin_dir)) or "flower-superlink"
    flwr_exe = shutil.which("flwr", path=str(bin_dir)) or "flwr"

    http_port = free_port()
    _write_connection(home, http_port)
    env = _simulation_env(home, bin_dir, cpus_per_site)
    log_file = home / "superlink.log"
    run_config = {
        "preset": preset,
        "output-dir": str(out),
        "data-root": str(data),
        "num-sites": num_sites,
        **(overrides or {}),
    }
    run_args = config_string(run_config)  # a bad value fails here, before any process starts
    federation = _federation_config(num_sites, cpus_per_site, gpus_per_site)
    start = time.monotonic()
    superlink: subprocess.Popen | None = None

    claim_run_folder(out)
    with StopSignals() as stop:
        try:
            superlink = _start_superlink(superlink_exe, http_port, home, log_file, env)
            _wait_healthy(http_port, superlink, log_file)
            # --stream makes `flwr run` wait for the run to end; without it it returns at once.
            cmd = [flwr_exe, "run", str(app), "fedbrats-sim", "--federation-config", federation,
                   "-c", run_args,
                   "--stream"]
            (out / "progress.json").unlink(missing_ok=True)  # a finished run's, if resumed
            display = ProgressDisplay(out) if progress else contextlib.nullcontext()
            with (out / "flwr-run.log").open("a") as run_log, display:
                proc = subprocess.run(cmd, env=env, cwd=str(app), check=False,
                                      stdout=None if stream else run_log,
                                      stderr=None if stream else subprocess.STDOUT)
            returncode = proc.returncode
        finally:
            stop.ignore()  # a signal now would cut the clean-up short
            end_run(out, superlink)
            (out / OWNER_FILE).unlink(missing_ok=True)
    report = out / "report.md"
    return SimulationResult(returncode, out, report if report.exists() else None,
                            time.monotonic() - start)


def _run(args) -> int:
    from fedbrats.common.data.contract import POPULATIONS

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not _:
            print(f"--set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    if args.baseline:
        overrides["baseline"] = args.baseline
    from fedbrats.common.config import load_run_config

    try:  # a bad setting fails here, before data are generated or a process starts
        config_string(overrides)
        load_run_config({"preset": args.preset, **overrides})
    except ValueError as e:  # ConfigError is one
        print(f"--set: {e}", file=sys.stderr)
        return 2
    from fedbrats.common.config import ConfigError, simulation_sites
    from fedbrats.common.data.labels import DEFAULT_CONVENTION
    from fedbrats.simulation.sites import (
        check_sites_data,
        parse_site_arg,
        read_sites_file,
        sim_sites_setting,
    )

    try:
        given = [parse_site_arg(t) for t in args.site or []]
        if args.sites_file:
            given += read_sites_file(args.sites_file)
        if given and args.data is not None:
            raise ConfigError("--data and --site/--sites-file exclude each other: the sites "
                              "name their own data")
        if given and args.sites is not None and args.sites != len(given):
            raise ConfigError(f"--sites {args.sites}, but --site/--sites-file name "
                              f"{len(given)} sites")
        if given:
            overrides["sim-sites"] = sim_sites_setting(given)
        sites = len(given) if given else (args.sites or len(POPULATIONS))
        if not 2 <= sites <= len(POPULATIONS):
            raise ConfigError(f"--sites must be 2 to {len(POPULATIONS)}, got {sites}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = Path(args.data if args.data is not None else DEFAULT_DATA)
    if not given:
        empty = not data.is_dir() or not any(data.iterdir())
        if empty and (args.synth or args.data is None):
            from fedbrats.simulation.phantoms import case_counts, write_dataset

            print(f"no data in {data}: generating the five-population phantom set")
            counts = {p: max(n, MIN_DEMO_CASES) for p, n in case_counts(args.cases).items()}
            write_dataset(data, counts, shape=(96, 96, 96), seed=0, progress=False)
        elif empty:
            what = "is empty" if data.is_dir() else "does not exist"
            print(f"error: --data {data} {what}; expected one folder per population "
                  f"({', '.join(POPULATIONS[:sites])}). Add --synth to generate the phantom "
                  "set there, or name each site's data with --site POP=PATH", file=sys.stderr)
            return 2
    checked = (simulation_sites(overrides["sim-sites"]) if given else
               [{"population": p, "data-dir": str(data / p), "labels": DEFAULT_CONVENTION,
                 "manifest": ""} for p in POPULATIONS[:sites]])
    problems = check_sites_data(checked)
    if problems:
        print("error: the sites' data do not pass the data contract; nothing was started:\n"
              + "\n".join(problems), file=sys.stderr)
        return 2
    print(f"run folder {Path(args.out).resolve()}; Flower's and Ray's log: "
          f"{Path(args.out).resolve() / 'flwr-run.log'}" + ("" if not args.verbose else
                                                           " (and below: --verbose)"))
    try:
        result = run_simulation(args.out, data, num_sites=sites, preset=args.preset,
                                overrides=overrides, cpus_per_site=args.cpus_per_site,
                                gpus_per_site=args.gpus_per_site, stream=args.verbose,
                                progress=not args.verbose)
    except SimulationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"\nstopped by {signal.Signals(e.signum).name}: every process of the run has "
              f"ended; the same command resumes after the last saved round", file=sys.stderr)
        return 128 + e.signum
    if result.returncode != 0 or result.report is None:
        log = result.output_dir / "flwr-run.log"
        if not args.verbose and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(["", f"--- the last lines of {log} ---", *tail, "---"]),
                  file=sys.stderr)
        print(f"simulation failed (exit {result.returncode}); log {log}, run folder "
              f"{result.output_dir}", file=sys.stderr)
        return result.returncode or 1
    from fedbrats.server.report import summary_table

    print()
    print(summary_table(str(result.output_dir / "report.json")))
    print(f"\nreport: {result.report}  ({result.seconds / 60:.1f} min)")
    return 0


def register_simulate(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run the whole protocol on Flower's simulation engine, one site per population",
        description=(
            "Run fedbrats end to end on this machine with Flower's simulation engine (Ray): "
            "each site (GLI, SSA, PED, MEN, MET in that order) trains its teacher, then the "
            "student is distilled over federated rounds and evaluated beside every teacher. "
            "Generates the phantom data first if DATA is empty. Started again with the same "
            "--out, a run goes on from its last finished round and reuses finished teachers."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help=f"data root with one folder per population (default: {DEFAULT_DATA}, "
                   "where the phantom set is generated if absent); it must exist unless --synth "
                   "is given")
    p.add_argument("--synth", action="store_true",
                   help="generate the five-population phantom set in --data if it is empty")
    p.add_argument("--site", action="append", metavar=SITE_ARG,
                   help="a virtual site's own data: its population, a folder of cases (BraTS "
                   "2023/2024 or 2020/2021 names), optionally its label convention and a "
                   "manifest CSV; repeatable, one per site, in partition order (instead of "
                   "--data)")
    p.add_argument("--sites-file", metavar="TOML",
                   help="the virtual sites as [[site]] tables (population, data-dir, labels, "
                   "manifest), instead of --site")
    p.add_argument("--preset", default="cpu-demo", choices=("tiny", "cpu-demo", "gpu"),
                   help="run settings preset (default: %(default)s)")
    p.add_argument("--sites", type=int, default=None,
                   help="number of sites, the first N populations of --data (default: 5)")
    p.add_argument("--cases", type=int, default=16,
                   help="cases of the largest population when generating data "
                   "(default: %(default)s)")
    p.add_argument("--baseline", choices=("fedavg",), default=None,
                   help="also train the labels-only FedAvg model with the student's schedule "
                   "in the same run and report it beside the student and the teachers "
                   "(run setting baseline; doubles phase 2's time)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a run setting, e.g. --set num-rounds=3 (repeatable)")
    p.add_argument("--cpus-per-site", type=float, default=1.0,
                   help="CPU cores Ray gives each virtual site (default: %(default)s)")
    p.add_argument("--gpus-per-site", type=float, default=0.0,
                   help="GPU share per virtual site, e.g. 0.2 (default: %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's and Ray's own output instead of the progress display "
                   "(it is always in the run folder's flwr-run.log)")
    p.set_defaults(func=_run)


__all__ = ["SimulationResult", "register_simulate", "run_simulation"]
