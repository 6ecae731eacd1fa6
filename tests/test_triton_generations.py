"""Generations of an export served as Triton model versions (serving/triton_generations.py): the
version folders, configs and record of a generation update, a rollback and a prune written offline
and refused where they must be; then the demo bank switched live from generation 1 to 2 and back
on a real ``tritonserver`` while clients keep asking, with no failed request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import copy_tree, draw_image, tree_digest
from test_triton import needs_protobuf, write
from transmiter_deploy.errors import InputError, VerificationError
from transmiter_deploy.serving import triton_server

NAME = "gen"
PARTS = ["gen_preprocess", "gen_backbone", "gen_colours_tinted", "gen_textures_foggy"]
ENSEMBLES = ["gen", "gen_images", "gen_colours_tinted_images", "gen_textures_foggy_images"]
IMAGE_MODELS = ["gen_colours_tinted_images", "gen_textures_foggy_images", "gen_images"]


@pytest.fixture(scope="module")
def bank(demo_bank_export) -> Path:
    return demo_bank_export


@pytest.fixture(scope="module")
def second(demo_bank_upgrade) -> Path:
    """The bank's second generation: ``transmiter upgrade`` onto a target of another image size and
    feature width (tests/conftest.py), so its parts' configs differ in their dims."""
    return demo_bank_upgrade


def ensemble_repository(export: Path, out: Path, **options):
    return write(export, out, layout="ensemble", name=NAME, **options)


def config(repository: Path, model: str) -> str:
    return (repository / model / "config.pbtxt").read_text()


def record_of(repository: Path) -> dict:
    return json.loads((repository / "transmiter-triton.json").read_text())


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Inode and status-change time of every path under ``folder``: Triton reloads a touched version."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_ctime_ns) for p in [folder, *folder.rglob("*")]}


def assert_serves(repository: Path, parts: list[int], ensembles: int) -> None:
    listed = ", ".join(map(str, parts))
    for model in PARTS:
        assert f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}" in config(repository, model), model
    for model in ENSEMBLES:
        text = config(repository, model)
        assert f"version_policy: {{ specific: {{ versions: [ {ensembles} ] }} }}" in text, model
        assert "model_version: -1" not in text and f"model_version: {ensembles}\n" in text, model


# ---------------------------------------------------------------------------- offline


@needs_protobuf
def test_a_generation_update_adds_version_folders_and_pins_every_config(bank, second, tmp_path):
    from transmiter_deploy.serving.triton import verify_repository

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    first = {model: config(repository, model) for model in PARTS + ENSEMBLES}
    for model in PARTS + ENSEMBLES:  # a first generation is written as before generations existed
        assert sorted(p.name for p in (repository / model).iterdir() if p.is_dir()) == ["1"]
        assert "version_policy" not in first[model]
    assert "model_version: -1" in first["gen_images"]
    record = record_of(repository)
    assert record["generation"] == 1 and list(record["generations"]) == ["1"]
    kept = {model: stamps(repository / model / "1") for model in PARTS + ENSEMBLES}

    plan = ensemble_repository(second, repository, update=True)
    assert plan.generation == 2
    assert {model: stamps(repository / model / "1") for model in PARTS + ENSEMBLES} == kept  # untouched
    assert_serves(repository, [2], 2)
    record = verify_repository(repository)
    assert record["generation"] == 2 and sorted(record["generations"]) == ["1", "2"]
    assert record["export"]["directory"] == str(second / "onnx")
    assert record["generations"]["1"]["configs"]["gen_backbone"] == first["gen_backbone"]  # what rollback restores
    version = repository / "gen_backbone" / "2"
    parameters = json.loads((version / "parameters.json").read_text())  # its own graphs' sha256s
    assert parameters["mode"] == "graph" and parameters["sha256"].startswith("backbone")
    assert "parameters.json" in (version / "model.py").read_text() and (version / "triton_model.py").is_file()
    assert not (repository / "gen_backbone" / "1" / "parameters.json").exists()


