"""PyTorch modules traced to ONNX graphs: the exporter, onnxslim on the structure, the full check.

The TorchScript exporter (``dynamo=False``) is used: it needs no extra packages, and every
export verifies its dynamic batch axis by running batches of two sizes (deploy/onnx_export.py).
A large tower's graph is written as traced (:func:`export_graph`), its weights copied from the
trace's data file a tensor at a time (``runtimes/onnx_files.py``), never in memory beside the
PyTorch tower's.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx
import torch

from ..errors import WRITE_ERRNOS, InputError, write_failure
from ..host import release_freed_memory
from ..runtimes.onnx_files import check_full, external_weights_as_inputs, save_graph, weights_apart

DEFAULT_OPSET = 17


def to_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
            opset: int, what: str, work_dir: Path | None = None) -> onnx.ModelProto:
    """Trace to ONNX with a dynamic batch axis, simplify with onnxslim, check fully; the graph in
    memory, with its tensors (:func:`export_graph` writes a large one without holding them)."""
    with _traced(module, example, input_name, output_name, opset, what, work_dir) as (model, data_dir):
        onnx.external_data_helper.load_external_data_for_model(model, str(data_dir))
    return model


def export_graph(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                 opset: int, what: str, path: Path, external_data_threshold: int | None = None) -> list[str]:
    """:func:`to_onnx` written to ``path`` as :func:`save_graph` writes it (external data past the
    threshold, the load probe), the weights copied from the trace's data file one tensor at a time:
    a large tower's graph never has its weights in memory beside the PyTorch tower's."""
    with _traced(module, example, input_name, output_name, opset, what, Path(path).parent) as (model, data_dir):
        return save_graph(model, path, external_data_threshold, data_dir=data_dir)


@contextmanager
def _traced(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str, opset: int,
            what: str, work_dir: Path | None) -> Iterator[tuple[onnx.ModelProto, Path]]:
    """The traced, simplified and checked graph's structure, and the directory of the data file its
    tensors are in (a temporary directory, gone when the context exits).

    The exporter writes into a file in a temporary directory rather than a buffer: past 2 GiB it
    can only write external data, and only beside a file. An export passes its staging directory
    as ``work_dir``, so the trace takes room on the artifact's own disk (not /tmp, often smaller)
    and a full disk is reported against the artifact (exit 5)."""
    import onnxslim

    with tempfile.TemporaryDirectory(prefix=".trace-", dir=work_dir) as work:
        traced = Path(work) / "traced.onnx"
        try:
            # Under no_grad, nn.MultiheadAttention takes a fused fast path
            # (aten::_native_multi_head_attention) that has no ONNX symbolic: the fast path is
            # switched off rather than tracing with grad mode on, which records for a backward pass.
            with warnings.catch_warnings(), torch.no_grad(), _mha_fast_path(False):
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    module, (example,), str(traced), dynamo=False, opset_version=opset,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:  # the trace's own file: a full disk, not an untraceable model
                raise write_failure(exc, str(work_dir or traced.parent)) from exc
            raise InputError(f"cannot export {what} to ONNX: {exc}") from exc
        except Exception as exc:  # the exporter raises many types; all mean "cannot trace this"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot export {what} to ONNX: {first}") from exc
        release_freed_memory()  # the exporter's own copies of the weights
        structure, data_dir = weights_apart(traced, Path(work))
        model = slimmed_or_as_traced(structure, onnxslim.slim, f"onnxslim {onnxslim.__version__}", what)
        del structure
        # checked as a structure beside its data file: the checker reads the graph from the path
        # and never the weights (in memory, it would hold the serialised graph twice more)
        checked = data_dir / f".checked-{uuid.uuid4().hex}.onnx"
        try:
            onnx.save_model(model, str(checked))
            check_full(checked, f"exported {what}")
        finally:
            checked.unlink(missing_ok=True)
        yield model, data_dir


def slimmed_or_as_traced(structure: onnx.ModelProto, slim: Callable, library: str, what: str) -> onnx.ModelProto:
    """:func:`_slim_structure`, or, where the optimisation pass fails, the graph as traced with one
    warning line naming the pass, its version and the graph: a pass only simplifies (the export is
    judged by parity either way), so its failure must not stop the export. Seen: onnxslim's ConvMul
    fusion reads a Conv's weight values, which are graph inputs here, on MobileCLIP's towers."""
    attempt = onnx.ModelProto()
    attempt.CopyFrom(structure)  # the pass may have changed its input before it failed: the structure holds no weights
    try:
        return _slim_structure(attempt, slim)
    except Exception as exc:  # noqa: BLE001 (any failure of an optional pass: skipped, named)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logging.getLogger(__name__).warning(f"warning: {library} failed on {what} ({type(exc).__name__}: {reason}); "
                                            "exported without it")
        return structure


def _slim_structure(structure: onnx.ModelProto, slim: Callable) -> onnx.ModelProto:
    """onnxslim on a graph whose external tensors are graph inputs for the time of the call.

    onnxslim copies every weight into its own graph representation (5.7x the weights' size at
    its peak, measured on ViT-B-16) and reads the values of the Constants it inspects. Weights
    presented as inputs of fixed shape are neither copied nor read, and any rewrite onnxslim makes
    around them holds whatever their values are; the shape arithmetic it exists to fold uses small
    tensors, which stay in the graph. (The exporter's own constant folding has already folded the
    weights' transposes.)"""
    weights = external_weights_as_inputs(structure)
    names = {tensor.name for tensor in weights}
    slimmed = slim(structure)
    used = {name for node in slimmed.graph.node for name in node.input}
    inputs = [value for value in slimmed.graph.input if value.name not in names]
    del slimmed.graph.input[:]
    slimmed.graph.input.extend(inputs)
    slimmed.graph.initializer.extend(tensor for tensor in weights if tensor.name in used)
    return slimmed


@contextmanager
def _mha_fast_path(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
