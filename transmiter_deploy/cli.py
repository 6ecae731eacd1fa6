"""The ``transmiter`` command line: a thin layer over the library.

Every command reads and writes the artifacts of :mod:`transmiter_deploy`;
all real work happens in the library. Errors the toolkit anticipates print
one line on stderr and exit with a documented status (see ``errors.py``):
2 bad input, 3 missing dependency or hardware, 4 verification failed, 5 cannot
write. Anything else is one line too, naming the step or command (exit 1).
``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_CODES, STEP_ATTRIBUTE, WRITE_ERRNOS, InputError, TransmiterError, one_line, write_failure
from .method.device import DEVICE_HELP, resolve_device
from .method.comparison import REQUIREMENTS, VerdictRules
from .runtimes import registry
from .upgrade.settings import LatencySettings

_STATE = {"debug": False, "progress": True}

EXIT_CODE_HELP = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())


def _progress() -> bool:
    mode = _STATE["progress"]
    return mode == "always" or (mode is True and sys.stderr.isatty())


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"\b\nExit status:\n{EXIT_CODE_HELP}",
)
@click.version_option(__version__, prog_name="transmiter")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--progress", "force_progress", is_flag=True, help="Progress bars even when stderr is not a terminal.")
def cli(debug: bool, quiet: bool, force_progress: bool) -> None:
    """TransMiter adapters: extract on a weak CLIP model, transfer to a strong one, deploy.

    \b
    Typical flow (each step writes a directory the next one reads):
      transmiter cache    --model ViT-B-16 --pretrained openai --data train/ --out c_src
      transmiter head     --model ViT-B-16 --pretrained openai --classes-from c_src --out h_src
      transmiter extract  --source-cache c_src --source-head h_src \\
                          --teacher-cache c_ft --teacher-head h_ft --out a_src
      transmiter transfer --adapter a_src --source-cache c_src --source-head h_src \\
                          --target-cache c_tgt --target-head h_tgt --out a_tgt
      transmiter evaluate --cache test_tgt --head h_tgt --adapter a_tgt
    """
    _STATE["debug"] = debug
    _STATE["progress"] = False if quiet else ("always" if force_progress else True)


# ----------------------------------------------------------------------------- shared options


def model_options(func):
    func = click.option("--device", default="cpu", show_default=True, help="torch device for the model.")(func)
    func = click.option("--init-seed", type=int, default=0, show_default=True,
                        help="Seed for random weights (when neither --pretrained nor --checkpoint).")(func)
    func = click.option("--checkpoint", type=click.Path(path_type=Path),
                        help="Local .safetensors checkpoint for the architecture.")(func)
    func = click.option("--pretrained", help="open_clip pretrained tag (read from the Hugging Face cache).")(func)
    func = click.option("--model", "model_name", required=True, help="open_clip architecture name, e.g. ViT-B-16.")(func)
    return func


def _load_model(model_name, pretrained, checkpoint, init_seed, device, image_tower_only=False):
    from . import demo  # noqa: F401  (registers the demo world's architectures)
    from .features.models import ModelSpec, load_image_tower, load_model

    load = load_image_tower if image_tower_only else load_model
    return load(ModelSpec(model_name, pretrained, checkpoint, init_seed), device=device)


def _check_out(out: Path, kind: str) -> None:
    """A bad --out is refused before the work (and before the heavy imports), not after it
    (artifacts.check_output_directory; ``kind``: a key of artifacts.MANIFESTS)."""
    from .artifacts import MANIFESTS, check_output_directory

    check_output_directory(out, MANIFESTS[kind])


@contextmanager
def _ray_log_named():
    """After a command's Ray run, succeeded or not, the file Ray's own output went to
    (features/distributed_cache.py keeps it off the terminal), in one line on stdout, unless
    --quiet: stderr keeps the one-line error of a failure. Only a file this block's run wrote
    to is named (an earlier run in the same process is forgotten first)."""

    def written():
        module = sys.modules.get("transmiter_deploy.features.distributed_cache")
        return module.ray_log_written() if module is not None else None

    written()
    try:
        yield
    finally:
        path = written()
        if path is not None and _STATE["progress"] is not False:
            click.echo(f"Ray's own log: {path}")


def _read_class_file(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"class list not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InputError(f"class list {path} is empty")
    return names


# ----------------------------------------------------------------------------- commands


@cli.command()
@model_options
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="ImageFolder directory, flat image directory, or CSV with path[,label].")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path),
              help="Text file, one class per line: fixes the class order (default: sorted names).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to write.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process (a DataLoader); ray: a Ray cluster (extra [distributed]), same cache.")
@click.option("--workers", type=click.IntRange(0, None),
              help="local: DataLoader worker processes (default 0); ray: encoding actors, one model each "
                   "(default: one per CPU of the cluster, or per --gpus-per-worker GPUs; at most one per batch).")
@click.option("--address", help="--engine ray: the cluster's HOST:PORT or auto (default: start a local cluster).")
@click.option("--gpus-per-worker", type=click.FloatRange(0, None), default=0, show_default=True,
              help="--engine ray: GPUs each encoding actor gets (fractions share a GPU).")
def cache(model_name, pretrained, checkpoint, init_seed, device, data, classes_file, out, batch_size, engine, workers,
          address, gpus_per_worker):
    """Encode a dataset's images once and store normalised features.

    Every later phase reads this cache, never the images. --engine ray writes the same cache
    on a Ray cluster (docs/recipes.md, "Run it on a cluster"); Ray's own log lines go to a
    file, not to the terminal, and its path is printed after the run (unless --quiet).

    \b
    Example:
      transmiter cache --model ViT-B-16 --pretrained openai --data data/train --out caches/b16-train
      transmiter cache --model ViT-B-16 --pretrained openai --data /shared/train --out caches/b16-train \\
          --engine ray --address 10.0.0.1:6379 --gpus-per-worker 1
    """
    if engine == "local" and (address is not None or gpus_per_worker):
        raise InputError("--address and --gpus-per-worker need --engine ray")
    if engine == "ray" and device != "cpu":
        raise InputError("--engine ray places the models itself (--gpus-per-worker); drop --device")
    if engine == "ray" and workers == 0:
        raise InputError("--workers 0: --engine ray needs at least 1 encoding actor "
                         "(leave --workers out for one per CPU of the cluster)")
    _check_out(out, "cache")
    from .features.datasets import open_dataset

    class_names = _read_class_file(classes_file) if classes_file else None
    dataset = open_dataset(data, class_names)
    if engine == "ray":
        from . import demo  # noqa: F401  (registers the demo world's architectures)
        from .features.distributed_cache import RayCacheSettings, build_cache_ray, import_ray
        from .artifacts import MANIFESTS, read_json
        from .features.models import ModelIdentity, ModelSpec

        import_ray()  # a missing extra is reported before any model loads
        spec = ModelSpec(model_name, pretrained, checkpoint, init_seed)
        with _ray_log_named():  # after the result line, or after a failure
            build_cache_ray(spec, dataset, out, RayCacheSettings(address, workers, gpus_per_worker),
                            batch_size=batch_size, progress=_progress())
            identity = ModelIdentity.from_dict(read_json(Path(out) / MANIFESTS["cache"], "cache manifest")["model"],
                                               str(out))
            _echo_cached(dataset, identity, out)
        return
    from .features.cache import build_cache

    model = _load_model(model_name, pretrained, checkpoint, init_seed, device)
    build_cache(model, dataset, out, batch_size=batch_size, num_workers=workers or 0, device=device,
                progress=_progress())
    _echo_cached(dataset, model.identity, out)


def _echo_cached(dataset, identity, out: Path) -> None:
    click.echo(f"cached {len(dataset)} images ({len(dataset.class_names)} classes) with "
               f"{identity.describe()} -> {out}")


@cli.command()
@model_options
@click.option("--classes", "classes_file", type=click.Path(path_type=Path), help="Text file, one task class per line.")
@click.option("--classes-from", type=click.Path(path_type=Path),
              help="Take classes from a cache (task classes), or from a head or adapter "
                   "(task and auxiliary classes, exactly).")
@click.option("--width", type=int, default=1024, show_default=True, help="Logit width C (task + auxiliary classes).")
@click.option("--no-auxiliary", is_flag=True, help="Task classes only (for the fine-tuned teacher's head).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the auxiliary class sample.")
@click.option("--auxiliary-vocabulary", type=click.Path(path_type=Path),
              help="Draw auxiliary classes from this file (one name per line) instead of the built-in nouns.")
@click.option("--templates", default="simple", show_default=True,
              help="Prompt templates: simple, openai, photo, or a file with one '{}' template per line.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Head directory to write.")
def head(model_name, pretrained, checkpoint, init_seed, device, classes_file, classes_from, width, no_auxiliary,
         seed, auxiliary_vocabulary, templates, out):
    """Build a zero-shot head from a model's text tower.

    Rows are the task classes, then auxiliary classes from the built-in
    vocabulary up to --width. Source and target heads must share one class
    list: build the target's with --classes-from SOURCE_HEAD.

    \b
    Example:
      transmiter head --model ViT-L-14 --pretrained openai --classes-from heads/b16 --out heads/l14
    """
    _check_out(out, "head")
    from .features.heads import build_head, save_head
    from .features.templates import resolve_templates
    from .features.vocabulary import select_auxiliary

    if (classes_file is None) == (classes_from is None):
        raise InputError("give exactly one of --classes or --classes-from")
    auxiliary = None
    if classes_file is not None:
        task = _read_class_file(classes_file)
    else:
        task, auxiliary = _classes_from(classes_from)
    if no_auxiliary:
        auxiliary = []
    elif auxiliary is None:
        vocabulary = _read_class_file(auxiliary_vocabulary) if auxiliary_vocabulary else None
        auxiliary = select_auxiliary(task, width, seed, vocabulary)
    model = _load_model(model_name, pretrained, checkpoint, init_seed, device)
    built = build_head(model, task, auxiliary, resolve_templates(templates), progress=_progress())
    save_head(built, out)
    click.echo(f"head for {model.identity.describe()}: {len(task)} task + {len(auxiliary)} auxiliary classes -> {out}")


def _classes_from(path: Path) -> tuple[list[str], list[str] | None]:
    from .artifacts import MANIFESTS, read_json

    for manifest in (MANIFESTS["head"], MANIFESTS["adapter"]):
        if (path / manifest).is_file():
            payload = read_json(path / manifest, manifest)
            return list(payload.get("class_names", [])), list(payload.get("auxiliary_names", []))
    if (path / MANIFESTS["cache"]).is_file():
        names = read_json(path / MANIFESTS["cache"], "cache manifest").get("class_names") or []
        if not names:
            raise InputError(f"cache {path} is unlabelled: it has no class names to take")
        return list(names), None
    raise InputError(f"--classes-from {path}: not a cache, head or adapter directory")


@cli.command()
@click.option("--source-cache", required=True, type=click.Path(path_type=Path), help="Source model's feature cache.")
@click.option("--source-head", required=True, type=click.Path(path_type=Path), help="Source model's zero-shot head (C classes).")
@click.option("--teacher-cache", required=True, type=click.Path(path_type=Path),
              help="Fine-tuned source's cache of the same images.")
@click.option("--teacher-head", required=True, type=click.Path(path_type=Path),
              help="Fine-tuned source's head over the K task classes.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--latent-dim", type=int, help="Latent width D (default: the logit width C).")
@click.option("--mlp-ratio", type=int, default=4, show_default=True)
@click.option("--layers", type=int, default=1, show_default=True, help="Residual MLP blocks.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--temperature", type=float, default=0.5, show_default=True, help="Teacher temperature tau.")
@click.option("--orthogonal-map", type=click.Choice(["qr", "cayley", "matrix_exp", "householder"]), default="qr",
              show_default=True,
              help="How the basis stays orthogonal: qr = retraction after each step (fast); "
                   "cayley/matrix_exp/householder = PyTorch's parametrisations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help=f"Where the adapter trains: {DEVICE_HELP}.")
def extract(source_cache, source_head, teacher_cache, teacher_head, out, latent_dim, mlp_ratio, layers, epochs,
            batch_size, lr, weight_decay, temperature, orthogonal_map, seed, device):
    """Phase 1: learn the fine-tuning's effect as an adapter on the source's logits (no labels).

    \b
    Example:
      transmiter extract --source-cache c/b16 --source-head h/b16 \\
          --teacher-cache c/b16-ft --teacher-head h/b16-ft --out adapters/b16
    """
    _check_out(out, "adapter")
    from .features.adapter_artifact import save_adapter
    from .features.cache import load_cache
    from .method.extraction import ExtractionSettings
    from .features.heads import load_head
    from .pipeline.phases import extract_adapter

    device = resolve_device(device)  # before any file is read: a missing GPU is said at once
    src_cache = load_cache(source_cache)
    settings = ExtractionSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                  teacher_temperature=temperature, orthogonal_map=orthogonal_map, seed=seed)
    artifact, history = extract_adapter(src_cache, load_head(source_head), load_cache(teacher_cache),
                                        load_head(teacher_head), latent_dim, mlp_ratio, layers, settings,
                                        progress=_progress(), device=device)
    save_adapter(artifact, out)
    click.echo(f"extracted adapter on {artifact.source_model.describe()} ({len(src_cache)} samples, "
               f"final loss {history[-1]:.4f}) -> {out}")


@cli.command()
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path), help="Extracted adapter.")
@click.option("--source-cache", required=True, type=click.Path(path_type=Path))
@click.option("--source-head", required=True, type=click.Path(path_type=Path))
@click.option("--target-cache", required=True, type=click.Path(path_type=Path),
              help="Target model's cache of the same images as the source cache.")
@click.option("--target-head", required=True, type=click.Path(path_type=Path),
              help="Target model's head over the adapter's class list.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--lambda", "regularisation", type=float, default=500.0, show_default=True,
              help="Procrustes regularisation lambda.")
@click.option("--lambda-mode", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="sum: lambda on the raw sum over samples (reference); mean: per-sample normalised.")
def transfer(adapter_dir, source_cache, source_head, target_cache, target_head, out, regularisation, lambda_mode):
    """Phase 2: move an adapter onto the target model in closed form (orthogonal Procrustes).

    \b
    Example:
      transmiter transfer --adapter adapters/b16 --source-cache c/b16 --source-head h/b16 \\
          --target-cache c/l14 --target-head h/l14 --out adapters/l14
    """
    _check_out(out, "adapter")
    from .features.adapter_artifact import load_adapter, save_adapter
    from .features.cache import load_cache
    from .features.heads import load_head
    from .pipeline.phases import transfer_adapter

    artifact = load_adapter(adapter_dir)
    moved, result = transfer_adapter(artifact, load_cache(source_cache), load_head(source_head),
                                     load_cache(target_cache), load_head(target_head), regularisation, lambda_mode)
    save_adapter(moved, out)
    click.echo(f"transferred {artifact.source_model.describe()} -> {moved.target_model.describe()} "
               f"({result.num_samples} samples, lambda {regularisation:g} [{lambda_mode}]) -> {out}")


@cli.command()
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path), help="Transferred adapter.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Labelled target cache.")
@click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path), help="Target head.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--shots", type=int, help="Use this many samples per class (seeded); default: all labelled samples.")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--free-basis", is_flag=True, help="Drop the orthogonality constraint while training.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help=f"Where the adapter trains: {DEVICE_HELP}.")
def plus(adapter_dir, cache_dir, head_dir, out, shots, epochs, batch_size, lr, weight_decay, free_basis, seed, device):
    """Phase 3 (TransMiter+): refine a transferred adapter with a few labels.

    \b
    Example:
      transmiter plus --adapter adapters/l14 --cache c/l14-fewshot --head h/l14 --shots 4 --out adapters/l14-plus
    """
    _check_out(out, "adapter")
    from .features.adapter_artifact import load_adapter, save_adapter
    from .features.cache import load_cache
    from .features.heads import load_head
    from .pipeline.phases import plus_adapter
    from .method.plus import PlusSettings

    device = resolve_device(device)  # before any file is read: a missing GPU is said at once
    settings = PlusSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            keep_orthogonal=not free_basis, seed=seed)
    result, history, num_samples = plus_adapter(load_adapter(adapter_dir), load_cache(cache_dir), load_head(head_dir),
                                                shots, settings, progress=_progress(), device=device)
    save_adapter(result, out)
    click.echo(f"TransMiter+ on {num_samples} labelled samples, final loss {history[-1]:.4f} -> {out}")


@cli.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Labelled test cache.")
@click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path), help="Zero-shot head of the cache's model.")
@click.option("--adapter", "adapter_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Adapter(s) to evaluate on top of the head; repeatable.")
@click.option("--num-base", type=int, help="Number of base classes (default: the first half, rounded up).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def evaluate(cache_dir, head_dir, adapter_dirs, num_base, json_path):
    """Base-to-novel accuracy (base, novel, harmonic mean) of zero-shot and adapted logits.

    \b
    Example:
      transmiter evaluate --cache c/l14-test --head h/l14 --adapter adapters/l14 --json results.json
    """
    import torch

    from .features.adapter_artifact import check_adapter_head, load_adapter
    from .artifacts import write_json
    from .features.cache import load_cache, zero_shot_logits
    from .method.evaluation import base_to_novel
    from .features.heads import load_head

    test, zs_head = load_cache(cache_dir), load_head(head_dir)
    if not test.class_names or not (test.labels >= 0).any():
        raise InputError(f"cache {cache_dir} has no labels to evaluate against")
    logits = zero_shot_logits(test, zs_head)
    rows = [{"name": f"zero-shot {zs_head.model.describe()}", **base_to_novel(logits[:, : zs_head.num_task_classes], test.labels, num_base)}]
    for adapter_dir in adapter_dirs:
        artifact = load_adapter(adapter_dir)
        check_adapter_head(artifact, zs_head, "head")
        with torch.no_grad():
            adapted = artifact.adapter.task_logits(logits)
        rows.append({"name": f"+ adapter {adapter_dir} ({artifact.stage})", **base_to_novel(adapted, test.labels, num_base)})

    def fmt(value):
        return "   -  " if value is None else f"{value:6.2f}"

    width = max(len(row["name"]) for row in rows)
    click.echo(f"{'':{width}}    base  novel     HM    all")
    for row in rows:
        click.echo(f"{row['name']:{width}}  {fmt(row['base'])} {fmt(row['novel'])} {fmt(row['hm'])} {fmt(row['all'])}")
    if json_path:
        write_json(Path(json_path), {"cache": str(cache_dir), "head": str(head_dir), "rows": rows})


@cli.command("export-onnx")
@model_options
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path),
              help="Adapter for this model (transferred or TransMiter+).")
@click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path), help="This model's zero-shot head.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export directory to write.")
@click.option("--images", type=click.Path(path_type=Path),
              help="Images for parity and fp16 calibration (directory or CSV); default: synthetic images.")
@click.option("--samples", type=int, default=16, show_default=True, help="How many images to verify with.")
@click.option("--opset", type=click.IntRange(17, 23), default=17, show_default=True)
@click.option("--softmax", is_flag=True, help="Output probabilities instead of logits.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(list(registry.PRECISIONS)),
              help="Export these precisions (repeatable; fp32, the reference, always; default: "
                   f"{', '.join(registry.default_precisions())}).")
@click.option("--no-fp16", is_flag=True, help="Skip the mixed-precision graphs (no onnxconverter-common needed).")
@click.option("--sigma-mode", type=click.Choice(["auto", "norm", "gram"]), default="auto", show_default=True,
              help="How the folded head computes sigma: norm of the pushed vector or the Gram form.")
@click.option("--calibration-images", type=click.IntRange(1, None), default=1, show_default=True,
              help="Images the fp16 converter runs through the fp32 model to find the nodes fp16 cannot "
                   "hold (its memory is bounded whatever the number: the tensors are fetched in groups).")
@click.option("--calibration-data", type=click.Path(path_type=Path),
              help="Unlabelled images to calibrate int8 on (directory or CSV; a seeded sample).")
@click.option("--calibration-count", type=click.IntRange(1, None), default=128, show_default=True,
              help="How many calibration images to sample (at least 32).")
@click.option("--external-data-threshold", type=click.IntRange(0, None), metavar="BYTES",
              help="Write a graph whose tensors pass BYTES with ONNX external data (GRAPH.onnx.data beside it; "
                   "default: $TRANSMITER_EXTERNAL_DATA_THRESHOLD, else 2000000000, just under protobuf's 2 GiB).")
def export_onnx(model_name, pretrained, checkpoint, init_seed, device, adapter_dir, head_dir, out, images, samples,
                opset, softmax, precisions, no_fp16, sigma_mode, calibration_images, calibration_data,
                calibration_count, external_data_threshold):
    """Fuse the adapter into the model and export verified ONNX (fp32 and mixed fp16).

    Writes model.onnx (pixels -> task logits), head.onnx (features -> task
    logits), their fp16 versions (and int8 with --precision int8, calibrated on
    --calibration-data), manifest.json and parity.json. Exits with 4 (and writes
    nothing) if the fp32 graphs do not match PyTorch.

    \b
    Example:
      transmiter export-onnx --model ViT-L-14 --pretrained openai --adapter a/l14 --head h/l14 \\
          --images data/val --out export/l14
    """
    from .features.adapter_artifact import load_adapter
    from .features.heads import load_head
    if device != "cpu":
        raise InputError("export-onnx traces on the CPU; drop --device")
    _check_out(out, "export")
    from .deploy.onnx_export import ExportSettings, export_deployment, format_report, parity_pixels

    artifact, target_head = load_adapter(adapter_dir), load_head(head_dir)
    # the head is computed already: the text tower is never built
    model = _load_model(model_name, pretrained, checkpoint, init_seed, device, image_tower_only=True)
    if artifact.model != model.identity:
        raise InputError(
            f"adapter {adapter_dir} applies to {artifact.model.describe()}, not to the model named "
            f"({model.identity.describe()})"
        )
    pixels = parity_pixels(model, images, count=samples)
    chosen = (registry.REFERENCE_PRECISION, *precisions) if precisions else registry.default_precisions()
    if no_fp16:
        chosen = tuple(name for name in chosen if name != "fp16")
    settings = ExportSettings(opset=opset, softmax=softmax, precisions=tuple(dict.fromkeys(chosen)),
                              sigma_mode=sigma_mode, calibration_images=calibration_images,
                              external_data_threshold=external_data_threshold)
    calibration = None
    if settings.calibrated():
        from .deploy.calibration import sample_calibration

        if calibration_data is None:
            raise InputError(f"--precision {settings.calibrated()[0].name} needs --calibration-data (unlabelled images)")
        calibration = sample_calibration(model, calibration_data, calibration_count)
    report = export_deployment(model, target_head, artifact, out, pixels, settings,
                               log=lambda line: click.echo(line, err=True), calibration=calibration)
    click.echo(format_report(report))
    click.echo(f"exported to {out}")


@cli.command("export")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: export/out/<recipe name>).")
@click.option("--force", is_flag=True, help="Redo every step, even those whose inputs are unchanged.")
@click.option("--check", is_flag=True, help="Only validate the recipe (and its files), then stop.")
def export(recipe_path, out, force, check):
    """Run a recipe end to end: caches, adapter (extract, transfer, TransMiter+), fused ONNX
    (fp32, fp16), parity, TensorRT engines where possible, and report.md / report.json.

    Re-running skips every step whose inputs are unchanged. See docs/recipes.md; a recipe
    with a tasks: list exports a task bank, one backbone and a head per task (docs/bank.md).

    \b
    Example:
      transmiter export export/recipes/demo.yaml
    """
    from .pipeline.bank_export import run_bank_export
    from .pipeline.export import run_export
    from .pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if check:
        click.echo(f"recipe {recipe_path} is valid" + (f" (a bank of {len(recipe.tasks)} tasks)" if recipe.bank else ""))
        return
    out = out or Path("export") / "out" / recipe.name
    with _ray_log_named():  # data.engine: ray
        outcome = (run_bank_export if recipe.bank else run_export)(recipe, out, force=force, progress=_progress(),
                                                                   log=lambda line: click.echo(line, err=True))
    for step in outcome.steps:
        if step.status == "unavailable":
            click.echo(f"skipped {step.name}: {step.detail}", err=True)
    for warning in outcome.teacher_warnings():
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"artifacts: {outcome.export_dir}")
    click.echo(f"report:    {out / 'report.md'}")


@cli.group("bank")
def bank_group():
    """Inspect and edit a task bank (the onnx/ directory a bank recipe exports, docs/bank.md).

    A recipe re-run is the usual way to grow or shrink a bank; these commands edit a bank
    directory directly, e.g. to add a head exported elsewhere for the same backbone.
    """


@bank_group.command("list")
@click.argument("bank_dir", metavar="BANK", type=click.Path(path_type=Path))
def bank_list(bank_dir):
    """The bank's tasks in order, with their classes and output names (every file verified)."""
    from .deploy.bank import read_bank

    bank = read_bank(bank_dir)
    click.echo(f"bank {bank_dir}: {bank.manifest['target_model'].get('name')} backbone, "
               f"{bank.manifest['feature_dim']}-dim features, graphs: {', '.join(bank.manifest['graphs'].values())}")
    for task in bank.tasks:
        classes = task.head.manifest["class_names"]
        click.echo(f"  {task.name}: {len(classes)} classes ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}) "
                   f"-> {bank.output(task.name)}")


