"""``python -m recloop.cli``: the ``recloop`` command."""

import sys

from recloop.cli import main

sys.exit(main())
