"""``fedbrats verify-data``: every data-contract check over a site's cases, as a table."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.data.cases import CaseReport, check_site, discover_cases
from fedbrats.common.data.labels import CONVENTIONS, DEFAULT_CONVENTION, add_labels_argument
from fedbrats.common.data.provenance import SYNTHETIC_MARK, marked_cases


def verify_site(
    site_dir: str | Path,
    manifest: str | Path | None = None,
    convention: str = DEFAULT_CONVENTION,
) -> list[CaseReport]:
    """Discover the site's cases and check each; raises ``DataError`` only for the folder."""
    return check_site(discover_cases(site_dir, manifest), convention)


def format_reports(reports: Sequence[CaseReport]) -> str:
    """A plain-text table: case, contrasts, shape, spacing, labels, background, source
    (``synthetic`` for a case with fedbrats' synthetic-data mark), status; below it the
    synthetic cases with their marks, the problems and the warnings."""
    rows = [("case", "contrasts", "shape", "spacing (mm)", "labels", "background", "source",
             "status")]
    for r in reports:
        contrasts = ",".join(c if c in r.contrasts else "-" for c in CONTRASTS)
        shape = "x".join(map(str, r.shape)) if r.shape else "?"
        spacing = "x".join(f"{s:g}" for s in r.spacing) if r.spacing else "?"
        labels = ",".join(map(str, r.label_values)) if r.label_values is not None else "-"
        status = "UNUSABLE" if not r.ok else ("ok, warning" if r.warnings else "ok")
        source = "synthetic" if r.synthetic else "-"
        rows.append((r.case_id, contrasts, shape, spacing, labels, r.background or "-", source,
                     status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    problems = [p for r in reports for p in r.problems]
    bad = sum(not r.ok for r in reports)
    missing = sum(bool(r.missing) for r in reports)
    lines.append("")
    lines.append(
        f"{len(reports)} cases: {len(reports) - bad} usable, {bad} unusable"
        + (f"; {missing} lack a contrast (zero-filled after normalisation)" if missing else "")
    )
    marked = marked_cases(reports)
    if marked:
        lines.append(f"{len(marked)} cases are synthetic: they carry the mark "
                     f"{SYNTHETIC_MARK!r} in their NIfTI headers (a site with data-kind 'real' "
                     "refuses them):")
        lines.extend(f"  - {cid}: {mark}" for cid, mark in marked)
    if problems:
        lines.append("problems:")
        lines.extend(f"  - {p}" for p in problems)
    warnings = [w for r in reports for w in r.warnings]
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warnings)
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from fedbrats.common.data.cases import DataError

    try:
        reports = verify_site(args.site_dir, args.manifest, args.labels)
    except DataError as e:
        print(f"error: {e}")
        return 2
    print(format_reports(reports))
    return 1 if any(not r.ok for r in reports) else 0


def register_verify_data(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-data",
        help="check every case of a site folder against the data contract",
        description=(
            "Discover the cases in SITE_DIR (BraTS 2023/2024 names, BraTS 2020/2021 names, or a "
            "manifest CSV), run every check of the data contract on each (readable, 3-D, same "
            "shape and affine for all files, finite, not empty, known label values) and print a "
            "table. Exits 1 when any case is unusable, 2 when the folder itself is unusable; "
            "never stops at the first bad case."
        ),
    )
    p.add_argument("site_dir", metavar="SITE_DIR", help="folder of cases, or a manifest .csv")
    p.add_argument(
        "--manifest",
        metavar="CSV",
        default=None,
        help="manifest CSV (case_id, t1n, t1c, t2w, t2f, seg[, population]) for other layouts",
    )
    add_labels_argument(p, of="the seg files")
    p.set_defaults(func=_run)
