"""Two figures of ``fedbrats bench perf`` alone, each a ratio measured side by side:

- phase 2 at demo scale (``measure_phase2``): ``make demo``'s five sites, ``ROUNDS``
  distillation rounds in Flower's simulation engine against the same rounds with the site
  functions in one process;
- a deployment round against a simulation round (``measure_deployment``): one site of 20
  BraTS-size (240x240x155) phantoms, cpu-demo, the rehearsal's SuperLink and SuperNode (TLS,
  node authentication) against the simulation engine.

Writes ``docs/bench/rounds-overhead.md`` and ``.json``. Run from the repository root on a quiet
machine (about 20 minutes on 2 cores):

    .venv/bin/python docs/bench/rounds_overhead.py WORK_DIR [ROUNDS] [phase2|deployment]

With a part named, only that part is measured again and the other's figures are kept from the
JSON already written (each part is a side-by-side ratio of its own).
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
parts = [sys.argv[3]] if len(sys.argv) > 3 else ["phase2", "deployment"]
cores = os.cpu_count() or 1
here = Path("docs/bench")
old = json.loads((here / "rounds-overhead.json").read_text()) if len(parts) == 1 else {}
t0, machine = time.perf_counter(), machine_info()
out = {k: v for k, v in old.items() if k in ("phase2", "deployment")}
for figures in out.values():  # written by the first version of this script: one header
    figures.setdefault("machine", old.get("machine", {}))
    figures.setdefault("command", old.get("command", ""))
    figures.setdefault("seconds", float("nan"))
for part in parts:
    command = "python docs/bench/" + " ".join([Path(__file__).name, "WORK", str(rounds), part])
    if part == "phase2":
        figures = measure_phase2(dataclasses.replace(FULL, phase2_rounds=rounds), work, cores)
    elif part == "deployment":
        figures = measure_deployment(work, cases=FULL.deploy_cases, preset=FULL.preset,
                                     threads=cores)
    else:
        raise SystemExit(f"unknown part {part!r}: expected phase2 or deployment")
    machine["load_average_end"] = machine_info()["load_average"]
    out[part] = {**figures, "command": command, "machine": dict(machine),
                 "seconds": time.perf_counter() - t0}
    print(f"{part}:", json.dumps(figures, default=float)[:400], flush=True)
    t0, machine = time.perf_counter(), machine_info()
(here / "rounds-overhead.json").write_text(json.dumps(out, indent=1, default=float))
lines = ["# What a round costs beyond its training: the simulation engine and deployment", ""]
for part, render in (("phase2", _md_phase2), ("deployment", md_deployment)):
    if part in out:
        lines += [*machine_markdown(out[part]["machine"], out[part]["command"],
                                    out[part]["seconds"]), "", *render(out[part])]
lines += ["Raw numbers: [`rounds-overhead.json`](rounds-overhead.json).", ""]
(here / "rounds-overhead.md").write_text("\n".join(lines))
