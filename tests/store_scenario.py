"""A history's life at the store level, phase by phase, with the state each phase leaves (crash-safety tests).

``python tests/store_scenario.py BASE MODE K...`` plays it once per K, SIGKILLed at the K-th store operation (see
``main``). Each phase appends ``start <i>`` to ``OUT/progress`` before it runs, so the test knows which phase a
kill interrupted.

Branch A writes steps 5-20 with checkpoints 10 and 15, the run is resumed from checkpoint-10 and branch B writes
15 (re-saving checkpoint-15) and 20. A step's ``relinf`` is ``step + branch`` (A = 0, B = 0.5), so a file tells
which branch wrote it.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pandas as pd

A, B = 0.0, 0.5
METRICS = {"m": {"study": "s", "probe_set": "p", "eval_set": "e", "context": "in"}}


def frame(step: int, branch: float) -> pd.DataFrame:
    return pd.DataFrame({
        "step": [step] * 2, "probe_set": "p", "probe_id": ["a", "b"], "probe_task": "t", "eval_set": "e",
        "eval_id": ["x", "x"], "eval_task": "t", "paired": [True, False], "dot": [1.0, 2.0], "eval_sq_norm": 1.0,
        "relinf": [step + branch] * 2, "probe_sq_norm": 1.0, "cosine": 0.5, "probe_tokens": 3, "eval_tokens": 3,
        "probe_loss": 1.0, "eval_loss": 1.0,
    })  # fmt: skip


def branch_of(pairs: pd.DataFrame) -> dict[int, float]:
    """``{step: branch}`` of a pairs table."""
    return {int(s): float(g.relinf.iloc[0]) - int(s) for s, g in pairs.groupby("step")}


def _ckpt(out: Path, step: int) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(exist_ok=True)
    return path


# (name, action(store, out), effect on the model {"live": {step: branch}, "failures": [steps], 10: side, 15: side})
PHASES = [
    ("lock", lambda st, out: (st.acquire_lock(), st.open_for_writing()), lambda m: None),
    ("metrics", lambda st, out: st.write_metrics(METRICS), lambda m: None),
    ("write 5A", lambda st, out: st.write_step(5, frame(5, A)), lambda m: m["live"].update({5: A})),
    ("write 10A", lambda st, out: st.write_step(10, frame(10, A)), lambda m: m["live"].update({10: A})),
    ("snapshot 10", lambda st, out: st.snapshot(_ckpt(out, 10), 10),
     lambda m: m.update({10: {"steps": dict(m["live"]), "failures": list(m["failures"])}})),
    ("failure 12", lambda st, out: st.record_failure({"step": 12, "kind": "eval_norm"}),
     lambda m: m["failures"].append(12)),
    ("write 15A", lambda st, out: st.write_step(15, frame(15, A)), lambda m: m["live"].update({15: A})),
    ("snapshot 15", lambda st, out: st.snapshot(_ckpt(out, 15), 15),
     lambda m: m.update({15: {"steps": dict(m["live"]), "failures": list(m["failures"])}})),
    ("write 20A", lambda st, out: st.write_step(20, frame(20, A)), lambda m: m["live"].update({20: A})),
    ("resume 10", lambda st, out: st.resume(out / "checkpoint-10", 10),
     lambda m: m.update({"live": dict(m[10]["steps"]), "failures": list(m[10]["failures"])})),
    ("write 15B", lambda st, out: st.write_step(15, frame(15, B)), lambda m: m["live"].update({15: B})),
    ("discard 15", lambda st, out: st.discard_sidecar(out / "checkpoint-15"), lambda m: m.update({15: None})),
    ("snapshot 15B", lambda st, out: st.snapshot(_ckpt(out, 15), 15),
     lambda m: m.update({15: {"steps": dict(m["live"]), "failures": list(m["failures"])}})),
    ("failure 15", lambda st, out: st.record_failure({"step": 15, "kind": "write_step"}),
     lambda m: m["failures"].append(15)),
    ("write 20B", lambda st, out: st.write_step(20, frame(20, B)), lambda m: m["live"].update({20: B})),
    ("unlock", lambda st, out: st.release_lock(), lambda m: None),
]  # fmt: skip


def states() -> list[dict]:
    """``states()[i]``: the model before phase i (the last one: after every phase)."""
    model = {"live": {}, "failures": [], 10: None, 15: None}
    out = [copy.deepcopy(model)]
    for _, _, effect in PHASES:
        effect(model)
        out.append(copy.deepcopy(model))
    return out


def run(out: Path) -> None:
    from swift_callbacks.store import InfluenceStore

    st = InfluenceStore(out)
    fd = os.open(out / "progress", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for i, (_, action, _) in enumerate(PHASES):
        os.write(fd, f"start {i}\n".encode())
        action(st, out)
    os.write(fd, b"done\n")
    os.close(fd)


def main(argv: list[str]) -> None:
    """``BASE MODE K...``: play the scenario once per K in ``BASE/<MODE>-<K>``, each in a forked child killed at
    its K-th store operation (the parent imports once; children start in milliseconds). Each folder gets
    ``status`` (the child's wait status: SIGKILL or a normal exit) and, for K = 0, ``count`` (operations in all)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kill_harness import install

    import swift_callbacks.store  # noqa: F401  (imported before forking)

    base, mode = Path(argv[0]), argv[1]
    for kill_at in (int(k) for k in argv[2:]):
        out = base / f"{mode}-{kill_at}"
        out.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                harness = install(kill_at, mode, skip_fsync=True)
                run(out)
                (out / "count").write_text(str(harness.count))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        (out / "status").write_text(str(status))


if __name__ == "__main__":
    main(sys.argv[1:])
