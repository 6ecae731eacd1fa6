"""Triton model repositories (serving/triton.py): written for every backend and layout and checked
offline (Triton's own model-config protobuf and our wiring checks), then the Python-backend
repositories of the demo export and the demo bank served live by a real ``tritonserver`` on
loopback, answering HTTP and gRPC clients as ``Deployment.classify`` does."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, copy_tree, draw_image
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.serving import triton_server

TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
needs_protobuf = pytest.mark.skipif(not TRITONCLIENT, reason="tritonclient is not installed (the serve extra): "
                                    "Triton's model-config protobuf comes with it")
BACKENDS = ("python", "onnxruntime", "tensorrt")


@pytest.fixture(scope="module")
def single(demo_export) -> Path:
    return demo_export[1].out_dir


@pytest.fixture(scope="module")
def bank(demo_bank_export) -> Path:
    return demo_bank_export


def write(export: Path, out: Path, **options):
    from transmiter_deploy.serving.triton import write_repository

    return write_repository(export, out, **options)


# ---------------------------------------------------------------------------- offline: configs


def check_written(repository: Path, plan, backend: str) -> None:
    from transmiter_deploy.serving.triton import verify_repository

    record = verify_repository(repository)
    assert record["backend"] == backend and record["models"] == [m.name for m in plan.models]
    assert plan.max_batch_size == 8  # the recipe's batch profile (engines/*.engine.json), not a default
    for model in plan.models:
        config = (repository / model.name / "config.pbtxt").read_text()
        assert "max_batch_size: 8" in config
        if model.kind == "ensemble":
            assert "dynamic_batching" not in config and "instance_group" not in config
            continue
        assert "KIND_CPU" in config and "dynamic_batching" in config
        for output in model.outputs:  # a label file per class output, as wide as the output
            if model.name.endswith(("_preprocess", "_backbone")):  # pixels, features: no classes
                assert output.labels is None
                continue
            labels = (repository / model.name / f"labels_{output.name}.txt").read_text().splitlines()
            assert len(labels) == output.dims[-1]
    if backend == "onnxruntime":  # the export's graphs, byte for byte
        graph = plan.model(plan.name) if plan.layout == "fused" else plan.model(f"{plan.name}_backbone")
        source = plan.export.directory / ("model.onnx" if plan.layout == "fused" else "backbone.onnx")
        assert (repository / graph.name / "1" / graph.model_filename).read_bytes() == source.read_bytes()


def check_tensorrt(export: Path, out: Path, layout: str) -> None:
    """No engine was built here (no TensorRT): writing is refused naming the trtexec record, and
    the configs, made from the manifest and the engine records, still pass both checks."""
    from transmiter_deploy.serving.triton import check_plan, plan_repository

    with pytest.raises(InputError, match=r"no TensorRT engine was built .*engines/(model|backbone)\.engine\.json"):
        write(export, out, backend="tensorrt", layout=layout)
    assert not out.exists()
    plan = plan_repository(export, "tensorrt", layout, require_engines=False)
    configs = check_plan(plan)
    engine_model = configs["transmiter" if layout == "fused" else "transmiter_backbone"]
    assert engine_model.backend == "tensorrt" and engine_model.default_model_filename == "model.plan"
    assert engine_model.instance_group[0].kind == engine_model.instance_group[0].KIND_GPU
    assert engine_model.max_batch_size == 8  # the engine's profile max
    if layout == "ensemble":  # heads have no engines: ONNX Runtime beside the TensorRT backbone
        assert configs["transmiter_colours_tinted"].backend == "onnxruntime"


@needs_protobuf
def test_every_backend_and_layout_writes_configs_triton_accepts(single, bank, tmp_path):
    for label, export, layouts in (("single", single, ("fused",)), ("bank", bank, ("fused", "ensemble"))):
        for layout in layouts:
            for backend in BACKENDS:
                out = tmp_path / f"{label}-{backend}-{layout}"
                if backend == "tensorrt":
                    check_tensorrt(export, out, layout)
                    continue
                plan = write(export, out, backend=backend, layout=layout)
                check_written(out, plan, backend)
    names = sorted(p.name for p in (tmp_path / "bank-python-ensemble").iterdir())
    assert names == ["README.md", "transmiter", "transmiter-triton.json", "transmiter_backbone",
                     "transmiter_colours_tinted", "transmiter_colours_tinted_images", "transmiter_images",
                     "transmiter_preprocess", "transmiter_textures_foggy", "transmiter_textures_foggy_images"]
    readme = (tmp_path / "bank-python-ensemble" / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "class_count" in readme


@needs_protobuf
def test_a_single_task_export_has_no_ensemble_layout(single, tmp_path):
    with pytest.raises(InputError, match="needs a task bank") as caught:
        write(single, tmp_path / "repo", layout="ensemble")
    assert "\n" not in str(caught.value) and not (tmp_path / "repo").exists()


@needs_protobuf
def test_the_triton_command_writes_a_repository_or_refuses_in_one_line(single, bank, tmp_path, capsys):
    from transmiter_deploy.cli import main

    assert main(["triton", str(bank), "--out", str(tmp_path / "repo"), "--layout", "ensemble", "--name", "bank"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {tmp_path / 'repo'}: ") and "bank_backbone" in printed
    assert (tmp_path / "repo" / "bank_backbone" / "config.pbtxt").is_file()
    assert main(["triton", str(single), "--out", str(tmp_path / "other"), "--layout", "ensemble"]) == 2
    assert "needs a task bank" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["triton", str(single), "--out", str(tmp_path / "trt"), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".engine.json" in err[0] and not (tmp_path / "trt").exists()


@needs_protobuf
def test_a_tampered_export_is_refused_and_nothing_is_written(single, tmp_path):
    export = copy_tree(single / "onnx", tmp_path / "onnx")
    graph = export / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.onnx") as caught:
        write(export, tmp_path / "repo")
    assert caught.value.exit_code == 2 and not (tmp_path / "repo").exists()


@needs_protobuf
def test_an_out_that_is_not_ours_is_refused_and_ours_is_replaced(single, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace"):
        write(single, theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    (theirs / "transmiter-triton.json").write_text(json.dumps({"format": "someone-else", "format_version": 1}))
    with pytest.raises(InputError, match="refusing to replace"):
        write(single, theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    write(single, ours, name="first")
    (ours / "stale.txt").write_text("left by hand")
    write(single, ours, name="second")
    assert sorted(p.name for p in ours.iterdir()) == ["README.md", "second", "second_images", "second_preprocess",
                                                      "transmiter-triton.json"]
    with pytest.raises(InputError, match="cannot name a Triton model"):
        write(single, tmp_path / "bad-name", name="no spaces")


@needs_protobuf
def test_an_update_touches_only_the_models_that_changed(bank, single, tmp_path):
    """``update=True`` (a server serves the repository): unchanged models keep their folders, inode
    and status-change time alike (Triton reloads a model it finds touched); a new task's models
    come in, a removed task's go, and the record and checks hold after each step."""
    from transmiter_deploy.deploy.bank import add_task, remove_task
    from transmiter_deploy.serving.triton import verify_repository

    grow = copy_tree(bank, tmp_path / "bank")
    repository = tmp_path / "repo"
    write(grow, repository, layout="ensemble", update=True)  # nothing earlier: written whole

    def stamps(model: str) -> dict[str, tuple[int, int]]:
        paths = [repository / model, *sorted((repository / model).rglob("*"))]
        return {str(p.relative_to(repository)): (p.stat().st_ino, p.stat().st_ctime_ns) for p in paths}

    kept = ["transmiter_backbone", "transmiter_preprocess", "transmiter_colours_tinted",
            "transmiter_colours_tinted_images"]
    before = {model: stamps(model) for model in kept}
    add_task(grow / "onnx", "tinted", single / "onnx", log=lambda _: None)
    write(grow, repository, layout="ensemble", update=True)
    assert {model: stamps(model) for model in kept} == before
    assert verify_repository(repository)["models"].count("transmiter_tinted_images") == 1
    remove_task(grow / "onnx", "textures_foggy", log=lambda _: None)
    write(grow, repository, layout="ensemble", update=True)
    assert {model: stamps(model) for model in kept} == before
    assert not (repository / "transmiter_textures_foggy").exists()
    assert not (repository / "transmiter_textures_foggy_images").exists()
    verify_repository(repository)
    assert not list(tmp_path.glob(".repo.update-*"))  # its staging is gone