@bank_group.command("add")
@click.argument("bank_dir", metavar="BANK", type=click.Path(path_type=Path))
@click.argument("name")
@click.argument("head_dir", metavar="HEAD", type=click.Path(path_type=Path))
def bank_add(bank_dir, name, head_dir):
    """Add task NAME, its head read from HEAD: a head export (tasks/<task>/head-export of a
    bank export) or a single-task export's onnx/ directory, built for the bank's backbone.

    \b
    Example:
      transmiter bank add export/out/demo-bank/onnx tinted export/out/demo/onnx
    """
    from .deploy.bank import add_task

    bank = add_task(bank_dir, name, head_dir, log=lambda line: click.echo(line, err=True))
    click.echo(f"bank {bank_dir}: tasks {', '.join(bank.task_names)}")


@bank_group.command("remove")
@click.argument("bank_dir", metavar="BANK", type=click.Path(path_type=Path))
@click.argument("name")
def bank_remove(bank_dir, name):
    """Take task NAME out of the bank (the backbone and the other heads stay byte-identical)."""
    from .deploy.bank import remove_task

    bank = remove_task(bank_dir, name, log=lambda line: click.echo(line, err=True))
    click.echo(f"bank {bank_dir}: tasks {', '.join(bank.task_names)}")


@cli.command("predict")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.argument("images", metavar="IMAGE_OR_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--runtime", "runtime_name", type=click.Choice([n for n, e in registry.RUNTIMES.items() if e.loads != "module"]),
              default="onnxruntime-cpu", show_default=True, help="Graph runtime of the registry to run the export on.")
