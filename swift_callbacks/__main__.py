"""``python -m swift_callbacks ...`` is ``swift-study ...`` (e.g. under ``accelerate launch -m swift_callbacks``)."""

import sys

from .cli import main

sys.exit(main())
