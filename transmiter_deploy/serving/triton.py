"""`transmiter triton`: an export written as a Triton Inference Server model repository.

```python
from transmiter_deploy.serving.triton import write_repository

write_repository("export/out/demo-bank", "triton-repo", backend="python", layout="ensemble")
```

Models (``name`` defaults to ``transmiter``; docs/serving.md has the full table):

* ``<name>_preprocess``: encoded image bytes (``image``, TYPE_STRING) -> the export's pixels, by
  the toolkit's own decoding and open_clip eval transform (Python backend, whatever ``backend``);
* ``fused`` layout: ``<name>``, the export's fused graph, pixels -> one output per task, and the
  ensemble ``<name>_images`` (bytes -> every output);
* ``ensemble`` layout (a bank): ``<name>_backbone`` (pixels -> features), one head model
  ``<name>_<task>`` per task (features -> that task's outputs, versioned alone), the ensembles
  ``<name>`` (pixels -> every output), ``<name>_images`` (bytes -> every output) and
  ``<name>_<task>_images`` (bytes -> one task's outputs).

Every output carries a label file, so Triton's classification extension answers with class
names. The repository is written in a staging directory, checked (Triton's model-config protobuf
and :mod:`.triton_config`'s wiring checks) and moved into place in one exchange; its
``transmiter-triton.json`` marks it as ours (with the sha256 of every file written), so a later
run replaces it whole (or, with ``update``, changes only the models that changed, for a server
that serves it) and any other non-empty directory is refused.

Every model's files sit in the version folder of the export's generation (``1/`` for an export no
upgrade made); an update from an export upgraded from the one the repository serves adds the new
generation's folders beside the old ones and switches to it (:mod:`.triton_generations`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import atomic_directory, check_format, check_output_directory, read_json, sha256_file, utc_now, write_json
from ..deploy.export_format import FIRST_GENERATION, generation_of
from ..errors import InputError, IntegrityError
from ..runtimes.registry import PRECISIONS, REFERENCE_PRECISION
from . import triton_config, triton_generations
from .deployment import DEFAULT_BATCH, ExportInfo, read_export
from .triton_config import (DTYPES, FORMAT, FORMAT_VERSION, MARKER, ModelSpec, Step, TensorSpec, check_name,
                            config_text, serving_config)
from .triton_generations import file_entry

BACKENDS = ("python", "onnxruntime", "tensorrt")
LAYOUTS = ("fused", "ensemble")
IMAGE_INPUT = "image"  # the ensembles' input: one encoded image (PNG, JPEG, ...) per batch row
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")  # the Python backend's model.py
ORT_RUNTIME = "onnxruntime-cpu"  # what the Python backend runs graphs on (the registry's name)


@dataclass
class RepositoryPlan:
    """What a repository holds: its models, and where its batch limit came from."""

    export: ExportInfo
    backend: str
    layout: str
    name: str
    precision: str
    max_batch_size: int
    batch_source: str
    models: list[ModelSpec]
    generation: int = FIRST_GENERATION  # the export's (its manifest's lineage): its models' version folder

    def model(self, name: str) -> ModelSpec:
        return next(model for model in self.models if model.name == name)


def plan_repository(export: Path, backend: str = "python", layout: str = "fused", name: str = "transmiter",
                    precision: str = REFERENCE_PRECISION, max_batch: int | None = None,
                    require_engines: bool = True) -> RepositoryPlan:
    """The models of the repository for ``export`` (verified against its manifest), without
    writing anything. ``require_engines=False`` plans a ``tensorrt`` repository from the engines'
    records alone (their batch profiles), for checking configs where no engine was built."""
    if backend not in BACKENDS:
        raise InputError(f"unknown Triton backend '{backend}' (known: {', '.join(BACKENDS)})")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    check_name(name, "--name")
    info = read_export(export)
    if layout == "ensemble" and info.kind != "bank":
        raise InputError(f"--layout ensemble needs a task bank (a backbone graph and a head per task); "
                         f"{info.directory} is a single-task export, whose model.onnx has no separate backbone "
                         f"graph: use --layout fused")
    pixels_graph = info.graph(precision).name if layout == "fused" else info.backbone_graph(precision)
    batch, source, engine = _batch_limit(info, pixels_graph, backend, max_batch, require_engines)
    generation = generation_of(info.manifest, str(info.directory / "manifest.json"))
    plan = RepositoryPlan(info, backend, layout, name, precision, batch, source, [], generation)
    plan.models.append(_preprocess_model(plan))
    if layout == "fused":
        plan.models += _fused_models(plan, pixels_graph, engine)
    else:
        plan.models += _ensemble_models(plan, pixels_graph, engine)
    if generation != FIRST_GENERATION:
        for model in plan.models:
            triton_generations.with_version_parameters(model, MODEL_SOURCE)
    names = [model.name for model in plan.models]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise InputError(f"model name '{clash[0]}' would be written twice (a task named like another model "
                         f"of the repository): choose another --name")
    return plan


def _entry(info: ExportInfo, graph: str) -> dict[str, Any]:
    entry = info.manifest["files"].get(graph)
    if not isinstance(entry, dict) or not entry.get("inputs") or not entry.get("outputs"):
        raise IntegrityError(f"{info.directory / 'manifest.json'}: no inputs and outputs recorded for {graph}")
    return entry


def _tensor(record: dict[str, Any], where: str, name: str | None = None,
            labels: tuple[str, ...] | None = None) -> TensorSpec:
    """A manifest's tensor record (``{"name", "dtype", "shape": ["batch", ...]}``) as Triton's."""
    dtype = DTYPES.get(str(record.get("dtype")))
    shape = record.get("shape")
    if dtype is None or not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:]):
        raise IntegrityError(f"{where}: tensor record {record!r} is not a batched tensor of fixed dims")
    if labels is not None and shape[-1] != len(labels):
        raise IntegrityError(f"{where}: output '{record.get('name')}' has width {shape[-1]}, its task "
                             f"{len(labels)} class names")
    return TensorSpec(check_name(name or str(record["name"]), "tensor name"), dtype, tuple(shape[1:]), labels)


def _labels(info: ExportInfo, output: str) -> tuple[str, ...] | None:
    for task in info.tasks:
        if output in (task.output, task.probabilities):
            return tuple(task.class_names)
    return None


def _graph_files(info: ExportInfo, graph: str) -> dict[str, Path]:
    """A graph and its external data files (named as it names them: beside it)."""
    source = info.directory / graph
    names = [source.name] + [str(n) for n in _entry(info, graph).get("external_data", [])]
    return {n: source.parent / n for n in names}


def _batch_limit(info: ExportInfo, graph: str, backend: str, max_batch: int | None,
                 require_engines: bool) -> tuple[int, str, Path | None]:
    """The repository's max_batch_size, what it came from, and the TensorRT engine to serve.

    An export run records its batch profile with each engine (``engines/<stem>.engine.json``,
    written whether TensorRT built the engine or only wrote the trtexec command): a served batch
    never passes the engine's largest profile shape, and the ONNX backends use the same limit, so
    every backend of one export batches alike. A record for another graph (its ``onnx_sha256``)
    is not this graph's profile."""
    from ..runtimes.tensorrt import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, FORMER_ENGINE_FORMATS

    if max_batch is not None and max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {max_batch}")
    record_path = info.directory.parent / "engines" / f"{Path(graph).stem}.engine.json"
    record = read_json(record_path, "engine record") if record_path.is_file() else None
    if record is not None:
        check_format(record, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, str(record_path), FORMER_ENGINE_FORMATS)
        if record.get("onnx_sha256") != info.manifest["files"][graph]["sha256"]:
            if backend == "tensorrt":
                raise IntegrityError(f"{record_path} was made from another graph than {info.directory / graph} "
                                     f"(onnx_sha256 differs): rebuild the engine")
            record = None
    profile_max = int(record["profile"]["max"]) if record is not None else None
    if backend != "tensorrt":
        if max_batch is not None:
            return max_batch, "--max-batch", None
        if profile_max is not None:
            return profile_max, f"the export's batch profile ({record_path.name})", None
        return DEFAULT_BATCH, "the default: the export records no batch profile", None
    if record is None:
        raise InputError(f"--backend tensorrt needs the export's engine of {graph}: {record_path} is missing "
                         f"(transmiter export writes engines/ beside onnx/)")
    engine = record_path.with_suffix("")
    if require_engines:
        if not record.get("built"):
            raise InputError(f"no TensorRT engine was built for {graph} ({record.get('reason_not_built')}): "
                             f"run the trtexec command recorded in {record_path}, then write the repository again")
        if not engine.is_file() or sha256_file(engine) != record.get("engine_sha256"):
            raise IntegrityError(f"engine {engine} is missing or does not match the sha256 in {record_path}")
    if max_batch is not None and max_batch > profile_max:
        raise InputError(f"--max-batch {max_batch} is past the engine's profile (at most {profile_max}, "
                         f"{record_path.name})")
    return max_batch or profile_max, f"the engine's profile ({record_path.name})", engine