@click.option("--precision", type=click.Choice(list(registry.PRECISIONS)), default="fp32", show_default=True,
              help="Which of the export's graphs (as its manifest records them).")
@click.option("--task", "tasks", multiple=True, help="A bank's task to report (repeatable; default: every task).")
@click.option("--topk", type=click.IntRange(1, None), default=5, show_default=True, help="Classes per image and task.")
@click.option("--batch", type=click.IntRange(1, None), help="Images per run (default: 8, or the engine's largest batch).")
@click.option("--threads", type=click.IntRange(1, None), help="CPU threads of the runtime (default: its own).")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Write JSON lines (one per image and task) to this file ('-': stdout) instead of the table.")
def predict_command(export_dir, images, runtime_name, precision, tasks, topk, batch, threads, json_out):
    """Classify images with an export (single-task or bank): per image and task, the top-k classes
    and their scores (logits, or probabilities for a softmax export).

    EXPORT is an export directory (with manifest.json) or a `transmiter export` output directory.
    Folders are searched for image files. An image that cannot be read is named on stderr and the
    others go on; the exit status is then 2.

    \b
    Examples:
      transmiter predict export/out/demo img1.png img2.jpg --topk 3
      transmiter predict export/out/demo-bank photos/ --task colours_tinted --json results.jsonl
    """
    from tqdm import tqdm

    from .artifacts import atomic_write_text
    from .runtimes.base import RunSettings
    from .serving.deployment import Deployment
    from .serving.predict import image_paths, predict_paths

    paths = image_paths(images)
    failed, lines = [], []
    with Deployment.open(export_dir, runtime_name, precision, RunSettings(threads=threads)) as deployment, \
            tqdm(total=len(paths), unit="img", desc="predict", disable=not _progress() or len(paths) < 2) as bar:
        for name in tasks:
            deployment.info.task(name)  # an unknown task stops here, before any image
        for result in predict_paths(deployment, paths, topk, tasks or None, batch, bar.update):
            if result.error is not None:
                failed.append(result)
                tqdm.write(f"transmiter: skipped {result.path}: {one_line(result.error)}", file=sys.stderr)
            if json_out is not None:
                lines += result.json_lines()
            elif result.predictions is not None:
                for task, prediction in result.predictions.items():
                    top = ", ".join(f"{name} {score:.4g}" for name, score in prediction.top)
                    tqdm.write(f"{result.path}\t{task}\t{top}")
    if json_out is not None and str(json_out) == "-":
        click.echo("\n".join(lines))
    elif json_out is not None:
        atomic_write_text(json_out, "".join(f"{line}\n" for line in lines))
    if failed:
        raise InputError(f"{len(failed)} of {len(paths)} images could not be read (first: {failed[0].path})")


