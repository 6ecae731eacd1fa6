"""What 0.1 users have keeps working for one release: the flat module paths (with a
DeprecationWarning) and artifacts written under the former format tags."""

import json
import subprocess
import sys

import pytest

from transmiter_deploy.errors import IntegrityError

OLD_PATHS = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from transmiter_deploy.adapter import AdapterConfig
    from transmiter_deploy.extraction import ExtractionSettings, extract
    from transmiter_deploy.transfer import transfer
    from transmiter_deploy.evaluation import base_to_novel
    from transmiter_deploy.runners import OnnxRuntimeRunner, TorchRunner, compare, onnxruntime_providers
    from transmiter_deploy.onnx_export import ExportSettings, ort_session, to_mixed_fp16
    from transmiter_deploy.adapter_artifact import clone_adapter
import transmiter_deploy.method.adapter as new_adapter
import transmiter_deploy.runtimes.onnxruntime as new_ort
import transmiter_deploy.deploy.precisions.fp16 as fp16
assert AdapterConfig is new_adapter.AdapterConfig and clone_adapter is new_adapter.clone_adapter
assert OnnxRuntimeRunner is new_ort.OnnxRuntimeRunner and to_mixed_fp16 is fp16.convert
assert onnxruntime_providers is new_ort.available_providers
moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
assert len(moved) == 7 and "transmiter_deploy.adapter is now transmiter_deploy.method.adapter" in moved[0], moved
import transmiter_deploy.runners as old_runners
try:
    old_runners.NoSuchThing
except AttributeError as exc:
    assert "moved to transmiter_deploy.runtimes.base" in str(exc), exc
else:
    raise AssertionError("a missing name imported")
"""


def test_the_flat_module_paths_of_0_1_import_with_a_deprecation_warning():
    # a fresh interpreter: the warning fires on the first import of each old path
    result = subprocess.run([sys.executable, "-c", OLD_PATHS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_engine_manifests_under_the_former_tag_still_load():
    from transmiter_deploy.runtimes.tensorrt import ENGINE_FORMAT, check_engine_manifest

    here = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    manifest = {"format": "transmiter-tensorrt-engine", "format_version": 1, "built": True,
                "tensorrt_version": "10.13.0.35", "gpu": here, "input": {"name": "pixel_values", "shapes": {}},
                "onnx_sha256": "0" * 64}
    check_engine_manifest(manifest, "10.13.0.35", here, "old.json")
    assert ENGINE_FORMAT == "transmiter-deploy/tensorrt-engine"
    with pytest.raises(IntegrityError, match="format is 'transmiter-somethingelse'"):
        check_engine_manifest({**manifest, "format": "transmiter-somethingelse"}, "10.13.0.35", here, "old.json")


def test_demo_weights_under_the_former_tag_still_verify(tmp_path):
    from transmiter_deploy.demo.weights import WEIGHTS_FORMAT, shipped_weights_dir, verify_weights

    manifest = json.loads((shipped_weights_dir() / "manifest.json").read_text())
    assert manifest["format"] == WEIGHTS_FORMAT == "transmiter-deploy/demo-weights"
    for name in manifest["files"]:
        (tmp_path / name).symlink_to(shipped_weights_dir() / name)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "transmiter-demo-weights"}))
    assert verify_weights(tmp_path)["files"] == manifest["files"]
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "transmiter-deploy/head"}))
    with pytest.raises(IntegrityError, match="expected 'transmiter-deploy/demo-weights'"):
        verify_weights(tmp_path)


def test_the_demo_registers_its_architectures_and_tokenizer_from_above():
    code = """
from transmiter_deploy.features.models import known_models, tokenizer_for
assert "TM-Demo-Target" not in known_models() and "TM-Tiny-ViT" in known_models()
import transmiter_deploy.demo
from transmiter_deploy.demo.tokenizer import WordTokenizer
assert "TM-Demo-Target" in known_models() and isinstance(tokenizer_for("TM-Demo-Target"), WordTokenizer)
assert not isinstance(tokenizer_for("TM-Tiny-ViT"), WordTokenizer)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