def _pixels(info: ExportInfo, graph: str) -> TensorSpec:
    where = str(info.directory / "manifest.json")
    return _tensor(_entry(info, graph)["inputs"][0], where)


def _preprocess_model(plan: RepositoryPlan) -> ModelSpec:
    """Encoded bytes -> pixels, always on the Python backend: decoding and open_clip's transform
    are the toolkit's own code (features/), which no other backend runs. It needs only the
    export's preprocess record, written beside its model.py."""
    info = plan.export
    graph = info.graph(plan.precision).name if plan.layout == "fused" else info.backbone_graph(plan.precision)
    # the record alone (no path of the export: a moved export must leave this model unchanged)
    record = {"preprocess": info.preprocess}
    return ModelSpec(f"{plan.name}_preprocess", "python", [TensorSpec(IMAGE_INPUT, "TYPE_STRING", (1,))],
                     [_pixels(info, graph)], plan.max_batch_size, "KIND_CPU",
                     files={"model.py": MODEL_SOURCE,
                            "preprocess.json": (json.dumps(record, indent=2) + "\n").encode()},
                     parameters={"mode": "preprocess"})


def _graph_model(plan: RepositoryPlan, name: str, graph: str, engine: Path | None,
                 outputs: list[TensorSpec], mode: str = "graph", backend: str | None = None) -> ModelSpec:
    """A model that runs one graph of the export: ``graph`` (relative to the export directory)
    on the plan's backend, or ``backend`` (a bank's heads have no engines: ONNX Runtime)."""
    info, backend = plan.export, backend or plan.backend
    inputs = [_tensor(record, str(info.directory / "manifest.json")) for record in _entry(info, graph)["inputs"]]
    kind = "KIND_GPU" if plan.backend == "tensorrt" else "KIND_CPU"
    spec = ModelSpec(name, backend, inputs, outputs, plan.max_batch_size, kind)
    if backend == "tensorrt":
        spec.model_filename, spec.files = "model.plan", {"model.plan": engine} if engine else {}
    elif backend == "onnxruntime":
        spec.files = _graph_files(info, graph)
        spec.model_filename = Path(graph).name
    elif mode == "deployment":  # the whole export, verified and opened by Deployment inside Triton
        files = [*info.manifest["files"], "manifest.json"]
        spec.files = {"model.py": MODEL_SOURCE, **{f"export/{f}": info.directory / f for f in files}}
        spec.parameters = {"mode": "deployment", "export": "export", "precision": plan.precision,
                           "runtime": ORT_RUNTIME}
    else:
        spec.files = {"model.py": MODEL_SOURCE, **_graph_files(info, graph)}
        spec.parameters = {"mode": "graph", "graph": Path(graph).name, "precision": plan.precision,
                           "runtime": ORT_RUNTIME, "sha256": _graph_digests(info, graph)}
    return spec


