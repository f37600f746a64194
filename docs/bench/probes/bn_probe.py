"""Is PED's core lost to the averaged batch-norm statistics? FedAvg at a fraction, then
evaluate each population with (a) the global BN stats, (b) BN stats re-estimated on that site's
training crops (weights unchanged), (c) fedavg_ft (one local round)."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from fedbrats.client.data import load_site_data, training_batches
from fedbrats.client.distill import student_input
from fedbrats.common.data.contract import POPULATIONS
from fedbrats.simulation.bench import quality as q
from fedbrats.simulation.bench.perf import torch_threads

frac, seed, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
settings = dataclasses.replace(q.FULL, fraction=frac, seeds=(seed,))
work = Path("build/bench/quality")
with torch_threads(1):
    train_root, test_root = q.prepare_data(settings, work)
    run = settings.method_run(seed, "fedavg")  # one shared last block, as the bench's FedAvg
    tests = q.load_test_sets(test_root, run)
    ctx = q.SeedRun(settings, seed, train_root, tests, {}, work)
    st = out / f"fedavg-f{frac:g}-s{seed}.pt"
    if st.exists():
        state = torch.load(st)
    else:
        t0 = time.time()
        state, last = q.federated(
            ctx.sites,
            run,
            lambda s, x, r: q.supervised_round(s, run, x, r),
            {p: 1.0 for p in POPULATIONS},
        )
        torch.save(state, st)
        print("fedavg", time.time() - t0, flush=True)
    res = {}
    for pop in POPULATIONS:
        m = q._student(run, state, ctx.device)
        a = ctx.evaluate(m, pop)
        # BN stats re-estimated on the site's training crops, with the student's input dropout
        m2 = q._student(run, state, ctx.device)
        for mod in m2.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
        m2.train()
        data = load_site_data(ctx.sites[pop], run)
        gen = torch.Generator().manual_seed(0)
        b = training_batches(data.train_ds, run.batch_size, 123)
        with torch.no_grad():
            for _ in range(30):
                x = next(b)["image"]
                m2(student_input(x, run, gen))
        m2.eval()
        bb = ctx.evaluate(m2, pop)
        res[pop] = {"global_bn": a, "site_bn": bb}

        print(
            pop,
            {
                k: {r: round(v[r]["dice"], 3) for r in ("WT", "TC", "ET")}
                for k, v in res[pop].items()
            },
            flush=True,
        )
    (out / f"bn-f{frac:g}-s{seed}.json").write_text(json.dumps(res, indent=1))