@needs_protobuf
def test_the_checks_see_what_the_protobuf_cannot(bank, tmp_path):
    from transmiter_deploy.serving.triton_config import check_repository

    original = tmp_path / "repo"
    write(bank, original, layout="ensemble")
    cases = {  # file -> (edit, what the refusal names)
        "transmiter_images/config.pbtxt": (lambda t: t.replace("max_batch_size", "max_batch_sise"), "max_batch_sise"),
        "transmiter_colours_tinted_images/config.pbtxt":
            (lambda t: t.replace('"transmiter_backbone"', '"transmiter_backbone2"'), "no model 'transmiter_backbone2'"),
        "transmiter_colours_tinted/config.pbtxt": (lambda t: t.replace("dims: [ 96 ]", "dims: [ 95 ]"),
                                                   "input 'image_features' takes TYPE_FP32 \\[95\\]"),
        "transmiter/config.pbtxt": (lambda t: t.replace('value: "logits_textures_foggy"', 'value: "logits_other"'),
                                    "output 'logits_textures_foggy' is written by no step"),
        "transmiter_images/labels_logits_colours_tinted.txt": (lambda t: t.split("\n", 1)[1],
                                                               "7 labels for output 'logits_colours_tinted' of width 8"),
        "transmiter_preprocess/config.pbtxt": (lambda t: t.replace('name: "transmiter_preprocess"', 'name: "other"'),
                                               "its directory is 'transmiter_preprocess'"),
        "transmiter_backbone/config.pbtxt": (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 4"),
                                             "max_batch_size 4 is below the ensemble's 8"),
    }
    check_repository(original)
    for index, (relative, (edit, refusal)) in enumerate(cases.items()):
        repository = copy_tree(original, tmp_path / f"case{index}")
        path = repository / relative
        path.write_text(edit(path.read_text()))
        with pytest.raises(InputError, match=refusal):
            check_repository(repository)
    # -1 is any size (how a model serving two generations of other feature widths declares it); a
    # tensor of another rank is still refused
    for dims, accepted in (("dims: [ -1 ]", True), ("dims: [ 96, 1 ]", False)):
        repository = copy_tree(original, tmp_path / f"wildcard-{accepted}")
        path = repository / "transmiter_colours_tinted" / "config.pbtxt"
        path.write_text(path.read_text().replace("dims: [ 96 ]", dims))
        if accepted:
            check_repository(repository)
        else:
            with pytest.raises(InputError, match="takes TYPE_FP32 \\[96, 1\\]"):
                check_repository(repository)


