"""``python -m codegen SUBCOMMAND``: regenerate committed files, or check them.

Each subcommand registers its own parser and a ``run`` function; ``--check`` never
writes and exits 1 with one line per out-of-date file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from codegen import chart, manifests, stubs

REPO_ROOT = Path(__file__).resolve().parent.parent

Command = Callable[[argparse.Namespace], int]


def _stubs(args: argparse.Namespace) -> int:
    if args.check:
        return _report(stubs.check(REPO_ROOT))
    stubs.write(REPO_ROOT)
    return 0


def _manifests(args: argparse.Namespace) -> int:
    if args.check:
        return _report(manifests.check(REPO_ROOT))
    manifests.write(REPO_ROOT)
    return 0


def _chart(args: argparse.Namespace) -> int:
    if args.check:
        return _report(chart.check(REPO_ROOT))
    chart.write(REPO_ROOT)
    return 0


def _report(problems: list[str]) -> int:
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codegen", description="Regenerate or check generated files."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    stubs_parser = commands.add_parser(
        "stubs", help=f"Python gRPC stubs from {stubs.PROTO_ROOT}/ into {stubs.OUTPUT_ROOT}/"
    )
    stubs_parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing stale files"
    )
    stubs_parser.set_defaults(run=_stubs)

    manifests_parser = commands.add_parser(
        "manifests",
        help=f"Kubernetes manifests from {manifests.DEPLOYMENT} into {manifests.OUTPUT_ROOT}/",
    )
    manifests_parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing stale files"
    )
    manifests_parser.set_defaults(run=_manifests)

    chart_parser = commands.add_parser(
        "chart",
        help=f"the Helm chart from {manifests.DEPLOYMENT} and {manifests.TEMPLATE_ROOT}/ "
        f"into {chart.OUTPUT_ROOT}/",
    )
    chart_parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing stale files"
    )
    chart_parser.set_defaults(run=_chart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except stubs.CodegenError as error:
        for line in str(error).splitlines():
            print(f"codegen: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
