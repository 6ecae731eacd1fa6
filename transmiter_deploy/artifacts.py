"""Writing and reading artifacts safely: atomic, hashed, versioned, pickle-free.

Every artifact directory is built under a temporary name beside its final
place and renamed into place only when complete (swapped with the previous one
in one atomic exchange), so a failure (or Ctrl-C) never leaves a half-written
artifact and never damages the previous one, and a reader never finds the
place empty. Tensors live in safetensors files whose sha256 is recorded in a JSON
manifest and checked on load.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .errors import WRITE_ERRNOS, InputError, IntegrityError, write_failure

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: the output checks below
# run first in every writing command, and a bad --out is refused before seconds of imports

# The manifest that marks each kind of artifact directory (atomic_directory's ``marker``): its
# module names it, and the CLI checks an --out against it before any work
MANIFESTS = {"cache": "cache.json", "head": "head.json", "adapter": "adapter.json", "export": "manifest.json",
             "teacher_logits": "teacher.json"}

T = TypeVar("T")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    """Versions recorded in every manifest, so an artifact says what made it."""
    versions = {}
    for dist in ("transmiter-deploy", "torch", "open_clip_torch", "numpy", "safetensors", "onnx",
                 "onnxruntime-gpu", "onnxslim", "nvidia-modelopt", "onnxconverter-common"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


STAGING_SUFFIX = ".partial"


def _writer_tag() -> str:
    """Host and process of a staging directory's writer, in its name: ``<host>-<pid>``."""
    return f"{os.uname().nodename}-{os.getpid()}"


def _remove_dead_writers_staging(final: Path) -> None:
    """Staging directories of ``final`` left by a writer that was killed (SIGKILL, out of memory,
    power loss: nothing ran to remove them) are removed: those written on this host by a process
    that no longer exists. A live writer's (another process on this host, or any process on
    another host sharing the directory) is left alone. Hosts are told apart by name: containers
    that share a directory need distinct host names (their process ids are not comparable)."""
    prefix = f".{final.name}."
    host = os.uname().nodename
    for sibling in final.parent.glob(f".*{STAGING_SUFFIX}"):
        name = sibling.name
        if not name.startswith(prefix) or not sibling.is_dir():
            continue
        tag = name[len(prefix):-len(STAGING_SUFFIX)].rsplit("-", 2)  # host, pid, mkdtemp's random part
        if len(tag) != 3 or tag[0] != host or not tag[1].isdigit() or _process_alive(int(tag[1])):
            continue
        shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _check_replaceable(final: Path, marker: str) -> None:
    """``final`` is absent, or a directory that is empty or holds ``marker``; else InputError."""
    try:
        status = os.stat(final)
    except FileNotFoundError:
        return
    except OSError as exc:  # a symlink loop, an over-long name, a file on the way: in the system's words
        raise InputError(f"cannot write to output directory {final.parent}: {exc.strerror}") from exc
    if not stat.S_ISDIR(status.st_mode):
        raise InputError(f"output path {final} exists and is not a directory")
    if any(final.iterdir()) and not (final / marker).is_file():
        raise InputError(f"refusing to replace {final}: it is not empty and holds no {marker}")


def _output_error(exc: OSError, final: Path) -> Exception:
    """An OSError making ``final``'s staging directory as the toolkit reports it: a full disk, quota
    or read-only file system is a write failure (exit 5), anything else bad input (exit 2)."""
    if exc.errno in WRITE_ERRNOS:
        return write_failure(exc, str(final))
    return InputError(f"cannot write to output directory {final.parent}: {exc.strerror}")


def check_output_directory(final: Path, marker: str) -> None:
    """Refuse, before any work, an output :func:`atomic_directory` would refuse at the end: a file,
    a non-empty directory without ``marker``, a path through a file or a symlink loop, a name too
    long, a directory the user may not write or a read-only file system (the same one-line errors
    and exit statuses). Writes nothing that stays: a directory is made and removed in the nearest
    existing ancestor of ``final`` (the directories on the way are made by the write itself)."""
    final = Path(final)
    _check_replaceable(final, marker)
    ancestor = final.parent
    while not ancestor.exists():
        if ancestor == ancestor.parent:
            break
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise _output_error(exc, final) from exc