@cli.command("triton")
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model repository to write (absent, empty, or an earlier one of ours: replaced whole).")
@click.option("--backend", type=click.Choice(["python", "onnxruntime", "tensorrt"]), default="python", show_default=True,
              help="Triton backend of the models that run graphs (the preprocessing model is always Python).")
@click.option("--layout", type=click.Choice(["fused", "ensemble"]), default="fused", show_default=True,
              help="fused: one model, every task's output; ensemble (banks): backbone + one head model per task.")
@click.option("--name", default="transmiter", show_default=True, help="Model name (and prefix of the others).")
@click.option("--precision", type=click.Choice(list(registry.PRECISIONS)), default="fp32", show_default=True,
              help="Which of the export's graphs (as its manifest records them).")
@click.option("--max-batch", type=click.IntRange(1, None),
              help="max_batch_size (default: the export's batch profile; at most the engine's for tensorrt).")
@click.option("--update", is_flag=True,
              help="Change an earlier repository of ours model by model, unchanged models untouched (a serving "
                   "server); from an export upgraded from the one it serves, add and switch to its generation.")
@click.option("--server", metavar="HOST:PORT",
              help="Apply --update, --rollback or --prune live on this Triton server (explicit model control; gRPC, "
                   "or http://HOST:PORT).")
