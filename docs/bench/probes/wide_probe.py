"""FedAvg at a fraction with a wider student (UNet channels x2, 4x the parameters): is PED's
core a capacity limit of the shared student?"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from fedbrats.common.data.contract import POPULATIONS
from fedbrats.common.networks import models
from fedbrats.simulation.bench import quality as q
from fedbrats.simulation.bench.perf import torch_threads

models.PRESETS["student-cpu-wide"] = models.ModelSpec(
    "UNet",
    {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2, "norm": "batch"},
)
frac, seed, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
settings = dataclasses.replace(q.FULL, fraction=frac, seeds=(seed,))
work = Path("build/bench/quality")
with torch_threads(1):
    train_root, test_root = q.prepare_data(settings, work)
    run = dataclasses.replace(settings.run(seed), student_model="student-cpu-wide")
    tests = q.load_test_sets(test_root, run)
    ctx = q.SeedRun(settings, seed, train_root, tests, {}, work)
    t0 = time.time()
    state, _ = q.federated(
        ctx.sites,
        run,
        lambda s, x, r: q.supervised_round(s, run, x, r),
        {p: 1.0 for p in POPULATIONS},
    )
    secs = time.time() - t0
    torch.save(state, out / f"fedavg-wide-f{frac:g}-s{seed}.pt")
    sc = ctx.evaluate_all(q._student(run, state, ctx.device))
    res = {
        "seconds": secs,
        "dice": {
            p: {r: round(sc[p][r]["dice"], 3) for r in ("WT", "TC", "ET")} for p in POPULATIONS
        },
        "scores": sc,
    }
    print(json.dumps(res["dice"]), secs, flush=True)
    (out / f"wide-f{frac:g}-s{seed}.json").write_text(json.dumps(res, indent=1))
