"""The ``kddpm`` command line: argument parsing, progress and printing only; one module per verb."""

from __future__ import annotations

import argparse
import sys
import traceback

from kddpm.cli import convert, edit, evaluate, export, info, sample, train
from kddpm.cli.common import verbose_flag

VERBS = (train, sample, edit, evaluate, export, convert, info)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from kddpm import _startup
    from kddpm.errors import KddpmError

    try:
        # The verb's own checks need no TensorFlow: bad arguments are answered at once.
        if getattr(args, "check", None):
            args.check(args)
        if not args.verbose:
            _startup.quiet_tensorflow_import(level="3")
            _startup.quiet_python_logs()
        return args.run(args) or 0
    except KddpmError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        hint = str(interrupt) or "files written so far are kept"
        print(f"\nInterrupted; {hint}", file=sys.stderr)
        return 130
    except Exception as error:  # the last line of defence: one sentence, not a traceback
        if args.verbose:
            traceback.print_exc()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: {type(error).__name__}: {first_line} (run again with --verbose for details)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    from kddpm import __version__

    parser = argparse.ArgumentParser(
        prog="kddpm",
        description="Train, sample, evaluate and export DDPM models (Ho et al. 2020) with Keras.",
        epilog="Each command's --help lists its options and examples; the guide is README.md, the reference docs/.",
    )
    parser.add_argument("--version", action="version", version=f"kddpm {__version__}")
    verbs = parser.add_subparsers(title="commands")
    common = verbose_flag()
    for verb in VERBS:
        verb.add_parser(verbs, common)
    return parser