# ---------------------------------------------------------------------------- live: tritonserver


@pytest.fixture(scope="module")
def served(single, bank, tmp_path_factory):
    """A tritonserver serving four Python-backend repositories: the demo export (``demo``), the
    demo bank fused (``bankf``) and as an ensemble (``bank``), and a copy of the bank as an
    ensemble (``grow``) that the last test adds a task to, under explicit model control (every
    model loaded at start); the server's start and stop times."""
    reason = triton_server.unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("triton")
    repositories = [root / "demo", root / "bank-fused", root / "bank-ensemble", root / "grow"]
    write(single, repositories[0], name="demo")
    write(bank, repositories[1], name="bankf")
    write(bank, repositories[2], name="bank", layout="ensemble")
    grow = copy_tree(bank, root / "grow-bank")
    write(grow, repositories[3], name="grow", layout="ensemble")
    began = time.monotonic()
    server = triton_server.TritonServer(repositories, root / "work", explicit=True, models=["*"]).start()
    timing = {"start_s": time.monotonic() - began}
    assert server.shm_regions(), "the Python backend's shared memory does not carry the server's own prefix"
    server.grow = (grow, repositories[3])  # the growing bank and its repository
    yield server, timing
    began = time.monotonic()
    server.stop()
    timing["stop_s"] = time.monotonic() - began
    assert server.shm_regions() == []
    log = server.log.read_text(errors="replace")
    crashes = [line for line in log.splitlines() if any(
        sign in line for sign in ("is not healthy", "terminate called", "Traceback", "Segmentation fault", "core dumped"))]
    assert crashes == [], f"the server logged a crash ({server.log}): {crashes[:3]}"
    print(f"\ntritonserver: ready in {timing['start_s']:.1f} s, stopped in {timing['stop_s']:.1f} s; "
          + ", ".join(f"{k} {v}" for k, v in timing.items() if k not in ("start_s", "stop_s")))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """PNG and JPEG files of several sizes and modes (RGB, RGBA, greyscale): the server converts and
    resizes each as the Deployment does."""
    root = tmp_path_factory.mktemp("triton-images")
    paths = []
    for index, colour in enumerate(COLOURS.values()):
        image = draw_image(colour, seed=500 + index, size=40 + 13 * index)
        variants = [(image, "png"), (image.convert("RGBA"), "png"), (image.convert("L"), "jpeg")]
        image, kind = variants[index % len(variants)]
        paths.append(root / f"{index}.{kind}")
        image.save(paths[-1], format=kind.upper())
    return paths