@click.option("--rollback", is_flag=True, help="Make the generation before the current one of --out current again.")
@click.option("--prune", is_flag=True, help="Remove the generations of --out older than the current one.")
def triton_command(export_dir, out, backend, layout, name, precision, max_batch, update, server, rollback, prune):
    """Write a Triton Inference Server model repository for EXPORT (docs/serving.md), or switch
    the generations of one (--rollback, --prune: no EXPORT).

    \b
    Examples:
      transmiter triton export/out/demo --out triton-repo
      transmiter triton export/out/demo-bank --out triton-repo --layout ensemble --name bank
      transmiter triton export/out/demo-bank-v2 --out triton-repo --layout ensemble --name bank --update --server localhost:8001
      transmiter triton --out triton-repo --rollback --server localhost:8001
    """
    from .serving.triton import write_repository
    from .serving.triton_generations import prune as prune_generations
    from .serving.triton_generations import rollback as roll_back

    live = f", live on {server}" if server else ""
    if rollback or prune:
        if export_dir is not None or update or (rollback and prune):
            raise InputError("--rollback and --prune take --out (and --server) alone: no EXPORT, no --update, not both")
        if rollback:
            click.echo(f"{out} serves generation {roll_back(out, server)} again{live}")
        else:
            removed = prune_generations(out, server)
            click.echo(f"removed generation {', '.join(map(str, removed))} from {out}" if removed
                       else f"{out} holds no generation older than its current one")
        return
    if export_dir is None:
        raise InputError("EXPORT is missing (it may be left out only with --rollback or --prune)")
    plan = write_repository(export_dir, out, backend=backend, layout=layout, name=name, precision=precision,
                            max_batch=max_batch, update=update, server=server)
    click.echo(f"wrote {out}: {len(plan.models)} models ({', '.join(m.name for m in plan.models)}); backend {backend}, "
               f"layout {layout}, {precision}, max_batch_size {plan.max_batch_size} ({plan.batch_source}); "
               f"generation {plan.generation}{live}")


