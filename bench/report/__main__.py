"""python -m bench.report RUN [RUN ...] [--out DIR]: merge runs into one report.

Like run_all.py: a user error is one line and exit code 2, a disk that cannot be written one line and
exit code 1, Ctrl-C one line and exit code 130, also while the heavy modules are still importing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m bench.report"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _interrupted() -> int:
    print(f"\n{PROG}: interrupted; the records are untouched, run the same command again", file=sys.stderr)
    return 130


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description="Merge run folders into one report (tables, figures, report.md).")
    parser.add_argument("runs", nargs="+", help="run folders (results/<run>) to merge")
    parser.add_argument("--out", help="output folder (default: the first run folder)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--no-pictures", action="store_true", help="skip the token-selection pictures")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or the one line above
        return stop.code or 0
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"{PROG}: error: --out {args.out!r} is a file; valid: a folder (existing or new)", file=sys.stderr)
        return 2
    try:
        from . import console_table, storage_message, write_report
        from .frame import ReportError  # pandas and the method registry: seconds
    except KeyboardInterrupt:
        return _interrupted()
    try:
        paths = write_report(args.runs, args.out, figures=not args.no_figures, pictures=not args.no_pictures)
        print(console_table(args.runs))
    except KeyboardInterrupt:
        return _interrupted()
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder's disk (full, read-only): one line, not a traceback
        print(f"{PROG}: error: {storage_message(exc, args.out or args.runs[0])}", file=sys.stderr)
        return 1
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
