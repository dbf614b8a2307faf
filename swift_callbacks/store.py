"""The influence history on disk: one Parquet file per evaluated step, checksummed, crash-safe and lineage-true.

Layout under the training ``output_dir``::

    swift_influence/
        pairs/step-000000050.parquet   one row per (probe example, eval example) at step 50
        metrics.json                   study metric labels -> (probe set, eval set, context)
        failures.jsonl                 steps, sets and examples the callback could not score or store, and why
        manifest.json                  sha256 and size of every file above (the history is what it lists)
        writer.lock                    pid, host and start time of the training writing the history
        superseded/                    steps of an abandoned branch, moved aside on resume (never deleted)
    checkpoint-50/swift_influence/     sidecar: a copy of the history up to step 50, with its own manifest.json

Integrity. Every file is written under a temporary name in its folder, flushed and fsynced, renamed into place,
and the folder fsynced. ``manifest.json`` is the commit record: a change (a new step, a resume) is first written
to it as *pending* (each new file's checksum and where its content is), then carried out, then committed. A
process killed anywhere leaves a history that readers see either before or after the change, never half of it;
the next writer completes the change. Readers verify every file against the manifest: a cut-short, altered or
unlisted file raises ``HistoryError`` naming it. A sidecar is built in a temporary folder next to its final place
and renamed into it, so a checkpoint holds a whole sidecar or none.

Lineage. Resuming from ``checkpoint-N`` makes the live history exactly the sidecar's steps (verified, restored
where missing or different) plus what the resumed run writes: every other step is moved to
``superseded/resumed-at-N/``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UserError

logger = logging.getLogger(__name__)

STORE_DIR = "swift_influence"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METRICS = "metrics.json"
FAILURES = "failures.jsonl"
LOCK = "writer.lock"
SUPERSEDED = "superseded"
_STEP_FILE = re.compile(r"^step-(\d+)\.parquet$")
_MANIFEST_PATH = re.compile(r"^(pairs/step-\d+\.parquet|metrics\.json|failures\.jsonl)$")
# Temporary files and folders: ".<name>.swift-<tmp|old>.<host hash>.<pid>.<random>".
_TEMP = re.compile(r"\.swift-(?:tmp|old)\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+$")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

PAIR_COLUMNS = [
    "step", "probe_set", "probe_id", "probe_task", "eval_set", "eval_id", "eval_task", "paired",
    "dot", "eval_sq_norm", "relinf", "probe_sq_norm", "cosine", "probe_tokens", "eval_tokens",
    "probe_loss", "eval_loss", "score",
]  # fmt: skip
SCORE_COLUMNS = [
    "step", "probe_set", "eval_set", "s_in", "s_cross", "n_in", "n_cross", "s_in_sem", "s_cross_sem",
    "mean_dot", "mean_probe_tokens", "mean_eval_tokens", "score",
]  # fmt: skip
EXACT_SCORE = "exact"  # the score label of histories written before the column existed
FAILURE_COLUMNS = ["step", "kind", "side", "set", "ids", "reason", "stored", "time"]


class HistoryError(UserError):
    """The influence history is missing, damaged or inconsistent; the message names the file and what to do."""


class _IncompleteChange(HistoryError):
    """An interrupted change whose content is gone, so it cannot be completed."""


class HistoryLockedError(HistoryError):
    """Another training holds the history's writer lock."""


class StepExistsError(HistoryError, FileExistsError):
    """A step is already recorded (the history never holds a step twice)."""


def store_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / STORE_DIR


def step_path(root: Path, step: int) -> Path:
    return root / "pairs" / f"step-{step:09d}.parquet"


def _step_rel(step: int) -> str:
    return f"pairs/step-{step:09d}.parquet"


def _rel_step(rel: str) -> int | None:
    m = _STEP_FILE.match(rel.removeprefix("pairs/")) if rel.startswith("pairs/") else None
    return int(m.group(1)) if m else None


def list_steps(root: Path) -> list[int]:
    """Steps recorded under ``root`` (a live history or a sidecar), by name only (``load_pairs`` verifies them).

    A step counts when the manifest records it (a write interrupted after its manifest entry is complete and
    counts) or when its file is present and not being moved away. Raises ``HistoryError`` if the manifest is
    unreadable.
    """
    root = Path(root)
    present = _present_steps(root)
    manifest = _read_manifest(root, _live_advice(root))
    if manifest is None:
        return sorted(present)
    files, removing = _apply_pending(manifest)
    listed = {s for rel in files if (s := _rel_step(rel)) is not None}
    gone = {s for rel in removing if (s := _rel_step(rel)) is not None}
    return sorted(listed | (set(present) - gone))


# ------------------------------------------------------------------------------------------ file primitives


