"""python -m bench.report RUN [RUN ...] [--out DIR]: merge runs into one report."""
from __future__ import annotations

import argparse
import sys

from . import ReportError, console_table, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Merge run folders into one report (tables, figures, report.md).")
    parser.add_argument("runs", nargs="+", help="run folders (results/<run>) to merge")
    parser.add_argument("--out", help="output folder (default: the first run folder)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--no-pictures", action="store_true", help="skip the token-selection pictures")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.runs, args.out, figures=not args.no_figures, pictures=not args.no_pictures)
        print(console_table(args.runs))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