def _graph_digests(info: ExportInfo, graph: str) -> str:
    """``file=sha256`` of a graph and its data files, checked by the Python model before loading."""
    base = Path(graph).parent  # data files are named relative to their graph's directory
    names = [graph] + [str(base / str(n)) for n in _entry(info, graph).get("external_data", [])]
    return ",".join(f"{Path(n).name}={info.manifest['files'][n]['sha256']}" for n in names)


def _fused_models(plan: RepositoryPlan, graph: str, engine: Path | None) -> list[ModelSpec]:
    info = plan.export
    where = str(info.directory / "manifest.json")
    outputs = [_tensor(r, where, labels=_labels(info, r["name"])) for r in _entry(info, graph)["outputs"]]
    model = _graph_model(plan, plan.name, graph, engine, outputs, mode="deployment")
    preprocess = f"{plan.name}_preprocess"
    pixels = model.inputs[0].name
    images = ModelSpec(f"{plan.name}_images", "ensemble", [TensorSpec(IMAGE_INPUT, "TYPE_STRING", (1,))], outputs,
                       plan.max_batch_size, steps=[
                           Step(preprocess, {IMAGE_INPUT: IMAGE_INPUT}, {pixels: pixels}),
                           Step(plan.name, {pixels: pixels}, {o.name: o.name for o in outputs})])
    return [model, images]