@cli.command("upgrade")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True, metavar="NAME",
              help="The new target (an open_clip model name, or a shipped demo model such as TM-Demo-Large).")
@click.option("--pretrained", metavar="TAG", help="Its open_clip pretrained tag (read from the Hugging Face cache).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Its weights from a local checkpoint.")
@click.option("--init-seed", type=int, help="Random weights (shapes and speed only).")
@click.option("--demo-weights", metavar="NAME", help="A shipped demo model's weights (default for a demo model's name).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The new export's directory (not the old export, nor inside it).")
@click.option("--dry-run", is_flag=True, help="Print which steps are reused and which run, and why; write nothing.")
@click.option("--margin", type=click.FloatRange(0, 1), default=VerdictRules.margin, show_default=True,
              help="Not worse: the accuracy difference's 95% interval lies above -margin (a fraction).")
@click.option("--max-negative-flips", type=click.FloatRange(0, 1), default=VerdictRules.max_negative_flips,
              show_default=True, help="Worse: more than this share of the images right before and wrong after.")
@click.option("--require", type=click.Choice(REQUIREMENTS), default=VerdictRules.require, show_default=True,
              help="What every task's verdict must be for the upgrade to go ahead.")
@click.option("--accept", multiple=True, metavar="TASK", help="A task whose verdict does not hold the upgrade (repeat).")
@click.option("--latency-budget", type=click.FloatRange(0, None), default=LatencySettings.budget_s, show_default=True,
              help="Seconds of interleaved old/new timing per batch size (0: no latency).")
def upgrade_command(export_dir, target_name, pretrained, checkpoint, init_seed, demo_weights, out, dry_run, margin,
                    max_negative_flips, require, accept, latency_budget):
    """Move every task of EXPORT onto a new target in closed form and judge it against the old
    one image by image (docs/upgrade.md). The source side is reused, only the target's steps run;
    upgrade.md and upgrade.json go into the new export. Exit 4: a task holds the upgrade.

    \b
    Examples:
      transmiter upgrade export/out/demo-bank --target TM-Demo-Large --out export/out/demo-bank-large --dry-run
      transmiter upgrade export/out/demo-bank --target TM-Demo-Large --out export/out/demo-bank-large
    """
    from .upgrade.run import dry_run_lines, plan_upgrade, target_ref, upgrade_export

    target = target_ref(target_name, pretrained, checkpoint, init_seed, demo_weights)
    if dry_run:
        for line in dry_run_lines(plan_upgrade(export_dir, target, out)):
            click.echo(line)
        return
    report = upgrade_export(export_dir, target, out, VerdictRules(margin, max_negative_flips, require), tuple(accept),
                            LatencySettings(budget_s=latency_budget) if latency_budget else LatencySettings(batches=()),
                            progress=_progress(), log=lambda line: click.echo(line, err=True))
    for line in report.summary():
        click.echo(line)
    click.echo(f"report:    {Path(out) / 'upgrade.md'}")


