"""The feature cache built on a Ray cluster (``transmiter cache --engine ray``, ``data.engine: ray``).

The same cache as :func:`.cache.build_cache`, file for file: Ray Data reads the image list,
decodes, hashes and preprocesses the images in tasks, and encodes them in a pool of actors that
each build their own model from a :class:`~.models.ModelSpec` (weights never travel pickled).
The driver receives the encoded batches in dataset order and hands them to the same
:class:`~.cache.CacheWriter` as the local engine, inside the same atomic directory, so a failure
or a killed driver leaves the previous cache intact and nothing half-written.

Order: ``DataContext.execution_options.preserve_order = True``, so batches reach the driver in
dataset order and the driver streams them into shards as they come (memory bounded by what Ray
has in flight, not by the dataset; carrying the row index and sorting at the end would hold the
whole dataset's features on the driver). The price is that a slow batch holds back the ones
behind it. Every row also carries its index, and the driver checks that the indices arrive as
0, 1, 2, ... - a lost or duplicated image (a retried batch delivered twice) is an error, never a
silently shifted cache.

Fingerprint: each decoding task hashes the bytes of its files (the expensive part, in parallel);
the driver combines the hashes with the relative paths and labels in dataset order, exactly as
the local engine does, so the two engines give the same fingerprint.

Errors: a file that does not decode (or a model a worker cannot load) travels back to the driver
as a row carrying the toolkit's one-line message, which the driver raises (Ray itself would keep
only a traceback as text); a cluster that fails beyond its retries is one DependencyError line.

Fault tolerance: an encoding actor that dies (a lost node, an out-of-memory kill) is restarted
up to ``ACTOR_RESTARTS`` times and its unfinished batches are retried on it. The actors are
:class:`ImageEncoder` objects, or those of a subclass given as ``encoder_class`` (the tests give
one that dies mid-run, tests/test_distributed_cache.py).

Ray's own output: while Ray starts, runs a cache and stops, what it writes to this process's
stderr (its Python logger's warnings, such as the token-authentication notice, and the lines of
its C++ core worker, such as the one about actor constructor arguments) goes into one log file
per process, ``transmiter-ray-*.log`` in the system's temporary directory (:func:`ray_log_path`),
not onto the terminal; the driver's progress bar still reaches it. ``transmiter cache`` and
``transmiter export`` print the file's location after a Ray run unless ``--quiet``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import atomic_directory, utc_now
from ..errors import DependencyError, InputError, TransmiterError, VerificationError
from .cache import MANIFEST, CacheWriter
from .datasets import ImageDataset, decode_image
from .models import ModelSpec, architecture_config, load_model, register_architecture_config

EXTRA = "distributed"  # pip install 'transmiter-deploy[distributed]'
CONNECT_TIMEOUT_S = 10.0  # an address that does not answer within this is unreachable
ACTOR_RESTARTS = 3  # a dying encoding actor is restarted this often, its batches retried as often
# Ray's CPU counts are logical: an encoding actor counts as 3/4 of a CPU and a decoding task as
# 1/4, so N actors on N CPUs (the default) leave room for decoding beside them instead of
# starving the tasks that feed them.
ACTOR_CPUS = 0.75
DECODE_CPUS = 0.25
RAY_LOG_PREFIX = "transmiter-ray-"  # the log file of Ray's own output: <temp dir>/transmiter-ray-*.log


@dataclass(frozen=True)
class RayCacheSettings:
    """Where and how wide: ``address`` of a running cluster (None: start a local one, or use the
    cluster this process has already joined), ``workers`` encoding actors (None: one per CPU of
    the cluster, or one per ``gpus_per_worker`` GPUs), each given ``gpus_per_worker`` GPUs."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0

    def validate(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise InputError(f"Ray workers must be a positive number, got {self.workers}")
        if not self.gpus_per_worker >= 0:
            raise InputError(f"GPUs per Ray worker must be 0 or more, got {self.gpus_per_worker}")
        if self.address is not None and not self.address.strip():
            raise InputError("Ray address is empty")


def import_ray():
    """The ``ray`` module, or a DependencyError naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DependencyError(
            f"the ray engine needs Ray Data: pip install 'transmiter-deploy[{EXTRA}]'"
        ) from exc
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in bounded time when nothing answers at ``address`` (``ray.init`` itself would keep
    retrying for minutes). ``auto`` (the cluster started on this machine) is left to Ray."""
    if address == "auto":
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address '{address}' is not HOST:PORT (or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DependencyError(f"cannot reach the Ray cluster at {address}: {reason}") from exc


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Joined to the cluster at ``address`` (None: a local one started here) for the block; a
    cluster this process had joined already is used as it is and left running. What Ray writes
    while it starts and stops goes to :func:`ray_log_path`."""
    ray = import_ray()
    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    where = address or "a new local cluster"
    try:
        # log_to_driver=False: the workers' output stays in their own files of Ray's session logs
        with ray_output_in_log(f"joining {where}"):
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"cannot join the Ray cluster at {where}: {first}") from exc
    try:
        yield ray
    finally:
        with ray_output_in_log(f"leaving {where}"):
            ray.shutdown()


class _RayLog:
    """This process's log file of Ray's output (created on first use) and how deep the
    redirection into it is nested."""

    path: Path | None = None
    depth: int = 0
    terminal: TextIO | None = None
    written: bool = False  # since ray_log_written() last looked


_RAY_LOG = _RayLog()


def ray_log_path() -> Path | None:
    """The file Ray's own output of this process went to, or None when no Ray run wrote one."""
    return _RAY_LOG.path


def ray_log_written() -> Path | None:
    """:func:`ray_log_path` if Ray wrote to it since the last call (None otherwise): for a command
    that names the log of its own run only."""
    written, _RAY_LOG.written = _RAY_LOG.written, False
    return _RAY_LOG.path if written else None


def _open_ray_log() -> int | None:
    """The log file for appending (made on first use, or again when it has gone, e.g. removed by
    a cleaner of the temporary directory; private to this user: mkstemp), or None when it cannot
    be made, in which case Ray's output stays where it was: a cache never fails for its log."""
    try:
        if _RAY_LOG.path is not None:
            try:
                return os.open(_RAY_LOG.path, os.O_WRONLY | os.O_APPEND)
            except FileNotFoundError:
                pass
        handle, name = tempfile.mkstemp(prefix=RAY_LOG_PREFIX, suffix=".log")
        os.close(handle)
        _RAY_LOG.path = Path(name)
        return os.open(name, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None


@contextmanager
def ray_output_in_log(what: str) -> Iterator[TextIO]:
    """For the block, Ray's output goes into :func:`ray_log_path` instead of stderr: the records of
    Python's ``ray`` logger, and everything written to file descriptor 2 (Ray's C++ core worker
    writes there directly, below Python). Yields the stream a progress bar should use to still
    reach the terminal. Nested blocks share the outer one's redirection."""
    if _RAY_LOG.depth:
        _RAY_LOG.depth += 1
        try:
            yield _RAY_LOG.terminal
        finally:
            _RAY_LOG.depth -= 1
        return
    target = _open_ray_log()
    saved = None
    if target is not None:
        try:
            os.write(target, f"--- {utc_now()} {what} (pid {os.getpid()})\n".encode())
            saved = os.dup(2)
        except OSError:
            os.close(target)
    if saved is None:  # no log to be had: Ray's output stays where it was
        yield sys.stderr
        return
    ray_logger = logging.getLogger("ray")
    handlers, propagate = list(ray_logger.handlers), ray_logger.propagate
    file_handler = terminal = None
    try:
        file_handler = logging.StreamHandler(os.fdopen(os.dup(target), "a", encoding="utf-8",
                                                       errors="backslashreplace"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- "
                                                    "%(message)s"))
        terminal = _terminal_stream(saved)
        _flush(sys.stdout, sys.stderr)  # what was written before the block stays where it was going
        os.dup2(target, 2)
        ray_logger.handlers, ray_logger.propagate = [file_handler], False
        _RAY_LOG.depth, _RAY_LOG.terminal, _RAY_LOG.written = 1, terminal, True
        yield terminal
    finally:
        _RAY_LOG.depth, _RAY_LOG.terminal = 0, None
        _flush(sys.stderr)  # what Python wrote to fd 2 in the block belongs to the log
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)
        ray_logger.handlers, ray_logger.propagate = handlers, propagate
        if file_handler is not None:
            file_handler.close()
        if terminal is not None and terminal is not sys.stderr:
            terminal.close()


def _flush(*streams) -> None:
    for stream in streams:
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _terminal_stream(saved_fd: int) -> TextIO:
    """Where stderr writes went before the redirection: a stream on the saved descriptor when
    ``sys.stderr`` is file descriptor 2, else ``sys.stderr`` itself (a stream the redirection
    does not touch, such as a test's capture)."""
    try:
        on_fd_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd_2 = False
    if not on_fd_2:
        return sys.stderr
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                     errors="backslashreplace")


def _decode_batch(batch: dict[str, np.ndarray], preprocess: Callable, pixel_shape: tuple[int, ...]
                  ) -> dict[str, np.ndarray]:
    """Ray task: read, hash, decode and preprocess a batch of files. A file that does not decode
    becomes a row carrying the error message (Ray Data would keep only a traceback as text): the
    driver raises it, naming the file, when the row reaches it."""
    pixels, digests, errors = [], [], []
    for path in batch["path"]:
        try:
            image, digest = decode_image(Path(str(path)))
        except InputError as exc:
            pixels.append(np.zeros(pixel_shape, dtype=np.float32))
            digests.append("")
            errors.append(str(exc))
            continue
        pixels.append(preprocess(image).numpy())
        digests.append(digest)
        errors.append("")
    return {"index": batch["index"], "pixels": np.stack(pixels), "sha256": np.asarray(digests),
            "error": np.asarray(errors)}


class ImageEncoder:
    """Ray actor: one model per actor, built here from its spec; encodes preprocessed batches.
    :func:`build_cache_ray` builds each actor as ``encoder_class(spec, architecture, threads)``
    and calls it on every batch of preprocessed pixels; a subclass may change what happens around
    that (a test's makes an actor die mid-run), not the features."""

    def __init__(self, spec: ModelSpec, architecture: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(threads)
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.error = ""
        try:
            register_architecture_config(spec.name, architecture)
            self.model = load_model(spec, device=self.device)
        except TransmiterError as exc:
            # a checkpoint missing on this node, say: raised here, Ray would report an actor that
            # died in its constructor, not why; the driver raises it from the first batch's rows
            self.error = str(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error:
            rows = len(batch["index"])
            return {"index": batch["index"], "features": np.zeros((rows, 0), np.float32),
                    "sha256": batch["sha256"], "error": np.full(rows, self.error)}
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        features = self.model.encode_images(pixels).cpu().numpy()
        return {"index": batch["index"], "features": features, "sha256": batch["sha256"], "error": batch["error"]}


@contextmanager
def _in_order(ray) -> Iterator[None]:
    """Ray Data delivers batches in dataset order for the block (its default lets a fast task
    overtake a slow one) and keeps its progress bars and execution log to itself (the driver's
    bar counts images; failures come back as exceptions); the process's previous settings come
    back afterwards."""
    context = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    previous = context.execution_options.preserve_order, context.enable_progress_bars, data_log.level
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    data_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars, level = previous
        data_log.setLevel(level)


def _default_workers(ray, settings: RayCacheSettings) -> int:
    resources = ray.cluster_resources()
    if settings.gpus_per_worker > 0:
        workers = int(resources.get("GPU", 0) // settings.gpus_per_worker)
        if workers < 1:
            raise DependencyError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs; "
                                  f"an encoding worker asks for {settings.gpus_per_worker:g}")
        return workers
    return max(1, int(resources.get("CPU", 1)))


def build_cache_ray(
    spec: ModelSpec,
    dataset: ImageDataset,
    out_dir: Path,
    settings: RayCacheSettings = RayCacheSettings(),
    batch_size: int = 64,
    shard_size: int = 8192,
    progress: bool = True,
    encoder_class: type[ImageEncoder] = ImageEncoder,
) -> Path:
    """Encode every image once on a Ray cluster and write the cache atomically (the same files
    as :func:`.cache.build_cache`). ``encoder_class``: the actors' class, :class:`ImageEncoder` or
    a subclass of it. Ray's own output of the run goes to :func:`ray_log_path`."""
    if batch_size < 1 or shard_size < 1:
        raise InputError("batch size and shard size must be positive")
    if not (isinstance(encoder_class, type) and issubclass(encoder_class, ImageEncoder)):
        raise InputError(f"the Ray engine's encoder must be ImageEncoder or a subclass of it, got {encoder_class!r}")
    settings.validate()
    out_dir = Path(out_dir)
    import_ray()  # what is missing, or does not answer, is one line before any log is opened
    if settings.address is not None:
        check_reachable(settings.address)
    with ray_output_in_log(f"caching {dataset.root} into {out_dir}") as terminal, \
            ray_cluster(settings.address) as ray, _in_order(ray):
        # the driver reads the model's identity and preprocessing; the actors load their own copies
        model = load_model(spec)
        architecture = architecture_config(spec.name)
        batches = max(1, -(-len(dataset) // batch_size))
        # no more actors than batches: one with no batch to encode would only load the model (seconds
        # each, and Ray warns that the pool cannot be used)
        workers = min(settings.workers or _default_workers(ray, settings), batches)
        images = ray.data.from_items(
            [{"index": index, "path": str(record.path)} for index, record in enumerate(dataset.records)],
            override_num_blocks=min(batches, 4 * workers),
        )
        pixel_shape = (3, *model.preprocess_config["image_size"])
        decoded = images.map_batches(_decode_batch, fn_kwargs={"preprocess": model.preprocess, "pixel_shape": pixel_shape},
                                     batch_size=batch_size, batch_format="numpy", num_cpus=DECODE_CPUS)
        gpus = settings.gpus_per_worker
        with warnings.catch_warnings():  # Ray 2.60 deprecates these keywords with no replacement yet
            warnings.simplefilter("ignore", DeprecationWarning)
            encoded = decoded.map_batches(
                encoder_class,
                fn_constructor_args=(spec, architecture, 1),  # one torch thread per actor: one actor per CPU
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=1 if gpus else ACTOR_CPUS,
                num_gpus=gpus or None,
                # Ray Data's own default is to restart forever: bounded, a batch that kills every
                # actor it reaches (out of memory) fails the cache instead of looping
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_RESTARTS,
            )
        with atomic_directory(out_dir, MANIFEST) as staging:
            writer = CacheWriter(staging, dataset, shard_size, model.identity)
            bar = tqdm(total=len(dataset), desc=f"image tower {model.identity.name} (ray, {workers} workers)",
                       unit="img", disable=not progress, file=terminal)
            try:
                with bar:
                    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                        indices = batch["index"]
                        failed = [str(error) for error in batch["error"] if error]
                        if failed:  # a file that does not decode, a model a worker cannot load
                            raise InputError(failed[0])
                        if not np.array_equal(indices, np.arange(writer.rows, writer.rows + len(indices))):
                            raise VerificationError(
                                f"the Ray engine delivered images out of order or twice: expected rows from "
                                f"{writer.rows}, got {indices[:3].tolist()}...; nothing was written")
                        writer.append(torch.from_numpy(np.array(batch["features"], dtype=np.float32)),
                                      [str(digest) for digest in batch["sha256"]])
                        bar.update(len(indices))
            except ray.exceptions.RayError as exc:  # a node lost for good, an actor past its restarts
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DependencyError(f"the Ray cluster failed while caching {dataset.root}: {first}") from exc
            writer.finish(model.preprocess_config)
    return out_dir


__all__ = ["RayCacheSettings", "ImageEncoder", "build_cache_ray", "import_ray", "check_reachable", "ray_cluster",
           "ray_output_in_log", "ray_log_path", "ray_log_written", "EXTRA"]