def _ensemble_models(plan: RepositoryPlan, backbone_graph: str, engine: Path | None) -> list[ModelSpec]:
    """The backbone, a head model per task (ONNX Runtime beside a TensorRT backbone: an export
    builds engines for the fused bank and the backbone only) and the ensembles that wire them."""
    info, name = plan.export, plan.name
    where = str(info.directory / "manifest.json")
    features = [_tensor(r, where) for r in _entry(info, backbone_graph)["outputs"]]
    backbone = _graph_model(plan, f"{name}_backbone", backbone_graph, engine, features)
    pixels, feature = backbone.inputs[0], features[0]
    models, head_steps, outputs_of = [backbone], [], {}
    for record in info.manifest["tasks"]:
        task = info.task(record["name"])
        graph = record["head"]["graphs"].get(plan.precision)
        if graph is None:
            raise InputError(f"task '{task.name}' of {info.directory} has no {plan.precision} head graph")
        names = [task.output] + ([task.probabilities] if task.probabilities else [])
        records = _entry(info, graph)["outputs"]
        if len(records) != len(names):
            raise IntegrityError(f"{where}: {graph} has {len(records)} outputs, task '{task.name}' names {len(names)}")
        outputs = [_tensor(r, where, labels=tuple(task.class_names)) for r in records]
        head = _graph_model(plan, check_name(f"{name}_{task.name}", "model name"), graph, None, outputs,
                            backend="onnxruntime" if plan.backend == "tensorrt" else None)
        models.append(head)
        head_steps.append(Step(head.name, {head.inputs[0].name: feature.name},
                               {o.name: n for o, n in zip(outputs, names)}))
        outputs_of[task.name] = [TensorSpec(n, o.dtype, o.dims, o.labels) for o, n in zip(outputs, names)]
    every = [tensor for outputs in outputs_of.values() for tensor in outputs]
    image = TensorSpec(IMAGE_INPUT, "TYPE_STRING", (1,))
    decode = Step(f"{name}_preprocess", {IMAGE_INPUT: IMAGE_INPUT}, {pixels.name: pixels.name})
    embed = Step(backbone.name, {pixels.name: pixels.name}, {feature.name: feature.name})
    batch = plan.max_batch_size
    models.append(ModelSpec(name, "ensemble", [pixels], every, batch, steps=[embed, *head_steps]))
    models.append(ModelSpec(f"{name}_images", "ensemble", [image], every, batch, steps=[decode, embed, *head_steps]))
    for (task, outputs), step in zip(outputs_of.items(), head_steps):
        models.append(ModelSpec(f"{name}_{task}_images", "ensemble", [image], outputs, batch,
                                steps=[decode, embed, step]))
    return models


def check_plan(plan: RepositoryPlan) -> dict[str, Any]:
    """Every config of ``plan`` as Triton's protobuf reads it, ensembles' wiring checked, without
    writing files: how a ``tensorrt`` repository is checked where no engine was built."""
    configs = {m.name: triton_config.parse_config(config_text(m), f"model {m.name}") for m in plan.models}
    for name, config in configs.items():
        if config.platform == "ensemble":
            triton_config.check_wiring(config, configs, f"model {name}")
    return configs