@cli.command("build-engine")
@click.argument("onnx_path", metavar="ONNX", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engine file to write (its manifest: OUT.json).")
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=8, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--workspace-mib", type=click.IntRange(1, None), default=4096, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Persistent timing cache (default: beside the engine).")
def build_engine_command(onnx_path, out, min_batch, opt_batch, max_batch, workspace_mib, timing_cache):
    """Build a strongly typed TensorRT engine from an exported graph (model.onnx -> fp32 engine,
    model_fp16.onnx -> fp16 engine) with one optimisation profile over the batch range.

    Without TensorRT or a GPU: exits with status 3 and writes OUT.json with the equivalent
    trtexec command, to build the engine elsewhere.

    \b
    Example:
      transmiter build-engine export/out/demo/onnx/model_fp16.onnx --out engines/demo_fp16.engine --max-batch 64
    """
    from .runtimes.tensorrt import BatchProfile, build_engine

    manifest = build_engine(onnx_path, out, BatchProfile(min_batch, opt_batch, max_batch), workspace_mib, timing_cache,
                            log=lambda line: click.echo(line, err=True))
    click.echo(f"built {out} (TensorRT {manifest['tensorrt_version']}, {manifest['gpu']['name']})")


@cli.command("bench")
@click.option("--profile", "profile_name", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: batches 1 and 8 on CPU, fits 15 min on 2 cores; full: the long sweep.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Results folder (default: benchmarks/results/<host label>, e.g. cpu-2core).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("build/bench"), show_default=True,
              help="Exported graphs, rendered images and caches, reused between runs.")
@click.option("--threads", type=click.IntRange(1, None), help="CPU threads of torch and of each runtime (default: all cores).")
@click.option("--part", "parts", multiple=True, type=click.Choice(["latency", "flops", "accuracy"]),
              help="Measure only these (repeatable; default: all three).")
@click.option("--runtime", "runtimes", multiple=True,
              type=click.Choice(list(registry.RUNTIMES)),
              help="Time only these runtimes (repeatable; default: every one available here).")
@click.option("--pair", "pairs", multiple=True,
              type=click.Choice(["demo", "vit-b-32_to_vit-b-16", "rn50_to_vit-b-16", "vit-b-16_to_vit-l-14"]),
              help="Only these source -> target pairs (repeatable; default: all).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1, None),
              help="Time these batch sizes instead of the profile's (repeatable).")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["backbone", "fused", "unfolded", "eft", "head"]),
              help="Build and time only these variants (repeatable; eft = every EFT variant; default: all).")
@click.option("--rounds", type=click.IntRange(1, None),
              help="Exactly this many timing rounds per cell, instead of the profile's time budget.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(list(registry.PRECISIONS)),
              help="Also time backbone and fused graphs in these precisions on the graph runtimes "
                   "(repeatable; converted as the export does, calibrated on random pixels).")
@click.option("--no-plots", is_flag=True, help="Write RESULTS.md without the PNG plots (no matplotlib needed).")
@click.option("--report-only", is_flag=True, help="Only rewrite RESULTS.md and plots from the JSON already in --out.")
@click.option("--bank-sweep", "bank_sweep", metavar="N,N,...",
              help="Instead of the suite: the task-bank sweep, backbone alone vs banks of these many synthetic "
                   "heads (e.g. 1,2,4,8,16,32), in one interleaved loop (default --out: <host label>-bank).")
@click.option("--bank-model", default="ViT-B-16", show_default=True, help="Backbone architecture of --bank-sweep.")
@click.option("--bank-compact", "bank_compact", multiple=True, metavar="SETTING[@N,...]",
              help="Compact-head banks to time in --bank-sweep (q8, q8i, q4, or none; @N: only at these N; "
                   "repeatable; default: q8i@8,16,32 and q8@16).")
def bench(profile_name, out, work, threads, parts, runtimes, pairs, batches, variants, rounds, precisions, no_plots,
          report_only, bank_sweep, bank_model, bank_compact):
    """Latency per runtime (backbone alone, fused TransMiter, unfolded, EFT, head alone), MACs per
    component and the demo world's accuracy table: latency.json, flops.json, accuracy.json,
    RESULTS.md and plots. Random weights for speed; GPU runtimes only where a GPU is visible.

    \b
    Examples:
      transmiter bench                              # quick profile, everything
      transmiter bench --profile full --part latency
    """
    import os
    import shlex

    from .benchmark.report import write_report
    from .benchmark.suite import PARTS, host_label, run_benchmark

    # what produced the results, recorded in them (the argv of a console-script run)
    command = "transmiter " + shlex.join(sys.argv[1:]) if sys.argv and "transmiter" in sys.argv[0] else "transmiter bench"
    if bank_sweep is not None:
        from dataclasses import replace

        from .benchmark import bank, bank_report

        out = out or bank.default_out(bank_model)
        if not report_only:
            tasks = bank.parse_tasks(bank_sweep)
            settings = bank.BankSettings(bank_model, tasks, tuple(batches) or bank.DEFAULT_BATCHES,
                                         compact=bank.parse_compact(tuple(bank_compact) or bank.DEFAULT_COMPACT, tasks,
                                                                    strict=bool(bank_compact)))
            if rounds is not None:
                settings = replace(settings, plan=replace(settings.plan, min_rounds=rounds, max_rounds=rounds))
            bank.run_bank_sweep(settings, out, work, threads or os.cpu_count() or 1,
                                tuple(runtimes) or bank.default_runtimes(), command,
                                log=lambda line: click.echo(line, err=True))
        click.echo(f"results: {bank_report.write_bank_report(out, plots=not no_plots)}")
        return
    out = out or Path("benchmarks") / "results" / host_label()
    if not report_only:
        run_benchmark(profile_name, out, work, threads or os.cpu_count() or 1, tuple(parts) or PARTS,
                      tuple(runtimes) or tuple(registry.RUNTIMES), tuple(pairs) or None, tuple(batches) or None,
                      tuple(variants) or None, rounds, command,
                      log=lambda line: click.echo(line, err=True), progress=_progress(),
                      precisions=tuple(precisions) or ("fp32",))
    click.echo(f"results: {write_report(out, command, plots=not no_plots)}")


