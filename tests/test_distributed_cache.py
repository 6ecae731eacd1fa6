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
import tempfile
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
    RAY_LOG_PREFIX,
    ImageEncoder,
    RayCacheSettings,
    build_cache_ray,
    check_reachable,
    ray_log_path,
)
from transmiter_deploy.features.models import load_model

from cli_process import CliProcess
from conftest import make_image_folder

BATCH, SHARD = 8, 24  # several batches per actor and shards that end mid-batch


@pytest.fixture(scope="module")
def ray_local_cluster():
    """One local cluster for this module (starting one takes seconds), shut down when it ends.
    Without Ray (the [distributed] extra) the tests that need a cluster are skipped; those of a
    missing Ray still run."""
    ray = pytest.importorskip("ray", reason="the ray engine's tests need the [distributed] extra")
    ray.init(num_cpus=2, object_store_memory=96 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if ray_log_path() is not None:  # this process's log of Ray's output (in the system's temp dir)
        ray_log_path().unlink(missing_ok=True)


def dying_encoder(trigger: Path, after: int) -> type[ImageEncoder]:
    """The engine's encoder, except that the first actor to finish ``after`` batches claims
    ``trigger`` (an atomic rename to ``<trigger>.fired``, so it happens once, whichever actor and
    however often actors restart) and exits at once on its next batch, as a lost process would.
    Made in a function so that Ray ships the class itself (by value) to its workers, which cannot
    import this test module."""

    class DyingEncoder(ImageEncoder):
        def __call__(self, batch):
            done = getattr(self, "done", 0)
            if done >= after and trigger.exists():
                try:
                    os.rename(trigger, f"{trigger}.fired")
                except OSError:
                    pass  # another actor claimed it
                else:
                    os._exit(1)
            self.done = done + 1
            return super().__call__(batch)

    return DyingEncoder


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
    trigger = tmp_path / "exit-after-batches"
    trigger.write_text("")
    # the first actor to finish 2 batches exits on its third
    build_cache_ray(demo_source_spec, dataset, tmp_path / "ray", RayCacheSettings(workers=2),
                    batch_size=BATCH, shard_size=SHARD, progress=False, encoder_class=dying_encoder(trigger, 2))
    assert Path(f"{trigger}.fired").is_file(), "no actor was killed"
    assert not trigger.exists()
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


def counting_encoder(folder: Path) -> type[ImageEncoder]:
    """The engine's encoder, except that each actor leaves a file named by its process id in
    ``folder`` when it is built (made in a function, as :func:`dying_encoder`)."""

    class CountingEncoder(ImageEncoder):
        def __init__(self, *args):
            (folder / str(os.getpid())).touch()
            super().__init__(*args)

    return CountingEncoder


def test_no_more_actors_start_than_there_are_batches(ray_local_cluster, demo_source_spec, tmp_path):
    """Two workers asked for, one batch of images: one actor loads the model, not two."""
    dataset = open_dataset(make_image_folder(tmp_path / "images", per_class=2))
    actors = tmp_path / "actors"
    actors.mkdir()
    build_cache_ray(demo_source_spec, dataset, tmp_path / "ray", RayCacheSettings(workers=2), batch_size=64,
                    progress=False, encoder_class=counting_encoder(actors))
    assert len(list(actors.iterdir())) == 1
    build_cache(load_model(demo_source_spec), dataset, tmp_path / "local", batch_size=64, progress=False)
    assert_same_cache(tmp_path / "ray", tmp_path / "local")


def test_a_model_a_worker_cannot_load_comes_back_as_its_one_line_error(ray_local_cluster, tmp_path):
    """A checkpoint present where the driver runs but not on a worker's node: the encoder (built
    here as Ray builds it in an actor) answers every batch with the loader's message, which the
    driver raises like a corrupt image's."""
    import numpy as np

    from transmiter_deploy.features.models import ModelSpec, architecture_config

    missing = tmp_path / "not-on-this-node.safetensors"
    threads = torch.get_num_threads()
    try:  # the actor sets its process's torch threads: this process's are put back
        encoder = ImageEncoder(ModelSpec("TM-Tiny-ViT", checkpoint=missing), architecture_config("TM-Tiny-ViT"), 1)
    finally:
        torch.set_num_threads(threads)
    rows = encoder({"index": np.arange(3), "pixels": np.zeros((3, 3, 32, 32), np.float32),
                    "sha256": np.array(["a", "b", "c"]), "error": np.array(["", "", ""])})
    assert rows["index"].tolist() == [0, 1, 2]
    assert set(rows["error"].tolist()) == {f"checkpoint not found: {missing}"}


def remove_ray_logs_of(pid: int) -> None:
    """The log of Ray's output that a killed child left in the temporary directory (its headers
    name the writer's pid, features/distributed_cache.py)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RAY_LOG_PREFIX}*.log"):
        try:
            if f"(pid {pid})" in path.read_text(errors="replace"):
                path.unlink()
        except OSError:
            pass


# what Ray itself writes on stderr on every run (Ray 2.60): its Python logger's notice when a driver
# joins a cluster with token authentication, and its C++ core worker's line about an actor pool
# with restarts whose constructor arguments are in the object store
RAY_LINES = ("Token authentication is enabled", "core_worker", "constructor arguments in the object store")


def test_rays_own_log_lines_go_to_a_log_file_not_to_stderr(ray_local_cluster, tmp_path, capfd):
    images = make_image_folder(tmp_path / "images", per_class=2)
    address = ray_local_cluster.get_runtime_context().gcs_address
    args = ["cache", "--model", "TM-Tiny-ViT", "--data", images, "--engine", "ray", "--workers", 1, "--batch-size", 4,
            "--address", address]
    # a driver of its own joining this module's cluster (tests/cli_process.py), as `transmiter cache`
    # runs: Ray logs its joining and its core worker starts in that process
    result = CliProcess([*args, "--out", tmp_path / "c"]).result(timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    cached, named = result.stdout.splitlines()
    assert cached.startswith("cached 8 images (4 classes)")
    assert named.startswith("Ray's own log: ")
    log = Path(named.removeprefix("Ray's own log: "))
    try:
        text = log.read_text()
    finally:
        log.unlink()
    assert f"caching {images} into {tmp_path / 'c'}" in text and "core_worker" in text
    assert "constructor arguments in the object store" in text
    if "RAY_AUTH_MODE" not in os.environ:  # set, Ray says nothing of it
        assert "Token authentication is enabled" in text
    # --quiet, in this process: the result line alone (the log is not named), nothing on stderr
    capfd.readouterr()
    assert main(["--quiet", *map(str, args), "--out", str(tmp_path / "quiet")]) == 0
    captured = capfd.readouterr()
    assert not any(line in captured.err for line in RAY_LINES), captured.err
    assert captured.err == "" and captured.out.splitlines() == [cached.replace(str(tmp_path / "c"), str(tmp_path / "quiet"))]
    assert f"caching {images} into {tmp_path / 'quiet'}" in ray_log_path().read_text()
    assert_same_cache(tmp_path / "quiet", tmp_path / "c")


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
        remove_ray_logs_of(process.pid)
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
    # zero encoding actors would encode nothing: refused before Ray is imported or a cluster joined
    assert main([*base, "--engine", "ray", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err == ("transmiter: error: --workers 0: --engine ray needs at least 1 encoding actor "
                   "(leave --workers out for one per CPU of the cluster)\n")
    with pytest.raises(InputError, match="workers"):
        RayCacheSettings(workers=0).validate()
    with pytest.raises(InputError, match="encoder must be ImageEncoder or a subclass"):
        build_cache_ray(None, None, tmp_path / "c", encoder_class=object)
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
