import json
import pickle

import pytest
import torch

from transmiter_deploy.method.adapter import AdapterConfig, TransMiterAdapter
from transmiter_deploy.features.adapter_artifact import AdapterArtifact, load_adapter, save_adapter
from transmiter_deploy.artifacts import atomic_directory
from transmiter_deploy.errors import InputError, IntegrityError
from transmiter_deploy.features.models import ModelIdentity


def make_artifact(seed: int = 0) -> AdapterArtifact:
    config = AdapterConfig(num_task_classes=3, logit_width=8, latent_dim=8, num_layers=2)
    adapter = TransMiterAdapter(config, seed=seed)
    with torch.no_grad():  # non-trivial MLP weights so the round trip is meaningful
        for block in adapter.blocks:
            block.fc2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return AdapterArtifact(
        adapter=adapter,
        class_names=["cat", "dog", "caf\u00e9, cr\u00e8me"],
        auxiliary_names=[f"aux{i}" for i in range(5)],
        stage="transferred",
        source_model=ModelIdentity("ViT-B-32", pretrained="openai"),
        target_model=ModelIdentity("ViT-L-14", checkpoint_sha256="ab" * 32),
        provenance={"transfer": {"lambda": 500.0}},
    )


def test_save_load_round_trip_is_bit_exact(tmp_path):
    artifact = make_artifact()
    save_adapter(artifact, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    for (name, a), (_, b) in zip(artifact.adapter.state_dict().items(), loaded.adapter.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.class_names == artifact.class_names
    assert loaded.auxiliary_names == artifact.auxiliary_names
    assert loaded.source_model == artifact.source_model
    assert loaded.target_model == artifact.target_model
    assert loaded.model == artifact.target_model
    assert loaded.adapter.config == artifact.adapter.config
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0]
    assert len(manifest["files"]["adapter.safetensors"]["sha256"]) == 64
    # no temporary leftovers beside the artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_tampered_and_truncated_weights_are_refused(tmp_path):
    save_adapter(make_artifact(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_adapter(tmp_path / "a")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(IntegrityError, match="sha256"):
        load_adapter(tmp_path / "a")


def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(tmp_path):
    save_adapter(make_artifact(), tmp_path / "a")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Boom())
    (tmp_path / "a" / "adapter.safetensors").write_bytes(payload)
    manifest_path = tmp_path / "a" / "adapter.json"
    manifest = json.loads(manifest_path.read_text())
    import hashlib

    manifest["files"]["adapter.safetensors"]["sha256"] = hashlib.sha256(payload).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="not a valid safetensors"):
        load_adapter(tmp_path / "a")
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.pop("class_names"), "missing key 'class_names'"),
        (lambda m: m.update(stage=3), "'stage' must be str"),
        (lambda m: m.update(format_version=99), "newer"),
        (lambda m: m.update(format="something-else"), "format"),
        (lambda m: m["config"].update(num_task_classes=4), "disagrees"),
        (lambda m: m["config"].update(bogus=1), "bad 'config'"),
        (lambda m: m.update(stage="trained"), "unknown stage"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, mutate, message):
    save_adapter(make_artifact(), tmp_path / "a")
    path = tmp_path / "a" / "adapter.json"
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=message):
        load_adapter(tmp_path / "a")


def test_failed_write_keeps_previous_artifact_and_leaves_no_partial(tmp_path):
    first = make_artifact(seed=1)
    save_adapter(first, tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a", "adapter.json") as staging:
            (staging / "adapter.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    load_adapter(tmp_path / "a")
    # a successful overwrite replaces it completely
    save_adapter(make_artifact(seed=2), tmp_path / "a")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_killed_writers_staging_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    save_adapter(make_artifact(seed=1), tmp_path / "a")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited: its staging can never be finished
    host = os.uname().nodename
    dead = tmp_path / f".a.{host}-{dead_pid}-k1ll3d00.partial"
    live = tmp_path / f".a.{host}-{os.getpid()}-w0rk1ng0.partial"  # this process: alive
    elsewhere = tmp_path / f".a.other-host-{dead_pid}-r3m0t300.partial"  # another machine's writer
    unrelated = tmp_path / f".ab.{host}-{dead_pid}-n0tm1ne0.partial"  # another artifact's
    for staging in (dead, live, elsewhere, unrelated):
        staging.mkdir()
        (staging / "adapter.safetensors").write_bytes(b"half")
    save_adapter(make_artifact(seed=2), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live.name, elsewhere.name, unrelated.name])
    load_adapter(tmp_path / "a")


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="refusing to replace"):
        save_adapter(make_artifact(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_missing_adapter_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_adapter(tmp_path / "nope")


def test_an_output_is_checked_before_the_work_and_nothing_stays():
    import tempfile
    from pathlib import Path

    from transmiter_deploy.artifacts import MANIFESTS, check_output_directory

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        check_output_directory(root / "a" / "b" / "out", MANIFESTS["adapter"])  # parents made by the write
        assert list(root.iterdir()) == []
        save_adapter(make_artifact(), root / "done")
        check_output_directory(root / "done", MANIFESTS["adapter"])  # an artifact of its kind: replaced
        (root / "notes").mkdir()
        (root / "notes" / "todo.txt").write_text("precious")
        with pytest.raises(InputError, match="refusing to replace .*notes.*holds no adapter.json"):
            check_output_directory(root / "notes", MANIFESTS["adapter"])
        with pytest.raises(InputError, match="todo.txt: Not a directory"):
            check_output_directory(root / "notes" / "todo.txt" / "out", MANIFESTS["adapter"])
        assert sorted(p.name for p in root.iterdir()) == ["done", "notes"]
