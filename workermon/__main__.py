"""``python -m workermon`` is the ``workermon`` command."""

import sys

from ._cli import main

sys.exit(main())
