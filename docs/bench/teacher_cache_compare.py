"""Paired student vs student_kept (teacher-cache) over the 3 seeds of docs/bench/quality-parts/f1.
Run: fedbrats bench quality --methods student_kept --seeds S --out OUT-S, then this script
(with the OUT-S folders in the path below)."""
import json
import statistics as st

R = ("WT", "TC", "ET"); rows = {}
for s in (0, 1, 2):
    a = json.load(open(f"docs/bench/quality-parts/f1/seed-{s}/student.json"))
    b = json.load(open(f"build/kept4/out-{s}/quality-parts/f1/seed-{s}/student_kept.json"))
    print("seed", s, "seconds", round(a["seconds"]), round(b["seconds"]))
    for p in a["scores"]:
        for r in R:
            rows.setdefault((p, r), []).append((a["scores"][p][r]["dice"], b["scores"][p][r]["dice"]))
def ms(x): return f"{st.mean(x):.3f} +/- {st.stdev(x):.3f}"
for r in R:
    means_a = [st.mean(rows[(p, r)][s][0] for p in ("GLI","SSA","PED","MEN","MET")) for s in range(3)]
    means_b = [st.mean(rows[(p, r)][s][1] for p in ("GLI","SSA","PED","MEN","MET")) for s in range(3)]
    print(r, "student", ms(means_a), "kept", ms(means_b), "paired diff", ms([b - a for a, b in zip(means_a, means_b)]))
for (p, r), v in rows.items():
    d = [b - a for a, b in v]
    print(p, r, f"{st.mean(a for a,_ in v):.3f} -> {st.mean(b for _,b in v):.3f}  diff {ms(d)}")