@contextmanager
def atomic_directory(final: Path, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` on success.

    ``marker`` is the manifest file name that identifies an artifact of this
    kind: an existing non-empty ``final`` without it is refused rather than
    replaced, so a mistyped ``--out .`` cannot wipe a user's directory.
    """
    final = Path(final)
    _check_replaceable(final, marker)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_writer_tag()}-", suffix=STAGING_SUFFIX, dir=parent))
    except OSError as exc:
        raise _output_error(exc, final) from exc
    try:
        yield staging
        _commit(staging, final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_failure(exc, str(final)) from exc
        raise


def _commit(staging: Path, final: Path, attempts: int = 20) -> None:
    """Move the finished ``staging`` to ``final``, retiring what was there.

    An existing ``final`` is swapped with ``staging`` in one atomic exchange, so a reader never
    finds the place empty. Two writers of the same ``final`` may commit at the same moment: a
    rename then finds the place taken by the other's artifact (ENOTEMPTY, EEXIST) or the old one
    gone (ENOENT), and tries again, so both end with a complete artifact in place and the last
    one to commit stays."""
    retry = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT)
    for attempt in range(attempts):
        last = attempt == attempts - 1
        if attempt:
            time.sleep(0.005 * attempt)  # let the other writer's rename finish
        try:
            if final.exists():
                if _exchange(staging, final):
                    shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old artifact
                    return
                _replace_in_two_renames(staging, final)
            else:
                os.rename(staging, final)
            return
        except OSError as exc:
            if exc.errno in retry and not last:
                continue
            raise


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    file system cannot. Python's os module has no renameat2, hence ctypes."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace_in_two_renames(staging: Path, final: Path) -> None:
    """Where no atomic exchange exists: the old artifact moved aside, the new one moved in (put
    back if that fails), the old one removed."""
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    previous = retired / "previous"
    try:
        os.rename(final, previous)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.exists():
                os.rename(previous, final)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def read_consistently(directory: Path, read: Callable[[], T], attempts: int = 20) -> T:
    """``read()`` of the artifact at ``directory``, repeated if a writer replaced the artifact
    while it was being read (its directory's identity changed) and the read failed part-way: the
    caller gets the old artifact or the new one whole, never an error made of the two. A writer
    that keeps replacing is waited out for up to ``attempts`` reads."""
    directory = Path(directory)
    for attempt in range(attempts):
        before = _identity(directory)
        try:
            return read()
        except (InputError, OSError):
            if attempt == attempts - 1 or _identity(directory) == before:
                raise
            time.sleep(min(0.005 * (attempt + 1), 0.05))
    raise AssertionError("unreachable")  # pragma: no cover


def _identity(directory: Path) -> tuple[int, int, int] | None:
    """Which directory is at ``directory`` now. The inode number alone is not enough: ext4 gives
    a directory made after another was removed the freed number at once, so an artifact replaced
    twice during one read can sit at the same number it started with; the inode's change time
    tells the two apart."""
    try:
        status = os.stat(directory)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON via a temporary file and a rename (atomic on POSIX)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` via a temporary file beside ``path`` and a rename (atomic on POSIX)."""
    path = Path(path)
    # a unique temporary name: two writers of the same file must not share one
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_failure(exc, str(path)) from exc
        raise


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: the toolkit never writes a key twice, and
    json would keep the last one silently."""
    payload = dict(pairs)
    if len(payload) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key '{duplicate}'")
    return payload


def _bounded_int(text: str) -> int:
    """An integer of at most 40 digits: the toolkit writes sizes, seeds and counts, and a longer
    one would overflow the first float() it meets."""
    if len(text.lstrip("-")) > 40:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits")
    return int(text)


def read_json(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except RecursionError as exc:  # json's decoder recurses once per nesting level
        raise IntegrityError(f"{what} {path} is nested too deeply to be one of ours") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an integer over Python's digit limit
        raise IntegrityError(f"{what} {path} is not valid JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(payload, dict):
        raise IntegrityError(f"{what} {path} must hold a JSON object")
    return payload


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file; return its sha256 (hashed from the bytes written)."""
    from safetensors.torch import save as safetensors_save

    data = safetensors_save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    Path(path).write_bytes(data)
    return sha256_bytes(data)


def load_tensors(path: Path, expected_sha256: str | None, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its hash first; never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise IntegrityError(
            f"{what} {path} does not match the sha256 in its manifest (truncated or modified)"
        )
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise IntegrityError(f"{what} {path} is not a valid safetensors file: {exc}") from exc


def write_manifest(path: Path, fmt: str, version: int, body: dict[str, Any]) -> None:
    """Write an artifact manifest: format tag and version first, versions and date last."""
    write_json(path, {"format": fmt, "format_version": version, **body,
                      "versions": library_versions(), "created": utc_now()})


def read_manifest(path: Path, fmt: str, version: int, what: str, former: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a manifest and check its format tag (or a ``former`` one) and version."""
    manifest = read_json(path, what)
    check_format(manifest, fmt, version, str(path), former)
    return manifest


def recorded_sha256(manifest: dict[str, Any], filename: str, where: str) -> str:
    """The sha256 a manifest's ``files`` section records for ``filename``."""
    files = manifest.get("files")
    entry = files.get(filename) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise IntegrityError(f"{where}: 'files' has no sha256 for {filename}")
    return entry["sha256"]


def require_keys(payload: dict[str, Any], spec: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Check that a manifest has each key with the expected JSON type."""
    for key, kind in spec.items():
        if key not in payload:
            raise IntegrityError(f"{where}: missing key '{key}'")
        value = payload[key]
        if isinstance(value, bool) and kind in (int, float):
            raise IntegrityError(f"{where}: key '{key}' must be {kind.__name__}, got a boolean")
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise IntegrityError(
                f"{where}: key '{key}' must be {expected}, got {type(value).__name__}"
            )


def require_string_lists(payload: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not all(isinstance(item, str) for item in payload[key]):
            raise IntegrityError(f"{where}: '{key}' must be a list of strings")


def check_format(payload: dict[str, Any], expected_format: str, supported_version: int, where: str,
                 former: tuple[str, ...] = ()) -> None:
    """Refuse another format or a newer version; ``former`` are tags this format was once
    written under (still read)."""
    require_keys(payload, {"format": str, "format_version": int}, where)
    if payload["format"] != expected_format and payload["format"] not in former:
        raise IntegrityError(f"{where}: format is '{payload['format']}', expected '{expected_format}'")
    if payload["format_version"] > supported_version:
        raise IntegrityError(
            f"{where}: format version {payload['format_version']} is newer than this "
            f"transmiter-deploy understands ({supported_version}); upgrade the package"
        )
