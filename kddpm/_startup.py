"""What runs before TensorFlow loads: the command line's quiet start.

``import kddpm`` imports TensorFlow (the package registers its Keras classes at import, so
that ``keras.models.load_model`` finds them). When the process is the ``kddpm`` command,
TensorFlow's start-up lines are hidden here, before that import, unless ``--verbose`` is
given; a library user's process is left as it is.
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


def quiet_tensorflow_import() -> None:
    """Imports TensorFlow with its C++ logs off and stderr hidden while it loads."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
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
