import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# tests/doubles (test doubles, kept out of the package) and scripts/ (the stand-in chat server and its arithmetic
# responder) are imported by the tests as top-level modules.
_TESTS = Path(__file__).resolve().parent
for _folder in (_TESTS, _TESTS.parent / "scripts"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from doubles import register_doubles  # noqa: E402

register_doubles()  # the backend "scripted" ("scripted:arithmetic" in model specs)