@pytest.fixture(scope="module")
def expected(single, bank, images):
    """``Deployment.classify`` of the same images on ONNX Runtime, per export: every task's scores."""
    from transmiter_deploy.serving.deployment import Deployment

    results = {}
    for label, export in (("single", single), ("bank", bank)):
        with Deployment.open(export, "onnxruntime-cpu", "fp32") as deployment:
            predictions = deployment.classify(images, topk=3)
            pixels = deployment.preprocess(images)
            results[label] = {"predictions": predictions, "pixels": pixels,
                              "outputs": {task.output: np.stack([p[task.name].scores for p in predictions])
                                          for task in deployment.info.tasks},
                              "task_of": {task.output: task.name for task in deployment.info.tasks}}
    return results


def client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def infer(server, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs=(), class_count: int = 0):
    """One request; the named outputs (all, when none are named) as arrays. Every client is closed:
    an open one holds the server's stop for its whole exit timeout."""
    module = client_module(protocol)
    url = server.http_url if protocol == "http" else server.grpc_url
    with module.InferenceServerClient(url) as client:
        tensors = []
        for name, array in inputs.items():
            tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(name, class_count=class_count) for name in outputs] or None
        result = client.infer(model, tensors, outputs=requested)
        names = list(outputs) or [o["name"] if isinstance(o, dict) else o.name
                                  for o in (result.get_response()["outputs"] if protocol == "http"
                                            else result.get_response().outputs)]
        return {name: result.as_numpy(name) for name in names}


def encoded(paths: list[Path]) -> np.ndarray:
    return np.array([[path.read_bytes()] for path in paths], dtype=object)