@needs_protobuf
def test_rollback_then_prune_keep_the_repository_valid(bank, second, tmp_path):
    from transmiter_deploy.serving.triton import verify_repository
    from transmiter_deploy.serving.triton_generations import prune, rollback, switch_generation

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    first = {model: config(repository, model) for model in PARTS + ENSEMBLES}
    ensemble_repository(second, repository, update=True)
    assert rollback(repository) == 1
    assert_serves(repository, [1], 1)
    assert verify_repository(repository)["generation"] == 1
    assert record_of(repository)["export"]["directory"] == str(bank / "onnx")
    assert prune(repository) == []  # generation 2 is newer than the current one: a roll-forward target
    assert (repository / "gen_backbone" / "2").is_dir()
    switch_generation(repository, 2)
    assert prune(repository) == [1]
    for model in PARTS + ENSEMBLES:
        assert sorted(p.name for p in (repository / model).iterdir() if p.is_dir()) == ["2"]
    record = verify_repository(repository)
    assert list(record["generations"]) == ["2"] and not any(k.split("/")[1] == "1" for k in record["files"] if "/" in k)
    assert_serves(repository, [2], 2)
    with pytest.raises(InputError, match="no generation before its current one"):
        rollback(repository)
    # the configs are generation 2's, serving it alone: its target's image size and feature width
    from transmiter_deploy.serving.triton_config import serving_config

    for model in PARTS:
        assert config(repository, model) == serving_config(record["generations"]["2"]["configs"][model], [2])
    assert "dims: [ 3, 32, 32 ]" in config(repository, "gen_backbone") and "dims: [ 64 ]" in config(repository, "gen_backbone")
    assert "dims: [ 3, 48, 48 ]" in first["gen_backbone"]


@needs_protobuf
def test_an_update_from_the_same_export_stays_in_its_version_folder_and_rollback_restores_the_old_configs(
        bank, second, tmp_path):
    """The current generation's export written again with another max_batch_size: only its version
    folders and configs change; a rollback writes generation 1's configs back from the record."""
    from transmiter_deploy.serving.triton import verify_repository
    from transmiter_deploy.serving.triton_generations import rollback

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    first = {model: config(repository, model) for model in PARTS}
    ensemble_repository(second, repository, update=True)
    kept = {model: stamps(repository / model / "1") for model in PARTS + ENSEMBLES}
    ensemble_repository(second, repository, update=True, max_batch=4)
    assert {model: stamps(repository / model / "1") for model in PARTS + ENSEMBLES} == kept
    assert all("max_batch_size: 4" in config(repository, model) for model in PARTS + ENSEMBLES)
    assert_serves(repository, [2], 2)
    record = verify_repository(repository)
    assert record["generation"] == 2 and "max_batch_size: 4" in record["generations"]["2"]["configs"]["gen_backbone"]
    assert rollback(repository) == 1  # another config: the parts switch at once, offline
    for model in PARTS:
        assert config(repository, model) == first[model].replace(
            "max_batch_size: 8\n", "max_batch_size: 8\nversion_policy: { specific: { versions: [ 1 ] } }\n")
    verify_repository(repository)


@needs_protobuf
def test_a_record_written_before_generations_takes_a_generation_update(bank, second, tmp_path):
    from transmiter_deploy.artifacts import write_json
    from transmiter_deploy.serving.triton import verify_repository

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    first = {model: config(repository, model) for model in PARTS + ENSEMBLES}
    record = record_of(repository)
    del record["generation"], record["generations"]
    write_json(repository / "transmiter-triton.json", record)
    ensemble_repository(second, repository, update=True)
    record = verify_repository(repository)
    assert record["generation"] == 2 and record["generations"]["1"]["configs"] == first


@needs_protobuf
def test_the_checks_refuse_a_pin_or_a_version_that_is_not_there(bank, second, tmp_path):
    from transmiter_deploy.serving.triton_config import check_repository

    original = tmp_path / "repo"
    ensemble_repository(bank, original)
    ensemble_repository(second, original, update=True)
    cases = {  # file -> (edit, what the refusal names)
        "gen_images/config.pbtxt": (lambda t: t.replace("model_version: 2\n", "model_version: 1\n", 1),
                                    "pinned to version 1, which that model does not serve"),
        "gen_backbone/config.pbtxt": (lambda t: t.replace("versions: [ 2 ]", "versions: [ 2, 3 ]"),
                                      "no version directory 3/"),
        "gen_backbone/2/model.py": (None, "its model file 2/model.py is missing"),
    }
    check_repository(original)
    for index, (relative, (edit, refusal)) in enumerate(cases.items()):
        repository = copy_tree(original, tmp_path / f"case{index}")
        path = repository / relative
        if edit is None:
            path.unlink()
        else:
            path.write_text(edit(path.read_text()))
        with pytest.raises(InputError, match=refusal):
            check_repository(repository)


