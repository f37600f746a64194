"""The ``fedbrats`` command line.

Each subcommand lives beside the code it drives and registers itself here through a
``register_*(subparsers)`` function that only declares arguments; heavy imports (torch, MONAI,
nibabel) happen inside the command, so ``fedbrats --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common.certs import register_certs
from common.evaluate import register_evaluate
from common.explain import register_explain
from common.predict import register_predict
from common.signing import register_keys
from common.verify import register_verify_data
from simulation.bench_quality import register_bench
from simulation.cli import register_snapshot, register_synth
from simulation.run import register_simulate

DESCRIPTION = """\
fedbrats: federated multi-population knowledge distillation for brain-tumour segmentation.

Hospitals serving different populations (adult glioma GLI, Sub-Saharan Africa SSA, paediatric PED,
meningioma MEN, metastases MET) each train an expert teacher locally and distil it, round by round,
into one shared student, without a scan leaving the site.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbrats",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_synth(sub)
    register_snapshot(sub)
    register_verify_data(sub)
    register_simulate(sub)
    register_predict(sub)
    register_explain(sub)
    register_evaluate(sub)
    register_certs(sub)
    register_keys(sub)
    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