def write_repository(export: Path, out: Path, backend: str = "python", layout: str = "fused",
                     name: str = "transmiter", precision: str = REFERENCE_PRECISION,
                     max_batch: int | None = None, update: bool = False,
                     server: str | None = None) -> RepositoryPlan:
    """The Triton model repository of ``export`` written to ``out``, atomically (module doc).

    ``update``: an earlier repository of ours at ``out`` is changed model by model instead of
    replaced whole, for a server that serves it: a model whose files are unchanged is not touched
    (Triton, under explicit model control, reloads a model whose folder it finds touched,
    modification or status-change times, whenever a load request reaches it, an ensemble's
    included), each changed or new model's folder is swapped in on its own, the models inside
    ensembles first, and models no longer planned are taken out. From an export upgraded from
    the one ``out`` serves (its manifest's lineage), the update adds the new generation's version
    folders instead and switches to it; from any other export but the same one it is refused
    (:func:`.triton_generations.update_repository`).

    ``server`` (``HOST:PORT`` for gRPC, ``http://HOST:PORT`` for HTTP; with ``update``): the
    Triton server, under explicit model control, that serves ``out``, sent the load requests
    that apply the update live, then one check request per model that takes encoded images."""
    out = Path(out)
    earlier = _refuse_foreign_marker(out)
    check_output_directory(out, MARKER)
    plan = plan_repository(export, backend, layout, name, precision, max_batch)
    if server is not None and not (update and earlier is not None):
        raise InputError(f"--server applies to --update of a repository the server serves; {out} holds none of ours"
                         if update else "--server applies to --update, --rollback and --prune")
    if update and earlier is not None:
        triton_generations.update_repository(out, plan, earlier, server, write_all, update_models)
        return plan
    with atomic_directory(out, MARKER) as staging:
        write_all(staging, plan)
    return plan


def write_all(root: Path, plan: RepositoryPlan) -> dict[str, Any]:
    """Every model, the README, the checks and the record of ``plan`` written under ``root``."""
    bases = {model.name: config_text(model) for model in plan.models}
    for model in plan.models:
        _write_model(root, model, plan.generation, fresh_config(bases[model.name], model.kind, plan.generation))
    (root / "README.md").write_text(repository_readme(plan), encoding="utf-8")
    triton_config.check_repository(root)
    files = {str(path.relative_to(root)): file_entry(path) for path in sorted(root.rglob("*")) if path.is_file()}
    export = {"directory": str(plan.export.directory), "kind": plan.export.kind,
              "manifest_sha256": sha256_file(plan.export.directory / "manifest.json")}
    models = [model.name for model in plan.models]
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": utc_now(), "export": export,
              "backend": plan.backend, "layout": plan.layout, "name": plan.name, "precision": plan.precision,
              "max_batch_size": plan.max_batch_size, "max_batch_size_from": plan.batch_source,
              "models": models, "files": files, "generation": plan.generation,
              "generations": {str(plan.generation): {"export": export, "models": models, "configs": bases}}}
    write_json(root / MARKER, record)
    return record


def fresh_config(base: str, kind: str, generation: int) -> str:
    """A model's config in a repository written whole: ``base`` itself for a first generation (the
    only version folder is the latest; repositories of exports no upgrade made stay as they
    were), otherwise pinned to its generation, as a repository holding several generations has it."""
    if generation == FIRST_GENERATION:
        return base
    return serving_config(base, [generation], generation if kind == "ensemble" else None)


def _model_files(files: dict[str, Any], model: str) -> dict[str, Any]:
    return {k: v.get("sha256") for k, v in files.items() if isinstance(v, dict) and k.startswith(f"{model}/")}


def update_models(out: Path, plan: RepositoryPlan, earlier: dict[str, Any]) -> tuple[list[ModelSpec], list[str]]:
    """:func:`write_repository`'s ``update`` of a repository holding one generation, from the
    same export: the whole new repository is written and checked beside ``out`` first; only then
    are its changed models moved in, one folder each. The models changed and the names gone."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.update-", dir=out.parent))
    retired = staging / ".retired"
    try:
        record = write_all(staging / "new", plan)
        changed = [m for m in plan.models if _model_files(record["files"], m.name) != _model_files(earlier["files"], m.name)
                   or not (out / m.name).is_dir()]
        gone = [n for n in earlier.get("models", []) if isinstance(n, str) and n not in {m.name for m in plan.models}]
        retired.mkdir()
        # an ensemble's parts before the ensemble, so a load request between two moves finds them
        for model in sorted(changed, key=lambda m: m.kind == "ensemble"):
            if (out / model.name).exists():
                os.rename(out / model.name, retired / model.name)
            os.rename(staging / "new" / model.name, out / model.name)
        for name in gone:
            if check_name(name, "model name") and (out / name).is_dir():
                os.rename(out / name, retired / name)
        os.replace(staging / "new" / "README.md", out / "README.md")
        os.replace(staging / "new" / MARKER, out / MARKER)  # last: the record says what is there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return changed, gone


def _refuse_foreign_marker(out: Path) -> dict[str, Any] | None:
    """The record of the earlier repository of ours at ``out`` (None: there is none); an --out
    whose marker file is not a record of ours is not replaced."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        record = read_json(marker, "repository record")
        check_format(record, FORMAT, FORMAT_VERSION, str(marker))
    except InputError as exc:
        raise InputError(f"refusing to replace {out}: {exc}") from exc
    return record if isinstance(record.get("files"), dict) else None