@needs_protobuf
def test_an_update_from_another_lineage_is_refused_and_nothing_changes(bank, second, tmp_path):
    from transmiter_deploy.artifacts import read_json, write_json

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    before = tree_digest(repository)
    stranger = copy_tree(bank, tmp_path / "stranger")  # the same bank elsewhere: not the repository's export
    cousin = copy_tree(second, tmp_path / "cousin")  # upgraded from another parent
    manifest = read_json(cousin / "onnx" / "manifest.json", "export manifest")
    manifest["lineage"]["parent_manifest_sha256"] = "0" * 64
    write_json(cousin / "onnx" / "manifest.json", manifest)
    for export in (stranger, cousin):
        with pytest.raises(InputError, match="written from another export") as caught:
            ensemble_repository(export, repository, update=True)
        message = str(caught.value)
        assert "\n" not in message and str(bank / "onnx") in message and str(export / "onnx") in message
        assert tree_digest(repository) == before


@needs_protobuf
def test_a_generation_that_cannot_be_served_side_by_side_is_refused_before_anything_is_written(bank, second,
                                                                                                 tmp_path):
    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    before = tree_digest(repository)
    with pytest.raises(InputError, match="cannot be served side by side") as caught:  # max_batch_size 4, not 8
        ensemble_repository(second, repository, update=True, max_batch=4, server="127.0.0.1:9")
    assert "gen_preprocess" in str(caught.value) and tree_digest(repository) == before


@needs_protobuf
def test_a_failure_inside_leaves_a_valid_repository(bank, second, tmp_path, monkeypatch):
    """Raised inside each operation: the update undoes what it wrote; a switch or a prune stopped
    half-way leaves configs and folders the record still accounts for, and the next run finishes."""
    from transmiter_deploy.serving import triton_generations as generations
    from transmiter_deploy.serving.triton import verify_repository

    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    before = tree_digest(repository)

    def fail(*_args, **_kwargs):
        raise OSError("stopped here")

    with monkeypatch.context() as patch:  # the record write of the update
        patch.setattr(generations, "_commit", fail)
        with pytest.raises(OSError, match="stopped here"):
            ensemble_repository(second, repository, update=True)
    assert tree_digest(repository) == before and verify_repository(repository)["generation"] == 1

    ensemble_repository(second, repository, update=True)
    written = []

    def some_then_fail(path, text):
        if len(written) == 3:
            raise OSError("stopped here")
        written.append(path)
        real(path, text)

    real = generations.atomic_write_text
    with monkeypatch.context() as patch:  # a rollback stopped after three configs
        patch.setattr(generations, "atomic_write_text", some_then_fail)
        with pytest.raises(OSError, match="stopped here"):
            generations.rollback(repository)
    assert len(written) == 3 and verify_repository(repository)["generation"] == 2
    assert generations.rollback(repository) == 1 and verify_repository(repository)["generation"] == 1
    generations.switch_generation(repository, 2)
    with monkeypatch.context() as patch:  # a prune stopped after its record, before removing folders
        patch.setattr(generations.shutil, "rmtree", fail)
        with pytest.raises(OSError, match="stopped here"):
            generations.prune(repository)
    assert list(verify_repository(repository)["generations"]) == ["2"] and (repository / "gen_backbone" / "1").is_dir()
    assert generations.prune(repository) == [] and not (repository / "gen_backbone" / "1").exists()
    verify_repository(repository)


