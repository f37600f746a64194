"""Paired student vs student_kept (teacher-cache) over the 3 seeds of docs/bench/quality-parts/f1.

Run ``fedbrats bench quality --methods student_kept --seeds S --out OUT-S`` for S = 0, 1, 2, then
``python docs/bench/teacher_cache_compare.py OUT`` (the OUT-S folders' common prefix).
"""

import json
import statistics as st
import sys

REGIONS, POPS = ("WT", "TC", "ET"), ("GLI", "SSA", "PED", "MEN", "MET")
out = sys.argv[1] if len(sys.argv) > 1 else "build/kept4/out"
rows: dict = {}
for s in (0, 1, 2):
    a = json.load(open(f"docs/bench/quality-parts/f1/seed-{s}/student.json"))
    b = json.load(open(f"{out}-{s}/quality-parts/f1/seed-{s}/student_kept.json"))
    print("seed", s, "seconds", round(a["seconds"]), round(b["seconds"]))
    for p in POPS:
        for r in REGIONS:
            pair = (a["scores"][p][r]["dice"], b["scores"][p][r]["dice"])
            rows.setdefault((p, r), []).append(pair)


def ms(x) -> str:
    return f"{st.mean(x):.3f} +/- {st.stdev(x):.3f}"


for r in REGIONS:
    base = [st.mean(rows[(p, r)][s][0] for p in POPS) for s in range(3)]
    kept = [st.mean(rows[(p, r)][s][1] for p in POPS) for s in range(3)]
    diff = [k - b for b, k in zip(base, kept)]
    print(r, "student", ms(base), "kept", ms(kept), "paired diff", ms(diff))
for (p, r), v in rows.items():
    d = [k - b for b, k in v]
    print(p, r, f"{st.mean(b for b, _ in v):.3f} -> {st.mean(k for _, k in v):.3f}  diff {ms(d)}")
