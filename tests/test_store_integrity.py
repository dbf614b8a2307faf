"""The history store: crash safety (SIGKILL at every file operation), damage detection, lineage, lock, readers.

Everything here runs on real files; crashes are real ``SIGKILL``s of forked children (``store_scenario.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from store_scenario import METRICS, PHASES, A, B, branch_of, frame, states

from swift_callbacks import store as store_mod
from swift_callbacks.store import (
    FAILURES,
    LOCK,
    MANIFEST,
    STORE_DIR,
    HistoryError,
    HistoryLockedError,
    InfluenceStore,
    StepExistsError,
    list_steps,
    load_failures,
    load_metric_specs,
    load_metrics,
    load_pairs,
    load_scores,
    scores_from_pairs,
    step_path,
    store_dir,
)

SCENARIO = Path(__file__).with_name("store_scenario.py")
HERE = Path(__file__).resolve().parent


def history(out: Path, steps: dict[int, float], checkpoint: int | None = None) -> InfluenceStore:
    """A history with ``{step: branch}`` written through the store, and a sidecar at ``checkpoint``."""
    st = InfluenceStore(out)
    st.write_metrics(METRICS)
    for step, branch in steps.items():
        st.write_step(step, frame(step, branch))
    if checkpoint is not None:
        (out / f"checkpoint-{checkpoint}").mkdir(parents=True, exist_ok=True)
        st.snapshot(out / f"checkpoint-{checkpoint}", checkpoint)
    return st


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".swift-" in p.name]


# ---------------------------------------------------------------------------------- crash at every operation


def sidecar_state(out: Path, step: int):
    side = out / f"checkpoint-{step}" / STORE_DIR
    if not side.exists():
        return None
    view = store_mod._sidecar_view(side, step)  # verifies every file
    assert view is not None, f"{side} exists but is empty"
    failures = store_mod._failure_lines(view.read(FAILURES), side) if FAILURES in view.files else []
    steps = {s: float(view.frame(s).relinf.iloc[0]) - s for s in view.steps()}
    return {"steps": steps, "failures": [r["step"] for r in failures]}


def visible(out: Path) -> dict:
    """What readers see after the crash: the live history and the sidecars (every file verified)."""
    pairs = load_pairs(out, empty_ok=True)
    live = branch_of(pairs)
    assert list_steps(store_dir(out)) == sorted(live)
    return {
        "live": live,
        "failures": list(load_failures(out).step),
        10: sidecar_state(out, 10),
        15: sidecar_state(out, 15),
        "metrics": load_metric_specs(out),
    }


def every_file_content(out: Path) -> set[tuple[int, float]]:
    root = store_dir(out)
    found = set()
    for path in [*(root / "pairs").glob("step-*.parquet"), *(root / "superseded").rglob("step-*.parquet")]:
        found |= set(branch_of(pd.read_parquet(path)).items())
    return found


def recover(out: Path) -> None:
    """What the next training does: take the lock, resume from checkpoint-10, train branch B to 20."""
    st = InfluenceStore(out)
    st.acquire_lock()
    st.open_for_writing()
    ckpt10 = out / "checkpoint-10"
    st.resume(ckpt10 if (ckpt10 / STORE_DIR).exists() else None, 10)
    if 10 not in st.steps():  # the callback records a resumed step the history lacks
        st.write_step(10, frame(10, A))
    st.discard_sidecar(out / "checkpoint-15")
    st.write_step(15, frame(15, B))
    (out / "checkpoint-15").mkdir(exist_ok=True)
    st.snapshot(out / "checkpoint-15", 15)
    st.write_step(20, frame(20, B))
    st.release_lock()


def check_crash(out: Path, model: list[dict], caplog) -> None:
    status = int((out / "status").read_text())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    phase = int((out / "progress").read_text().split()[-1])
    before, after = model[phase], model[phase + 1]
    seen = visible(out)
    # Live steps and failures change together (a resume changes both): all of one state or all of the other.
    assert (seen["live"], seen["failures"]) in [(s["live"], s["failures"]) for s in (before, after)], seen
    for step in (10, 15):
        assert seen[step] in (before[step], after[step]), (step, seen[step])
    assert seen["metrics"] in ({}, METRICS)
    lock = json.loads((store_dir(out) / LOCK).read_text()) if (store_dir(out) / LOCK).exists() else None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.store"):
        recover(out)
    if lock is not None:
        assert f"process {lock['pid']} is gone" in caplog.text
    expected = {10: A, 15: B, 20: B} | ({5: A} if 5 in seen["live"] else {})
    assert branch_of(load_pairs(out)) == expected
    assert load_failures(out).empty  # the failures of steps after 10 went with their branch
    assert sidecar_state(out, 15) == {"steps": {s: b for s, b in expected.items() if s <= 15}, "failures": []}
    assert set(seen["live"].items()) <= every_file_content(out), "a step file was deleted"
    assert not temp_files(out), temp_files(out)
    assert not (store_dir(out) / LOCK).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["before", "torn"])
def test_sigkill_at_every_store_operation(tmp_path, mode, caplog, monkeypatch):
    """Killed before each file operation (or halfway through each file write), readers see the state before or
    after the interrupted change (never part of it, never a damaged file), and the next run ends right.

    fsync is skipped here (in the killed children and in the recoveries): a SIGKILL loses no data the kernel
    holds, so it changes no state a kill can leave, and hundreds of runs would otherwise wait on the disk.
    """
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    encoded: dict[tuple, bytes] = {}
    to_bytes = store_mod._parquet_bytes

    def cached(pairs):  # the recoveries write the same few frames hundreds of times
        key = (int(pairs.step.iloc[0]), float(pairs.relinf.iloc[0]))
        return encoded[key] if key in encoded else encoded.setdefault(key, to_bytes(pairs))

    monkeypatch.setattr(store_mod, "_parquet_bytes", cached)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def play(*ks: int) -> None:
        subprocess.run([sys.executable, SCENARIO, tmp_path, mode, *map(str, ks)], check=True, env=env, cwd=HERE)

    play(0)
    total = int((tmp_path / f"{mode}-0" / "count").read_text())
    assert total > (150 if mode == "before" else 40)
    done = tmp_path / f"{mode}-0"
    assert branch_of(load_pairs(done)) == {5: A, 10: A, 15: B, 20: B}
    assert (done / "progress").read_text().endswith("done\n")
    play(*range(1, total + 1))
    model = states()
    phases_hit = set()
    for k in range(1, total + 1):
        out = tmp_path / f"{mode}-{k}"
        phases_hit.add(int((out / "progress").read_text().split()[-1]))
        try:
            check_crash(out, model, caplog)
        except (AssertionError, HistoryError) as err:
            phase = PHASES[int((out / "progress").read_text().split()[-1])][0]
            raise AssertionError(f"killed at operation {k} ({mode}) during {phase!r}: {err}") from err
    without_writes = {i for i, (name, _, _) in enumerate(PHASES) if name in ("discard 15", "unlock")}
    assert phases_hit == set(range(len(PHASES))) - (without_writes if mode == "torn" else set())


# ---------------------------------------------------------------------------------------- damage detection


def test_readers_name_a_missing_or_empty_folder(tmp_path):
    missing = tmp_path / "no-such-run"
    for load in (load_pairs, load_scores, load_metrics, load_failures):
        with pytest.raises(HistoryError, match=rf"{missing}.*does not exist"):
            load(missing)
    with pytest.raises(HistoryError, match=rf"{missing}.*does not exist"):
        load_pairs(missing, empty_ok=True)
    for load in (load_pairs, load_scores, load_metrics):
        with pytest.raises(HistoryError, match=rf"No influence history under {tmp_path}"):
            load(tmp_path)
        assert load(tmp_path, empty_ok=True).empty
    history(tmp_path / "run", {})  # metrics.json, no step yet
    with pytest.raises(HistoryError, match="holds no recorded step"):
        load_pairs(tmp_path / "run")
    with pytest.raises(HistoryError, match="pass its parent"):
        load_pairs(tmp_path / "run" / STORE_DIR)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (truncate, r"has \d+ bytes where \d+ were written \(cut short\)"),
        (flip_byte, "does not match its sha256 checksum"),
        (Path.unlink, "is missing"),
    ],
)
def test_damaged_step_file_raises_naming_it(tmp_path, damage, match):
    history(tmp_path, {5: A, 10: A})
    path = step_path(store_dir(tmp_path), 10)
    damage(path)
    for load in (load_pairs, load_scores, load_metrics):
        with pytest.raises(HistoryError, match=rf"{path}.*{match}"):
            load(tmp_path)


def test_unlisted_and_unreadable_step_files_raise_naming_them(tmp_path):
    st = history(tmp_path, {5: A})
    stray = step_path(st.root, 7)
    stray.write_bytes(step_path(st.root, 5).read_bytes())
    with pytest.raises(HistoryError, match=rf"{stray} is not in {st.root / MANIFEST}"):
        load_pairs(tmp_path)
    stray.unlink()
    # Listed with a right checksum, but not Parquet (written through the store's own commit path).
    st._commit_staged("test", [st._stage("pairs/step-000000008.parquet", b"not a parquet file")])
    with pytest.raises(HistoryError, match=rf"{step_path(st.root, 8)} is not a readable Parquet file"):
        load_pairs(tmp_path)
    st.quarantine(8)
    assert sorted(load_pairs(tmp_path).step.unique()) == [5]
    assert list((st.root / "superseded").glob("quarantined-*/step-000000008.parquet"))


def test_unlisted_metrics_and_failures_raise_naming_them(tmp_path):
    st = InfluenceStore(tmp_path)
    st.write_step(5, frame(5, A))
    for name, text in (("metrics.json", "{}"), ("failures.jsonl", '{"step": 5}\n')):
        path = st.root / name
        path.write_text(text)  # not written by the store: not in its manifest
        with pytest.raises(HistoryError, match=rf"{path} is not in {st.root / MANIFEST}"):
            load_pairs(tmp_path)
        path.unlink()
    assert sorted(load_pairs(tmp_path).step.unique()) == [5]


def test_a_file_or_folder_in_the_wrong_place_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / STORE_DIR).write_text("not a folder")
    for load in (load_pairs, load_scores, load_metrics, load_failures):
        with pytest.raises(HistoryError, match=rf"{run / STORE_DIR} is a file"):
            load(run)
    st = history(tmp_path / "other", {5: A})
    path = step_path(st.root, 5)
    path.unlink()
    path.mkdir()
    with pytest.raises(HistoryError, match=rf"{path} cannot be read"):
        load_pairs(tmp_path / "other")
    (st.root / MANIFEST).rename(st.root / "m")
    (st.root / MANIFEST).mkdir()
    with pytest.raises(HistoryError, match=rf"{st.root / MANIFEST} cannot be read"):
        load_pairs(tmp_path / "other")


def test_damaged_manifest_and_metrics_raise_naming_them(tmp_path):
    st = history(tmp_path, {5: A})
    metrics = st.root / "metrics.json"
    flip_byte(metrics, 5)
    with pytest.raises(HistoryError, match=rf"{metrics}.*sha256"):
        load_metrics(tmp_path)
    st.write_metrics(METRICS)  # rewritten through the store: fine again
    assert set(load_metrics(tmp_path).metric) == {"m"}
    manifest = st.root / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace('"size": ', '"size": 1', 1))
    with pytest.raises(HistoryError, match=rf"{manifest} does not match its own checksum"):
        load_pairs(tmp_path)
    manifest.write_text(text[:-20])
    with pytest.raises(HistoryError, match=rf"{manifest} is not readable JSON"):
        load_pairs(tmp_path)
    manifest.unlink()
    with pytest.raises(HistoryError, match=r"not listed in any manifest.*adopt\(\)"):
        load_pairs(tmp_path)
    assert st.adopt() == ["pairs/step-000000005.parquet", "metrics.json"]
    assert sorted(load_pairs(tmp_path).step.unique()) == [5]


SIDE = f"checkpoint-10/{STORE_DIR}"


@pytest.mark.parametrize(
    ("damage", "names", "match"),
    [
        (lambda side: truncate(step_path(side, 5)), "pairs/step-000000005.parquet", "cut short"),
        (lambda side: flip_byte(step_path(side, 10)), "pairs/step-000000010.parquet", "sha256"),
        (lambda side: step_path(side, 5).unlink(), "pairs/step-000000005.parquet", "is missing"),
        (lambda side: flip_byte(side / "metrics.json"), "metrics.json", "sha256"),
        (lambda side: (side / MANIFEST).unlink(), MANIFEST, "is missing"),
        (lambda side: (side / MANIFEST).write_text("{"), MANIFEST, "not readable JSON"),
        (lambda side: flip_byte(side / MANIFEST, 40), MANIFEST, "(?:checksum|JSON)"),
        (lambda side: step_path(side, 7).write_bytes(step_path(side, 5).read_bytes()), "pairs/step-000000007.parquet",
         "is not in"),
    ],
)  # fmt: skip
def test_damaged_sidecar_refuses_the_resume_and_changes_nothing(tmp_path, damage, names, match):
    st = history(tmp_path, {5: A, 10: A, 15: A}, checkpoint=10)
    side = tmp_path / SIDE
    assert sidecar_state(tmp_path, 10) == {"steps": {5: A, 10: A}, "failures": []}
    damage(side)
    before = files_of(st.root)
    with pytest.raises(HistoryError, match=rf"(?s){side / names}.*{match}.*move {side} away"):
        InfluenceStore(tmp_path).resume(tmp_path / "checkpoint-10", 10)
    assert files_of(st.root) == before


def test_an_interrupted_resume_whose_sidecar_is_gone_is_set_aside_and_a_new_resume_works(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    history(elsewhere, {5: A, 10: A}, checkpoint=10)  # an outside checkpoint with its sidecar
    st = history(tmp_path / "run", {5: B, 10: B, 15: B}, checkpoint=15)
    calls = {"n": 0}
    real_apply = InfluenceStore._apply

    def killed(self, manifest):  # the pending change is recorded; the process dies before carrying it out
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(InfluenceStore, "_apply", killed)
    with pytest.raises(KeyboardInterrupt):
        InfluenceStore(tmp_path / "run").resume(elsewhere / "checkpoint-10", 10)
    monkeypatch.setattr(InfluenceStore, "_apply", real_apply)
    shutil.rmtree(elsewhere)  # the outside checkpoint is deleted
    report = InfluenceStore(tmp_path / "run").resume(tmp_path / "run" / "checkpoint-15", 15)
    assert report.sidecar and branch_of(load_pairs(tmp_path / "run")) == {5: B, 10: B, 15: B}
    assert list((st.root / "superseded").glob("unfinished-change*/manifest.json"))


def test_sidecar_of_another_step_is_refused(tmp_path):
    history(tmp_path, {5: A, 10: A}, checkpoint=10)
    os.rename(tmp_path / "checkpoint-10", tmp_path / "checkpoint-12")
    with pytest.raises(HistoryError, match="taken at step 10, but its checkpoint is at step 12"):
        InfluenceStore(tmp_path).resume(tmp_path / "checkpoint-12", 12)


# -------------------------------------------------------------------------------------------------- lineage


def test_resume_makes_the_history_exactly_the_sidecars_lineage(tmp_path):
    history(tmp_path, {5: A, 10: A}, checkpoint=10)
    st = InfluenceStore(tmp_path)
    st.record_failure({"step": 10, "kind": "eval_norm"})  # after the snapshot: not in the sidecar
    st.set_aside(5, "test")  # branch B replaces 10 and goes on
    for s in (10, 15):
        st.write_step(s, frame(s, B))
    stray = step_path(st.root, 12)
    stray.write_bytes(frame_bytes := step_path(st.root, 15).read_bytes())
    report = InfluenceStore(tmp_path).resume(tmp_path / "checkpoint-10", 10)
    assert (report.superseded, report.restored) == ([10, 12, 15], [10])
    assert branch_of(load_pairs(tmp_path)) == {5: A, 10: A}
    assert load_failures(tmp_path).empty
    aside = st.root / report.folder
    assert sorted(p.name for p in aside.iterdir()) == [
        "failures.jsonl", "step-000000010.parquet", "step-000000012.parquet", "step-000000015.parquet",
    ]  # fmt: skip
    assert (aside / "step-000000012.parquet").read_bytes() == frame_bytes
    assert branch_of(pd.read_parquet(aside / "step-000000010.parquet")) == {10: B}
    # A second resume finds nothing to change.
    again = InfluenceStore(tmp_path).resume(tmp_path / "checkpoint-10", 10)
    assert (again.superseded, again.restored, again.folder) == ([], [], None)


def test_resume_without_sidecar_moves_damaged_and_later_steps_aside(tmp_path, caplog):
    st = history(tmp_path, {5: A, 10: A, 15: A})
    flip_byte(step_path(st.root, 5))
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.store"):
        report = InfluenceStore(tmp_path).resume(None, 10)
    assert report.superseded == [5, 15] and not report.sidecar
    assert f"{step_path(st.root, 5)} is damaged" in caplog.text
    assert branch_of(load_pairs(tmp_path)) == {10: A}


def test_failures_follow_the_lineage(tmp_path):
    st = history(tmp_path, {5: A})
    st.record_failure({"step": 5, "kind": "probe_norm", "ids": ["a"]})
    st.write_step(10, frame(10, A))
    st.record_failure({"step": 10, "kind": "write_step"})
    (tmp_path / "checkpoint-5").mkdir()
    st.snapshot(tmp_path / "checkpoint-5", 5)
    assert sidecar_state(tmp_path, 5) == {"steps": {5: A}, "failures": [5]}
    st.resume(tmp_path / "checkpoint-5", 5)
    failures = load_failures(tmp_path)
    assert list(failures.step) == [5] and list(failures.ids) == [["a"]]


def test_write_step_refuses_duplicates_and_set_aside_never_overwrites(tmp_path):
    st = history(tmp_path, {5: A})
    with pytest.raises(StepExistsError):
        st.write_step(5, frame(5, A))
    assert st.set_aside(-1, "old") == [5]
    assert not st.has_history()
    st.write_step(5, frame(5, B))
    assert st.set_aside(-1, "old") == [5]
    assert sorted(p.name for p in (st.root / "superseded").iterdir()) == ["old", "old-2"]
    assert sorted(p.name for p in (st.root / "superseded" / "old").iterdir()) == [
        "metrics.json", "step-000000005.parquet"
    ]  # fmt: skip


def test_a_damaged_history_is_set_aside_whole(tmp_path):
    st = history(tmp_path, {5: A})
    (st.root / MANIFEST).write_text("garbage")
    assert InfluenceStore(tmp_path).set_aside(-1, "old") == [5]
    assert sorted(p.name for p in (st.root / "superseded" / "old").iterdir()) == [
        MANIFEST, "metrics.json", "step-000000005.parquet"
    ]  # fmt: skip
    InfluenceStore(tmp_path).write_step(3, frame(3, A))
    assert branch_of(load_pairs(tmp_path)) == {3: A}


def test_scores_leave_out_pairs_with_undefined_relinf():
    import math

    pairs = pd.concat([frame(5, A), frame(5, A)], ignore_index=True)
    pairs["eval_id"] = ["x", "x", "y", "y"]
    pairs["relinf"] = [1.0, 3.0, math.nan, 5.0]
    (row,) = scores_from_pairs(pairs).to_dict("records")
    assert (row["n_in"], row["n_cross"], row["s_in"], row["s_cross"]) == (1, 2, 1.0, 4.0)
    assert row["mean_dot"] == pytest.approx((1.0 + 2.0 + 2.0) / 3)


# ------------------------------------------------------------------------------------------ temporary files


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stray_temporary_files_are_removed_when_the_store_opens(tmp_path):
    st = history(tmp_path, {5: A}, checkpoint=5)
    host = store_mod._HOST
    dead = f".step-000000007.parquet.swift-tmp.{host}.{dead_pid()}.abcd"
    alive = f".step-000000008.parquet.swift-tmp.{host}.{os.getpid()}.abcd"
    elsewhere = f".manifest.json.swift-tmp.00000000.{dead_pid()}.abcd"
    for name in (dead, alive):
        (st.root / "pairs" / name).write_bytes(b"partial")
    (st.root / elsewhere).write_bytes(b"partial")
    side_tmp = tmp_path / "checkpoint-5" / f".{STORE_DIR}.swift-tmp.{host}.{dead_pid()}.abcd"
    (side_tmp / "pairs").mkdir(parents=True)
    InfluenceStore(tmp_path).open_for_writing()  # no lock: only temporary files of dead writers on this host
    assert sorted(temp_files(tmp_path)) == [f"{STORE_DIR}/{elsewhere}", f"{STORE_DIR}/pairs/{alive}"]
    locked = InfluenceStore(tmp_path)
    locked.acquire_lock()
    locked.open_for_writing()  # the only writer: every temporary file is stray
    assert temp_files(tmp_path) == []
    locked.release_lock()
    assert branch_of(load_pairs(tmp_path)) == {5: A}


# --------------------------------------------------------------------------------------------------- locks

HOLD = textwrap.dedent(
    """
    import os, signal, sys
    from swift_callbacks.store import InfluenceStore
    st = InfluenceStore(sys.argv[1])
    st.acquire_lock()
    print("locked", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # exits normally: the lock is released at interpreter exit
    """
)


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(HistoryLockedError, match=rf"pid {proc.pid} on host .*use another output_dir"):
            InfluenceStore(tmp_path).acquire_lock()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert not (store_dir(tmp_path) / LOCK).exists()
    st = InfluenceStore(tmp_path)
    st.acquire_lock()
    st.release_lock()


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "kill"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    held = json.loads((store_dir(tmp_path) / LOCK).read_text())
    assert held["pid"] != os.getpid()
    st = InfluenceStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.store"):
        st.acquire_lock()
    assert "Taking over the influence history lock" in caplog.text and f"process {held['pid']} is gone" in caplog.text
    assert json.loads((store_dir(tmp_path) / LOCK).read_text())["pid"] == os.getpid()
    st.release_lock()


def test_locks_in_one_process_and_from_other_hosts(tmp_path, caplog):
    first, second = InfluenceStore(tmp_path), InfluenceStore(tmp_path)
    first.acquire_lock()
    first.acquire_lock()  # re-entrant for its holder
    with pytest.raises(HistoryLockedError, match="Another training in this process"):
        second.acquire_lock()
    del first  # its training is gone without releasing (an exception in train(), a dropped trainer)
    with caplog.at_level(logging.WARNING, logger="swift_callbacks.store"):
        second.acquire_lock()
    assert "earlier training in this process that did not finish" in caplog.text
    second.release_lock()
    lock = store_dir(tmp_path) / LOCK
    lock.write_text(json.dumps({"pid": 1, "hostname": "another-host", "started": "then", "token": "x"}))
    with pytest.raises(HistoryLockedError, match=r"another-host.*If that process is gone, delete"):
        InfluenceStore(tmp_path).acquire_lock()
