"""``python -m splatforge.cli``: the ``splatforge`` command."""

import sys

from splatforge.cli import main

sys.exit(main())
