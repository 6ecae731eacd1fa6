"""Output paths a user can get wrong, for each writing command: an existing file, a path under a
file, a directory the user may not write, a symlink loop, a read-only file system, a name too
long. One line each, the documented exit status, nothing created. The CLI runs in this process
(what it says and writes is the point), except where the process's own capabilities are."""

import os
import subprocess

import pytest

from hostile_support import extract_args, leftovers, one_line, run_cli, run_cli_here

COMMANDS = ("cache", "head", "extract")


def _args(flow, command, out):
    return {
        "cache": ["cache", "--model", "TM-Tiny-RN", "--data", flow / "images", "--out", out],
        "head": ["head", "--model", "TM-Tiny-RN", "--classes-from", flow / "h_src", "--templates", "photo", "--out", out],
        "extract": extract_args(flow, out),
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file_or_under_a_file(flow, tmp_path, command, capfd):
    target = tmp_path / "file"
    target.write_text("keep me")
    for out in (target, target / "sub"):
        result = run_cli_here(capfd, *_args(flow, command, out))
        assert result.returncode == 2, result.stderr
        assert str(target) in one_line(result.stderr)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_in_a_directory_the_user_may_not_write(flow, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        result = run_cli(*_args(flow, command, locked / "out"), obey_permissions=True)
    finally:
        os.chmod(locked, 0o755)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line(result.stderr)
    assert str(locked) in line and "ermission denied" in line, line
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_out_through_a_symlink_loop(flow, tmp_path, command, capfd):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = run_cli_here(capfd, *_args(flow, command, tmp_path / "loop" / "out"))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "loop" in line and "symbolic links" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_with_a_name_too_long(flow, tmp_path, command, capfd):
    result = run_cli_here(capfd, *_args(flow, command, tmp_path / ("x" * 300)))
    assert result.returncode == 2, result.stderr
    assert "too long" in one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def _read_only_mount(tmp_path):
    """A read-only bind mount of an empty directory, where this machine allows one (root in a
    mount namespace); None elsewhere."""
    source, mount = tmp_path / "source", tmp_path / "ro"
    source.mkdir()
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    check = subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], capture_output=True, text=True)
    if check.returncode != 0 or os.access(mount, os.W_OK) and _writable(mount):
        subprocess.run(["umount", str(mount)], capture_output=True)
        return None
    return mount


def _writable(directory) -> bool:
    try:
        (directory / ".probe").write_text("")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


@pytest.mark.parametrize("command", COMMANDS)
def test_out_on_a_read_only_file_system(flow, tmp_path, command, capfd):
    mount = _read_only_mount(tmp_path)
    if mount is None:
        pytest.skip("this machine allows no read-only bind mount here")
    try:
        result = run_cli_here(capfd, *_args(flow, command, mount / "out"))
        assert result.returncode == 5, result.stderr
        assert "Read-only file system" in one_line(result.stderr)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert leftovers(tmp_path) == []
