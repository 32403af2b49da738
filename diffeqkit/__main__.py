"""`python -m diffeqkit info`: argument parsing only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffeqkit",
        description="diffeqkit: differentiable ODE solving on JAX, PyTorch and SciPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="installed backends, versions, devices and the support matrix"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead")
    args = parser.parse_args(argv)

    from ._info import format_report, info_report

    report = info_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
