"""``clustermesh datapath ...``: inspect or remove a node's socket-LB datapath.

Wire it into the main CLI with :func:`build_parser` on a sub-parser and
:func:`run` as its handler, or run ``python -m clustermesh.datapath``.
Neither subcommand needs bcc.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clustermesh.datapath import hooks
from clustermesh.datapath.dump import dump_main
from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.hooks import PIN_ROOT, pin_dir_for


def _where(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--node", help=f"node name: the pins are in {PIN_ROOT}/<node>")
    group.add_argument("--pin-dir", help="the bpffs directory holding the pins")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the datapath subcommands to ``parser`` (or a new one) and return it."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="clustermesh datapath", description=__doc__)
    sub = parser.add_subparsers(dest="datapath_command", required=True)
    dump = sub.add_parser("dump", help="show the service and backend maps of a node")
    _where(dump)
    dump.add_argument("--json", action="store_true", help="machine-readable output")
    destroy = sub.add_parser(
        "destroy",
        help="detach the programs from the node's cgroup and remove the pins "
        "(global services fall back to kube-proxy)",
    )
    _where(destroy)
    destroy.add_argument("--cgroup", required=True, help="the node's cgroup v2 directory")
    return parser


def _pin_dir(args: argparse.Namespace) -> str:
    return str(args.pin_dir) if args.pin_dir else str(pin_dir_for(args.node))


def run(args: argparse.Namespace) -> int:
    """Handle parsed arguments; returns the exit code."""
    try:
        if args.datapath_command == "dump":
            return dump_main(_pin_dir(args), as_json=args.json)
        detached = hooks.destroy(args.cgroup, _pin_dir(args))
    except DatapathError as exc:
        print(f"clustermesh datapath {args.datapath_command}: {exc}", file=sys.stderr)
        return 1
    print(f"detached: {', '.join(detached) or 'nothing'}; pins removed from {_pin_dir(args)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
