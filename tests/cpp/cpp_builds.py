"""The builds of the C++ runtime (cpp/) that the tests drive, and how each one is run.

`make test` builds cpp/ for this machine (release, and ASan+UBSan) and, where the cross toolchain
is installed (`make cpp-aarch64`, cpp/README.md), for aarch64 (release, and ASan+UBSan), and names
each build's directory in an environment variable. A build whose variable is unset is skipped
with that reason; one whose variable is set but whose program is missing fails. An aarch64 build
on an x86-64 machine runs under qemu-user (`qemu-aarch64 -cpu neoverse-n1 -L SYSROOT`), so every test
parameterised over the builds checks the cross-built binaries against the same Python reference
as the native ones.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer", "runtime error:")
# Lines an emulated program's libraries print because of the emulation, not because of the program:
# ONNX Runtime's cpuinfo reads /proc/cpuinfo, which under qemu-user is the x86-64 host's, and
# warns once on stderr that it knows no such Arm vendor. Dropped before the one-line checks.
EMULATION_NOISE = ("onnxruntime cpuid_info warning: Unknown CPU vendor",)
# The emulated aarch64 CPU, as cpp/cmake/aarch64-linux-gnu.cmake sets it for ctest (it says why:
# qemu's default CPU has SVE, which ONNX Runtime uses and qemu emulates about 11x slower)
QEMU_CPU = "neoverse-n1"


@dataclass(frozen=True)
class BuildSpec:
    variable: str      # the environment variable naming the build directory
    arch: str | None   # the target architecture (None: this machine's)
    sanitized: bool


BUILDS = {
    "release": BuildSpec("TRANSMITER_CPP_BUILD", None, False),
    "asan": BuildSpec("TRANSMITER_CPP_ASAN_BUILD", None, True),
    "aarch64": BuildSpec("TRANSMITER_CPP_AARCH64_BUILD", "aarch64", False),
    "aarch64-asan": BuildSpec("TRANSMITER_CPP_AARCH64_ASAN_BUILD", "aarch64", True),
}


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@dataclass(frozen=True)
class CppBuild:
    name: str
    directory: Path
    arch: str
    launcher: tuple[str, ...]  # () natively; the emulator and its arguments otherwise
    sanitized: bool

    @property
    def emulated(self) -> bool:
        return bool(self.launcher)

    def command(self, program: str = "transmiter_infer") -> list[str]:
        return [*self.launcher, str(self.directory / program)]

    def env(self) -> dict[str, str]:
        # LeakSanitizer stops the process with ptrace to scan it, which qemu-user does not
        # emulate ("LeakSanitizer has encountered a fatal error"): leaks are checked by the
        # native sanitizer build; the emulated one checks addresses and undefined behaviour.
        leaks = "0" if self.emulated else "1"
        return {**os.environ, "ASAN_OPTIONS": f"detect_leaks={leaks}:abort_on_error=0",
                "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def emulator(arch: str) -> tuple[str, ...]:
    """How this machine runs a program built for `arch`: natively, or under qemu-user."""
    if arch == host_arch():
        return ()
    qemu = shutil.which(f"qemu-{arch}")
    if not qemu:
        pytest.fail(f"qemu-{arch} is not installed: the {arch} build cannot run here (make cpp-aarch64-deps)")
    sysroot = os.environ.get("TRANSMITER_AARCH64_SYSROOT", f"/usr/{arch}-linux-gnu")
    return (qemu, "-cpu", QEMU_CPU, "-L", sysroot)


def cpp_build(name: str) -> CppBuild:
    spec = BUILDS[name]
    root = os.environ.get(spec.variable)
    if not root:
        pytest.skip(f"{spec.variable} is not set: the C++ runtime's {name} build is built and tested by `make test`")
    directory = Path(root)
    if not (directory / "transmiter_infer").is_file():
        pytest.fail(f"{spec.variable}={root} but {directory / 'transmiter_infer'} was not built")
    arch = spec.arch or host_arch()
    return CppBuild(name, directory, arch, emulator(arch), spec.sanitized)


def run(build: CppBuild, *args, check: bool = True, program: str = "transmiter_infer",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A program of `build` with `args`; no sanitizer report may appear, and with `check` it must succeed."""
    path = build.directory / program
    if not path.is_file():
        pytest.fail(f"{path} was not built")
    # backslashreplace: the fuzz test's messages quote the bytes it mutated
    result = subprocess.run([*build.command(program), *map(str, args)], capture_output=True, text=True,
                            errors="backslashreplace", timeout=900 if build.emulated else 300,
                            env={**build.env(), **(env or {})})
    assert not any(mark in result.stderr for mark in SANITIZER_MARKS), result.stderr
    if build.emulated:
        result.stderr = "".join(line for line in result.stderr.splitlines(keepends=True)
                                if not line.startswith(EMULATION_NOISE))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def needs_onnxruntime(build: CppBuild) -> None:
    """Skips (or, with TRANSMITER_CPP_ORT=ON, fails) a pixels test on a build without that backend."""
    if "onnxruntime" not in run(build, "--backends").stdout.split():
        if os.environ.get("TRANSMITER_CPP_ORT") == "ON":
            pytest.fail(f"TRANSMITER_CPP_ORT=ON but the {build.name} build has no onnxruntime backend")
        pytest.skip(f"the {build.name} build has no onnxruntime backend (no ONNX Runtime headers; see cpp/README.md)")


# The builds, as fixtures: each test names the ones it runs on (directly, or through a
# parameterised fixture of its module).
@pytest.fixture(scope="session")
def infer() -> CppBuild:
    return cpp_build("release")


@pytest.fixture(scope="session")
def infer_asan() -> CppBuild:
    return cpp_build("asan")


@pytest.fixture(scope="session")
def infer_aarch64() -> CppBuild:
    return cpp_build("aarch64")


def builds(*names: str):
    """A session fixture parameterised over the named builds (each id is the build's name); list it
    first among a test's arguments, so that a missing build skips before expensive fixtures run."""
    @pytest.fixture(scope="session", params=names)
    def build(request) -> CppBuild:
        return cpp_build(request.param)
    return build


@pytest.fixture
def build_case(request) -> tuple[CppBuild, str]:
    """(build, case) for a test parameterised indirectly over chosen (build name, case) pairs:
    every case natively, some under emulation (each emulated ONNX Runtime run costs seconds in qemu).
    ``@pytest.mark.parametrize("build_case", PAIRS, indirect=True, ids=...)``."""
    name, case = request.param
    return cpp_build(name), case
