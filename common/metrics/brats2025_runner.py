"""Run the official BraTS 2025 scorer over a job that :mod:`fedbrats.common.metrics.brats2025`
wrote.

This file runs in the scorer's own Python environment (``brats-evaluation`` and its
``panoptica``), not fedbrats': it imports nothing of fedbrats and nothing beyond the standard
library and the official package. It scores each pair with the package's own functions
(``Panoptica_Evaluator.load_from_config(config_path(...))``, ``evaluate_single_exam``,
``parse_seg_results``) and writes their per-case rows as JSON:

    python brats2025_runner.py JOB.json OUT.json

``JOB.json``: ``{"config": "gli", "pairs": [{"case_id": ..., "pred": PATH, "ref": PATH}, ...]}``.
``OUT.json``: ``{"versions": {...}, "rows": {case_id: {column: value}}, "errors": {case_id: msg}}``.
"""

import contextlib
import csv
import io
import json
import math
import sys
from importlib.metadata import version


def _number(text):
    if text in ("", None):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def main(job_path: str, out_path: str) -> int:
    from brats_evaluation import config_path, evaluate_single_exam, parse_seg_results
    from panoptica import Panoptica_Evaluator

    with open(job_path) as f:
        job = json.load(f)
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path(job["config"])))
    results, errors = [], {}
    # the package prints a progress line (and a citation reminder) per case: kept off stdout
    with contextlib.redirect_stdout(io.StringIO()):
        for pair in job["pairs"]:
            r = evaluate_single_exam(pair["pred"], pair["ref"], pair["case_id"], evaluator)
            if "error" in r:
                errors[pair["case_id"]] = r["error"]
            else:
                results.append(r)
        raw = out_path + ".panoptica.json"
        table = out_path + ".panoptica.csv"
        with open(raw, "w") as f:
            json.dump({"metrics": results, "missings": []}, f)
        rows = {}
        if results:
            parse_seg_results(raw, table)
            with open(table, newline="") as f:
                for row in csv.DictReader(f):
                    if row["subject_id"] not in ("mean", "std", "median"):
                        rows[row["subject_id"]] = {
                            k: _number(v) for k, v in row.items() if k != "subject_id"
                        }
    out = {
        "versions": {p: version(p) for p in ("brats-evaluation", "panoptica")},
        "rows": rows,
        "errors": errors,
    }
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
