"""Content-keyed incremental steps: what makes a re-run of ``transmiter export`` cheap.

Each step has a key, the sha256 of everything it reads (recipe values, file
contents, the keys of the steps before it); a step whose key matches its
record from the previous run and whose outputs exist is skipped, so a re-run
redoes only what changed (``force`` redoes everything). One run at a time per
output directory (a lock file); staging left by a killed run is removed.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..artifacts import read_json, sha256_file, write_json
from ..errors import STEP_ATTRIBUTE, InputError


# a step record's field naming the export its outputs were copied from (upgrade/run.py)
REUSED_FROM = "reused_from"


@dataclass
class StepRecord:
    name: str
    # "ran" | "skipped" (unchanged) | "reused" (unchanged: its outputs came from the export an upgrade
    # started from, upgrade/plan.py) | "unavailable" (needs what this host lacks) | "failed"
    status: str
    seconds: float
    detail: str = ""


def step_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Steps:
    """Runs named steps, skipping those whose inputs are unchanged since the last run."""

    def __init__(self, out_dir: Path, force: bool, log: Callable[[str], None]) -> None:
        self.records_dir = out_dir / ".steps"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.force, self.log = force, log
        self.done: list[StepRecord] = []
        self.prefix = ""

    def scoped(self, prefix: str) -> "Steps":
        """The same steps with names under ``prefix`` (a bank's tasks: ``<task>.extract``);
        records and the list of what ran are shared."""
        view = copy.copy(self)
        view.prefix = self.prefix + prefix
        return view

    def run(self, name: str, inputs: dict[str, Any], outputs: list[Path], work: Callable[[], Any]) -> str:
        name = self.prefix + name
        key = step_key({"step": name, **inputs})
        record = self.records_dir / f"{name}.json"
        if not self.force and record.is_file() and all(path.exists() for path in outputs):
            try:
                previous = read_json(record, "step record")
            except InputError:
                previous = {}
            if previous.get("key") == key:
                origin = previous.get(REUSED_FROM)
                if isinstance(origin, str):
                    self.done.append(StepRecord(name, "reused", 0.0, f"outputs reused from {origin}, sha256 verified"))
                    self.log(f"[reuse] {name} (from {origin})")
                    return key
                self.done.append(StepRecord(name, "skipped", 0.0,
                                            f"inputs unchanged (took {previous.get('seconds', 0.0):.1f} s when it ran)"))
                self.log(f"[skip] {name} (inputs unchanged)")
                return key
        self.log(f"[run ] {name}")
        start = time.perf_counter()
        try:
            work()
        except Exception as exc:
            if getattr(exc, STEP_ATTRIBUTE, None) is None:  # the innermost step is the one to name
                try:
                    setattr(exc, STEP_ATTRIBUTE, name)
                except AttributeError:  # an exception type that takes no attributes
                    pass
            raise
        seconds = time.perf_counter() - start
        write_json(record, {"key": key, "seconds": seconds})
        self.done.append(StepRecord(name, "ran", seconds))
        return key

    def forget(self, name: str) -> None:
        """Drop a step's record, so that its next run is not skipped (its outputs are gone)."""
        (self.records_dir / f"{self.prefix}{name}.json").unlink(missing_ok=True)

    def failed(self, name: str, reason: str) -> None:
        """A step that ran and failed its checks; nothing it would have written was kept."""
        self.done.append(StepRecord(self.prefix + name, "failed", 0.0, reason))
        self.log(f"[FAIL] {self.prefix}{name}: {reason}")

    def unavailable(self, name: str, reason: str) -> None:
        self.done.append(StepRecord(self.prefix + name, "unavailable", 0.0, reason))
        self.log(f"[skip] {self.prefix}{name}: {reason}")


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One export per output directory: a second concurrent run is refused, not interleaved."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".lock", "w")
    except FileExistsError as exc:  # out_dir, or a folder on the way to it, is a file
        raise InputError(f"output directory {out_dir}: {exc.filename} exists and is not a directory") from exc
    except NotADirectoryError as exc:
        raise InputError(f"output directory {out_dir}: a part of the path is a file, not a directory") from exc
    except OSError as exc:  # permissions, a read-only file system
        raise InputError(f"cannot write to output directory {out_dir}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(f"another transmiter export is writing to {out_dir}; wait for it to finish") from exc
        yield
    finally:
        handle.close()


def remove_stale_staging(out: Path, log: Callable[[str], None]) -> None:
    """Staging directories left by a run that was killed (SIGKILL, power loss) never became
    artifacts; under the lock no other export can be using them, so they go."""
    for stale in sorted([*out.rglob(".*.partial"), *out.rglob(".*.old")], reverse=True):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            log(f"removed {stale} (left by an interrupted run)")


def tree_sha256(path: Path) -> str:
    """Content hash of a file or of every file under a directory (relative paths and bytes)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
