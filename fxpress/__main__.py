"""``python -m fxpress``: the command line (``fxpress.cli``)."""

import sys

from fxpress.cli import main

sys.exit(main())
