"""The ``fedbrats`` command line: the dispatcher.

Each subcommand lives beside the code it drives, in whichever layer that is (``fedbrats
simulate`` in ``simulation/``, ``fedbrats predict`` in ``common/inference/``), and is declared
as an entry point of the group ``fedbrats.commands`` in pyproject.toml: a
``register_*(subparsers)`` function that only declares arguments. The dispatcher loads them by
name, so it imports no higher layer; heavy imports (torch, MONAI, nibabel) happen inside the
command, so ``fedbrats --help`` answers at once. To add a command: write its ``register_*``
function, add it to ``[project.entry-points."fedbrats.commands"]`` and to :data:`ORDER`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

COMMAND_GROUP = "fedbrats.commands"
ORDER = ("synth", "snapshot", "verify-data", "simulate", "predict", "explain", "evaluate",
         "certs", "keys", "bench")
"""The order of the commands in ``fedbrats --help``; others (plug-ins) follow by name."""

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
    commands = {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}
    if not commands:
        raise SystemExit(f"fedbrats: no commands registered in the entry-point group "
                         f"{COMMAND_GROUP!r}; install the project (pip install -e .)")
    rank = {name: i for i, name in enumerate(ORDER)}
    for name in sorted(commands, key=lambda n: (rank.get(n, len(ORDER)), n)):
        commands[name].load()(sub)
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
