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

    .venv/bin/python docs/bench/soak_large_student.py WORK_DIR [ROUNDS]

Writes ``docs/bench/soak.md`` and ``docs/bench/soak.json``. About 30 minutes on 2 cores.
"""

import json
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
here = Path("docs/bench")
command = "python docs/bench/soak_large_student.py WORK " + str(rounds)
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
    (here / "soak.json").write_text(json.dumps(result, indent=1, default=float))
    per_round = result["rounds"]
    lines = ["# A 117 MB student over TLS, five SuperNodes, round after round", "",
             *machine_markdown(result["machine"], command,
                               time.perf_counter() - started), "",
             f"Student `{STUDENT}`: {params:,} parameters, {float32_mb:.1f} MB in float32; each "
             f"round sends it to 5 sites and gets 5 updates back (about "
             f"{10 * float32_mb / 1000:.2f} GB of arrays a round). Tiny phantoms (3 cases a "
             "site at 48^3), preset `tiny`, `local-steps` 1, evaluated in the last round only; "
             "the rehearsal's TLS and node authentication. Resident memory is the largest seen "
             "in the round (sampled every 0.5 s) of each process itself (its ClientApps not "
             "counted); bytes are what the SuperLink process read and wrote (rchar + wchar).",
             "", "| round | seconds | SuperLink RSS MB | SuperNodes RSS MB (GLI SSA PED MEN MET) "
             "| SuperLink I/O GB |", "|---:|---:|---:|:---|---:|"]
    for r in per_round:
        nodes = " ".join(f"{r['supernode_rss_mb'].get(s, float('nan')):.0f}" for s in SITES)
        lines.append(f"| {r['round']} | {r['seconds']:.1f} | {r['superlink_rss_mb']:.0f} | "
                     f"{nodes} | {r['superlink_io_gb']:.2f} |")
    if "verdict" in result:
        v = result["verdict"]
        lines += ["", f"Rounds recorded: {v['rounds_recorded']} (expected 1..{rounds}, each "
                  f"once: **{v['rounds_ok']}**). Memory, last round against the third: "
                  f"SuperLink {v['superlink_ratio']:.3f}, SuperNodes "
                  + ", ".join(f"{s} {x:.3f}" for s, x in v["supernode_ratio"].items())
                  + f" (flat within 10 %: **{v['flat']}**). Run status: {v['status']}."]
    lines += ["", "Raw numbers: [`soak.json`](soak.json).", ""]
    (here / "soak.md").write_text("\n".join(lines))


data = work / "data"
if not (data / "MET").exists():
    write_dataset(data, {s: 3 for s in SITES}, shape=(48, 48, 48), seed=3, progress=False)
fed_dir, out = work / "federation", work / "federation" / "run"
result: dict = {"command": command, "machine": machine, "student": STUDENT,
                "parameters": params, "float32_mb": float32_mb, "rounds": []}
with LocalFederation(fed_dir, {s: data / s for s in SITES},
                     env={"OMP_NUM_THREADS": "1"}) as fed:
    handle = fed.start_run({"preset": "tiny", "num-sites": 5, "output-dir": str(out),
                            "student-model": STUDENT, "num-rounds": rounds, "local-steps": 1,
                            "eval-every": rounds})
    link = fed.procs["superlink"].pid
    nodes = {s: fed.procs[f"supernode-{s}"].pid for s in SITES}
    peak: dict = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for key, pid in [("superlink", link), *nodes.items()]:
                value = rss_mb(pid)
                if value is not None:
                    peak[key] = max(peak.get(key, 0.0), value)
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
                    "superlink_io_gb": (now_io - last_io) / 1e9,
                })
                peak.clear()
                last_io, last_t = now_io, now_t
            seen = len(done)
            write(result)
    stop.set()
    final = fed.wait_run(handle, timeout=600)

recorded = [e["round"] for e in read_rounds(out)]
third, last = result["rounds"][2], result["rounds"][-1]
ratios = {s: last["supernode_rss_mb"][s] / third["supernode_rss_mb"][s] for s in SITES}
link_ratio = last["superlink_rss_mb"] / third["superlink_rss_mb"]
result["verdict"] = {
    "rounds_recorded": recorded, "rounds_ok": recorded == list(range(1, rounds + 1)),
    "superlink_ratio": link_ratio, "supernode_ratio": ratios,
    "flat": all(0.9 <= x <= 1.1 for x in [link_ratio, *ratios.values()]),
    "status": final.status,
}
write(result)
print(json.dumps(result["verdict"], indent=1))
