"""A large student over TLS for many rounds: bytes moved, memory of the SuperLink and the
SuperNodes per round, no round lost or repeated.

The deployment rehearsal (``LocalFederation``: TLS, node authentication, a SuperLink and five
SuperNodes on loopback), tiny phantoms (3 cases a site), preset ``tiny`` with the
``student-large`` student (SegResNet, 29.4 M parameters, 117 MB in float32), ``ROUNDS`` rounds
of ``local-steps`` 1, evaluated only in the last. While it runs, every 0.5 s it samples the
resident memory (VmRSS) of the SuperLink's and each SuperNode's own process, and the bytes the
SuperLink process read and wrote through system calls (``/proc/PID/io``: the TLS traffic, its
database). Per round it keeps the largest resident memory seen and the bytes moved. After each
round the figures are written, so a stopped run keeps what it measured:

    .venv/bin/python docs/bench/soak_large_student.py WORK_DIR [ROUNDS] [NAME]

Writes ``docs/bench/NAME.md`` and ``docs/bench/NAME.json`` (NAME: ``soak`` by default). About 30 minutes on 2 cores.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

from fedbrats.common.networks.models import build_network, count_parameters
from fedbrats.simulation.bench.perf import machine_info, machine_markdown
from fedbrats.simulation.phantoms import write_dataset
from fedbrats.simulation.rehearsal import LocalFederation

SITES = ("GLI", "SSA", "PED", "MEN", "MET")
STUDENT = "student-large"

work = Path(sys.argv[1]).resolve()
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
stem = sys.argv[3] if len(sys.argv) > 3 else "soak"
here = Path("docs/bench")
command = f"python docs/bench/soak_large_student.py WORK {rounds} {stem}"
machine = machine_info()
started = time.perf_counter()
params = count_parameters(build_network(STUDENT))
float32_mb = params * 4 / 1e6


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def io_bytes(pid: int) -> int | None:
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def read_rounds(out: Path) -> list[dict]:
    try:
        return json.loads((out / "rounds.json").read_text())
    except (OSError, ValueError):
        return []


def write(result: dict) -> None:
    (here / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    per_round = result["rounds"]
    lines = ["# A 117 MB student over TLS, five SuperNodes, round after round", "",
             *machine_markdown(result["machine"], command,
                               time.perf_counter() - started), "",
             f"Student `{STUDENT}`: {params:,} parameters, {float32_mb:.1f} MB in float32; each "
             f"round sends it to 5 sites and gets 5 updates back (about "
             f"{10 * float32_mb / 1000:.2f} GB of arrays a round). Tiny phantoms (3 cases a "
             "site at 48^3), preset `tiny`, `local-steps` 1, evaluated in the last round only; "
             "the rehearsal's TLS and node authentication"
             + (f"; environment {result['environment']}" if result.get("environment") else "")
             + ". Resident memory is the largest seen "
             "in the round (sampled every 0.5 s) of each process itself (its ClientApps not "
             "counted); bytes are what the SuperLink process read and wrote (rchar + wchar).",
             "", "Each memory cell: the largest / the smallest resident memory seen in the round "
             "(MB). The smallest is what the process holds between messages: a leak shows "
             "there; the largest depends on how many 117 MB messages it happens to hold at "
             "once.", "",
             "| round | seconds | SuperLink | ServerApp | SuperNodes (GLI SSA PED MEN MET) "
             "| SuperLink I/O GB |", "|---:|---:|---:|---:|:---|---:|"]
    for r in per_round:
        nodes = " ".join(
            f"{r['supernode_rss_mb'].get(s, float('nan')):.0f}/"
            f"{r.get('supernode_low_mb', {}).get(s, float('nan')):.0f}" for s in SITES)
        lines.append(f"| {r['round']} | {r['seconds']:.1f} | {r['superlink_rss_mb']:.0f}/"
                     f"{r.get('superlink_low_mb', float('nan')):.0f} | "
                     f"{r.get('serverapp_rss_mb', float('nan')):.0f}/"
                     f"{r.get('serverapp_low_mb', float('nan')):.0f} | "
                     f"{nodes} | {r['superlink_io_gb']:.2f} |")
    if "verdict" in result:
        v = result["verdict"]
        lines += ["", f"Rounds recorded: {v['rounds_recorded']} (expected 1..{rounds}, each "
                  f"once: **{v['rounds_ok']}**). Memory, last round against the third: "
                  f"SuperLink {v['superlink_ratio']:.3f}, SuperNodes "
                  + ", ".join(f"{s} {x:.3f}" for s, x in v["supernode_ratio"].items())
                  + f" (flat within 10 %: **{v['flat']}**). The smallest resident memory, last "
                  "round against the third: " + ", ".join(
                      f"{k.replace(' (low)', '')} {x:.3f}" for k, x in v["low_ratio"].items())
                  + f" (none more than 10 % higher: **{v['low_flat']}**). Trend over rounds 3 "
                  "to the last (least squares, MB a round): " + ", ".join(
                      f"{k} {x:+.1f}" for k, x in v["slope_mb_per_round"].items())
                  + f". Run status: {v['status']}."]
    lines += ["", f"Raw numbers: [`{stem}.json`]({stem}.json).", ""]
    (here / f"{stem}.md").write_text("\n".join(lines))


data = work / "data"
if not (data / "MET").exists():
    write_dataset(data, {s: 3 for s in SITES}, shape=(48, 48, 48), seed=3, progress=False)
fed_dir, out = work / "federation", work / "federation" / "run"
result: dict = {"command": command, "machine": machine, "student": STUDENT,
                "parameters": params, "float32_mb": float32_mb, "rounds": []}
# extra environment for every process of the federation, e.g. SOAK_ENV="MALLOC_ARENA_MAX=2"
extra_env = dict(item.split("=", 1) for item in os.environ.get("SOAK_ENV", "").split() if item)
result["environment"] = extra_env
with LocalFederation(fed_dir, {s: data / s for s in SITES},
                     env={"OMP_NUM_THREADS": "1", **extra_env}) as fed:
    handle = fed.start_run({"preset": "tiny", "num-sites": 5, "output-dir": str(out),
                            "student-model": STUDENT, "num-rounds": rounds, "local-steps": 1,
                            "eval-every": rounds})
    link = fed.procs["superlink"].pid
    nodes = {s: fed.procs[f"supernode-{s}"].pid for s in SITES}
    peak: dict = {}
    trough: dict = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            apps = fed.serverapp_pids()
            watched = [("superlink", link), *nodes.items()] + \
                ([("serverapp", apps[0])] if apps else [])
            for key, pid in watched:
                value = rss_mb(pid)
                if value is not None:
                    peak[key] = max(peak.get(key, 0.0), value)
                    trough[key] = min(trough.get(key, float("inf")), value)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seen, last_io, last_t = 0, io_bytes(link) or 0, time.monotonic()
    while handle.process.poll() is None:
        time.sleep(1.0)
        done = read_rounds(out)
        if len(done) > seen:
            now_io, now_t = io_bytes(link) or 0, time.monotonic()
            for entry in done[seen:]:
                result["rounds"].append({
                    "round": entry["round"], "seconds": now_t - last_t,
                    "train_seconds": entry.get("train_seconds"),
                    "superlink_rss_mb": peak.get("superlink", float("nan")),
                    "supernode_rss_mb": {s: peak.get(s, float("nan")) for s in SITES},
                    "serverapp_rss_mb": peak.get("serverapp", float("nan")),
                    "superlink_low_mb": trough.get("superlink", float("nan")),
                    "supernode_low_mb": {s: trough.get(s, float("nan")) for s in SITES},
                    "serverapp_low_mb": trough.get("serverapp", float("nan")),
                    "superlink_io_gb": (now_io - last_io) / 1e9,
                })
                peak.clear()
                trough.clear()
                last_io, last_t = now_io, now_t
            seen = len(done)
            write(result)
    stop.set()
    final = fed.wait_run(handle, timeout=600)

recorded = [e["round"] for e in read_rounds(out)]
third, last = result["rounds"][2], result["rounds"][-1]
ratios = {s: last["supernode_rss_mb"][s] / third["supernode_rss_mb"][s] for s in SITES}
link_ratio = last["superlink_rss_mb"] / third["superlink_rss_mb"]


def trend(values: list[float]) -> float:
    """Least-squares slope (MB a round) over rounds 3 to the last."""
    import numpy as np

    y = np.asarray(values[2:], dtype=float)
    return float(np.polyfit(np.arange(len(y)), y, 1)[0]) if len(y) > 1 else float("nan")


series = {"superlink": [r["superlink_rss_mb"] for r in result["rounds"]],
          "superlink (low)": [r["superlink_low_mb"] for r in result["rounds"]],
          "serverapp": [r["serverapp_rss_mb"] for r in result["rounds"]],
          **{f"supernode {s}": [r["supernode_rss_mb"][s] for r in result["rounds"]]
             for s in SITES},
          **{f"supernode {s} (low)": [r["supernode_low_mb"][s] for r in result["rounds"]]
             for s in SITES}}
low_ratio = {k: v[-1] / v[2] for k, v in series.items() if "(low)" in k}
result["verdict"] = {
    "rounds_recorded": recorded, "rounds_ok": recorded == list(range(1, rounds + 1)),
    "superlink_ratio": link_ratio, "supernode_ratio": ratios,
    "flat": all(0.9 <= x <= 1.1 for x in [link_ratio, *ratios.values()]),
    "low_ratio": low_ratio,
    "low_flat": all(x <= 1.1 for x in low_ratio.values()),
    "slope_mb_per_round": {k: trend(v) for k, v in series.items()},
    "status": final.status,
}
write(result)
print(json.dumps(result["verdict"], indent=1))
