"""The demo world's trained CLIP models: where they ship, how they are named and checked.

A weights directory holds the weak source, the stronger target, one
fine-tuned source per task and, where it was trained (``make demo-weights-large``), the larger
upgrade target (TM-Demo-Large: wider and deeper), as fp16 safetensors, with ``manifest.json``
recording each file's sha256 and ``training_log.json`` the settings that made
them. The package ships one such directory (``make demo-weights`` regenerates
it from scratch); anything that loads it checks the hashes first.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..artifacts import read_manifest, recorded_sha256, sha256_file, write_manifest
from ..errors import InputError, IntegrityError
from ..features.models import ModelSpec

WEIGHTS_FORMAT = "transmiter-deploy/demo-weights"
FORMER_WEIGHTS_FORMATS = ("transmiter-demo-weights",)  # before 0.2; still read
WEIGHTS_FORMAT_VERSION = 1
SOURCE = "TM-Demo-Source"
TARGET = "TM-Demo-Target"
# A larger target (wider and deeper than TM-Demo-Target), trained on the same world after the others (its
# own make target), so that upgrading a served export onto a stronger model means something here.
LARGE = "TM-Demo-Large"


def finetuned_name(task_name: str) -> str:
    return f"{SOURCE}-ft-{task_name}"


def shipped_weights_dir() -> Path:
    return Path(str(resources.files("transmiter_deploy").joinpath("demo", "weights")))


def write_weights_manifest(directory: Path, task_names: list[str], reference_accuracy: dict) -> None:
    names = [SOURCE, TARGET, *(finetuned_name(task) for task in task_names)]
    names += [LARGE] if (Path(directory) / f"{LARGE}.safetensors").is_file() else []
    files = {f"{name}.safetensors": {"sha256": sha256_file(Path(directory) / f"{name}.safetensors")} for name in names}
    write_manifest(Path(directory) / "manifest.json", WEIGHTS_FORMAT, WEIGHTS_FORMAT_VERSION,
                   {"tasks": task_names, "files": files, "reference_accuracy": reference_accuracy})


def verify_weights(directory: Path) -> dict:
    """Check every weights file against the manifest; return the manifest."""
    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise InputError(f"no demo weights in {directory} (no manifest.json); run `make demo-weights`")
    manifest = read_manifest(directory / "manifest.json", WEIGHTS_FORMAT, WEIGHTS_FORMAT_VERSION, "demo weights manifest",
                             FORMER_WEIGHTS_FORMATS)
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise IntegrityError(f"{directory / 'manifest.json'}: 'files' must list the weights files")
    for filename in manifest["files"]:
        path = directory / filename
        if not path.is_file():
            raise IntegrityError(f"demo weights file missing: {path}")
        if sha256_file(path) != recorded_sha256(manifest, filename, str(directory / "manifest.json")):
            raise IntegrityError(f"demo weights file {path} does not match the sha256 in its manifest")
    return manifest


def demo_model_spec(directory: Path, name: str) -> ModelSpec:
    """The spec that loads demo model ``name`` (source, target or a fine-tuned source)."""
    config = SOURCE if name.startswith(SOURCE) else name if name in (TARGET, LARGE) else TARGET
    return ModelSpec(config, checkpoint=Path(directory) / f"{name}.safetensors")
