"""``python -m kddpm.cli``: the same as the ``kddpm`` command."""

import sys

from kddpm.cli import main

sys.exit(main())
