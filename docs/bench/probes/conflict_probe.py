"""Is PED's core a conflict between populations or only too little weight? The last block
(model.2) tuned on PED for 30 steps, as in head_probe.py, scored on every population's test
cases beside FedAvg's own: where the others lose, one shared last block cannot serve them all."""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fedbrats.client.data import load_site_data, training_batches
from fedbrats.client.distill import LocalTrainer
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

    def scores(model) -> dict:
        return {p: {r: round(ctx.evaluate(model, p)[r]["dice"], 3) for r in ("WT", "TC", "ET")}
                for p in tests}

    res = {"fedavg": scores(q._student(run, state, ctx.device))}
    m = q._student(run, state, ctx.device)
    for n, p in m.net.named_parameters():
        p.requires_grad_(n.startswith("model.2"))
    m.train()
    for n, mod in m.net.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and not n.startswith("model.2"):
            mod.eval()
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    s = derived_seed(run.seed, "PED", "round", run.num_rounds)
    tr = LocalTrainer(m, labels_only, ctx.device, run.round_lr(run.num_rounds), s)
    b = training_batches(load_site_data(ctx.sites["PED"], run).train_ds, run.batch_size, s)
    for _ in range(run.local_steps):
        tr.step(next(b))
    res["ped_tuned_last_block"] = scores(m.eval())
    print(json.dumps(res), flush=True)
    (out / f"conflict-f{frac:g}-s{seed}.json").write_text(json.dumps(res, indent=1))