def assert_same_scores(served_outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    for name, scores in served_outputs.items():
        np.testing.assert_allclose(scores, reference[name], atol=1e-4, rtol=0, err_msg=name)
        assert (scores.argmax(axis=1) == reference[name].argmax(axis=1)).all(), name


# the served models that take encoded images, each with the export it answers for and its outputs
IMAGE_MODELS = {"demo_images": ("single", None), "bankf_images": ("bank", None), "bank_images": ("bank", None),
                "bank_colours_tinted_images": ("bank", ["logits_colours_tinted"]),
                "bank_textures_foggy_images": ("bank", ["logits_textures_foggy"])}


@pytest.mark.cluster  # starts a live server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_scores_equal_the_deployments(served, expected, images, protocol):
    server, _ = served
    for model, (label, outputs) in IMAGE_MODELS.items():
        reference = expected[label]["outputs"]
        result = infer(server, protocol, model, {"image": encoded(images)})
        assert sorted(result) == sorted(outputs or reference), model
        assert_same_scores(result, reference)
    for model, label in (("demo", "single"), ("bankf", "bank"), ("bank", "bank")):  # pixels in
        result = infer(server, protocol, model, {"pixel_values": expected[label]["pixels"]})
        assert_same_scores(result, expected[label]["outputs"])


@pytest.mark.cluster  # starts a live server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_classification_extension_names_the_classes(served, expected, images, protocol):
    server, _ = served
    for model, label in (("demo_images", "single"), ("bank_images", "bank")):
        reference = expected[label]
        outputs = list(reference["outputs"])
        result = infer(server, protocol, model, {"image": encoded(images)}, outputs=outputs, class_count=3)
        for output in outputs:
            for row, entries in enumerate(result[output]):
                fields = [entry.decode().split(":", 2) for entry in entries]  # score:index:class name
                names = [name for _, _, name in fields]
                want = reference["predictions"][row][reference["task_of"][output]].top
                assert names == [name for name, _ in want], (model, output, row)
                np.testing.assert_allclose([float(score) for score, _, _ in fields], [s for _, s in want], atol=1e-4)


def bad_requests(expected, images):
    """(model, inputs, requested outputs, what the error names) for each bad request."""
    pixels = expected["single"]["pixels"]
    nan = np.full_like(pixels[:1], np.nan)
    return [
        ("demo_images", {"image": np.array([[b"not an image at all"]], dtype=object)}, (), "cannot decode image"),
        ("bank_images", {"image": np.array([[b""]], dtype=object)}, (), "empty"),
        ("demo_images", {"image": np.zeros((0, 1), dtype=object)}, (), "got 0"),
        ("demo_images", {"image": encoded(images * 3)[:9]}, (), "batch-size must be <= 8"),
        ("demo_images", {"image": encoded(images[:1])}, ("no_such_output",), "no_such_output"),
        ("bank_no_such_task_images", {"image": encoded(images[:1])}, (), "unknown model"),
        ("demo", {"pixel_values": nan}, (), "NaN"),
        ("bank_backbone", {"pixel_values": nan}, (), "NaN"),
        ("demo", {"pixel_values": pixels[:, :, :-1]}, (), "unexpected shape for input 'pixel_values'"),
    ]


@pytest.mark.cluster  # starts a live server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_errors_and_the_server_keeps_serving(served, expected, images, protocol):
    from tritonclient.utils import InferenceServerException

    server, _ = served
    good = {"image": encoded(images[:2])}
    for model, inputs, outputs, refusal in bad_requests(expected, images):
        with pytest.raises(InferenceServerException) as caught:
            infer(server, protocol, model, inputs, outputs)
        assert refusal in str(caught.value), (model, str(caught.value))
        result = infer(server, protocol, "bank_images", good)  # and the next good request is answered
        assert_same_scores(result, {k: v[:2] for k, v in expected["bank"]["outputs"].items()})


def backbone_runs(server, name: str) -> tuple[str, int]:
    """The backbone model's loaded version and its executions so far (Triton's statistics: a
    reload starts them again from 0)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(f"{name}_backbone").model_stats
    assert len(stats) == 1
    return stats[0].version, stats[0].execution_count


@pytest.mark.cluster  # starts a live server
def test_a_task_added_live_loads_without_reloading_the_backbone(served, single, expected, images):
    """Issue 28, item 5: a task added to the bank, the repository updated in place and the new
    head and ensembles loaded through the repository API, while requests to the other tasks keep
    coming: none fails, the backbone is neither reloaded nor re-executed from zero, and the new
    task answers as the single-task export it came from does."""
    import threading

    import tritonclient.grpc as grpcclient
    from transmiter_deploy.deploy.bank import add_task

    server, timing = served
    grow, repository = server.grow
    encoded_images = {"image": encoded(images[:2])}
    infer(server, "grpc", "grow_images", encoded_images)
    before = backbone_runs(server, "grow")
    stop, outcome = threading.Event(), {"ok": 0, "failed": []}

    def keep_asking() -> None:  # the other tasks, one request after another, through the update
        while not stop.is_set():
            for model in ("grow_colours_tinted_images", "grow_textures_foggy_images", "grow_images"):
                try:
                    infer(server, "grpc", model, encoded_images)
                    outcome["ok"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    outcome["failed"].append(f"{model}: {exc}")

    asking = threading.Thread(target=keep_asking)
    asking.start()
    try:
        add_task(grow / "onnx", "tinted", single / "onnx", log=lambda _: None)
        began = time.monotonic()
        write(grow, repository, name="grow", layout="ensemble", update=True)
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            for model in ("grow_tinted", "grow_tinted_images", "grow", "grow_images"):
                client.load_model(model)
        answer = infer(server, "grpc", "grow_tinted_images", {"image": encoded(images)})
        timing["new task answering after_s"] = round(time.monotonic() - began, 2)
        time.sleep(0.5)
    finally:
        stop.set()
        asking.join()
    assert outcome["failed"] == [] and outcome["ok"] > 0, outcome["failed"][:3]
    version, runs = backbone_runs(server, "grow")
    assert version == before[0] and runs > before[1]  # the same backbone, still counting
    assert server.log.read_text(errors="replace").count("successfully loaded 'grow_backbone'") == 1
    assert_same_scores({"logits": answer["logits_tinted"]}, expected["single"]["outputs"])
    every = infer(server, "grpc", "grow_images", {"image": encoded(images)})
    assert sorted(every) == ["logits_colours_tinted", "logits_textures_foggy", "logits_tinted"]
    assert_same_scores({k: v for k, v in every.items() if k != "logits_tinted"}, expected["bank"]["outputs"])


@pytest.mark.cluster  # starts a live server
def test_a_server_that_dies_leaves_no_shared_memory_behind(single, tmp_path):
    """A tritonserver killed (as a crash ends it: no unloading) leaves its Python-backend regions in
    /dev/shm; stopping it removes them, and its stub processes."""
    import os
    import signal

    reason = triton_server.unavailable()
    if reason:
        pytest.skip(reason)
    write(single, tmp_path / "repository", name="demo")
    server = triton_server.TritonServer([tmp_path / "repository"], tmp_path / "work").start()
    process = server.process
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        left = server.shm_regions()
        assert left, "nothing was left to remove"
    finally:
        server.stop()
    assert server.shm_regions() == [] and not any(region.exists() for region in left)
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while live_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_group_members(process.pid) == [], "the server's stub processes outlived it"


def live_group_members(group: int) -> list[int]:
    """The processes of process group ``group`` that are alive (zombies, dead and waiting to be
    reaped by whoever adopted them, are not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # ended while being read
        if int(pgrp) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members
