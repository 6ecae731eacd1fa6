"""The Ray engine of the feature cache, on a real local Ray cluster (2 CPUs), against the local
engine: the same files, a killed actor retried, a killed driver leaving the old cache, bad input
as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from transmiter_deploy.cli import main
from transmiter_deploy.errors import DependencyError, InputError
from transmiter_deploy.features.cache import build_cache, load_cache
from transmiter_deploy.features.datasets import open_dataset
from transmiter_deploy.features.distributed_cache import (
    CONNECT_TIMEOUT_S,
    TEST_EXIT_ENV,
    RayCacheSettings,
    build_cache_ray,
    check_reachable,
)
from transmiter_deploy.features.models import load_model

from cli_process import CliProcess
from conftest import make_image_folder

BATCH, SHARD = 8, 24  # several batches per actor and shards that end mid-batch


@pytest.fixture(scope="module")
def ray_local_cluster(tmp_path_factory):
    """One local cluster for this module (starting one takes seconds), shut down when it ends. The
    fault-injection variable is set before it starts, so its workers inherit it; it names a file
    no test has written yet, so no actor dies until a test writes it. Without Ray (the [distributed] extra)
    the tests that need a cluster are skipped; those of a missing Ray still run."""
    ray = pytest.importorskip("ray", reason="the ray engine's tests need the [distributed] extra")
    trigger = tmp_path_factory.mktemp("ray-fault") / "exit-after-batches"
    os.environ[TEST_EXIT_ENV] = str(trigger)
    ray.init(num_cpus=2, object_store_memory=96 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield trigger
    ray.shutdown()
    os.environ.pop(TEST_EXIT_ENV, None)


@pytest.fixture(scope="module")
def demo_source_spec():
    # a demo-world architecture: the actors must rebuild it from its configuration
    from transmiter_deploy.demo.weights import demo_model_spec, shipped_weights_dir

    return demo_model_spec(shipped_weights_dir(), "TM-Demo-Source")


@pytest.fixture(scope="module")
def images_and_local_cache(tmp_path_factory, demo_source_spec):
    root = tmp_path_factory.mktemp("ray-cache")
    dataset = open_dataset(make_image_folder(root / "images", per_class=15))
    build_cache(load_model(demo_source_spec), dataset, root / "local", batch_size=BATCH, shard_size=SHARD,
                progress=False)
    return dataset, root / "local"


def assert_same_cache(ray_dir: Path, local_dir: Path) -> None:
    ray_cache, local_cache = load_cache(ray_dir), load_cache(local_dir)
    assert ray_cache.fingerprint == local_cache.fingerprint
    assert torch.equal(ray_cache.labels, local_cache.labels)
    assert ray_cache.class_names == local_cache.class_names
    assert ray_cache.model == local_cache.model
    assert (ray_cache.features - local_cache.features).abs().max() <= 1e-6
    ray_manifest, local_manifest = (json.loads((d / "cache.json").read_text()) for d in (ray_dir, local_dir))
    for key in ("preprocess", "num_samples", "feature_dim"):
        assert ray_manifest[key] == local_manifest[key], key
    for key in ("kind", "num_samples", "fingerprint"):  # the location differs where a copy is compared
        assert ray_manifest["dataset"][key] == local_manifest["dataset"][key], key
    assert [s["rows"] for s in ray_manifest["shards"]] == [s["rows"] for s in local_manifest["shards"]]


def test_ray_cache_equals_local_cache(ray_local_cluster, images_and_local_cache, demo_source_spec, tmp_path):
    dataset, local = images_and_local_cache
    build_cache_ray(demo_source_spec, dataset, tmp_path / "ray", RayCacheSettings(workers=2),
                    batch_size=BATCH, shard_size=SHARD, progress=False)
    assert_same_cache(tmp_path / "ray", local)
    assert [p.name for p in tmp_path.iterdir()] == ["ray"]  # no staging left behind


def test_killed_actor_is_retried_and_no_image_is_lost_or_doubled(ray_local_cluster, images_and_local_cache,
                                                                 demo_source_spec, tmp_path):
    dataset, local = images_and_local_cache
    ray_local_cluster.write_text("2")  # the first actor to finish 2 batches exits on its third
    build_cache_ray(demo_source_spec, dataset, tmp_path / "ray", RayCacheSettings(workers=2),
                    batch_size=BATCH, shard_size=SHARD, progress=False)
    assert Path(f"{ray_local_cluster}.fired").is_file(), "no actor was killed"
    assert not ray_local_cluster.exists()
    assert_same_cache(tmp_path / "ray", local)


def test_corrupt_image_is_named_and_the_previous_cache_stays(ray_local_cluster, images_and_local_cache,
                                                             demo_source_spec, tmp_path):
    dataset, local = images_and_local_cache
    images = make_image_folder(tmp_path / "images", per_class=4)
    (images / "green" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = shutil.copytree(local, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match=r"^cannot decode image \S*green/002\.png: [^\n]*$"):
        build_cache_ray(demo_source_spec, open_dataset(images), out, RayCacheSettings(workers=1),
                        batch_size=BATCH, shard_size=SHARD, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "images"]


def test_a_model_a_worker_cannot_load_comes_back_as_its_one_line_error(ray_local_cluster, tmp_path):
    """A checkpoint present where the driver runs but not on a worker's node: the encoder (built
    here as Ray builds it in an actor) answers every batch with the loader's message, which the
    driver raises like a corrupt image's."""
    import numpy as np

    from transmiter_deploy.features.distributed_cache import _ImageEncoder
    from transmiter_deploy.features.models import ModelSpec, architecture_config

    missing = tmp_path / "not-on-this-node.safetensors"
    threads = torch.get_num_threads()
    try:  # the actor sets its process's torch threads: this process's are put back
        encoder = _ImageEncoder(ModelSpec("TM-Tiny-ViT", checkpoint=missing), architecture_config("TM-Tiny-ViT"), 1)
    finally:
        torch.set_num_threads(threads)
    rows = encoder({"index": np.arange(3), "pixels": np.zeros((3, 3, 32, 32), np.float32),
                    "sha256": np.array(["a", "b", "c"]), "error": np.array(["", "", ""])})
    assert rows["index"].tolist() == [0, 1, 2]
    assert set(rows["error"].tolist()) == {f"checkpoint not found: {missing}"}


