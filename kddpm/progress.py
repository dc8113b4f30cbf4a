"""Progress bars: Keras' Progbar, live on a terminal and a plain line per bar elsewhere (logs, pipes).

No TensorFlow at import: the command line reads ``fit_verbosity`` before loading it.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Whether output goes to a terminal or a notebook, where a live bar can redraw itself."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def progress_bar(target: int, unit_name: str = "step"):
    """A ``keras.utils.Progbar`` of ``target`` units: redrawn in place on a terminal, otherwise
    one plain line when it completes (no carriage returns or colour codes in a log file)."""
    import keras

    return keras.utils.Progbar(target, unit_name=unit_name, verbose=1 if interactive() else 2)


def fit_verbosity() -> int:
    """``model.fit``'s verbose for the same rule: 1 (a live bar) on a terminal, 2 (a line per epoch) otherwise."""
    return 1 if interactive() else 2
