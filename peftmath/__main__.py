"""``python -m peftmath ...``: the ``peftmath`` command (:func:`peftmath.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
