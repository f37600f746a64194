"""PED's core under FedAvg: per-class confusion on PED test cases, and whether 30 local steps
of only the last block (model.2) recover it (the shared features already separate the classes)
or the whole network must move."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedbrats.client.data import load_site_data, training_batches
from fedbrats.client.distill import LocalTrainer
from fedbrats.client.scoring import evaluate_model
from fedbrats.common.utils.seeds import derived_seed
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
    state = torch.load(out / f"fedavg-f{frac:g}-s{seed}.pt")

    def confusion(model, pop):
        cm = np.zeros((4, 4), np.int64)

        def score(pred, gt):
            cm[:] += np.bincount(
                4 * np.asarray(gt).astype(int).ravel() + np.asarray(pred).astype(int).ravel(),
                minlength=16,
            ).reshape(4, 4)
            return {}

        evaluate_model(model, tests[pop].dataset, tests[pop].site, run, ctx.device, score=score)
        return (cm / cm.sum(1, keepdims=True)).round(3).tolist()

    res = {
        "fedavg_confusion_PED": confusion(q._student(run, state, ctx.device), "PED"),
        "fedavg_confusion_GLI": confusion(q._student(run, state, ctx.device), "GLI"),
    }
    print(json.dumps(res), flush=True)
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    for prefix in ("model.2", ""):
        m = q._student(run, state, ctx.device)
        for n, p in m.net.named_parameters():
            p.requires_grad_(n.startswith(prefix))
        m.train()
        for n, mod in m.net.named_modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and not n.startswith(prefix):
                mod.eval()
        site = ctx.sites["PED"]
        s = derived_seed(run.seed, "PED", "round", run.num_rounds)
        tr = LocalTrainer(m, labels_only, ctx.device, run.round_lr(run.num_rounds), s)
        b = training_batches(load_site_data(site, run).train_ds, run.batch_size, s)
        for _ in range(run.local_steps):
            tr.step(next(b))
        m.eval()
        sc = ctx.evaluate(m, "PED")
        res[f"ft[{prefix or 'all'}]"] = {r: round(sc[r]["dice"], 3) for r in ("WT", "TC", "ET")}
        print(prefix or "all", res[f"ft[{prefix or 'all'}]"], flush=True)
    (out / f"head-f{frac:g}-s{seed}.json").write_text(json.dumps(res, indent=1))
