"""Writes docs/cli.md: every kddpm command's --help, as the parser prints it.

    python tools/write_cli_reference.py          # rewrite docs/cli.md
    python tools/write_cli_reference.py --check  # exit 1 if docs/cli.md differs (the test suite runs this)

The page is generated, never edited by hand, so that it cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAGE = Path(__file__).parents[1] / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps help to $COLUMNS


def reference() -> str:
    os.environ["COLUMNS"] = WIDTH
    from kddpm.cli import _parser

    parser = _parser()
    verbs = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    parts = [
        "# Command-line reference\n\n"
        "Every `kddpm` command's `--help`, generated from the parser by `tools/write_cli_reference.py` (a test "
        "keeps this page current). The guide is the [README](../README.md); each command's topic page is linked "
        "from its description.\n\n"
        "```\n" + parser.format_help().rstrip() + "\n```\n"
    ]
    for name, subparser in verbs.choices.items():
        parts.append(f"\n## kddpm {name}\n\n```\n{subparser.format_help().rstrip()}\n```\n")
    return "".join(parts).replace("usage: kddpm", "kddpm")


def main() -> int:
    check = "--check" in sys.argv[1:]
    text = reference()
    if check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python tools/write_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"Wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
