"""The step figures of ``fedbrats bench perf`` (``measure_steps``) alone, at the cpu-demo preset:
a supervised step, a distillation step with the teacher run at the step and with its kept
outputs (``teacher-cache``), interleaved on the same crop of a 96^3 GLI phantom. Writes
``docs/bench/teacher-cache.json``. Run from the repository root:

    .venv/bin/python docs/bench/teacher_cache_steps.py WORK_DIR
"""

import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

from fedbrats.common.config import PRESETS, SiteConfig
from fedbrats.simulation.bench.perf import machine_info, measure_steps, torch_threads
from fedbrats.simulation.phantoms import write_dataset

work = Path(sys.argv[1])
root = work / "gli"
if not root.exists():
    write_dataset(root, {"GLI": 4}, shape=(96,) * 3, seed=0, progress=False)
site = SiteConfig(population="GLI", data_dir=root / "GLI", work_dir=work / "site")
run = dataclasses.replace(PRESETS["cpu-demo"], device="cpu")
out = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
       "machine": machine_info(), "steps": {}}
for threads in (1, 2):
    with torch_threads(threads):
        r = measure_steps(site, run, 30, torch.device("cpu"))
    r.pop("all_seconds")
    out["steps"][f"{threads} thread(s)"] = r
    print(threads, json.dumps(r["seconds"]), r["ratio_distillation_over_supervised"],
          r["ratio_kept_distillation_over_supervised"])
Path("docs/bench/teacher-cache.json").write_text(json.dumps(out, indent=1))
