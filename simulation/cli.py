"""``fedbrats synth`` and ``fedbrats snapshot``: write phantom data sets and look at them.

Only argument declarations live at module level; numpy, nibabel and the generator are imported
inside the commands so that ``fedbrats --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from fedbrats.common.data.contract import POPULATION_NAMES, POPULATIONS
from fedbrats.simulation.runner import MIN_DEMO_CASES

MIN_SIZE = 32

SYNTH_DESCRIPTION = f"""\
Write a synthetic five-population brain-tumour data set in the BraTS 2023 layout:
OUT/<POP>/BraTS-<POP>-00000-000/BraTS-<POP>-00000-000-{{t1n,t1c,t2w,t2f,seg}}.nii.gz

Brains come from the MNI152 template bundled with nilearn, deformed per case; tumours follow
each population:
{chr(10).join(f"  {p}  {POPULATION_NAMES[p]}" for p in POPULATIONS)}

Case counts are imbalanced like BraTS 2023 (GLI most, SSA fewest, at least 2 each) unless
--balanced. The same --seed always gives the same cases.
"""

SNAPSHOT_DESCRIPTION = """\
Render one PNG per population folder of DATA_DIR (its first case): T1c and FLAIR through the
largest lesion in axial, coronal and sagittal views, radiological orientation, with the
segmentation outlined (NETC red, SNFH green, ET yellow). Files are named phantom-<POP>.png.
"""


def parse_shape(text: str) -> tuple[int, int, int]:
    """``96`` -> (96, 96, 96); ``240,240,155`` -> (240, 240, 155). Each axis >= 32."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be N or X,Y,Z integers, got {text!r}"
        ) from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"shape must be N or X,Y,Z, got {text!r}")
    if min(values) < MIN_SIZE:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is too small: every axis needs at least {MIN_SIZE} voxels"
        )
    return tuple(values)  # type: ignore[return-value]


def parse_populations(text: str) -> list[str]:
    """``GLI,ssa`` -> ["GLI", "SSA"]; ``all`` -> every population."""
    if text.strip().lower() == "all":
        return list(POPULATIONS)
    from fedbrats.common.data.contract import check_population

    try:
        pops = [check_population(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not pops:
        raise argparse.ArgumentTypeError("no population given")
    return list(dict.fromkeys(pops))


def register_synth(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic five-population BraTS-style data set",
        description=SYNTH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", metavar="DIR", default="data/phantoms",
        help="output folder; population folders are created inside (default: %(default)s)",
    )
    parser.add_argument(
        "--cases", metavar="N", type=int, default=16,
        help="cases of the largest population (GLI); the others get fewer, like BraTS 2023 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--balanced", action="store_true",
        help="give every population N cases instead of the BraTS-like imbalance",
    )
    parser.add_argument(
        "--populations", metavar="LIST", type=parse_populations, default=list(POPULATIONS),
        help=f"comma-separated populations to write, or 'all' (default: {','.join(POPULATIONS)})",
    )
    parser.add_argument(
        "--shape", metavar="N|X,Y,Z", type=parse_shape, default=(96, 96, 96),
        help="output grid: 96 (2 mm voxels), 128 (1.5 mm) or 240,240,155 (1 mm, BraTS); the "
        "voxel size is chosen so the head fits; each axis >= 32 (default: 96)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="random seed; each case depends only on (seed, population, index) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="do not print a line per written case",
    )
    parser.add_argument(
        "--min-cases", type=int, default=MIN_DEMO_CASES, metavar="N",
        help="at least N cases per population, so that every simulated site trains on 4 and "
        "validates on 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="skip the data-contract checks (fedbrats verify-data) run on the written cases",
    )
    parser.set_defaults(func=run_synth)
    return parser


def register_snapshot(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "snapshot",
        help="render a PNG of the first case of each population folder",
        description=SNAPSHOT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data_dir", metavar="DATA_DIR",
        help="data set folder holding GLI/, SSA/, PED/, MEN/, MET/ (as written by synth)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default="docs/img",
        help="folder for phantom-<POP>.png (default: %(default)s)",
    )
    parser.set_defaults(func=run_snapshot)
    return parser


def run_synth(args) -> int:
    import time
    from pathlib import Path

    from fedbrats.simulation.phantoms import case_counts, default_spacing, write_dataset

    if args.cases < 1:
        print("fedbrats synth: --cases must be at least 1", file=sys.stderr)
        return 2
    shape = args.shape if isinstance(args.shape, tuple) else parse_shape(str(args.shape))
    counts = {p: max(n, args.min_cases)
              for p, n in case_counts(args.cases, balanced=args.balanced).items()}
    counts = {p: n for p, n in counts.items() if p in args.populations}
    start = time.perf_counter()
    dirs = write_dataset(Path(args.out), counts, shape=shape, seed=args.seed,
                         progress=args.progress)
    elapsed = time.perf_counter() - start
    spacing = default_spacing(shape)
    print(f"wrote {len(dirs)} cases to {args.out} in {elapsed:.1f} s")
    print(f"grid {shape[0]}x{shape[1]}x{shape[2]} at {spacing[0]:g} mm, seed {args.seed}")
    for pop, n in counts.items():
        print(f"  {pop}  {n:4d}  {POPULATION_NAMES[pop]}")
    if not args.verify:
        return 0
    # The same discovery and checks as a real site's BraTS folder goes through.
    from fedbrats.common.data.verify import format_reports, verify_site

    bad = []
    for pop in counts:
        reports = verify_site(Path(args.out) / pop)
        bad += [r for r in reports if not r.ok]
    if bad:
        print(format_reports(bad))
        return 1
    print(f"data-contract checks: all {len(dirs)} cases usable (fedbrats verify-data DIR/POP)")
    return 0


def run_snapshot(args) -> int:
    from pathlib import Path

    from fedbrats.common.inference.render import render_dataset

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"fedbrats snapshot: no such folder {data_dir}", file=sys.stderr)
        return 2
    try:
        written = render_dataset(data_dir, Path(args.out))
    except FileNotFoundError as exc:
        print(f"fedbrats snapshot: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
