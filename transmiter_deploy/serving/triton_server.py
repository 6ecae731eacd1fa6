"""A ``tritonserver`` process on loopback, as the tests and the load benchmark run one.

The server is the binary the PyPI package ``nvidia-pytriton`` carries (Triton 2.51, the Python
backend only), run directly rather than through PyTriton, so it serves a model repository as
any Triton would:

* a backend directory of our own (``<work>/backends/python``): the package's Python backend
  with the stub built for this interpreter's Python version beside it, where Triton looks for it;
* the stub's libraries: this interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH``
  (``sysconfig``'s ``LIBDIR``; another ``libpython3.x`` of the same version found first fails to
  load the standard library), then the package's bundled ``nvidia_pytriton.libs``;
* the stub's Python: the stub embeds the ``python3`` it finds first on ``PATH`` and takes that
  interpreter's environment, so a small virtual environment (``<work>/stub-python``) is put first:
  it sees this interpreter's packages, with NumPy 1.x ahead of them when this interpreter has
  NumPy 2 (Triton 2.51's stub was built for NumPy 1 and garbles NumPy 2 arrays: see
  :func:`.triton_model.check_numpy_bridge`). That NumPy lives in ``$TRANSMITER_TRITON_NUMPY``, else
  ``<sys.prefix>/triton-numpy`` (``pip install --no-deps --target <dir> 'numpy>=1.26,<2'``);
* free loopback ports, chosen by binding port 0 (a port taken between the choice and the start is
  retried), metrics off (``--allow-gpu-metrics=false``: there is no GPU).

A stop is SIGTERM: Triton finishes in-flight requests and unloads every model within its exit
timeout (Triton's default, 30 s: Python-backend models take seconds to unload, and a server that
exits on the timeout leaves their shared-memory regions in /dev/shm). A client left open holds
the stop for the whole timeout: close every client. Each server names its Python-backend
shared-memory regions with a prefix of its own (``shm-region-prefix-name``), so that what a server
that died or was killed leaves in /dev/shm (1 MiB or more per model instance; seen: Triton 2.51's
Python backend aborting with ``boost::interprocess::lock_exception`` while loading models on a
loaded 2-core machine) is found and removed when it is stopped, and no other server's regions are.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DependencyError, InputError

INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0 (its tritonserver binary; see docs/serving.md)"
NUMPY_INSTALL = "pip install --no-deps --target {dir} 'numpy>=1.26,<2'"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the packaged server are."""

    binary: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libraries: Path | None  # the package's bundled shared libraries


def find_tritonserver() -> TritonInstall:
    """The ``tritonserver`` of the installed nvidia-pytriton; DependencyError naming what is missing."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported: its own imports are not ours to need
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"tritonserver is not installed: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libraries = root.parent.parent / "nvidia_pytriton.libs"  # site-packages/nvidia_pytriton.libs
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub",
                            libraries if libraries.is_dir() else None)
    for path, what in ((install.binary, "the tritonserver binary"), (install.python_backend, "the Python backend"),
                       (install.stub, f"the Python backend stub for Python {version}")):
        if not path.exists():
            raise DependencyError(f"{what} is missing from nvidia-pytriton ({path}): {INSTALL}")
    return install


def unavailable() -> str | None:
    """Why a live server cannot run here (tritonserver or tritonclient missing), or None."""
    try:
        find_tritonserver()
    except DependencyError as exc:
        return str(exc)
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed: pip install 'transmiter-deploy[serve]'"
    return None


def stub_numpy() -> Path | None:
    """The folder holding the NumPy 1.x the stub needs, or None when this interpreter's NumPy is
    1.x already; DependencyError naming the command that installs it."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    folder = Path(os.environ.get("TRANSMITER_TRITON_NUMPY") or Path(sys.prefix) / "triton-numpy")
    found = sorted(folder.glob("numpy-*.dist-info")) if folder.is_dir() else []
    if found and found[-1].name.split("-")[1].split(".")[0] == "1" and (folder / "numpy").is_dir():
        return folder
    raise DependencyError(f"Triton 2.51's Python backend stub needs NumPy 1.x (it garbles NumPy {numpy.__version__} "
                          f"arrays) and {folder} holds none: {NUMPY_INSTALL.format(dir=folder)}")


