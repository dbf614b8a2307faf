"""A real SFTTrainer run with the InfluenceCallback, SIGKILLed inside one store call (crash-safety tests).

    python tests/train_kill_worker.py OUT METHOD STEP K [RESUME_FROM]

trains ``KILL_CONFIG`` (``helpers.make_trainer``) into ``OUT``, resuming from ``RESUME_FROM`` if given, and kills
itself at the K-th file operation inside ``InfluenceStore.METHOD`` for step ``STEP`` (see ``kill_harness``). If the
run ends without reaching it, it prints ``finished after N operations`` and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

KILL_CONFIG = {"save_steps": 5, "max_steps": 15, "n_train": 64}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import make_trainer, torch_threads
    from kill_harness import install

    out, method, step, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    harness = install(kill_at, "before", method, step, skip_fsync=True)
    with torch_threads(1):
        trainer, _ = make_trainer(out, **KILL_CONFIG)
        trainer.train(resume_from_checkpoint=resume)
    print(f"finished after {harness.count} operations")
