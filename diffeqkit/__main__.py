"""`python -m diffeqkit info|compare`: argument parsing only.

The command lives in `diffeqkit.tools.cli`, the report in `diffeqkit._info`.
Exit codes: 0 done (rows that are unsupported or failed are part of the
output); 2 a bad command line (unknown problem, backend or sensealg name, a bad
number, ``compare`` without rich, ``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from . import backends, problems
    from .tools.compare import DEFAULT_PROBLEM, SENSEALG_NAMES
    from .tools.sweep import DEFAULT_BUDGET_S, SWEEP_WIDTHS

    parser = argparse.ArgumentParser(
        prog="python -m diffeqkit",
        description="diffeqkit: differentiable ODE solving on JAX, PyTorch and SciPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="installed backends, versions, devices and the support matrix"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead")
    cmp = sub.add_parser(
        "compare",
        help="time and check every installed backend x gradient method",
        description="Time the forward solve and the gradient of every installed "
        "backend x sensealg on a built-in problem, and check each gradient "
        "against a tight-tolerance reference. Columns: docs/compare.md.",
    )
    cmp.add_argument(
        "--problem",
        choices=problems.names(),
        metavar="NAME",
        help=f"a built-in problem: {', '.join(problems.names())} "
        f"(default {DEFAULT_PROBLEM}; not with --sweep)",
    )
    cmp.add_argument(
        "--backends",
        nargs="+",
        choices=[*backends.SPECS, *backends.ALIASES],
        metavar="NAME",
        help=f"backends to compare: {', '.join(backends.SPECS)} "
        "(default: every installed one)",
    )
    cmp.add_argument(
        "--sensealgs",
        nargs="+",
        choices=SENSEALG_NAMES,
        metavar="NAME",
        help=f"gradient methods: {', '.join(SENSEALG_NAMES)} (default: all)",
    )
    cmp.add_argument("--alg", default="tsit5", help="the solver (default tsit5)")
    cmp.add_argument(
        "--rtol", type=float, help="relative tolerance (default: the problem's)"
    )
    cmp.add_argument(
        "--atol", type=float, help="absolute tolerance (default: the problem's)"
    )
    cmp.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed rounds after the warm-up (default 3)",
    )
    cmp.add_argument("--json", metavar="FILE", help="write the report as JSON")
    cmp.add_argument("--plot", metavar="FILE", help="save a figure (matplotlib)")
    cmp.add_argument("--device", help="cpu, cuda, cuda:N (default: each default)")
    cmp.add_argument(
        "--quiet", action="store_true", help="no progress bar (tables still print)"
    )
    cmp.add_argument(
        "--no-count",
        action="store_true",
        help="skip counting the evaluations of f in each gradient's forward and "
        "backward pass (an extra call per row; on JAX a compilation each)",
    )
    cmp.add_argument(
        "--sweep",
        action="store_true",
        help="instead of one problem, time every method on neural ODEs of growing "
        "width (about 10 to 10^4 parameters) and report where forward mode stops "
        "winning",
    )
    cmp.add_argument(
        "--widths",
        nargs="+",
        type=int,
        metavar="W",
        help="with --sweep: hidden widths (default "
        f"{' '.join(map(str, SWEEP_WIDTHS))})",
    )
    cmp.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="SECONDS",
        help="with --sweep: a method slower than this per gradient is not run at "
        f"larger widths (default {DEFAULT_BUDGET_S:g})",
    )
    args = parser.parse_args(argv)

    if args.command == "info":
        from ._info import format_report, info_report

        report = info_report()
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    return _compare(cmp, args)


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._errors import DiffEqKitError
    from .tools.cli import run_compare

    if args.sweep and args.problem is not None:
        parser.error(
            "--sweep measures the neural ODE at several widths; drop --problem."
        )
    if not args.sweep and args.widths is not None:
        parser.error("--widths goes with --sweep.")
    try:
        run_compare(
            problem=args.problem,
            as_sweep=args.sweep,
            widths=args.widths,
            budget_s=args.budget,
            backends=args.backends,
            sensealgs=args.sensealgs,
            alg=args.alg,
            rtol=args.rtol,
            atol=args.atol,
            repeat=args.repeat,
            device=args.device,
            count=not args.no_count,
            quiet=args.quiet,
            json_path=args.json,
            plot_path=args.plot,
        )
    except DiffEqKitError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
