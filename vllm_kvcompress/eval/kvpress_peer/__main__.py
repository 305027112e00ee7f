"""``python -m kvpress_peer``: see the package docstring."""

import sys

from .runner import main

sys.exit(main())
