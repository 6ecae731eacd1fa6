"""``transmiter`` in a child process forked from a warm parent, for the cases whose point is the
process boundary: a file-size limit (RLIMIT_FSIZE), SIGKILL, concurrent writers, dropped
capabilities.

A fresh interpreter imports torch, open_clip and ONNX Runtime before the CLI parses its first
option (5-10 s on the project's 2-core machines); that import is not what these cases test. The
children here are forked from a multiprocessing ``forkserver`` that imported the CLI once per
test session and ran nothing else (no torch thread pool exists yet when it forks), so each child
is a separate process, with its own limits, signals and capabilities, that starts in
milliseconds. The child runs the CLI's ``main`` (the console script's entry point) and exits with
its status; its stdout and stderr come back over sockets the parent drains, as ``subprocess``'s
pipes would give them.
The console script itself keeps a test of its own (tests/test_cli.py).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import threading
import time

_CONTEXT = multiprocessing.get_context("forkserver")
# the CLI and what its commands import when they run: imported once, in the server, never in a child
_CONTEXT.set_forkserver_preload([
    "torch", "open_clip", "onnx", "onnxruntime", "transmiter_deploy.cli", "transmiter_deploy.demo",
    "transmiter_deploy.pipeline.export", "transmiter_deploy.pipeline.bank_export", "transmiter_deploy.deploy.bank",
    "transmiter_deploy.runtimes.tensorrt"])

# linux/capability.h: the header version whose data is two 32-bit words per set, and the bits of
# the two capabilities that let root ignore file permissions
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_file_permission_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process (effective and permitted,
    so it cannot take them back): root then obeys file permissions as a user does. What
    util-linux's ``setpriv --bounding-set=-dac_override,-dac_read_search`` achieves across an
    exec, done in place (capget/capset, linux/capability.h)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _child(argv: list[str], stdout: socket.socket, stderr: socket.socket, limit: int | None,
           obey_permissions: bool, env: dict[str, str], cwd: str) -> None:
    # what a fresh ``python -m transmiter_deploy.cli`` would have: its own output streams (sockets,
    # which RLIMIT_FSIZE does not cut, as it does not cut subprocess's pipes), limits,
    # environment and working directory
    for stream, connection in ((sys.stdout, stdout), (sys.stderr, stderr)):
        stream.flush()
        os.dup2(connection.fileno(), stream.fileno())
        connection.close()
    os.environ.clear()  # the parent's environment now, not the server's when it started
    os.environ.update(env)
    os.chdir(cwd)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if obey_permissions and os.geteuid() == 0:
        drop_file_permission_override()
    from transmiter_deploy.cli import main

    status = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(status)


class CliProcess:
    """One running ``transmiter ARGS`` child; ``Popen``'s shape where the tests need it."""

    def __init__(self, args, limit: int | None = None, obey_permissions: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.args = [str(arg) for arg in args]
        self._output: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        ends, readers = {}, []
        for name in self._output:
            ours, theirs = socket.socketpair()
            ends[name] = theirs
            readers.append(threading.Thread(target=self._drain, args=(ours, self._output[name]), daemon=True))
        self._process = _CONTEXT.Process(
            target=_child, args=(self.args, ends["stdout"], ends["stderr"], limit, obey_permissions,
                                 {**os.environ, **(env or {})}, os.getcwd()), daemon=False)
        self._process.start()
        for end in ends.values():  # the child holds its own copies: EOF when it exits
            end.close()
        self._readers = readers
        for reader in readers:
            reader.start()

    @staticmethod
    def _drain(connection: socket.socket, chunks: list[bytes]) -> None:
        with connection:
            while chunk := connection.recv(1 << 16):
                chunks.append(chunk)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    def send_signal(self, signal_number: int) -> None:
        os.kill(self._process.pid, signal_number)

    def _text(self, name: str) -> str:
        return b"".join(self._output[name]).decode(errors="replace")

    def wait_for_stderr(self, text: str, timeout: float) -> bool:
        """Whether ``text`` appeared on the child's stderr within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self._text("stderr"):
                return True
            if self.poll() is not None:
                break
            time.sleep(0.05)
        return text in self._text("stderr")

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait, then the child's status and all its output."""
        try:
            status = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._process.join()
            raise
        for reader in self._readers:
            reader.join()
        return subprocess.CompletedProcess(self.args, status, self._text("stdout"), self._text("stderr"))


def run_cli_child(*args, limit: int | None = None, obey_permissions: bool = False, timeout: float = 600,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``transmiter --quiet ARGS`` in a forked child: under RLIMIT_FSIZE ``limit`` bytes (Python
    ignores SIGXFSZ, so a write past it fails with EFBIG); ``obey_permissions``: as root, without
    the capabilities that let root ignore file permissions."""
    return CliProcess(["--quiet", *args], limit=limit, obey_permissions=obey_permissions, env=env).result(timeout)
