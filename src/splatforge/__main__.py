"""``python -m splatforge``: the ``splatforge`` command (what ``torchrun -m splatforge train``
runs in every process)."""

import sys

from splatforge.cli import main

sys.exit(main())
