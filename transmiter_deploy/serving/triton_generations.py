"""Generations of an export served as Triton model versions: updated, switched live, rolled back, pruned.

An export that ``transmiter upgrade`` made records its parent in its manifest (``lineage``:
:func:`..deploy.export_format.lineage_of`); its generation is its version folder in the repository
(an export no upgrade made is generation 1, folder ``1/``). :func:`update_repository` (the
``update`` of :func:`.triton.write_repository`, which sits above this module and hands it its two
repository writers) tells three updates apart:

* from an export whose lineage names the manifest the repository serves (its sha256): a
  **generation update**, each model's folder gains the version folder ``<generation>/`` beside the
  older ones, which stay; then :func:`switch_generation` makes it the current one;
* from the export the repository was written from (the same directory): today's update, inside
  the current version folder;
* from any other export: refused.

The record (``transmiter-triton.json``) keeps every generation it holds, its export and each
model's config text (``config_text``'s, without versions), and which one is current. On disk a
model serves versions by ``version_policy { specific }`` and an ensemble's steps are pinned to the
generation it belongs to (so a request never mixes generations); the ensemble's own version is its
generation too, so responses name it. Triton keeps one config per model, for all its versions: a
config change other than the version policy reloads every loaded version. So the versions of a
Python-backend model after the first read their parameters (graph sha256s) from their own
``parameters.json`` through a small ``model.py`` (:data:`VERSION_MODEL`), two generations of a
model are served side by side only where their configs are otherwise equal, and a model's config
keeps the parameters it carries where they stay right (version 1 folders read them).

A live switch (``server``) issues, under Triton's explicit model control: the current generation's
configs pinned (a repository of one first generation has none) -> (a) every part (non-ensemble
model) serving [old, new] -> (b) every ensemble pinned to the new generation, then the old
ensembles' versions drained -> (c) parts serving [new]; then one request to every model that takes
encoded images must answer from the new version. A failed load or check restores the previous
generation the same way and raises, naming the model. The record is written last (atomically)."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from ..artifacts import atomic_write_text, check_format, read_json, sha256_file, utc_now, write_json
from ..deploy.export_format import FIRST_GENERATION, UPGRADE_REPORT, UPGRADE_REPORT_FORMAT, lineage_of
from ..errors import DependencyError, InputError, VerificationError
from . import triton_config
from .triton_config import CONFIG, FORMAT, FORMAT_VERSION, MARKER, ModelSpec, parse_config, policy_of, serving_config

# what :mod:`.triton` hands an update: ``write(root, plan)`` a whole checked repository (its record),
# ``update_models(out, plan, earlier)`` the update of a repository of one generation
Write = Callable[[Path, Any], dict[str, Any]]
UpdateModels = Callable[[Path, Any, dict[str, Any]], tuple[list[ModelSpec], list[str]]]

IN_USE = {"READY", "LOADING", "UNLOADING"}  # states of a version Triton holds (UNLOADING: requests in flight)
DRAIN_TIMEOUT_S = 120.0

# model.py of a Python-backend model's version folder from a generation after the first: Triton gives
# every version of a model the same config, whose parameters name one generation's graphs and sha256s
VERSION_MODEL = '''"""One version (generation) of a Python-backend model written by `transmiter triton`.