def _write_model(root: Path, model: ModelSpec, version: int, config: str) -> None:
    directory = root / model.name
    (directory / str(version)).mkdir(parents=True)
    (directory / triton_config.CONFIG).write_text(config, encoding="utf-8")
    for output in model.outputs:
        if output.labels is not None:
            (directory / output.label_file).write_text("".join(f"{label}\n" for label in output.labels),
                                                       encoding="utf-8")
    for relative, source in model.files.items():
        target = directory / str(version) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)  # a copy, never a link: the repository stands alone


def verify_repository(repository: Path) -> dict[str, Any]:
    """A repository this module wrote: its record, every file's sha256, every config and the
    wiring checked; the record. IntegrityError naming the first file that differs."""
    repository = Path(repository)
    record = read_json(repository / MARKER, "repository record")
    check_format(record, FORMAT, FORMAT_VERSION, str(repository / MARKER))
    for relative, entry in record["files"].items():
        path = repository / relative
        if path.is_file() and sha256_file(path) == entry["sha256"]:
            continue
        # a switch between generations rewrites configs before the record (the record is written
        # last): a config that serves the record's generations as a switch writes them is theirs
        if not (path.is_file() and path.name == triton_config.CONFIG
                and triton_generations.config_from_record(path, record)):
            raise IntegrityError(f"{path} is missing or differs from {MARKER}")
    triton_config.check_repository(repository)
    return record


def repository_readme(plan: RepositoryPlan) -> str:
    """The repository's own README: its models, how to start a server, a client."""
    rows = "\n".join(f"| `{m.name}` | {m.kind} | {', '.join(f'`{t.name}`' for t in m.inputs)} | "
                     f"{', '.join(f'`{t.name}`' for t in m.outputs)} |" for m in plan.models)
    first = plan.model(f"{plan.name}_images").outputs[0].name
    python_note = ("Python-backend models import `transmiter_deploy` (its decoding, open_clip's transform, ONNX "
                   "Runtime): start `tritonserver` from an environment where `pip install 'transmiter-deploy[serve]'` "
                   "is installed (the Python backend runs the `python3` it finds first on `PATH`).")
    generations = "" if plan.generation == FIRST_GENERATION else (
        f"\nThis is generation {plan.generation} of the export: each generation's files sit in the version folder "
        f"of its number and the configs say which versions are served (`transmiter triton --rollback`, `--prune`).\n")
    return f"""# Triton model repository of a TransMiter export

Written by `transmiter triton` from `{plan.export.directory}` ({plan.export.kind} export, {plan.precision}),
backend `{plan.backend}`, layout `{plan.layout}`. `max_batch_size` {plan.max_batch_size}: {plan.batch_source}.
`transmiter-triton.json` records the sha256 of every file; `transmiter triton` replaces this directory
whole when run again, or with `--update` only the models that changed (for a server serving it).
{generations}
| model | backend | inputs | outputs |
| --- | --- | --- | --- |
{rows}

Send encoded images (PNG, JPEG, ...) to `{plan.name}_images`, one per batch row (`{IMAGE_INPUT}`, BYTES,
shape [N, 1]); send preprocessed pixels to `{plan.name}`. Every output has a label file, so Triton's
classification extension returns `score:index:class name`.

## Start a server

```bash
tritonserver --model-repository=$PWD --http-port=8000 --grpc-port=8001
```

{python_note}

## A client

```python
import numpy as np
import tritonclient.http as httpclient

with httpclient.InferenceServerClient("localhost:8000") as client:
    data = open("image.png", "rb").read()
    image = httpclient.InferInput("{IMAGE_INPUT}", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=object))
    result = client.infer("{plan.name}_images", [image],
                          outputs=[httpclient.InferRequestedOutput("{first}", class_count=3)])
    print(result.as_numpy("{first}"))  # [[b"23.1:2:yellow", ...]]
```
"""
