"""Concurrent writers and readers of one artifact: two ``transmiter cache`` (``head``, ``extract``)
writing the same ``--out`` at once each end with a complete artifact in place or a one-line
refusal, never a mix of the two runs' files; readers during a replacement read the old artifact
or the new one whole."""

import json
import threading
import time

import pytest

from cli_process import CliProcess
from hostile_support import extract_args, leftovers
from transmiter_deploy.artifacts import atomic_directory, read_consistently, read_json, write_json
from transmiter_deploy.errors import IntegrityError
from transmiter_deploy.features.cache import load_cache

ROUNDS = 3


def _writers(flow, out):
    # two runs that write different bytes into the same place
    return {
        "cache": [["cache", "--model", "TM-Tiny-RN", "--init-seed", seed, "--data", flow / "images", "--out", out]
                  for seed in (0, 1)],
        "head": [["head", "--model", "TM-Tiny-RN", "--init-seed", seed, "--classes-from", flow / "h_src",
                  "--templates", "photo", "--out", out] for seed in (0, 1)],
        "extract": [extract_args(flow, out) + ["--seed", seed] for seed in (0, 1)],
    }


def _consistent(out, command) -> str:
    """Which run's artifact is in place; fails on a mixed or broken one."""
    from transmiter_deploy.features.adapter_artifact import load_adapter
    from transmiter_deploy.features.heads import load_head

    loader = {"cache": load_cache, "head": load_head, "extract": load_adapter}[command]
    loader(out)  # every hash in its manifest matches: one run's files only
    manifest = json.loads((out / {"cache": "cache.json", "head": "head.json", "extract": "adapter.json"}[command]).read_text())
    return json.dumps(manifest.get("model") or manifest.get("source_model") or manifest.get("provenance"), sort_keys=True)


@pytest.mark.parametrize("command", ["cache", "head", "extract"])
def test_two_writers_of_one_output_each_end_whole(flow, tmp_path, command):
    out = tmp_path / "artifact"
    for _ in range(ROUNDS):
        runs = [CliProcess(["--quiet", *args]) for args in _writers(flow, out)[command]]
        results = [(done.returncode, done.stderr) for done in (run.result(timeout=600) for run in runs)]
        for status, err in results:
            assert status == 0 or (status in (2, 5) and len(err.strip().splitlines()) == 1), err
            assert "Traceback" not in err
        assert any(status == 0 for status, _ in results)
        _consistent(out, command)
        assert leftovers(tmp_path) == []


def test_readers_during_replacements_read_the_old_or_the_new_cache_whole(flow, tmp_path):
    out = tmp_path / "cache"
    first = flow / "c_src"
    second = flow / "c_ft"  # same images, another model: different features and hashes
    import shutil

    shutil.copytree(first, out)
    expected = {load_cache(first).features.numpy().tobytes(), load_cache(second).features.numpy().tobytes()}
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                cache = load_cache(out)
                if cache.features.numpy().tobytes() not in expected:
                    failures.append("a cache made of both versions")
                reads[0] += 1
            except Exception as exc:  # anything but a whole old or new cache is a failure
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for i in range(30):
            source = (first, second)[i % 2]
            with atomic_directory(out, "cache.json") as staging:
                for path in source.iterdir():
                    shutil.copy2(path, staging / path.name)
            time.sleep(0.002)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == [], failures[:3]
    assert reads[0] > 0


def test_a_read_torn_by_two_replacements_is_retried_even_where_the_inode_number_comes_back(tmp_path):
    # ext4 hands the inode number of a removed directory to the next one made, so an artifact
    # replaced twice during one read can sit at the number it had when the read began
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "marker.json").write_text("{}")
    calls = []

    def torn_then_whole():
        calls.append(out.stat().st_ino)
        if len(calls) == 1:
            for _ in range(2):
                with atomic_directory(out, "marker.json") as staging:
                    (staging / "marker.json").write_text("{}")
            raise IntegrityError("a manifest of one version, a shard of the next")
        return "whole"

    assert read_consistently(out, torn_then_whole) == "whole"
    assert len(calls) == 2


def test_concurrent_json_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "record.json"
    errors = []

    def write(value):
        try:
            for _ in range(200):
                write_json(path, {"writer": value, "payload": [value] * 500})
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    record = read_json(path, "record")
    assert record["payload"] == [record["writer"]] * 500
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