Triton gives every version of a model the same config; this version's own parameters (its graphs'
sha256s) are in parameters.json beside this file and replace the config's before the toolkit's
model (triton_model.py beside this file) reads them.
"""

import importlib.util
import json
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / str(args["model_version"])
        spec = importlib.util.spec_from_file_location("transmiter_triton_model", here / "triton_model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = json.loads(args["model_config"])
        parameters = json.loads((here / "parameters.json").read_text(encoding="utf-8"))
        config["parameters"] = {key: {"string_value": value} for key, value in parameters.items()}
        self.model = module.TritonPythonModel()
        self.model.initialize({**args, "model_config": json.dumps(config)})

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


def with_version_parameters(spec: ModelSpec, model_source: Path) -> None:
    """A Python-backend model of a generation after the first: its parameters beside its files
    (``model_source``: the toolkit's model, which :data:`VERSION_MODEL` runs)."""
    if spec.kind == "python":
        spec.files = {**spec.files, "model.py": VERSION_MODEL.encode(), "triton_model.py": model_source,
                      "parameters.json": (json.dumps(spec.parameters, indent=2) + "\n").encode()}


def file_entry(path: Path) -> dict[str, Any]:
    """A file as the record lists it."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------- the record


def read_record(repository: Path) -> dict[str, Any]:
    record = read_json(Path(repository) / MARKER, "repository record")
    check_format(record, FORMAT, FORMAT_VERSION, str(Path(repository) / MARKER))
    return record


def generations_of(record: dict[str, Any], repository: Path) -> dict[int, dict[str, Any]]:
    """Every generation the record holds (a record written before generations: generation 1,
    its configs as they are on disk)."""
    held = record.get("generations")
    if isinstance(held, dict) and held:
        return {int(g): entry for g, entry in held.items()}
    configs = {m: (Path(repository) / m / CONFIG).read_text(encoding="utf-8") for m in record.get("models", [])}
    return {FIRST_GENERATION: {"export": record.get("export", {}), "models": list(record.get("models", [])),
                               "configs": configs}}


def current_of(record: dict[str, Any]) -> int:
    return int(record.get("generation", FIRST_GENERATION))


def config_from_record(path: Path, record: dict[str, Any]) -> bool:
    """``path`` (a model's config) serves generations the record holds as a switch writes them: a
    generation's config serving some held versions, an ensemble's pinned to its own."""
    held = record.get("generations")
    if not isinstance(held, dict):
        return False
    bases = [entry.get("configs", {}).get(path.parent.name) for entry in held.values()]
    text = path.read_text(encoding="utf-8")
    try:
        config = parse_config(text, str(path))
    except InputError:
        return False
    versions = policy_of(config)
    if not versions or not {str(v) for v in versions} <= set(held):
        return False
    pin = versions[0] if config.platform == "ensemble" else None
    if any(isinstance(base, str) and serving_config(base, versions, pin) == text for base in bases):
        return True
    served = [held[str(v)].get("configs", {}).get(path.parent.name) for v in versions]
    merged = _merged_dims(served) if all(isinstance(base, str) for base in served) else None
    return merged is not None and serving_config(merged, versions) == text


def _commit(repository: Path, record: dict[str, Any]) -> None:
    """The record written (atomically), its entries for configs and the README taken from disk."""
    files = dict(record["files"])
    for relative in [k for k in files if k.endswith(f"/{CONFIG}") or k == "README.md"]:
        path = repository / relative
        if path.is_file():
            files[relative] = file_entry(path)
    record = {**record, "files": dict(sorted(files.items())), "updated": utc_now()}
    write_json(repository / MARKER, record)


def _ensemble(base: str) -> bool:
    return '\nplatform: "ensemble"\n' in base


def _without_parameters(base: str) -> str:
    return base.split("\nparameters {")[0]  # config_text writes parameters last


# ---------------------------------------------------------------------------- configs on disk


def _part_config(bases: dict[int, str], served: list[int], disk: str | None) -> str:
    """A part's config serving ``served``: a generation's config whose parameters stay right.

    Version 1 folders read the config's parameters, later ones their own (``parameters.json``), so
    a config serving version 1 carries generation 1's; otherwise the parameters on disk stay where
    the rest agrees (a parameter change would make Triton reload the loaded versions)."""
    def fits(g: int) -> bool:
        return all(_equal_but_parameters(bases[g], bases[s]) for s in served)

    if FIRST_GENERATION in served:
        source = FIRST_GENERATION
    else:
        policy = policy_of(parse_config(disk, "config")) if disk is not None else None
        on_disk = [g for g in sorted(bases) if serving_config(bases[g], policy) == disk]
        source = next((g for g in on_disk if fits(g)), max(served))
    if not fits(source):
        merged = _merged_dims([bases[source], *(bases[s] for s in served if s != source)])
        if merged is None:
            raise _SideBySide(source, next(s for s in served if not _equal_but_parameters(bases[source], bases[s])))
        return serving_config(merged, served)
    return serving_config(bases[source], served)


DIMS = re.compile(r"^(\s*)dims: \[ (-?\d+(?:, -?\d+)*) \]$")


def _merged_dims(texts: list[str]) -> str | None:
    """The first of ``texts`` with each tensor's dims widened to -1 where the generations differ (a
    new target's image size or feature width), so that one config serves their versions side by
    side; None where anything else differs (parameters aside: versions after the first read their
    own). Triton checks a request's shape against the config, the versions' graphs check it against
    their own."""
    bodies = [_without_parameters(text).split("\n") for text in texts]
    if len({len(body) for body in bodies}) != 1:
        return None
    merged = []
    for lines in zip(*bodies):
        if len(set(lines)) == 1:
            merged.append(lines[0])
            continue
        found = [DIMS.match(line) for line in lines]
        if not all(found) or len({len(m[2].split(", ")) for m in found}) != 1:
            return None
        columns = zip(*(m[2].split(", ") for m in found))
        dims = ", ".join(column[0] if len(set(column)) == 1 else "-1" for column in columns)
        merged.append(f"{found[0][1]}dims: [ {dims} ]")
    return "\n".join(merged) + texts[0][len(_without_parameters(texts[0])):]


def _equal_but_parameters(a: str, b: str) -> bool:
    return _without_parameters(a) == _without_parameters(b)


class _SideBySide(Exception):
    """Two generations' configs of a model differ beyond parameters: one config cannot serve both."""


def _configs(bases: dict[int, dict[str, str]], models: Iterable[str], parts: list[int], ensembles: int | None,
             repository: Path) -> dict[str, str]:
    """The config text of each of ``models``: parts serving ``parts``, ensembles pinned to ``ensembles``."""
    texts = {}
    for model in models:
        of_model = {g: configs[model] for g, configs in bases.items()}
        if _ensemble(of_model[max(of_model)]):
            if ensembles is not None:
                texts[model] = serving_config(of_model[ensembles], [ensembles], ensembles)
        else:
            path = repository / model / CONFIG
            disk = path.read_text(encoding="utf-8") if path.is_file() else None
            try:
                texts[model] = _part_config(of_model, parts, disk)
            except _SideBySide as exc:
                raise InputError(_side_by_side(model, of_model, *exc.args)) from None
    return texts


def _side_by_side(model: str, bases: dict[int, str], a: int, b: int) -> str:
    first, second = (_without_parameters(bases[g]).split("\n") for g in (a, b))
    line = next((y for x, y in zip(first, second) if x != y), second[-1])
    return (f"model '{model}' has another config in generation {b} than in {a} ({line.strip()!r}): Triton keeps one "
            f"config per model, so the two versions cannot be served side by side; switch without --server and "
            f"reload the server's models")


def _write_configs(repository: Path, texts: dict[str, str]) -> list[str]:
    """Each config rewritten where it differs (a rewrite marks the model modified for Triton); the
    models rewritten."""
    rewritten = []
    for model, text in texts.items():
        path = repository / model / CONFIG
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            parse_config(text, str(path))
            atomic_write_text(path, text)
            rewritten.append(model)
    return rewritten


def _bases(record: dict[str, Any], repository: Path) -> dict[int, dict[str, str]]:
    return {g: dict(entry["configs"]) for g, entry in generations_of(record, repository).items()}


# ---------------------------------------------------------------------------- updates


def update_repository(out: Path, plan: Any, earlier: dict[str, Any], server: str | None, write: Write,
                      update_models: UpdateModels) -> None:
    """:func:`.triton.write_repository`'s ``update`` of ``out`` to ``plan`` (a ``RepositoryPlan``;
    module doc): a generation update, an update from the same export, or a refusal naming both."""
    current, export = current_of(earlier), earlier.get("export", {})
    lineage = lineage_of(plan.export.manifest, str(plan.export.directory / "manifest.json"))
    if lineage is not None and lineage.parent_manifest_sha256 == export.get("manifest_sha256"):
        _generation_update(out, plan, earlier, server, write)
    elif _same_directory(export.get("directory"), plan.export.directory):
        if plan.generation != current:
            raise InputError(f"{plan.export.directory} is generation {plan.generation} now, {out} serves generation "
                             f"{current} of it and its manifest names no parent that {out} serves")
        if len(generations_of(earlier, out)) == 1:
            changed, gone = update_models(out, plan, earlier)
        else:
            changed, gone = _put_generation(out, plan, earlier, write), []
        if server is not None:
            _apply_changed(out, server, changed, gone, current)
    else:
        raise InputError(f"{out} was written from another export: {export.get('directory')} (generation {current}); "
                         f"{plan.export.directory} is neither it nor an export upgraded from it (its manifest's lineage)")


def _same_directory(recorded: Any, directory: Path) -> bool:
    return isinstance(recorded, str) and Path(recorded).resolve() == Path(directory).resolve()


def _refuse_held(export: Path) -> None:
    """An upgrade that its own judgement held (a task worse, and not accepted) is not served."""
    report = Path(export).parent / UPGRADE_REPORT
    if not report.is_file():
        return
    record = read_json(report, "upgrade report")
    check_format(record, UPGRADE_REPORT_FORMAT, 1, str(report))
    if record.get("verdict") == "held":
        raise InputError(f"{export} is an upgrade its report holds ({report}: held by "
                         f"{', '.join(map(str, record.get('held', [])))}): serve it only once `transmiter upgrade ... "
                         f"--accept TASK` accepts those tasks")


def _generation_update(out: Path, plan: Any, earlier: dict[str, Any], server: str | None, write: Write) -> None:
    _refuse_held(plan.export.directory)
    current = current_of(earlier)
    if plan.generation <= current:
        raise InputError(f"{plan.export.directory} is generation {plan.generation}, not after the generation {current} "
                         f"that {out} serves")
    for key in ("backend", "layout", "name", "precision"):
        if earlier.get(key) != getattr(plan, key):
            raise InputError(f"{out} serves {key} {earlier.get(key)!r}; a generation update keeps it "
                             f"(got {getattr(plan, key)!r})")
    if server is not None:  # refused before anything is written
        bases = {**_bases(earlier, out), plan.generation: {m.name: triton_config.config_text(m) for m in plan.models}}
        _configs(bases, [m.name for m in plan.models], [current, plan.generation], None, out)
        with _Server(server):
            pass
    _put_generation(out, plan, earlier, write)
    switch_generation(out, plan.generation, server)


def _put_generation(out: Path, plan: Any, earlier: dict[str, Any], write: Write) -> list[ModelSpec]:
    """``plan``'s version folders written into ``out`` beside the others (those whose files
    differ: all of a new generation), the record naming its generation (still serving the current
    one, or, for the current one, its new configs). The models whose folders were put."""
    generation, current = plan.generation, current_of(earlier)
    models = [m.name for m in plan.models]
    if sorted(models) != sorted(earlier.get("models", [])):
        raise InputError(f"{out} holds models {', '.join(sorted(earlier.get('models', [])))}; a generation of it "
                         f"must have the same ones, not {', '.join(sorted(models))} (prune the other generations, "
                         f"then update, to change them)")
    held = generations_of(earlier, out)  # before any config is rewritten (a record without generations reads them)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.generation-", dir=out.parent))
    undo: list[Callable[[], None]] = []
    try:
        new = write(staging / "new", plan)
        _check_labels(out, staging / "new", plan)
        bases = {g: dict(entry["configs"]) for g, entry in held.items()}
        # before a new version folder appears: a config of Triton's default policy serves the latest
        _undoable_configs(out, _configs(bases, models, [current], current, out), undo)
        put = _put_folders(out, staging, plan, earlier, new["files"], generation in held, undo)
        readme = (out / "README.md").read_bytes()
        undo.append(lambda: (out / "README.md").write_bytes(readme))
        os.replace(staging / "new" / "README.md", out / "README.md")
        record = _with_generation(earlier, held, new, generation, put)
        _commit(out, record)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if generation == current:  # the record holds the new configs before they are written: each is then its
        put += _write_configs(out, _configs(_bases(record, out), models, [current], current, out))
        _commit(out, record)
    return [m for m in plan.models if m.name in put]


def _check_labels(out: Path, staged: Path, plan: Any) -> None:
    """Label files sit beside the config, one set for every version: a generation keeps them."""
    for model in plan.models:
        for output in model.outputs:
            if output.label_file is None:
                continue
            old, new = out / model.name / output.label_file, staged / model.name / output.label_file
            if old.is_file() and old.read_bytes() != new.read_bytes():
                raise InputError(f"{new.name} of model '{model.name}' differs in generation {plan.generation}: Triton "
                                 f"reads labels per model, not per version (a generation keeps its tasks' classes)")


def _undoable_configs(out: Path, texts: dict[str, str], undo: list[Callable[[], None]]) -> None:
    before = {m: (out / m / CONFIG).read_text(encoding="utf-8") for m in texts}
    undo.append(lambda: _write_configs(out, before))
    _write_configs(out, texts)


def _put_folders(out: Path, staging: Path, plan: Any, earlier: dict[str, Any],
                 files: dict[str, Any], held: bool, undo: list[Callable[[], None]]) -> list[str]:
    """Each model's staged version folder moved in where its files differ from the record's
    (``held``: the record has this generation); the models moved."""
    version, retired, put = str(plan.generation), staging / ".retired", []
    retired.mkdir()
    for model in sorted(plan.models, key=lambda m: m.kind == "ensemble"):  # parts first, as every update
        target = out / model.name / version
        if held and target.is_dir() and _entries(earlier["files"], model.name, version) == _entries(
                files, model.name, version):
            continue
        if target.exists():
            os.rename(target, retired / model.name)
            undo.append(lambda m=model.name, t=target: os.rename(retired / m, t))
        os.rename(staging / "new" / model.name / version, target)
        undo.append(lambda t=target, m=model.name: os.rename(t, staging / f"undone-{m}"))
        put.append(model.name)
    return put


def _entries(files: dict[str, Any], model: str, version: str) -> dict[str, Any]:
    prefix = f"{model}/{version}/"
    return {k: v.get("sha256") for k, v in files.items() if k.startswith(prefix)}


def _with_generation(earlier: dict[str, Any], generations: dict[int, dict[str, Any]], new: dict[str, Any],
                     generation: int, put: list[str]) -> dict[str, Any]:
    """``earlier`` holding ``new``'s generation (its version folders' files as ``new`` recorded them)."""
    version = str(generation)
    moved = tuple(f"{m}/{version}/" for m in put)
    files = {k: v for k, v in earlier["files"].items() if not k.startswith(moved)}
    files.update({k: v for k, v in new["files"].items() if k.startswith(moved) or k == "README.md"})
    held = {str(g): entry for g, entry in generations.items()}
    held[version] = new["generations"][version]
    record = {**earlier, "files": files, "generation": current_of(earlier), "generations": dict(sorted(
        held.items(), key=lambda item: int(item[0])))}
    if generation == current_of(earlier):
        record.update(export=new["export"], models=new["models"])
    return record


# ---------------------------------------------------------------------------- switching


def switch_generation(repository: Path, generation: int, server: str | None = None,
                      image: bytes | None = None) -> dict[str, Any]:
    """Make ``generation`` (one the repository holds) the current one: its configs written (and,
    with ``server``, loaded in the order of the module doc, then checked with ``image``, a small
    encoded image: a PNG of its own by default); the record, written last. The record."""
    repository = Path(repository)
    record = read_record(repository)
    held, current = generations_of(record, repository), current_of(record)
    if generation not in held:
        raise InputError(f"{repository} holds no generation {generation} (it holds {', '.join(map(str, sorted(held)))})")
    if generation == current:
        return record
    if server is None:
        _offline_switch(repository, record, current, generation)
    else:
        _live_switch(repository, record, current, generation, server, image or tiny_png())
    triton_config.check_repository(repository)
    entry = held[generation]
    record = {**record, "generation": generation, "export": entry["export"], "models": entry["models"],
              "generations": {str(g): e for g, e in sorted(held.items())}}
    _commit(repository, record)
    return record


def rollback(repository: Path, server: str | None = None, image: bytes | None = None) -> int:
    """The generation before the current one made current again (:func:`switch_generation`); its number."""
    record = read_record(repository)
    current = current_of(record)
    earlier = [g for g in generations_of(record, Path(repository)) if g < current]
    if not earlier:
        raise InputError(f"{repository} holds no generation before its current one ({current}) to roll back to")
    switch_generation(repository, max(earlier), server, image)
    return max(earlier)


def prune(repository: Path, server: str | None = None) -> list[int]:
    """The generations older than the current one removed (their version folders and record
    entries); the newer ones (after a rollback) stay. Refused while a config, or with ``server``
    the server, still serves one of them. The record is written before the folders go, so it never
    names a removed file; a prune that was stopped leaves folders no record names, which the next
    one removes. The generations removed."""
    repository = Path(repository)
    record = read_record(repository)
    held, current = generations_of(record, repository), current_of(record)
    old = sorted(g for g in held if g < current)
    models = list(record["models"])
    _refuse_served(repository, models, old, server)
    keep = {g: entry for g, entry in held.items() if g not in old}
    if old:
        kept_bases = {g: dict(entry["configs"]) for g, entry in keep.items()}
        _write_configs(repository, _configs(kept_bases, models, [current], None, repository))
        prefixes = tuple(f"{m}/{g}/" for m in models for g in old)
        _commit(repository, {**record, "files": {k: v for k, v in record["files"].items() if not k.startswith(prefixes)},
                             "generations": {str(g): e for g, e in sorted(keep.items())}})
    for model in models:
        for folder in (repository / model).iterdir():
            if folder.is_dir() and folder.name.isdigit() and int(folder.name) not in keep:
                shutil.rmtree(folder)
    return old


def _refuse_served(repository: Path, models: list[str], old: list[int], server: str | None) -> None:
    for model in models:
        path = repository / model / CONFIG
        config = parse_config(path.read_text(encoding="utf-8"), str(path))
        served = set(policy_of(config) or ()) | {s.model_version for s in config.ensemble_scheduling.step}
        if served & set(old):
            raise InputError(f"{path} still serves generation {min(served & set(old))} (a switch that did not finish?): "
                             f"switch generations again before pruning")
    if server is None or not old:
        return
    with _Server(server) as triton:
        try:
            states = triton.states()
        except _Failed as failure:
            raise InputError(f"cannot tell which versions the server at {server} holds: {failure}") from failure
    held = sorted((m, g) for m in models for g in old if states.get((m, str(g))) in IN_USE)
    if held:
        raise InputError(f"the server at {server} still holds model '{held[0][0]}' version {held[0][1]}: "
                         f"switch it with --server before pruning")


def tiny_png() -> bytes:
    """An 8 x 8 grey PNG: a check request any image model answers."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- live


class _Failed(Exception):
    """A request the server refused or did not answer as it must, named with its model."""

    def __init__(self, model: str, what: str, exc: BaseException) -> None:
        super().__init__(f"model '{model}' ({what}: {' '.join(str(exc).split())})")
        self.model = model


class _Server:
    """The few calls a switch makes on a Triton server: gRPC at ``HOST:PORT`` or ``grpc://HOST:PORT``,
    HTTP at ``http://HOST:PORT``."""

    def __init__(self, url: str) -> None:
        self.url, self.http = url, url.startswith("http://")
        address = url.split("://", 1)[1] if "://" in url else url
        try:
            self.module = importlib.import_module("tritonclient.http" if self.http else "tritonclient.grpc")
        except ImportError as exc:
            raise DependencyError(f"tritonclient is not installed ({exc}): {triton_config.SERVE_EXTRA}") from exc
        self.client = self.module.InferenceServerClient(address)
        try:
            self.client.is_server_live()
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the server is not there
            self.client.close()
            raise InputError(f"cannot reach the Triton server at {url}: {' '.join(str(exc).split())}") from exc

    def __enter__(self) -> "_Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def load(self, model: str) -> None:
        try:
            self.client.load_model(model)
        except Exception as exc:  # noqa: BLE001 - the server's refusal, named with the model
            raise _Failed(model, "load", exc) from exc

    def load_all(self, models: list[str]) -> None:
        """``models`` loaded at once, each by a client of its own (Triton loads them in parallel: a
        new Python-backend version is a process importing torch, seconds each on a busy machine);
        the first failure in ``models``' order raised once every load has ended."""
        if len(models) < 2:
            for model in models:
                self.load(model)
            return

        def load(model: str) -> _Failed | None:
            try:
                with _Server(self.url) as own:
                    own.load(model)
            except _Failed as failure:
                return failure
            return None

        with ThreadPoolExecutor(max_workers=len(models)) as pool:
            failures = [f for f in pool.map(load, models) if f is not None]
        if failures:
            raise failures[0]

    def unload(self, model: str) -> None:
        try:
            self.client.unload_model(model)
        except Exception as exc:  # noqa: BLE001
            raise _Failed(model, "unload", exc) from exc

    def states(self) -> dict[tuple[str, str], str]:
        try:
            index = (self.client.get_model_repository_index() if self.http
                     else self.client.get_model_repository_index(as_json=True).get("models", []))
        except Exception as exc:  # noqa: BLE001
            raise _Failed("(the repository index)", "read", exc) from exc
        return {(entry["name"], str(entry.get("version", ""))): entry.get("state", "") for entry in index}

    def answering_version(self, model: str, tensor_name: str, image: bytes) -> str:
        import numpy as np

        tensor = self.module.InferInput(tensor_name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=object))
        try:
            result = self.client.infer(model, [tensor])
        except Exception as exc:  # noqa: BLE001
            raise _Failed(model, "check request", exc) from exc
        response = result.get_response() if self.http else result.get_response(as_json=True)
        return str(response.get("model_version"))


def _kinds(bases: dict[int, dict[str, str]], models: list[str]) -> tuple[list[str], list[str]]:
    latest = bases[max(bases)]
    return [m for m in models if not _ensemble(latest[m])], [m for m in models if _ensemble(latest[m])]


def _stage(triton: _Server | None, repository: Path, texts: dict[str, str]) -> None:
    _write_configs(repository, texts)
    if triton is not None:
        triton.load_all(list(texts))


def _drain(triton: _Server | None, models: list[str], version: int) -> None:
    """Wait until Triton holds no ``version`` of ``models``: a request still running in an old
    ensemble reaches its parts' old versions, which must outlive it."""
    if triton is None:
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        states = triton.states()
        held = [m for m in models if states.get((m, str(version))) in IN_USE]
        if not held:
            return
        if time.monotonic() > deadline:
            raise _Failed(held[0], "unload", TimeoutError(f"version {version} still held after {DRAIN_TIMEOUT_S:.0f} s"))
        time.sleep(0.05)


def _move(triton: _Server | None, repository: Path, bases: dict[int, dict[str, str]], models: list[str],
          source: int, target: int, ready: Callable[[str], bool] = lambda _: True) -> None:
    """(a) parts serving both, (b) ensembles on ``target``, old ones drained, (c) parts on ``target``
    alone. ``ready(part)``: whether the part's ``source`` version may be kept while the others move."""
    parts, ensembles = _kinds(bases, models)
    both = {part: sorted({target, source} if ready(part) else {target}) for part in parts}
    _stage(triton, repository, {p: _configs(bases, [p], both[p], None, repository)[p] for p in parts})
    _stage(triton, repository, _configs(bases, ensembles, [target], target, repository))
    _drain(triton, ensembles, source)
    _stage(triton, repository, _configs(bases, parts, [target], None, repository))


def _offline_switch(repository: Path, record: dict[str, Any], current: int, target: int) -> None:
    """The configs of a switch in the live order, so that a switch stopped half-way leaves every
    ensemble's pins served; generations whose parts cannot be served side by side go at once."""
    bases, models = _bases(record, repository), list(record["models"])
    try:
        _configs(bases, _kinds(bases, models)[0], [current, target], None, repository)
    except InputError:
        _write_configs(repository, _configs(bases, models, [target], target, repository))
        return
    _move(None, repository, bases, models, current, target)


def _live_switch(repository: Path, record: dict[str, Any], current: int, target: int, server: str,
                 image: bytes) -> None:
    bases, models = _bases(record, repository), list(record["models"])
    parts, ensembles = _kinds(bases, models)
    _configs(bases, parts, [current, target], None, repository)  # refused before any load
    with _Server(server) as triton:
        try:
            for group in (parts, ensembles):  # pinned first: Triton's default policy serves the latest folder
                _stage(triton, repository, _configs(bases, group, [current], current, repository))
            _move(triton, repository, bases, models, current, target)
            _check(triton, bases, models, target, image)
        except _Failed as failure:
            _restore(triton, repository, bases, models, current, target, failure, server)


def _check(triton: _Server, bases: dict[int, dict[str, str]], models: list[str], version: int, image: bytes) -> None:
    """One request to every model that takes encoded images (an ensemble of one BYTES input), answered
    by ``version``."""
    from tritonclient.grpc import model_config_pb2

    for model in models:
        config = parse_config(bases[version][model], model)
        inputs = list(config.input)
        if config.platform == "ensemble" and len(inputs) == 1 and inputs[0].data_type == model_config_pb2.TYPE_STRING:
            answered = triton.answering_version(model, inputs[0].name, image)
            if answered != str(version):
                raise _Failed(model, "check request", RuntimeError(f"answered by version {answered}, not {version}"))


def _restore(triton: _Server, repository: Path, bases: dict[int, dict[str, str]], models: list[str],
             current: int, target: int, failure: _Failed, server: str) -> None:
    """Back to ``current`` from wherever the switch stopped: a part keeps the new version while the
    ensembles move back only where Triton holds it."""
    try:
        states = triton.states()
        _move(triton, repository, bases, models, target, current,
              ready=lambda part: states.get((part, str(target))) == "READY")
    except _Failed as again:
        raise VerificationError(f"switching {repository} to generation {target} on {server} failed at {failure}; "
                                f"restoring generation {current} failed too at {again}: run the switch again") from again
    raise VerificationError(f"switching {repository} to generation {target} on {server} failed at {failure}; "
                            f"generation {current} is restored and served") from failure


def _apply_changed(repository: Path, server: str, changed: list[ModelSpec], gone: list[str], current: int) -> None:
    """An update from the same export applied live: changed parts, then changed ensembles loaded,
    the models gone unloaded, and the image models checked."""
    record = read_record(repository)
    bases, models = _bases(record, repository), list(record["models"])
    with _Server(server) as triton:
        try:
            for model in sorted(changed, key=lambda m: m.kind == "ensemble"):
                triton.load(model.name)
            for name in gone:
                triton.unload(name)
            _check(triton, bases, models, current, tiny_png())
        except _Failed as failure:
            raise VerificationError(f"updating {repository} on {server} failed at {failure}") from failure
