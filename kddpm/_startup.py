"""What runs before TensorFlow loads: a quiet start for library users and the command line.

``import kddpm`` imports TensorFlow (the package registers its Keras classes at import, so
that ``keras.models.load_model`` finds them), with its start-up lines hidden. The ``kddpm``
command imports the package without TensorFlow (so that ``--help`` is instant) and loads it
quietly before running a verb, unless ``--verbose`` is given.
"""

from __future__ import annotations

import os
import sys

_COMMAND_MODULES = ("kddpm", "kddpm.cli")


def invoked_as_command_line() -> bool:
    """Whether this process is ``kddpm ...`` or ``python -m kddpm[.cli] ...``."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if sys.argv and os.path.basename(sys.argv[0]) in ("kddpm", "kddpm.exe"):
        return True
    return any(argv[i] == "-m" and argv[i + 1] in _COMMAND_MODULES for i in range(len(argv) - 1))


def verbose_requested() -> bool:
    return "--verbose" in sys.argv[1:] or "--verbose" in getattr(sys, "orig_argv", [])


def quiet_tensorflow_import(level: str = "3") -> None:
    """Imports TensorFlow with its C++ logs below ``level`` off (3: all, 2: all but errors) and
    stderr hidden while it loads. A TF_CPP_MIN_LOG_LEVEL the user set wins; below 2 nothing
    is hidden."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", level)
    if "tensorflow" in sys.modules:
        return
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("2", "3"):
        import tensorflow

        return
    # Some native start-up lines ignore TF_CPP_MIN_LOG_LEVEL: hide stderr while TF loads.
    devnull, saved = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_python_logs() -> None:
    """TensorFlow's, absl's and tf2onnx's Python loggers to errors only; warnings off."""
    import logging
    import warnings

    import absl.logging
    import tensorflow as tf

    warnings.filterwarnings("ignore")
    tf.get_logger().setLevel(logging.ERROR)
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
