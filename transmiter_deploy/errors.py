"""The exceptions the toolkit raises on purpose, and the CLI exit status of each.

Every message names the offending file, key or value in one line, so the CLI
can print it as is. Anything else that escapes is a bug (exit status 1).
"""

from __future__ import annotations

import errno


class TransmiterError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(TransmiterError):
    """Bad input: a missing, malformed or mismatched file, key or value."""

    exit_code = 2


class IntegrityError(InputError):
    """An artifact that is truncated, tampered with or does not match its manifest."""


class DependencyError(TransmiterError):
    """An optional dependency or a piece of hardware is missing."""

    exit_code = 3


class VerificationError(TransmiterError):
    """A computed result failed a check it must pass (parity, tolerance)."""

    exit_code = 4


class WriteError(TransmiterError):
    """An output could not be written: the disk is full, a file-size limit was hit, the file
    system is read-only or the process may not write there. Nothing half-written is left, and
    the artifact that was there before is unchanged."""

    exit_code = 5


# set on an exception that escapes a pipeline step (pipeline/steps.py), so that the CLI's one line
# can name the step it came from
STEP_ATTRIBUTE = "transmiter_step"

# errno values that mean "this write cannot succeed here" whatever the toolkit does
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


def write_failure(exc: OSError, what: str) -> WriteError:
    """``exc`` (raised while writing ``what``) as one line naming the file and the reason."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(what) else ""
    return WriteError(f"cannot write {what}{where}: {exc.strerror or exc}")


def one_line(message: str) -> str:
    """``message`` as the one line the CLI prints: characters that would end or hide a line
    (newlines, other line separators, control characters, a file's stray bytes) escaped, so a
    key or value quoted from a hostile file cannot split the message or write to the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with --debug output)",
    2: "bad input (file, key or value named in the message)",
    3: "missing optional dependency or hardware",
    4: "verification failed",
    5: "cannot write an output (disk full, file-size limit, read-only file system); nothing half-written is left",
}