@cli.group("teacher")
def teacher_group():
    """Write a recipe's open_clip teacher out as another teacher kind (docs/recipes.md, "Teachers").

    The files are what an ONNX or precomputed-logits teacher (finetuned: {onnx: ...} or
    {logits: ...}) reads; `make demo-teachers` makes the demo recipes' files this way.
    """


def _recipe_teacher(recipe_path: Path, task_name: str | None, work: Path | None):
    """The checkpoint teacher of RECIPE's task (the only one, or --task), its data rendered or
    read into ``work``."""
    from .pipeline.recipe import load_recipe
    from .pipeline.teacher_files import checkpoint_teacher

    recipe = load_recipe(recipe_path)
    tasks = {task.name: task for task in recipe.tasks}
    if task_name is None and len(tasks) > 1:
        raise InputError(f"recipe {recipe_path} has {len(tasks)} tasks; name one with --task ({', '.join(tasks)})")
    if task_name is not None and task_name not in tasks:
        raise InputError(f"recipe {recipe_path} has no task '{task_name}' (its tasks: {', '.join(tasks)})")
    task = tasks[task_name] if task_name is not None else recipe.tasks[0]
    return checkpoint_teacher(recipe, task, work, _progress(), lambda line: click.echo(line, err=True))


def _teacher_options(func):
    func = click.option("--work", type=click.Path(path_type=Path),
                        help="Where a demo task's images and the teacher's caches go (default: a temporary "
                             "directory, removed afterwards).")(func)
    func = click.option("--task", "task_name", help="The task of a bank recipe.")(func)
    func = click.option("--out", required=True, type=click.Path(path_type=Path), help="The file to write.")(func)
    return click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))(func)


def _in_work_dir(work: Path | None, body):
    import tempfile

    if work is not None:
        return body(work)
    with tempfile.TemporaryDirectory(prefix="transmiter-teacher-") as scratch:
        return body(Path(scratch))


@teacher_group.command("onnx")
@_teacher_options
def teacher_onnx(recipe_path, out, task_name, work):
    """RECIPE's teacher as an ONNX classifier: OUT (.onnx, pixels -> task logits) and OUT.json
    beside it (its preprocessing, classes and sha256), checked on ONNX Runtime first.

    \b
    Example:
      transmiter teacher onnx export/recipes/demo.yaml --out export/teachers/demo-teacher.onnx
    """
    from .pipeline.teacher_files import export_onnx_teacher

    difference = _in_work_dir(work, lambda where: export_onnx_teacher(_recipe_teacher(recipe_path, task_name, where), out))
    click.echo(f"wrote {out} and {out}.json (max abs vs PyTorch {difference:.2e})")


@teacher_group.command("logits")
@_teacher_options
def teacher_logits(recipe_path, out, task_name, work):
    """RECIPE's teacher's task logits on every image of its data: OUT (.safetensors or .npy, N x K)
    and OUT.json beside it, the image of each row (split, relative path, sha256).

    \b
    Example:
      transmiter teacher logits export/recipes/demo.yaml --out export/teachers/demo-teacher-logits.safetensors
    """
    from .pipeline.teacher_files import write_teacher_logits

    rows = _in_work_dir(work, lambda where: write_teacher_logits(_recipe_teacher(recipe_path, task_name, where), out,
                                                                 where, progress=_progress()))
    click.echo(f"wrote {out} ({rows} images) and {out}.json")


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps the toolkit's errors to one stderr line and an exit status."""
    try:
        result = cli.main(args=argv, prog_name="transmiter", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Abort:
        click.echo("transmiter: aborted", err=True)
        return 130
    except click.ClickException as exc:
        # click's own report is four lines (usage, hint, blank, error): one line, like every other
        command = getattr(getattr(exc, "ctx", None), "command_path", None)
        hint = f" (see '{command} -h')" if command else ""
        click.echo(f"transmiter: error: {one_line(exc.format_message())}{hint}", err=True)
        return 2
    except TransmiterError as exc:
        if _STATE["debug"]:
            traceback.print_exc()
        click.echo(f"transmiter: error: {one_line(str(exc))}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("transmiter: interrupted", err=True)
        return 130
    except OSError as exc:
        # what the artifact writers did not already name: a full disk or a file-size limit hit by a
        # library's own temporary files (exit 5), or a path the system refuses (exit 2)
        if _STATE["debug"]:
            traceback.print_exc()
        if exc.errno in WRITE_ERRNOS:
            failure = write_failure(exc, str(exc.filename or "an output"))
            click.echo(f"transmiter: error: {one_line(str(failure))}", err=True)
            return failure.exit_code
        if exc.filename is None:
            return _internal_error(exc, argv)
        click.echo(f"transmiter: error: {one_line(f'cannot use {exc.filename}: {exc.strerror or exc}')}", err=True)
        return InputError.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line: a library's failure is one line too
        return _internal_error(exc, argv)


def _internal_error(exc: BaseException, argv: list[str] | None) -> int:
    """Anything the toolkit did not anticipate (a converter, a quantiser, a runtime failing on an
    unusual graph): one line naming the step or command it happened in, exit 1; --debug adds the
    traceback."""
    if _STATE["debug"]:
        traceback.print_exc()
    args = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in args if arg in cli.commands), None)
    step = getattr(exc, STEP_ATTRIBUTE, None)
    where = " ".join(part for part in (f"step {step} of" if step else "", f"transmiter {command}" if command else
                                       "transmiter") if part)
    click.echo(f"transmiter: internal error in {where}: {type(exc).__name__}: {one_line(str(exc))} "
               "(run with --debug for the traceback)", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