def test_killed_driver_leaves_the_previous_cache(ray_local_cluster, images_and_local_cache, tmp_path):
    """SIGKILL of `transmiter cache --engine ray` while it writes: the cache that was there stays,
    whole (the run wrote only into its hidden staging directory)."""
    dataset, local = images_and_local_cache
    out = shutil.copytree(local, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import ray

    images = make_image_folder(tmp_path / "images", per_class=60)
    # a child process (tests/cli_process.py): the driver's death is the point
    process = CliProcess(["cache", "--model", "TM-Tiny-ViT", "--data", images, "--out", out, "--engine", "ray",
                          "--batch-size", 4, "--address", ray.get_runtime_context().gcs_address])
    deadline = time.monotonic() + 60
    try:
        while not list(tmp_path.glob(".cache.*.partial")):
            assert process.poll() is None, process.result().stderr[-2000:]
            assert time.monotonic() < deadline, "the driver never started writing"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the run: the cluster is encoding
        assert process.poll() is None, "the run finished before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.result()
    assert process.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(load_cache(out)) == len(dataset)
    # its staging directory outlives it (nothing ran to remove it) until the next write of the cache
    assert [p for p in tmp_path.glob(".cache.*.partial") if f"-{process.pid}-" in p.name]
    few = make_image_folder(tmp_path / "few", per_class=1)
    assert main(["cache", "--model", "TM-Tiny-ViT", "--data", str(few), "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".cache.*.partial"))


def test_unreachable_address_is_one_line_exit_3_in_bounded_time(ray_local_cluster, tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", per_class=1)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code = main(["cache", "--model", "TM-Tiny-ViT", "--data", str(images), "--out", str(tmp_path / "c"),
                 "--engine", "ray", "--address", f"127.0.0.1:{port}"])
    assert code == 3
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert not (tmp_path / "c").exists()
    # an address that never answers (TEST-NET-1, RFC 5737): bounded by the timeout
    started = time.monotonic()
    with pytest.raises(DependencyError, match="cannot reach the Ray cluster at 192.0.2.1:6379"):
        check_reachable("192.0.2.1:6379", timeout=1.0)
    assert time.monotonic() - started < 3
    with pytest.raises(InputError, match="not HOST:PORT"):
        check_reachable("no-port-here")


def test_without_ray_the_ray_engine_exits_3_naming_the_extra(tmp_path, capsys, monkeypatch):
    images = make_image_folder(tmp_path / "images", per_class=1)
    for name in [name for name in sys.modules if name == "ray" or name.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when it is not installed
    code = main(["cache", "--model", "TM-Tiny-ViT", "--data", str(images), "--out", str(tmp_path / "c"),
                 "--engine", "ray"])
    assert code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'transmiter-deploy[distributed]'" in err


def test_gpus_per_worker_on_a_cluster_without_gpus_is_exit_3(ray_local_cluster, images_and_local_cache,
                                                           demo_source_spec, tmp_path):
    dataset, _ = images_and_local_cache
    with pytest.raises(DependencyError, match="the Ray cluster has 0 GPUs; an encoding worker asks for 0.5"):
        build_cache_ray(demo_source_spec, dataset, tmp_path / "c", RayCacheSettings(gpus_per_worker=0.5),
                        progress=False)
    assert not (tmp_path / "c").exists()


def test_bad_engine_settings_are_one_line_errors(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", per_class=1)
    base = ["cache", "--model", "TM-Tiny-ViT", "--data", str(images), "--out", str(tmp_path / "c")]
    assert main([*base, "--address", "127.0.0.1:6379"]) == 2
    assert "need --engine ray" in capsys.readouterr().err
    assert main([*base, "--engine", "ray", "--device", "cuda"]) == 2
    assert "drop --device" in capsys.readouterr().err
    with pytest.raises(InputError, match="workers"):
        RayCacheSettings(workers=0).validate()
    assert not (tmp_path / "c").exists()


def test_export_with_data_engine_ray_builds_the_same_cache_under_the_same_step_keys(ray_local_cluster, demo_export,
                                                                                     tmp_path):
    """`data.engine: ray` in a recipe: a missing cache is rebuilt on the cluster, equal to the one
    the local engine wrote, and switching engine redoes no other step (the keys do not change)."""
    from conftest import SMALL_DEMO, copy_export
    from transmiter_deploy.pipeline.export import run_export
    from transmiter_deploy.pipeline.recipe import load_recipe

    recipe_text = SMALL_DEMO.replace("data: {demo_task:", "data: {engine: ray, workers: 2, demo_task:")
    assert recipe_text != SMALL_DEMO
    path, out = copy_export(demo_export, tmp_path, recipe_text)
    kept = shutil.move(out / "caches" / "target-test", tmp_path / "local-target-test")
    outcome = run_export(load_recipe(path), out, progress=False, log=lambda _: None)
    assert [step.name for step in outcome.steps if step.status == "ran"] == ["cache-target-test"]
    assert_same_cache(out / "caches" / "target-test", Path(kept))