def prepare_environment(install: TritonInstall, work: Path) -> dict[str, str]:
    """The backend directory and the stub's Python under ``work``; the server's environment."""
    backend = work / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in [*install.python_backend.glob("*.so"), *install.python_backend.glob("*.py"), install.stub]:
        shutil.copy2(source, backend / source.name)  # copies: Triton reads the stub from the backend's folder
    python = work / "stub-python"
    venv.EnvBuilder(symlinks=True, with_pip=False, clear=True).create(python)
    site_dirs = [str(p) for p in (stub_numpy(),) if p is not None]
    site_dirs += list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    purelib = Path(sysconfig.get_paths(vars={"base": str(python), "platbase": str(python)})["purelib"])
    # addsitedir, not a plain path line: the interpreter's own .pth files (an editable install) apply
    # too. No bytecode: the stub would write __pycache__ beside each model.py, in the model's version
    # folder, which Triton then takes for a changed model and reloads on the next load request
    # that reaches it (an ensemble's); the stub's isolated interpreter ignores PYTHONDONTWRITEBYTECODE.
    (purelib / "transmiter-triton.pth").write_text(
        "import sys, site; sys.dont_write_bytecode = True; "
        + "; ".join(f"site.addsitedir({d!r})" for d in site_dirs) + "\n", encoding="utf-8")
    libraries = [sysconfig.get_config_var("LIBDIR") or "", str(install.libraries or ""),
                 os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "PATH": f"{python / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": os.pathsep.join(p for p in libraries if p)}


def _kill_group(pid: int) -> None:
    """SIGKILL to the process group of ``pid`` (the server's own session: start_new_session), if any
    of it is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (bound to port 0 together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """``tritonserver`` serving ``repositories`` on loopback; a context manager.

    ``explicit=True`` starts Triton's explicit model control (models load and unload through the
    repository API; ``models`` are loaded at start, ``"*"`` for all). The server's output goes to
    ``<work>/tritonserver.log``."""

    def __init__(self, repositories: Sequence[Path], work: Path, explicit: bool = False,
                 models: Sequence[str] = (), start_timeout: float = 300.0, exit_timeout: int = 30) -> None:
        self.repositories = [Path(r).resolve() for r in repositories]
        self.work = Path(work).resolve()
        self.explicit, self.models = explicit, list(models)
        self.start_timeout, self.exit_timeout = start_timeout, exit_timeout
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.log = self.work / "tritonserver.log"
        self.shm_prefix = f"transmiter_triton_{uuid.uuid4().hex[:12]}_"

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def command(self, install: TritonInstall) -> list[str]:
        command = [str(install.binary), *(f"--model-repository={r}" for r in self.repositories),
                   f"--backend-directory={self.work / 'backends'}",
                   f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
                   f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--allow-gpu-metrics=false", "--disable-auto-complete-config",
                   f"--exit-timeout-secs={self.exit_timeout}",
                   f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if self.explicit:
            command += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        return command

    def start(self) -> "TritonServer":
        """Start and wait until the server is ready (every model loaded), or raise with the log's end."""
        for repository in self.repositories:
            if not repository.is_dir():
                raise InputError(f"model repository not found: {repository}")
        install = find_tritonserver()
        self.work.mkdir(parents=True, exist_ok=True)
        environment = prepare_environment(install, self.work)
        for attempt in range(3):  # a port taken between free_ports and the bind: new ports
            self.http_port, self.grpc_port = free_ports(2)
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(self.command(install), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
            if self._wait_ready():
                return self
            taken = "address already in use" in self.log_tail().lower()
            self.stop()
            if not taken or attempt == 2:
                raise DependencyError(f"tritonserver did not become ready (log {self.log}): "
                                      f"{self.log_tail(3).strip()}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the server's process group (its stub processes with it) if it
        has not exited within its exit timeout and a margin; a server that had already ended (it
        died) has its stub processes killed. Then the server's shared-memory regions left in
        /dev/shm are removed."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.exit_timeout + 20)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)
                process.wait()
        else:
            _kill_group(process.pid)
        for region in self.shm_regions():
            region.unlink(missing_ok=True)

    def shm_regions(self) -> list[Path]:
        """This server's Python-backend shared-memory regions in /dev/shm."""
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
