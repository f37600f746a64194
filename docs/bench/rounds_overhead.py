"""Two figures of ``fedbrats bench perf`` alone, each a ratio measured side by side:

- phase 2 at demo scale (``measure_phase2``): ``make demo``'s five sites, ``ROUNDS``
  distillation rounds in Flower's simulation engine against the same rounds with the site
  functions in one process;
- a deployment round against a simulation round (``measure_deployment``): one site of 20
  BraTS-size (240x240x155) phantoms, cpu-demo, the rehearsal's SuperLink and SuperNode (TLS,
  node authentication) against the simulation engine.

Writes ``docs/bench/rounds-overhead.md`` and ``.json``. Run from the repository root on a quiet
machine (about 20 minutes on 2 cores):

    .venv/bin/python docs/bench/rounds_overhead.py WORK_DIR [ROUNDS]
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from fedbrats.simulation.bench.perf import (
                                            FULL,
                                            _md_phase2,
                                            machine_info,
                                            machine_markdown,
                                            md_deployment,
                                            measure_deployment,
                                            measure_phase2,
)

work = Path(sys.argv[1]).resolve()
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else FULL.phase2_rounds
cores = os.cpu_count() or 1
command = "python docs/bench/" + " ".join([Path(__file__).name, "WORK", *sys.argv[2:]])
t0, machine = time.perf_counter(), machine_info()
out = {"command": command, "machine": machine}
out["phase2"] = measure_phase2(dataclasses.replace(FULL, phase2_rounds=rounds), work, cores)
print("phase 2:", json.dumps(out["phase2"]), flush=True)
out["deployment"] = measure_deployment(work, cases=FULL.deploy_cases, preset=FULL.preset,
                                       threads=cores)
print("deployment:", out["deployment"]["ratio"], flush=True)
machine["load_average_end"] = machine_info()["load_average"]
seconds = time.perf_counter() - t0
here = Path("docs/bench")
(here / "rounds-overhead.json").write_text(json.dumps(out, indent=1, default=float))
lines = ["# What a round costs beyond its training: the simulation engine and deployment", "",
         *machine_markdown(machine, command, seconds), "",
         *_md_phase2(out["phase2"]), *md_deployment(out["deployment"]),
         "Raw numbers: [`rounds-overhead.json`](rounds-overhead.json).", ""]
(here / "rounds-overhead.md").write_text("\n".join(lines))
