"""The ``kddpm`` command line: argument parsing, progress and printing only; one module per verb."""

from __future__ import annotations

import argparse
import sys
import traceback

from kddpm.cli import convert, evaluate, export, sample, train
from kddpm.cli.common import verbose_flag

VERBS = (train, sample, evaluate, export, convert)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from kddpm import _startup
    from kddpm.errors import KddpmError

    if not args.verbose:
        _startup.quiet_python_logs()

    try:
        return args.run(args) or 0
    except KddpmError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted; files written so far are kept.", file=sys.stderr)
        return 130
    except Exception as error:  # the last line of defence: one sentence, not a traceback
        if args.verbose:
            traceback.print_exc()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: {type(error).__name__}: {first_line} (run again with --verbose for details)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kddpm", description="Train, sample, evaluate and export DDPM models (Ho et al. 2020) with Keras."
    )
    verbs = parser.add_subparsers(title="commands")
    common = verbose_flag()
    for verb in VERBS:
        verb.add_parser(verbs, common)
    return parser
