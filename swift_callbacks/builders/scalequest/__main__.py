"""``python -m swift_callbacks.builders.scalequest COMMAND ...``: the ``swift-study scalequest`` commands."""

import sys

from .cli import main

sys.exit(main())
