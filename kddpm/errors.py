"""The one exception type kddpm raises for bad input; its message names the problem and the fix."""


class KddpmError(ValueError):
    """Bad input or a missing file: the message says what is wrong and how to fix it."""
