"""``python -m wksd``: the same as the ``wksd`` console script."""

import sys

from .cli import main

sys.exit(main())