@needs_protobuf
def test_the_triton_command_updates_rolls_back_and_prunes_or_refuses_in_one_line(bank, second, tmp_path, capsys):
    from transmiter_deploy.cli import main

    repository = str(tmp_path / "repo")
    options = ["--out", repository, "--layout", "ensemble", "--name", NAME]
    assert main(["triton", str(bank), *options]) == 0
    assert main(["triton", str(second), *options, "--update"]) == 0
    assert capsys.readouterr().out.strip().endswith("generation 2")
    assert main(["triton", "--out", repository, "--rollback"]) == 0
    assert capsys.readouterr().out.strip() == f"{repository} serves generation 1 again"
    assert main(["triton", "--out", repository, "--prune"]) == 0
    assert "holds no generation older" in capsys.readouterr().out
    for argv, refusal in ((["triton", str(bank), "--out", repository, "--rollback"], "no EXPORT"),
                          (["triton", "--out", repository, "--rollback", "--prune"], "not both"),
                          (["triton", "--out", repository], "EXPORT is missing"),
                          (["triton", str(bank), *options, "--server", "127.0.0.1:9"], "--server applies to --update"),
                          (["triton", "--out", str(tmp_path / "none"), "--rollback"], "repository record not found")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and refusal in err[0], (argv, err)
    before = tree_digest(Path(repository))
    assert main(["triton", str(second), *options, "--update", "--server", "127.0.0.1:9"]) == 2
    assert "cannot reach the Triton server at 127.0.0.1:9" in capsys.readouterr().err
    assert tree_digest(Path(repository)) == before


# ---------------------------------------------------------------------------- live: tritonserver


def switched(load, switch, old: str, new: str) -> dict:
    """A switch under load (benchmark/switch_load.py) that must fail no request and leave every
    answer after it to ``new``."""
    from transmiter_deploy.benchmark.switch_load import switch_under_load

    figures = switch_under_load(load, switch, old)
    assert figures["failed"] == [], figures["failed"][:3]
    assert figures["answers_after"] and figures["versions_after"] == [new], figures["versions_after"]
    return figures


@pytest.fixture
def live_repository(bank, tmp_path):
    """The demo bank's repository (ensemble layout, generation 1) served by a tritonserver under
    explicit model control; the server is stopped, its clients closed and its log checked for
    crashes afterwards."""
    reason = triton_server.unavailable()
    if reason:
        pytest.skip(reason)
    repository = tmp_path / "repo"
    ensemble_repository(bank, repository)
    began = time.monotonic()
    server = triton_server.TritonServer([repository], tmp_path / "work", explicit=True, models=["*"]).start()
    server.start_s = time.monotonic() - began
    try:
        yield server, repository
    finally:
        server.stop()
    assert server.shm_regions() == []
    log = server.log.read_text(errors="replace")
    crashes = [line for line in log.splitlines() if any(
        sign in line for sign in ("is not healthy", "terminate called", "Traceback", "Segmentation fault", "core dumped"))]
    assert crashes == [], f"the server logged a crash ({server.log}): {crashes[:3]}"


def served_versions(server) -> dict[tuple[str, str], str]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        index = client.get_model_repository_index(as_json=True)["models"]
    return {(m["name"], m["version"]): m["state"] for m in index if m.get("state") == "READY"}


@pytest.mark.cluster  # starts a live server
def test_generations_switch_live_under_load_with_no_failed_request(live_repository, second, tmp_path):
    """Generation 2 switched in, then rolled back to 1, while four clients keep asking: no request
    fails, every answer after each switch is from the generation switched to; a generation whose
    preprocessing model cannot load is refused and generation 1 keeps serving."""
    import io

    from transmiter_deploy.benchmark.switch_load import ImageLoad
    from transmiter_deploy.serving.triton_generations import rollback, switch_generation

    server, repository = live_repository
    buffer = io.BytesIO()
    draw_image((220, 30, 30), seed=7).save(buffer, format="PNG")
    image = buffer.getvalue()
    with ImageLoad(server.grpc_url, IMAGE_MODELS, image, clients=4) as load:
        up = switched(load, lambda: ensemble_repository(second, repository, update=True, server=server.grpc_url),
                      "1", "2")
        assert {("gen_backbone", "2"), ("gen_images", "2")} <= set(served_versions(server))
        assert ("gen_backbone", "1") not in served_versions(server)
        down = switched(load, lambda: rollback(repository, server.grpc_url, image), "2", "1")
        broken = repository / "gen_preprocess" / "2" / "parameters.json"  # fails as it loads, before any import
        broken.write_text(json.dumps({**json.loads(broken.read_text()), "mode": "broken"}))
        began = time.monotonic()
        with pytest.raises(VerificationError, match="model 'gen_preprocess' \\(load.*generation 1 is restored") as caught:
            switch_generation(repository, 2, server.grpc_url, image)
        refused_s = time.monotonic() - began
        time.sleep(0.5)
        assert "\n" not in str(caught.value)
        assert load.failures() == [], load.failures()[:3]
        assert {a.version for a in load.window(time.monotonic() - 0.4, time.monotonic())} == {"1"}
    assert json.loads((repository / "transmiter-triton.json").read_text())["generation"] == 1
    assert not any(version == "2" for _, version in served_versions(server))
    print(f"\ngenerations live (2 cores, concurrency 4, server ready in {server.start_s:.1f} s): "
          f"1 -> 2 answered by 2 after {up['switch_s']:.2f} s (call {up['call_s']:.2f} s), p99 {up['p99_ms']:.0f} ms "
          f"during vs {up['steady_p99_ms']:.0f} ms steady ({up['requests']} requests); rollback 2 -> 1 after "
          f"{down['switch_s']:.2f} s (call {down['call_s']:.2f} s), p99 {down['p99_ms']:.0f} ms vs "
          f"{down['steady_p99_ms']:.0f} ms; a broken generation refused in {refused_s:.2f} s")