def _temp_name(name: str, kind: str = "tmp") -> str:
    return f".{name}.swift-{kind}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; renames are durable there
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) with ``data``, flushed and fsynced. Removed again on failure."""
    try:
        with open(path, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary name in the same folder, fsync, rename, fsync of the folder."""
    tmp = path.with_name(_temp_name(path.name))
    _write_new(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _move(src: Path, dest: Path) -> Path:
    """Rename ``src`` to ``dest`` (or ``dest`` with a numbered suffix if taken); both folders fsynced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    final, n = dest, 1
    while final.exists():
        n += 1
        final = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
    os.replace(src, final)
    _fsync_dir(final.parent)
    _fsync_dir(src.parent)
    return final


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False
    return _entry(data) == {"sha256": entry["sha256"], "size": entry["size"]}


def _check_bytes(path: Path, data: bytes, entry: dict[str, Any]) -> str | None:
    """Why ``data`` (read from ``path``) is not the content the manifest records, or None if it is."""
    if len(data) != entry["size"]:
        how = "cut short" if len(data) < entry["size"] else "longer than written"
        return f"{path} has {len(data)} bytes where {entry['size']} were written ({how})"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return f"{path} does not match its sha256 checksum (the file was altered or corrupted)"
    return None


def _present_steps(root: Path) -> list[int]:
    pairs = root / "pairs"
    if pairs.exists() and not pairs.is_dir():
        raise HistoryError(f"{pairs} is a file, where the folder of step files should be: move it away.")
    if not pairs.is_dir():
        return []
    return sorted(int(m.group(1)) for f in pairs.iterdir() if (m := _STEP_FILE.match(f.name)))


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ manifests


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    body = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    doc = {**body, "checksum": hashlib.sha256(canonical).hexdigest()}
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode()


def _read_manifest(folder: Path, advice: str) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None if it has none), checked for shape and its own checksum."""
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise HistoryError(
            f"{folder} is a file, where the influence history folder should be: move it away (training writes its "
            "history there), or pass the output_dir of another run."
        )
    if path.is_symlink() and not path.exists():
        raise HistoryError(f"{path} is a broken link. {advice}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:  # a folder in place of the file, no permission, an I/O error
        raise HistoryError(f"{path} cannot be read ({err.strerror or err}). {advice}") from err
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HistoryError(f"{path} is not readable JSON ({err}): the manifest is damaged. {advice}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise HistoryError(f"{path} is not a swift_callbacks manifest. {advice}")
    if doc.get("format") != FORMAT_VERSION:
        raise HistoryError(
            f"{path} has format {doc.get('format')!r}; this swift_callbacks reads format {FORMAT_VERSION} "
            "(upgrade swift_callbacks to read a newer history)."
        )
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if doc.get("checksum") != hashlib.sha256(canonical).hexdigest():
        raise HistoryError(f"{path} does not match its own checksum (the manifest was altered or corrupted). {advice}")
    for rel, entry in doc["files"].items():
        if not _MANIFEST_PATH.match(rel) or not isinstance(entry, dict) or {"sha256", "size"} - set(entry):
            raise HistoryError(f"{path}: bad entry {rel!r}. {advice}")
    return doc


def _apply_pending(manifest: dict[str, Any]) -> tuple[dict[str, dict], set[str]]:
    """Files of the history once its pending change is done, and the paths the change removes."""
    files = {rel: dict(e) for rel, e in manifest["files"].items()}
    removing: set[str] = set()
    for op in (manifest.get("pending") or {}).get("ops", []):
        if op["entry"] is None:
            files.pop(op["path"], None)
            removing.add(op["path"])
        else:
            files[op["path"]] = {**op["entry"], "source": op.get("source")}
            removing.discard(op["path"])
    return files, removing


def _live_advice(root: Path) -> str:
    return (
        f"Resume training from a checkpoint whose sidecar holds the damaged step (the resume restores it), or "
        f"call swift_callbacks.store.InfluenceStore({str(root.parent)!r}).quarantine(...) to move the file to "
        f"{SUPERSEDED}/ and accept the gap."
    )


def _sidecar_advice(side: Path) -> str:
    return (
        f"The sidecar {side} cannot be trusted, so the history up to its checkpoint cannot be restored from it. "
        f"Resume from another checkpoint, restore {side} from a backup, or move {side} away to resume without "
        "it (the live history's steps up to the checkpoint are then kept as they are, their lineage unchecked)."
    )


@dataclass
class _View:
    """A verified-on-read view of one history folder (live history or sidecar)."""

    root: Path
    files: dict[str, dict] = field(default_factory=dict)
    advice: str = ""

    def steps(self) -> list[int]:
        return sorted(s for rel in self.files if (s := _rel_step(rel)) is not None)

    def read(self, rel: str) -> bytes:
        entry = self.files[rel]
        candidates = [self.root / rel]
        if entry.get("source"):
            candidates.append(self.root / entry["source"])
        problems = []
        for path in candidates:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                problems.append(f"{path} is missing")
                continue
            except OSError as err:
                problems.append(f"{path} cannot be read ({err.strerror or err})")
                continue
            problem = _check_bytes(path, data, entry)
            if problem is None:
                return data
            problems.append(problem)
        where = self.root / MANIFEST
        raise HistoryError(
            f"{self.root / rel} failed its integrity check against {where}: {'; '.join(problems)}. {self.advice}"
        )

    def frame(self, step: int) -> pd.DataFrame:
        path = step_path(self.root, step)
        data = self.read(_step_rel(step))
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise HistoryError(f"{path} is not a readable Parquet file ({err}). {self.advice}") from err
        if "step" in frame.columns and len(frame) and not (frame["step"] == step).all():
            raise HistoryError(f"{path} holds rows of another step (renamed by hand?). {self.advice}")
        if "score" not in frame.columns:  # written before score variants were recorded: exact
            frame["score"] = EXACT_SCORE
        return frame


def _open_view(root: Path, advice: str | None = None, check_unlisted: bool = True) -> _View:
    """The history in ``root`` as its manifest records it. Raises if a step file is present but not listed
    (unless ``check_unlisted`` is False: writers that only read listed files)."""
    advice = advice if advice is not None else _live_advice(root)
    present = _present_steps(root)  # listed before the manifest is read: a file seen here is in that manifest
    manifest = _read_manifest(root, advice)
    if manifest is None:
        stray = [step_path(root, s) for s in present] + [root / n for n in (METRICS, FAILURES) if (root / n).exists()]
        if stray and check_unlisted:
            raise HistoryError(
                f"{stray[0]} is not listed in any manifest: {root} has no {MANIFEST} (written by an older "
                "swift_callbacks, or copied in by hand), so its files cannot be verified. If you trust them as they "
                f"are, call swift_callbacks.store.InfluenceStore({str(root.parent)!r}).adopt() to checksum them."
            )
        return _View(root, {}, advice)
    files, removing = _apply_pending(manifest)
    unlisted = [_step_rel(step) for step in present] + [n for n in (METRICS, FAILURES) if (root / n).exists()]
    for rel in unlisted if check_unlisted else ():
        if rel not in files and rel not in removing:
            raise HistoryError(
                f"{root / rel} is not in {root / MANIFEST}: it was not written by this history's writer (copied in "
                f"by hand, or left by another program). Move it out of {root} (or call "
                f"InfluenceStore({str(root.parent)!r}).adopt() if you trust it)."
            )
    return _View(root, files, advice)


def _sidecar_view(side: Path, step: int) -> _View | None:
    """The verified sidecar of ``checkpoint-<step>`` (every file read and checked now), or None if empty."""
    advice = _sidecar_advice(side)
    present = _present_steps(side)
    manifest = _read_manifest(side, advice)
    if manifest is None:
        stray = [step_path(side, s) for s in present] + [side / n for n in (METRICS, FAILURES) if (side / n).exists()]
        if stray:
            raise HistoryError(f"{side / MANIFEST} is missing, but the sidecar holds {stray[0]}. {advice}")
        return None
    if manifest.get("pending"):
        raise HistoryError(f"{side / MANIFEST} records an unfinished change (a sidecar never has one). {advice}")
    if manifest.get("step") != step:
        raise HistoryError(
            f"{side / MANIFEST} was taken at step {manifest.get('step')}, but its checkpoint is at step {step} "
            f"(a sidecar copied from another checkpoint?). {advice}"
        )
    view = _View(side, {rel: dict(e) for rel, e in manifest["files"].items()}, advice)
    for s in present:
        if _step_rel(s) not in view.files:
            raise HistoryError(f"{step_path(side, s)} is not in {side / MANIFEST}. {advice}")
    for name in (METRICS, FAILURES):
        if (side / name).exists() and name not in view.files:
            raise HistoryError(f"{side / name} is not in {side / MANIFEST}. {advice}")
    for s in view.steps():
        if s > step:
            raise HistoryError(f"{step_path(side, s)} is after the sidecar's step {step}. {advice}")
    for rel in view.files:
        view.read(rel)
    return view


# --------------------------------------------------------------------------------------------------- locks

_HELD_LOCKS: dict[str, str] = {}  # lock path -> token, released at interpreter exit
_HOLDERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # token -> InfluenceStore holding it


@atexit.register
def _release_held_locks() -> None:
    for path, token in list(_HELD_LOCKS.items()):
        _release_lock_file(Path(path), token)


def _release_lock_file(path: Path, token: str) -> None:
    _HELD_LOCKS.pop(str(path), None)
    info = _read_lock(path)
    if info and info.get("token") == token and info.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()
            _fsync_dir(path.parent)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a live process from a later one reusing its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2 :].startswith("Z"):  # a zombie: killed, not yet reaped
            return False
    except OSError:
        pass
    now = _process_start(pid)
    return not (started is not None and now is not None and now != started)


def _describe_lock(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on host {info.get('hostname')!r}, started {info.get('started')}"


# --------------------------------------------------------------------------------------------------- writer


@dataclass
class ResumeReport:
    """What ``InfluenceStore.resume`` did."""

    superseded: list[int]
    restored: list[int]
    dropped: list[int]  # listed in the live manifest, file gone, no sidecar to restore it from
    sidecar: bool
    folder: str | None  # superseded/<label> where steps were moved, if any


class InfluenceStore:
    """Writer of the history of one run (use on the main process only).

    Mutating calls open the store for writing first: an interrupted change recorded in the manifest is
    completed, and temporary files of dead writers (all of them while this store holds the lock) are removed.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.root = store_dir(output_dir)
        self._opened = False
        self._lock_token: str | None = None

    # ------------------------------------------------------------------------------------------- reading

    def steps(self) -> list[int]:
        return list_steps(self.root)

    def has_history(self) -> bool:
        """Whether anything of a history (steps, metrics, failures, manifest) is here."""
        if _present_steps(self.root) or any((self.root / n).exists() for n in (METRICS, FAILURES)):
            return True
        try:
            return bool((_read_manifest(self.root, "") or {"files": {}})["files"])
        except HistoryError:
            return True

    def _view(self) -> _View:
        """The listed files (a file present but not listed is not history; readers flag it)."""
        return _open_view(self.root, check_unlisted=False)

    def _manifest(self) -> dict[str, Any]:
        return _read_manifest(self.root, _live_advice(self.root)) or {"format": FORMAT_VERSION, "files": {}}

    # ------------------------------------------------------------------------------------------- opening

    def open_for_writing(self) -> None:
        """Complete an interrupted change and remove stray temporary files (called by every mutating method)."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise HistoryError(f"{self.output_dir} is a file, not a folder: give an output folder for the history.")
        self.root.mkdir(parents=True, exist_ok=True)
        self._settle()
        self._clean_temps()
        self._opened = True

    def _writable(self) -> None:
        if not self._opened:
            self.open_for_writing()

    def _settle(self) -> None:
        manifest = _read_manifest(self.root, _live_advice(self.root))
        if manifest and manifest.get("pending"):
            logger.warning(
                "Completing an interrupted change of the influence history in %s: %s.", self.root,
                manifest["pending"].get("what"),
            )  # fmt: skip
            try:
                self._apply(manifest)
            except _IncompleteChange as err:
                # Its content is gone (e.g. the sidecar it restored from was deleted): the history cannot be made
                # consistent, so it is moved aside whole, as it is, and the writer starts from an empty one (a
                # resume then restores what its checkpoint's sidecar holds).
                folder = self._new_folder("unfinished-change")
                logger.warning("%s The history is moved as it is to %s/%s/.", err, self.root / SUPERSEDED, folder)
                self._retire_raw(folder)

    def _clean_temps(self) -> None:
        everything = self._lock_token is not None  # no other writer can be at work
        folders = [self.root, self.root / "pairs"]
        if self.output_dir.is_dir():
            folders += [p for p in self.output_dir.iterdir() if p.name.startswith("checkpoint-") and p.is_dir()]
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                m = _TEMP.search(path.name)
                if not m or not path.name.startswith("."):
                    continue
                if folder.name.startswith("checkpoint-") and not path.name.startswith(f".{STORE_DIR}."):
                    continue
                if everything or (m.group(1) == _HOST and not _pid_alive(int(m.group(2)))):
                    logger.info("Removing a temporary file left by an interrupted write: %s", path)
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            path.unlink()

    # -------------------------------------------------------------------------------------- transactions

    def _transact(self, what: str, ops: list[dict[str, Any]]) -> None:
        """Record ``ops`` as the manifest's pending change, carry them out, commit.

        An op is ``{"path", "entry", "source", "aside"}``: ``path`` becomes the content ``entry`` (sha256, size),
        found at ``path`` or ``source`` (a path relative to the history folder), or is removed when ``entry`` is
        None; a different file already at ``path`` is first moved to ``aside`` (relative), never deleted.
        """
        self._settle()
        if not ops:
            return
        manifest = self._manifest()
        pending = {"format": FORMAT_VERSION, "files": manifest["files"], "pending": {"what": what, "ops": ops}}
        _atomic_write(self.root / MANIFEST, _manifest_bytes(pending))
        self._apply(pending)

    def _apply(self, manifest: dict[str, Any]) -> None:
        """Carry out the pending change of ``manifest`` (idempotent: a repeat after a crash finishes it), commit."""
        files = {rel: dict(e) for rel, e in manifest["files"].items()}
        what = manifest["pending"].get("what")
        for op in manifest["pending"]["ops"]:
            path, entry = self.root / op["path"], op["entry"]
            if entry is None:
                if path.exists():
                    if not op.get("aside"):
                        raise HistoryError(f"Internal error: removal of {path} without a place to move it to.")
                    _move(path, self.root / op["aside"])
                files.pop(op["path"], None)
                continue
            if not _matches(path, entry):
                source = self.root / op["source"] if op.get("source") else None
                if source is None or not _matches(source, entry):
                    raise _IncompleteChange(
                        f"Cannot complete the interrupted change ({what}) of {self.root}: the content for {path} is "
                        f"gone ({source} is missing or altered). Restore it, or move {self.root} away and resume "
                        "from a checkpoint."
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.exists() and op.get("aside"):
                    _move(path, self.root / op["aside"])
                if source.parent == path.parent and _TEMP.search(source.name):
                    os.replace(source, path)
                    _fsync_dir(path.parent)
                else:
                    _atomic_write(path, source.read_bytes())
            files[op["path"]] = {"sha256": entry["sha256"], "size": entry["size"]}
        _atomic_write(self.root / MANIFEST, _manifest_bytes({"format": FORMAT_VERSION, "files": files}))

    def _stage(self, rel: str, data: bytes) -> dict[str, Any]:
        """Write ``data`` to a temporary file next to ``rel``; the op that puts it in place."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(_temp_name(path.name))
        _write_new(tmp, data)
        return {"path": rel, "entry": _entry(data), "source": tmp.relative_to(self.root).as_posix(), "aside": None}

    def _commit_staged(self, what: str, ops: list[dict[str, Any]]) -> None:
        try:
            self._transact(what, ops)
        except BaseException:
            try:
                manifest = _read_manifest(self.root, "")
            except HistoryError:
                manifest = None
            if not (manifest and manifest.get("pending")):  # never recorded: the staged files are garbage
                for op in ops:
                    if op.get("source"):
                        with contextlib.suppress(OSError):
                            (self.root / op["source"]).unlink()
            raise

    # ------------------------------------------------------------------------------------------- writing

    def write_step(self, step: int, pairs: pd.DataFrame) -> Path:
        """Atomically record the pairs of ``step``. Raises ``StepExistsError`` if the step is already recorded."""
        self._writable()
        path = step_path(self.root, step)
        if step in self.steps() or path.exists():
            raise StepExistsError(f"Influence history already has step {step} ({path}).")
        ops = [self._stage(_step_rel(step), _parquet_bytes(pairs))]
        self._commit_staged(f"write step {step}", ops)
        return path

    def write_metrics(self, metrics: dict[str, dict]) -> None:
        """Record the study metric definitions (``metrics.json``)."""
        self._writable()
        data = json.dumps(metrics, indent=2, ensure_ascii=False).encode()
        current = self._manifest()["files"].get(METRICS)
        if current == _entry(data) and _matches(self.root / METRICS, current):
            return
        self._commit_staged("write metrics.json", [self._stage(METRICS, data)])

    def record_failure(self, record: dict[str, Any]) -> None:
        """Append one record to ``failures.jsonl`` (rewritten atomically with the new line)."""
        self._writable()
        view = self._view()
        current = view.read(FAILURES) if FAILURES in view.files else b""
        line = json.dumps({"time": _now(), **record}, ensure_ascii=False, default=str).encode() + b"\n"
        self._commit_staged(f"record a failure at step {record.get('step')}", [self._stage(FAILURES, current + line)])

    def set_aside(self, after: int, label: str) -> list[int]:
        """Move every recorded step ``> after`` to ``superseded/<label>/`` (never deleted). Returns the steps.

        With ``after < 0`` the whole history goes (metrics and failures too): a new run starts in a used folder;
        a history whose manifest is unreadable is then moved as it is, manifest included.
        """
        folder = self._new_folder(label)
        if after < 0:
            try:
                self._writable()
            except HistoryError as err:
                logger.warning("Moving a damaged influence history aside as it is (%s).", err)
                return self._retire_raw(folder)
        self._writable()
        aside = f"{SUPERSEDED}/{folder}"
        manifest = self._manifest()
        listed = {s for rel in manifest["files"] if (s := _rel_step(rel)) is not None}
        moved = sorted(s for s in set(listed) | set(_present_steps(self.root)) if s > after)
        ops = [{"path": _step_rel(s), "entry": None, "aside": f"{aside}/{step_path(self.root, s).name}"} for s in moved]
        if after < 0:
            ops += [
                {"path": n, "entry": None, "aside": f"{aside}/{n}"}
                for n in (METRICS, FAILURES)
                if n in manifest["files"] or (self.root / n).exists()
            ]
        self._transact(f"set aside steps after {after} to {aside}", ops)
        return moved

    def move_aside(self, steps: Iterable[int], label: str) -> list[int]:
        """Move the given recorded steps to ``superseded/<label>/`` (never deleted). Returns those moved."""
        self._writable()
        present = set(self.steps()) | set(_present_steps(self.root))
        moved = sorted(s for s in set(steps) if s in present)
        if moved:
            aside = f"{SUPERSEDED}/{self._new_folder(label)}"
            ops = [{"path": _step_rel(s), "entry": None, "aside": f"{aside}/{step_path(self.root, s).name}"}
                   for s in moved]  # fmt: skip
            self._transact(f"move steps {moved} to {aside}", ops)
        return moved

    def read_step(self, step: int) -> pd.DataFrame:
        """One recorded step's pairs, verified against the manifest."""
        return self._view().frame(step)

    def _retire_raw(self, folder: str) -> list[int]:
        dest = self.root / SUPERSEDED / folder
        moved = _present_steps(self.root)
        for s in moved:
            _move(step_path(self.root, s), dest / step_path(self.root, s).name)
        for name in (METRICS, FAILURES, MANIFEST):
            if (self.root / name).exists():
                _move(self.root / name, dest / name)
        self._opened = False
        return moved

    def quarantine(self, *steps: int) -> list[Path]:
        """Move damaged or unlisted step files to ``superseded/quarantined-<time>/``, accepting the gap."""
        return [self.root / SUPERSEDED / f for f in self._quarantine(steps)]

    def _quarantine(self, steps: Iterable[int]) -> list[str]:
        self._writable()
        folder = self._new_folder(f"quarantined-{time.strftime('%Y%m%d-%H%M%S')}")
        ops = [
            {"path": _step_rel(s), "entry": None, "aside": f"{SUPERSEDED}/{folder}/{step_path(self.root, s).name}"}
            for s in steps
        ]
        self._transact(f"quarantine steps {list(steps)}", ops)
        return [f"{folder}/{step_path(self.root, s).name}" for s in steps]

    def adopt(self) -> list[str]:
        """Checksum files present but not in the manifest (a history from an older version), as they are now.

        Only for files you trust: adoption is what makes later damage detectable, it cannot undo earlier damage.
        Every adopted step file must be readable Parquet.
        """
        self._writable()
        files = self._manifest()["files"]
        ops = []
        for rel in [_step_rel(s) for s in _present_steps(self.root)] + [METRICS, FAILURES]:
            path = self.root / rel
            if rel in files or not path.exists():
                continue
            data = path.read_bytes()
            if rel.startswith("pairs/"):
                try:
                    pd.read_parquet(io.BytesIO(data))
                except Exception as err:
                    raise HistoryError(f"{path} is not a readable Parquet file ({err}); not adopted.") from err
            ops.append({"path": rel, "entry": _entry(data), "source": None, "aside": None})
        self._transact("adopt unlisted files", ops)
        return [op["path"] for op in ops]

    def _new_folder(self, label: str) -> str:
        """A name under ``superseded/`` not used yet (history set aside earlier is never overwritten)."""
        name, n = label, 1
        while (self.root / SUPERSEDED / name).exists():
            n += 1
            name = f"{label}-{n}"
        return name

    # -------------------------------------------------------------------------------------------- sidecar

    def snapshot(self, checkpoint_dir: str | os.PathLike, upto: int) -> None:
        """Copy the history up to step ``upto`` into ``checkpoint_dir/swift_influence`` (the resume sidecar).

        Every file is verified against the live manifest while copied (damage is never copied into a fresh
        checksum). The sidecar is built in a temporary folder and renamed into place; one already there (a
        checkpoint re-saved by a resumed branch) is replaced.
        """
        self._writable()
        ckpt = Path(checkpoint_dir)
        side = ckpt / STORE_DIR
        view = self._view()
        tmp = ckpt / _temp_name(STORE_DIR)
        try:
            (tmp / "pairs").mkdir(parents=True)
            files = {}
            for step in view.steps():
                if step <= upto:
                    data = view.read(_step_rel(step))
                    _write_new(tmp / _step_rel(step), data)
                    files[_step_rel(step)] = _entry(data)
            if METRICS in view.files:
                data = view.read(METRICS)
                _write_new(tmp / METRICS, data)
                files[METRICS] = _entry(data)
            if FAILURES in view.files:
                data = _failures_upto(view.read(FAILURES), upto)
                if data:
                    _write_new(tmp / FAILURES, data)
                    files[FAILURES] = _entry(data)
            _fsync_dir(tmp / "pairs")
            body = {"format": FORMAT_VERSION, "step": upto, "taken": _now(), "files": files}
            _write_new(tmp / MANIFEST, _manifest_bytes(body))
            _fsync_dir(tmp)
            if side.exists():
                self.discard_sidecar(ckpt)
            os.replace(tmp, side)
            _fsync_dir(ckpt)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def discard_sidecar(self, checkpoint_dir: str | os.PathLike) -> bool:
        """Remove ``checkpoint_dir``'s sidecar (before its checkpoint is overwritten by another branch)."""
        ckpt = Path(checkpoint_dir)
        side = ckpt / STORE_DIR
        if not side.exists():
            return False
        old = ckpt / _temp_name(STORE_DIR, "old")
        os.replace(side, old)
        _fsync_dir(ckpt)
        shutil.rmtree(old, ignore_errors=True)
        return True

    def resume(self, checkpoint_dir: str | os.PathLike | None, step: int) -> ResumeReport:
        """Make the live history that of a run resumed at ``step`` from ``checkpoint_dir``.

        With a sidecar, the history becomes exactly its steps: a live step after ``step``, or up to it but absent
        from or different from the sidecar, is moved to ``superseded/resumed-at-<step>/``; a sidecar step
        missing or different here is restored. ``failures.jsonl`` becomes the sidecar's. Without one, steps after
        ``step`` and damaged or unlisted ones are moved aside, the rest kept.

        Raises:
            HistoryError: The sidecar is damaged (missing, cut-short, altered or unlisted file, bad manifest);
                nothing has been changed then.
        """
        self._writable()
        side = Path(checkpoint_dir) / STORE_DIR if checkpoint_dir else None
        if side is not None and (side.exists() or side.is_symlink()) and not side.is_dir():
            raise HistoryError(f"{side} is not a folder: {_sidecar_advice(side)}")
        side_view = _sidecar_view(side, step) if side is not None and side.is_dir() else None
        if side_view is None and side is not None and side.is_dir():
            logger.warning("The influence sidecar %s is empty; resuming without it.", side)
        manifest = self._manifest()
        listed = {s: rel for rel in manifest["files"] if (s := _rel_step(rel)) is not None}
        present = set(_present_steps(self.root))
        folder = self._new_folder(f"resumed-at-{step}")
        aside = f"{SUPERSEDED}/{folder}"
        ops: list[dict[str, Any]] = []
        superseded, restored, dropped = [], [], []
        for s in sorted(present | set(listed)):
            rel, path = _step_rel(s), step_path(self.root, s)
            if s not in present:  # listed, file gone
                if side_view is not None and rel in side_view.files and s <= step:
                    ops.append(self._restore_op(side_view, rel, None))
                    restored.append(s)
                else:
                    ops.append({"path": rel, "entry": None, "aside": None})
                    if s <= step:
                        dropped.append(s)
                continue
            actual = _entry(path.read_bytes())
            if side_view is not None:
                want = side_view.files.get(rel) if s <= step else None
                if want is not None and _same(actual, want):
                    if s not in listed or not _same(manifest["files"][rel], want):
                        ops.append({"path": rel, "entry": _strip(want), "source": None, "aside": None})
                    continue
                if want is not None:
                    ops.append(self._restore_op(side_view, rel, f"{aside}/{path.name}"))
                    restored.append(s)
                else:
                    ops.append({"path": rel, "entry": None, "aside": f"{aside}/{path.name}"})
                superseded.append(s)
                continue
            if s <= step and s in listed and _same(actual, manifest["files"][rel]):
                continue
            if s <= step:
                logger.warning(
                    "Influence step file %s is %s and there is no sidecar to restore it from: moved to %s/.", path,
                    "not in the manifest" if s not in listed else "damaged", aside,
                )  # fmt: skip
            ops.append({"path": rel, "entry": None, "aside": f"{aside}/{path.name}"})
            superseded.append(s)
        if side_view is not None:
            have = {s for s in present | set(listed)}
            for s in side_view.steps():
                if s not in have:
                    ops.append(self._restore_op(side_view, _step_rel(s), None))
                    restored.append(s)
            if METRICS in side_view.files and METRICS not in manifest["files"]:
                ops.append(self._restore_op(side_view, METRICS, f"{aside}/{METRICS}"))
        ops += self._failure_ops(manifest, side_view, step, f"{aside}/{FAILURES}")
        self._transact(f"resume at step {step}", ops)
        return ResumeReport(superseded, sorted(restored), dropped, side_view is not None, aside if superseded else None)

    def _restore_op(self, side: _View, rel: str, aside: str | None) -> dict[str, Any]:
        # Absolute and resolved: a path relative to the history would go wrong when ".." crosses a symlinked folder.
        source = (side.root / rel).resolve()
        return {"path": rel, "entry": _strip(side.files[rel]), "source": source.as_posix(), "aside": aside}

    def _failure_ops(self, manifest: dict, side: _View | None, step: int, aside: str) -> list[dict[str, Any]]:
        """Make failures.jsonl that of the resumed lineage (the sidecar's, else the live one's up to ``step``)."""
        path = self.root / FAILURES
        current_entry = manifest["files"].get(FAILURES)
        try:
            current = self._view().read(FAILURES) if current_entry else None
        except HistoryError as err:
            logger.warning("%s; it is replaced by the resumed lineage's and kept in %s.", err, aside)
            current = None
        if side is not None:
            target = side.read(FAILURES) if FAILURES in side.files else b""
        else:
            target = _failures_upto(current, step) if current is not None else b""
        if current is not None and current == target:
            return []
        if not target:
            if current_entry is None and not path.exists():
                return []
            return [{"path": FAILURES, "entry": None, "aside": aside}]
        op = self._stage(FAILURES, target)
        op["aside"] = aside
        return [op]

    # --------------------------------------------------------------------------------------------- locking

    def acquire_lock(self) -> None:
        """Take the writer lock ``swift_influence/writer.lock`` (pid, host, start time).

        A lock held by a live process (here, or on another host) refuses with ``HistoryLockedError``. A lock left
        by a process that is gone (killed with SIGKILL, or an earlier training in this process that never
        finished) is taken over with a warning. Released by ``release_lock`` and at interpreter exit.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        if self._lock_token is not None:
            info = _read_lock(path)
            if info and info.get("token") == self._lock_token:
                return
        token = secrets.token_hex(8)
        info = {
            "pid": os.getpid(), "hostname": socket.gethostname(), "started": _now(),
            "process_start": _process_start(os.getpid()), "token": token,
        }  # fmt: skip
        for _ in range(5):
            if _create_exclusive(path, json.dumps(info, indent=1).encode()):
                break
            held = _read_lock(path)
            if held is None:
                continue  # released meanwhile
            stale = self._stale(held, path)
            if not stale and held.get("pid") == os.getpid() and held.get("hostname") == socket.gethostname():
                raise HistoryLockedError(
                    f"Another training in this process is writing the influence history in {self.root} (lock "
                    f"{path}). If that training ended with an exception, call callback.store.release_lock() on its "
                    "InfluenceCallback, or drop that trainer."
                )
            if not stale:
                raise HistoryLockedError(
                    f"Another training is writing the influence history in {self.root} (lock {path}: "
                    f"{_describe_lock(held)}). Two runs writing one history would mix their steps: use another "
                    f"output_dir, or wait for that run to end. If that process is gone, delete {path}."
                )
            with contextlib.suppress(FileNotFoundError):
                grave = path.with_name(_temp_name(LOCK, "old"))
                os.replace(path, grave)
                logger.warning("Taking over the influence history lock %s from %s (%s).", path, _describe_lock(held),
                               stale)  # fmt: skip
                grave.unlink()
        else:
            raise HistoryLockedError(f"Could not take the influence history lock {path} (contended).")
        self._lock_token = token
        _HELD_LOCKS[str(path)] = token
        _HOLDERS[token] = self
        self._opened = False  # open again (complete, then clean every temporary file: the only writer now)

    def _stale(self, held: dict[str, Any], path: Path) -> str | None:
        """Why the lock ``held`` is stale (its owner is gone), or None if it is live."""
        if not held:  # unreadable: written by hand, or not by this code
            age = time.time() - path.stat().st_mtime if path.exists() else 0
            return "unreadable lock file" if age > 60 else None
        if held.get("hostname") != socket.gethostname():
            return None
        pid = held.get("pid")
        if not isinstance(pid, int):
            return "lock without a pid"
        if pid == os.getpid():
            if _HOLDERS.get(held.get("token")) is not None:
                gc.collect()  # a holder only kept alive by a reference cycle is gone
            if _HOLDERS.get(held.get("token")) is None:
                return "left by an earlier training in this process that did not finish"
            return None
        if not _pid_alive(pid, held.get("process_start")):
            return f"process {pid} is gone"
        return None

    def release_lock(self) -> None:
        if self._lock_token is not None:
            _release_lock_file(self.root / LOCK, self._lock_token)
            _HOLDERS.pop(self._lock_token, None)
            self._lock_token = None

    @property
    def holds_lock(self) -> bool:
        return self._lock_token is not None


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` atomically, complete or not at all; False if it exists."""
    tmp = path.with_name(_temp_name(path.name))
    _write_new(tmp, data)
    try:
        os.link(tmp, path)
        _fsync_dir(path.parent)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: exclusive create (a crash may leave it empty; see _stale)
        try:
            _write_new(path, data)
            _fsync_dir(path.parent)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["sha256"] == b["sha256"] and a["size"] == b["size"]


def _strip(entry: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": entry["sha256"], "size": entry["size"]}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _failure_lines(data: bytes, where: Path | str) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise HistoryError(f"{where}, line {n}: not JSON ({err}).") from err
    return records


def _failures_upto(data: bytes, step: int) -> bytes:
    kept = [line for line in data.decode("utf-8").splitlines(keepends=True) if line.strip()]
    kept = [line for line in kept if json.loads(line).get("step", -1) <= step]
    return "".join(kept).encode()


# --------------------------------------------------------------------------------------------------- reading


def _history_view(output_dir: str | os.PathLike, empty_ok: bool) -> _View:
    out = Path(output_dir)
    if not out.is_dir():
        raise HistoryError(
            f"{out} does not exist (or is not a folder): there is no influence history to read. Pass the training "
            f"output_dir of a run with InfluenceCallback attached (the folder that contains {STORE_DIR}/)."
        )
    root = store_dir(out)
    view = _open_view(root)
    if not view.steps() and not empty_ok:
        hint = ""
        if out.name == STORE_DIR or (out / MANIFEST).exists() or (out / "pairs").is_dir():
            hint = f" {out} looks like the history folder itself: pass its parent, the training output_dir."
        raise HistoryError(
            f"No influence history under {out}: {root} holds no recorded step. Pass the training output_dir of a "
            f"run with InfluenceCallback attached, after at least one save or evaluation step.{hint}"
        )
    return view


def load_pairs(output_dir: str | os.PathLike, *, empty_ok: bool = False) -> pd.DataFrame:
    """Every recorded (step, probe example, eval example) row of a run, sorted by step; every file verified.

    Columns: ``step, probe_set, probe_id, probe_task, eval_set, eval_id, eval_task, paired, dot, eval_sq_norm,
    relinf, probe_sq_norm, cosine, probe_tokens, eval_tokens, probe_loss, eval_loss, score``. ``relinf`` (and
    ``cosine``) is NaN for a pair the callback could not score at that step (see ``load_failures``); ``score`` is
    the score variant that produced the numbers (``"exact"``, or e.g. ``"projection(dim=256, seed=0)"``).

    Args:
        output_dir: The training ``output_dir``.
        empty_ok: Return an empty table when ``output_dir`` exists but holds no recorded step yet.

    Raises:
        HistoryError: ``output_dir`` does not exist, holds no history (unless ``empty_ok``), or a file of the
            history is missing, cut short, altered, unlisted or unreadable (the message names it).
    """
    view = _history_view(output_dir, empty_ok)
    frames = [view.frame(s) for s in view.steps()]
    if not frames:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)


def load_scores(output_dir: str | os.PathLike, *, empty_ok: bool = False) -> pd.DataFrame:
    """One row per (step, probe_set, eval_set): s_in, s_cross (eq. 4-5), pair counts and standard errors.

    Pairs whose RelInf is undefined at a step (NaN ``relinf``) are left out: ``n_in``/``n_cross`` count the
    scored pairs only. ``s_in``/``s_cross`` are NaN only where ``n_in``/``n_cross`` = 0. Raises like
    ``load_pairs``.
    """
    return scores_from_pairs(load_pairs(output_dir, empty_ok=empty_ok))


def scores_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-block scores from a pairs table (the same arithmetic the callback logs; NaN-RelInf pairs left out)."""
    import numpy as np
    import torch  # here, not at import: reading a history needs no torch until scores are computed

    from .influence.scores import block_scores

    rows = []
    for (step, probe_set, eval_set), block in pairs.groupby(["step", "probe_set", "eval_set"], sort=True):
        rel = block["relinf"].to_numpy(dtype=np.float64)
        ok = np.isfinite(rel)
        paired = block["paired"].to_numpy(dtype=bool)
        s = block_scores(torch.tensor(rel[ok]), torch.tensor(paired[ok]))
        rows.append({
            "step": int(step), "probe_set": probe_set, "eval_set": eval_set,
            "s_in": s.s_in, "s_cross": s.s_cross, "n_in": s.n_in, "n_cross": s.n_cross,
            "s_in_sem": s.s_in_sem, "s_cross_sem": s.s_cross_sem,
            "mean_dot": float(block["dot"].to_numpy(dtype=np.float64)[ok].mean()) if ok.any() else float("nan"),
            "mean_probe_tokens": float(block.drop_duplicates("probe_id")["probe_tokens"].mean()),
            "mean_eval_tokens": float(block.drop_duplicates("eval_id")["eval_tokens"].mean()),
            "score": "+".join(sorted({v for v in block.get("score", ()) if isinstance(v, str)})) or EXACT_SCORE,
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return frame.astype({"s_in": float, "s_cross": float, "s_in_sem": float, "s_cross_sem": float})


def load_metric_specs(output_dir: str | os.PathLike) -> dict[str, dict]:
    """The study metric definitions of ``metrics.json`` (verified; empty if the history has none)."""
    view = _history_view(output_dir, empty_ok=True)
    if METRICS not in view.files:
        return {}
    data = view.read(METRICS)
    try:
        specs = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HistoryError(f"{view.root / METRICS} is not readable JSON ({err}).") from err
    if not isinstance(specs, dict):
        raise HistoryError(f"{view.root / METRICS} is not a mapping of metric definitions.")
    return specs


def load_metrics(output_dir: str | os.PathLike, *, empty_ok: bool = False) -> pd.DataFrame:
    """Study metrics by step (long format): ``step, metric, study, probe_set, eval_set, context, value``.

    Raises like ``load_pairs``.
    """
    specs = load_metric_specs(output_dir)
    scores = load_scores(output_dir, empty_ok=empty_ok)
    rows = []
    for label, spec in specs.items():
        block = scores[(scores.probe_set == spec["probe_set"]) & (scores.eval_set == spec["eval_set"])]
        for _, r in block.iterrows():
            rows.append(
                {
                    "step": r.step,
                    "metric": label,
                    "study": spec.get("study"),
                    "probe_set": spec["probe_set"],
                    "eval_set": spec["eval_set"],
                    "context": spec["context"],
                    "value": r[f"s_{spec['context']}"],
                }
            )
    return pd.DataFrame(rows, columns=["step", "metric", "study", "probe_set", "eval_set", "context", "value"])


def load_failures(output_dir: str | os.PathLike) -> pd.DataFrame:
    """What the callback could not score or store, one row per record of ``failures.jsonl`` (verified).

    Columns: ``step, kind, side, set, ids, reason, stored, time``. ``kind`` is ``"eval_norm"`` (zero or
    non-finite evaluation gradient: RelInf undefined), ``"probe_norm"``, ``"nonfinite_pairs"``, ``"write_step"``,
    ``"snapshot"`` or ``"write_metrics"``; ``stored`` tells whether the step's pairs are in the history (with
    NaN ``relinf`` for the failed examples) or missing from it.
    """
    view = _history_view(output_dir, empty_ok=True)
    if FAILURES not in view.files:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    records = _failure_lines(view.read(FAILURES), view.root / FAILURES)
    frame = pd.DataFrame(records)
    for col in FAILURE_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    return frame[FAILURE_COLUMNS + [c for c in frame.columns if c not in FAILURE_COLUMNS]]
