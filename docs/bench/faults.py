"""Times to recover from each fault, measured by the fault tests themselves.

Runs the slow fault tests (the deployment rehearsal's site crash, ServerApp stop and kill,
SuperNode and SuperLink restarts, and the signals to ``fedbrats simulate``) with
``FEDBRATS_RECOVERY_LOG`` set, so each test appends what it measured (``record_recovery`` in
``tests/conftest.py``), and writes ``docs/bench/faults.md`` and ``faults.json``. A test that fails
is named in the results and its figures are left out. Run from the repository root on a quiet
machine (about 25 minutes on 2 cores):

    .venv/bin/python docs/bench/faults.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedbrats.simulation.bench.perf import machine_info, machine_markdown

TESTS = [
    "tests/simulation/test_deployment.py::test_round_completes_without_the_crashed_site",
    "tests/simulation/test_deployment.py::"
    "test_serverapp_stopped_or_killed_resumes_without_repeating_a_round",
    "tests/simulation/test_deployment.py::test_restarted_supernode_reuses_its_teacher",
    "tests/simulation/test_deployment.py::"
    "test_superlink_killed_and_restarted_on_its_database_loses_only_the_round_under_way",
    "tests/simulation/test_signals.py::test_a_stop_signal_ends_every_process_and_the_run_resumes",
]
here = Path("docs/bench")
command = "python docs/bench/faults.py"
started = time.perf_counter()
machine = machine_info()

with tempfile.TemporaryDirectory() as tmp:
    log = Path(tmp) / "recovery.jsonl"
    junit = Path(tmp) / "junit.xml"
    env = {**os.environ, "FEDBRATS_SLOW": "1", "FEDBRATS_RECOVERY_LOG": str(log)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *TESTS], env=env)
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    import xml.etree.ElementTree as ET

    failed = [f"{case.get('classname')}::{case.get('name')}"
              for case in ET.parse(junit).iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]

result = {"command": command, "machine": machine, "pytest_rc": done.returncode,
          "failed": failed, "recoveries": entries}
(here / "faults.json").write_text(json.dumps(result, indent=1))
lines = ["# Times to recover from faults", "",
         *machine_markdown(machine, command, time.perf_counter() - started), "",
         "Measured by the fault tests themselves (TLS, node authentication, three SuperNodes on "
         "loopback, the `tiny` preset on 48^3 phantoms; the signals on `fedbrats simulate`). "
         "The README's fault table cites these figures.", "",
         "| fault | seconds | from what to what |", "|---|---:|---|"]
lines += [f"| {e['fault']} | {e['seconds']:.1f} | {e['what']} |" for e in entries]
lines += ["", f"Tests failed: {', '.join(failed) if failed else 'none'} "
          f"(pytest exit code {done.returncode}).", "", "Raw numbers: [`faults.json`](faults.json).", ""]
(here / "faults.md").write_text("\n".join(lines))
print("\n".join(lines))
sys.exit(done.returncode)
